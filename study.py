"""The original project's whole experiment in one resumable command: endpoints for every loss and
init scheme, curves between every pair of inits, their checks and evaluations, and a results table.

    python study.py --dir runs/study --preset tiny            # CPU, minutes, built-in faces
    python study.py --dir runs/study --preset small --lpips   # the demo's size
    python study.py --dir runs/study --preset paper --data_path data --device cuda   # CelebA, a GPU
    python study.py --dir runs/study --preset paper --print_commands   # for a cluster's scheduler

Every stage is a command line of the project's own scripts (train.py, check_ends.py,
eval_curve.py, plane.py), run in dependency order. A finished stage (its result file present with
the SHA-256 recorded in <dir>/study.json) is skipped, an interrupted training resumes from its
checkpoint-last.pt, and rerunning the same command after a stop or a kill finishes the study
without redoing anything. A setting changed since a stage ran is refused (its result would be
stale). At the end: <dir>/results.md, results.csv and loss_grid.png.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
import time

from aemc import architectures, distributed, studies, study_tables
from aemc.cli import ArgParser, positive, run_cli
from aemc.errors import Interrupted, UserError
from aemc.losses import LOSSES
from models.autoencoder import INITS, NORMS
from models.curves import curve_name

ROOT = os.path.dirname(os.path.abspath(__file__))


def names(allowed, what):
    def parse(text):
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                                             f"choose from {', '.join(allowed)}")
        return chosen
    parse.__name__ = what
    return parse


def numbers(kind):
    def parse(text):
        try:
            return tuple(kind(n) for n in text.split(",") if n.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    parse.__name__ = "numbers"
    return parse


def get_args_parser():
    p = ArgParser("study.py", description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="the study's folder (stages, study.json, results)")
    p.add_argument("--preset", choices=tuple(studies.PRESETS), required=True,
                   help="tiny (CPU, minutes), small (the demo's size), paper (the original's, CelebA, a GPU): the "
                        "init x loss grid; width: barriers against width; instability: the barrier between copies "
                        "spawned at epoch K against K")
    p.add_argument("--widths", type=numbers(int), default=None, help="width preset: the base widths (8,16,32,64)")
    p.add_argument("--spawn_epochs", type=numbers(int), default=None,
                   help="instability preset: the epochs to spawn copies at (0,1,2,4,6)")
    p.add_argument("--losses", type=names(LOSSES, "loss"), default=None,
                   help="(mae,laplacian; width, instability: mae)")
    p.add_argument("--inits", type=names(INITS, "init"), default=None,
                   help=f"({','.join(INITS)}; width, instability: normal)")
    p.add_argument("--curve", type=curve_name, default="Bezier")
    p.add_argument("--num_bends", type=positive(int), default=3)
    p.add_argument("--plane", action="store_true", help="also the loss plane of every curve")
    p.add_argument("--align", action="store_true", help="also every segment with its end aligned to its start")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None,
                   help="LPIPS in the evaluations (preset: on for small and paper)")
    p.add_argument("--print_commands", action="store_true", help="print the stages' command lines, run nothing")
    g = p.add_argument_group("overrides of the preset")
    for name, kind in (("epochs", positive(int)), ("curve_epochs", positive(int)), ("num_points", positive(int)),
                       ("grid_points", positive(int)), ("max_images", positive(int)), ("batch_size", positive(int)),
                       ("in_filters", positive(int)), ("latent_dim", positive(int)), ("lr", positive(float)),
                       ("num_workers", int), ("dataset", str), ("data_path", str), ("device", str),
                       ("image_size", positive(int)), ("channels", int), ("beta", float)):
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--arch", default=None, help="the model (train.py --arch; default conv, the original's)")
    g.add_argument("--arch_kwargs", default=None, help="its arguments as a JSON object (train.py --arch_kwargs)")
    g.add_argument("--norm", choices=NORMS, default=None)
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default=None)
    for name in ("channels_last", "compile", "no_gpu_data"):
        g.add_argument(f"--{name}", action="store_true")
    return p


def settings_from(args):
    """The preset's StudySettings, with every flag given on the command line in place of its value."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(studies.StudySettings)
                 if getattr(args, f.name, None) is not None}
    overrides.update({k: tuple(v) for k, v in overrides.items() if isinstance(v, list)})
    settings = dataclasses.replace(studies.PRESETS[args.preset], **overrides)
    if settings.kind == "grid" and len(settings.inits) < 2:
        raise UserError("--inits needs at least two init schemes: a curve joins two of them")
    return settings


def main(args):
    distributed.refuse_several("study.py")
    settings = settings_from(args)
    architectures.allow(settings.arch)
    stages = studies.plan(args.dir, settings)
    if args.print_commands:
        for stage in stages:
            print(stage.command(os.path.relpath(ROOT)))
        return {"stages": stages}
    os.makedirs(args.dir, exist_ok=True)
    state = studies.StudyState(args.dir)
    started = time.time()
    for number, stage in enumerate(stages, start=1):
        status = state.check(stage)
        if status == "done":
            print(f"[{number}/{len(stages)}] {stage.name}: done, kept")
            continue
        argv = stage.argv + (["--resume", stage.resume] if status == "resume" else [])
        print(f"[{number}/{len(stages)}] {stage.name}: {'resuming' if status == 'resume' else 'running'} "
              f"python {' '.join(argv)}", flush=True)
        state.started(stage)
        code = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]]).returncode
        if code == 130:
            raise Interrupted(f"interrupted in stage '{stage.name}'; rerun the same command to continue")
        if code != 0:
            raise UserError(f"stage '{stage.name}' failed (exit {code}; its message is above); finished stages "
                            "are kept: fix the cause and rerun the same command")
        state.finished(stage)
    rows = study_tables.results(args.dir, settings)
    files = study_tables.write_tables(args.dir, rows)
    files["figure"] = study_tables.write_figure(args.dir, settings, rows)
    print(open(files["md"]).read())
    print(f"study done in {time.time() - started:.0f}s: " + ", ".join(files.values()))
    return {"stages": stages, "rows": rows, "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
