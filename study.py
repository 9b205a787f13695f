"""The original project's whole experiment in one resumable command: endpoints for every loss and
init scheme, curves between every pair of inits, their checks and evaluations, and a results table.

    python study.py --dir runs/study --preset tiny            # CPU, minutes, built-in faces
    python study.py --dir runs/study --preset small --lpips   # 4,000 built-in faces, 16 filters
    python study.py --dir runs/study --preset paper --data_path data --device cuda   # CelebA, a GPU
    python study.py --dir runs/study --preset paper --print_commands   # for a cluster's scheduler
    python study.py --dir runs/symmetry --preset symmetry   # is the segment's ridge only a symmetry?

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
import time

from aemc import architectures, distributed, scheduling, studies, study_tables, tracking
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.errors import UserError
from aemc.files import make_folder
from aemc.losses import LOSSES
from models.autoencoder import INITS, NORMS
from models.curves import curve_name
from utils import tracking_settings

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
    p = ArgParser("study.py", description=description(__doc__))
    p.add_argument("--dir", required=True, help="the study's folder (stages, study.json, results)")
    p.add_argument("--preset", choices=tuple(studies.PRESETS), required=True,
                   help="tiny (CPU, minutes), small (4,000 built-in faces, 16 filters, 8 + 8 epochs), paper (the "
                        "original's, CelebA, a GPU): the init x loss grid; width: barriers against width; "
                        "instability: the barrier between copies spawned at epoch K against K; symmetry: the "
                        "segment after every way of undoing the permutation symmetry, with and without REPAIR, "
                        "stitching and layer-wise barriers per layer")
    p.add_argument("--widths", type=numbers(int), default=None, help="width preset: the base widths (8,16,32,64)")
    p.add_argument("--spawn_epochs", type=numbers(int), default=None,
                   help="instability preset: the epochs to spawn copies at (0,1,2,4,6)")
    p.add_argument("--pairs", type=positive(int), default=None,
                   help="width, instability, symmetry: independent pairs of endpoints (or parent runs) per row, "
                        "each with its own seeds; tables give the mean, the standard deviation and paired "
                        "differences with a 95%% t interval over them (preset: 3)")
    p.add_argument("--losses", type=names(LOSSES, "loss"), default=None,
                   help="(mae,laplacian; width, instability: mae)")
    p.add_argument("--inits", type=names(INITS, "init"), default=None,
                   help=f"({','.join(INITS)}; width, instability: normal)")
    p.add_argument("--curve", type=curve_name, default="Bezier", help="the curves' kind: Bezier or PolyChain (Bezier)")
    p.add_argument("--num_bends", type=positive(int), default=3, help="the curves' bends, ends included (3)")
    p.add_argument("--plane", action="store_true", help="also the loss plane of every curve")
    p.add_argument("--align", action="store_true", help="also every segment with its end aligned to its start")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=None,
                   help="LPIPS in the evaluations (preset: on for small and paper)")
    p.add_argument("--print_commands", action="store_true", help="print the stages' command lines, run nothing")
    g = p.add_argument_group("where the stages run (docs/distributed.md)")
    g.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: on this machine; slurm: a SLURM job per stage, with the stages it reads as "
                        "dependencies (through submitit)")
    g.add_argument("--max_parallel", type=positive(int), default=1,
                   help="local: stages at once (1: one after another, output in this terminal)")
    g.add_argument("--no_wait", action="store_true", help="slurm: submit and exit (rerun later to record and tabulate)")
    for name, kind, what in (("partition", str, "partition"), ("gpus_per_node", positive(int), "GPUs per job "
                             "(training and evaluation stages run under torchrun on all of them)"),
                             ("time", positive(int), "time limit per job, minutes"),
                             ("cpus_per_task", positive(int), "CPUs per job"),
                             ("mem_gb", positive(int), "memory per job, GB"),
                             ("account", str, "account"), ("qos", str, "quality of service")):
        g.add_argument(f"--slurm_{name}", type=kind, default=None, help=what)
    g = p.add_argument_group("overrides of the preset")
    for name, kind in (("epochs", positive(int)), ("curve_epochs", positive(int)), ("num_points", positive(int)),
                       ("grid_points", positive(int)), ("max_images", positive(int)), ("batch_size", positive(int)),
                       ("in_filters", positive(int)), ("latent_dim", positive(int)), ("lr", positive(float)),
                       ("num_workers", int), ("dataset", str), ("data_path", str), ("device", str),
                       ("image_size", positive(int)), ("channels", int), ("beta", float)):
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--ste_steps", type=positive(int), default=None,
                   help="symmetry: steps of the straight-through estimator (100)")
    g.add_argument("--latent_map", choices=("orthogonal", "linear"), default=None,
                   help="symmetry: the map of the latent folded into the end before weight matching (orthogonal)")
    g.add_argument("--stitch_map", choices=("identity", "permutation", "orthogonal", "affine"), default=None,
                   help="symmetry: the map stitching fits at every layer (affine)")
    g.add_argument("--arch", default=None, help="the model (train.py --arch; default conv, the original's)")
    g.add_argument("--arch_kwargs", default=None, help="its arguments as a JSON object (train.py --arch_kwargs)")
    g.add_argument("--norm", choices=NORMS, default=None)
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default=None)
    for name in ("channels_last", "compile", "no_gpu_data"):
        g.add_argument(f"--{name}", action="store_true")
    tracking.add_tracking_args(p)
    return p


def settings_from(args):
    """The preset's StudySettings, with every flag given on the command line in place of its value."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(studies.StudySettings)
                 if getattr(args, f.name, None) is not None}
    overrides.update({k: tuple(v) for k, v in overrides.items() if isinstance(v, list)})
    settings = dataclasses.replace(studies.PRESETS[args.preset], **overrides)
    if settings.kind == "grid" and settings.pairs != 1:
        raise UserError(f"--pairs: the {args.preset} preset pairs init schemes (--inits); --pairs is for the width, "
                        "instability and symmetry presets")
    symmetry_only = [f"--{name}" for name in ("ste_steps", "latent_map", "stitch_map")
                     if getattr(args, name) is not None]
    if symmetry_only and settings.kind != "symmetry":
        raise UserError(f"{', '.join(symmetry_only)}: only the symmetry preset reads them")
    if settings.kind == "grid" and len(settings.inits) < 2:
        raise UserError("--inits needs at least two init schemes: a curve joins two of them")
    return settings


def slurm_options(args):
    """submitit's SLURM parameters from the --slurm_* flags given."""
    options = {name: getattr(args, f"slurm_{name}") for name in ("partition", "gpus_per_node", "time",
                                                                 "cpus_per_task", "account", "qos")
               if getattr(args, f"slurm_{name}") is not None}
    if args.slurm_mem_gb is not None:
        options["mem"] = f"{args.slurm_mem_gb}GB"
    return options


def main(args):
    distributed.refuse_several("study.py")
    settings = settings_from(args)
    architectures.allow(settings.arch)
    track = tracking_settings(args)
    if track.wandb:  # the stages and the table in one group: the study's folder name unless given
        track = dataclasses.replace(track, wandb_group=track.wandb_group or os.path.basename(os.path.abspath(args.dir)))
    tracking.check_wandb(track)
    logging = tracking.wandb_flags(track)
    stages = studies.plan(args.dir, settings)
    if args.print_commands:
        for stage in stages:
            print(stage.command(os.path.relpath(ROOT)))
        return {"stages": stages}
    state = studies.StudyState(args.dir, args.preset, stages)  # another preset's folder is refused
    make_folder(args.dir)
    started = time.time()
    number = {stage.name: i for i, stage in enumerate(stages, start=1)}
    todo = {}
    for stage in stages:
        status = state.check(stage)
        if status == "done":
            print(f"[{number[stage.name]}/{len(stages)}] {stage.name}: done, kept")
        else:
            todo[stage.name] = status

    def log(name, message):
        print(f"[{number[name]}/{len(stages)}] {name}: {message}", flush=True)
    if todo and args.executor == "slurm":
        jobs = scheduling.submit_slurm(stages, todo, state, ROOT, slurm_options(args), log=log, tracking=logging)
        if args.no_wait:
            print(f"{len(jobs)} stages submitted to SLURM; rerun the same command (without --no_wait) once they "
                  "have ended to record them and write the table")
            return {"stages": stages, "jobs": jobs}
        scheduling.report_failures(scheduling.wait_slurm(jobs, stages, state, log=log))
    elif todo:
        scheduling.report_failures(scheduling.run_local(stages, todo, state, ROOT, args.max_parallel, log=log,
                                                        tracking=logging))
    rows = study_tables.results(args.dir, settings)
    files = study_tables.write_tables(args.dir, settings, rows)
    files["figure"] = study_tables.write_figure(args.dir, settings, rows)
    if track.wandb:  # the table, in the study's group
        trackers = tracking.open_trackers(track, args.dir, dataclasses.asdict(settings), "study", name="results")
        with open(files["csv"]) as f:
            header, *lines = [line.strip().split(",") for line in f if line.strip()]
        for tracker in trackers:
            tracker.table("results", header, lines)
            tracker.media({"figure": files["figure"]})
        tracking.close(trackers)
    print(open(files["md"]).read())
    print(f"study done in {time.time() - started:.0f}s: " + ", ".join(files.values()))
    return {"stages": stages, "rows": rows, "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
