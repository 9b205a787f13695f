"""Studies as plans of stages, each stage one command line of the project's own scripts, and the
state file that makes a study resumable. Three kinds:

* grid (the original project's experiment): endpoints for every (loss, init), curves between every
  pair of inits, the check of their ends, their evaluation (and planes);
* width (Ainsworth et al.'s width figure, for autoencoders): at every width and for each of
  `pairs` pairs, two endpoints of one init scheme and different seeds, the curve between them, and
  one evaluation of their segment, aligned segment, aligned + REPAIR segment and curve;
* instability (Frankle et al. 2020): `pairs` parent runs that keep a checkpoint per epoch (and their
  initialisation), and for each, at each chosen epoch K, two copies spawned with other data orders,
  trained to the end, and the barrier between them;
* symmetry (aemc.symmetry_study): for each of `pairs` pairs, the segment raw and after every way of
  undoing the permutation symmetry, with and without REPAIR, the curve, and per layer stitching
  and the layer-wise barrier.

The width and instability tables give, over the pairs, each barrier's mean and standard deviation
and the paired differences that compare two paths (or two K) with a t interval (aemc.intervals).

A stage is finished when its output file exists with the SHA-256 recorded when it finished;
finished stages are skipped, an interrupted training resumes from its checkpoint-last.pt, and a
stage whose command or whose inputs changed since it was recorded is refused (its result would
be stale).
"""
import itertools
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Optional

from aemc import reports
from aemc.errors import UserError
from aemc.files import file_digest, output_stem, write_json


@dataclass(frozen=True)
class StudySettings:
    """What a study runs: its kind, the grid (losses x pairs of inits), the widths or the epochs to
    spawn from, the sizes, and what each stage is told. A None is a flag left out of the stages'
    command lines (the scripts' defaults)."""
    kind: str = "grid"                # grid | width | instability | symmetry
    widths: tuple = (8, 16, 32, 64)   # width: the base widths f
    spawn_epochs: tuple = (0, 1, 2, 4)  # instability: the epochs K the copies are spawned at
    pairs: int = 1                    # width, instability, symmetry: independent pairs (seeds) per row
    confidence: float = 0.95          # of the paired differences' t intervals
    arch: Optional[str] = None        # train.py's --arch (None: conv, the original's)
    arch_kwargs: Optional[str] = None  # its --arch_kwargs (JSON)
    norm: Optional[str] = None
    beta: Optional[float] = None      # a VAE's KL weight
    dataset: str = "synthetic"
    data_path: Optional[str] = None
    max_images: Optional[int] = None
    image_size: Optional[int] = None
    channels: Optional[int] = None
    in_filters: Optional[int] = 64   # left out of the stages where the architecture takes none (mlp)
    latent_dim: Optional[int] = 128
    batch_size: int = 64
    lr: float = 1e-4
    epochs: int = 100
    curve_epochs: int = 100
    num_points: int = 21
    grid_points: int = 21
    device: Optional[str] = None
    num_workers: int = 4
    lpips: bool = False
    losses: tuple = ("mae", "laplacian")
    inits: tuple = ("normal", "kaiming_normal", "kaiming_uniform")
    curve: str = "Bezier"
    num_bends: int = 3
    plane: bool = False
    align: bool = False
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    no_gpu_data: bool = False
    ste_steps: int = 100              # symmetry: the straight-through estimator's steps
    latent_map: str = "orthogonal"    # symmetry: the map folded into the latent (align.py --latent)
    stitch_map: str = "affine"        # symmetry: the map stitching fits at every layer (stitch.py --map)


PRESETS = {
    # CPU, minutes, built-in faces: the tests run it
    "tiny": StudySettings(dataset="synthetic", max_images=400, in_filters=4, latent_dim=8, batch_size=32, lr=1e-3,
                          epochs=2, curve_epochs=2, num_points=5, grid_points=5, device="cpu", num_workers=0,
                          lpips=False),
    # CPU, hours: 4,000 built-in faces, 16 filters, 8 + 8 epochs (the demo's size before it was cut to 1,600 images)
    "small": StudySettings(dataset="synthetic", max_images=4000, in_filters=16, latent_dim=64, batch_size=64,
                           lr=1e-3, epochs=8, curve_epochs=8, num_points=11, grid_points=11, num_workers=4,
                           lpips=True),
    # the original project's settings on CelebA (a GPU's work)
    "paper": StudySettings(dataset="celeba", max_images=None, in_filters=64, latent_dim=128, batch_size=64, lr=1e-4,
                           epochs=100, curve_epochs=100, num_points=21, grid_points=21, num_workers=4, lpips=True),
    # barriers against width: endpoints of one init scheme, different seeds (--widths to change them)
    "width": StudySettings(kind="width", widths=(8, 16, 32, 64), pairs=3, dataset="synthetic", max_images=4000,
                           latent_dim=64, batch_size=64, lr=1e-3, epochs=8, curve_epochs=8, num_points=11,
                           num_workers=4, losses=("mae",), inits=("normal",)),
    # the barrier between copies spawned at epoch K against K (--spawn_epochs to change them)
    "instability": StudySettings(kind="instability", spawn_epochs=(0, 1, 2, 4, 6), pairs=3, dataset="synthetic",
                                 max_images=4000, in_filters=16, latent_dim=64, batch_size=64, lr=1e-3, epochs=8,
                                 num_points=11, num_workers=4, losses=("mae",), inits=("normal",)),
    # is the segment's ridge only a symmetry? every way of undoing it, stitching and layer-wise paths per layer
    "symmetry": StudySettings(kind="symmetry", pairs=3, dataset="synthetic", max_images=1600, in_filters=8,
                              latent_dim=64, batch_size=64, lr=1e-3, epochs=5, curve_epochs=5, num_points=9,
                              num_workers=0, losses=("mae",), inits=("normal",)),
}
DATA_FLAGS = ("dataset", "data_path", "max_images", "image_size", "channels", "batch_size", "num_workers", "device")
SPEED_FLAGS = ("amp", "channels_last", "compile", "no_gpu_data")


@dataclass
class Stage:
    name: str
    argv: list            # the script and its flags
    output: str           # the file whose presence (and recorded SHA-256) means the stage is done
    inputs: list = field(default_factory=list)   # files of earlier stages it reads
    resume: str = None    # a training stage's checkpoint-last.pt: present, the stage continues from it
    adopt: bool = True    # an output found without a record (the study was killed just after the
    #                       stage ended) counts as done; not for checks, whose output precedes the verdict

    def command(self, scripts="."):
        """The stage as a command line; `scripts`: where the project's scripts are, from here."""
        return shlex.join(["python", os.path.normpath(os.path.join(scripts, self.argv[0])), *self.argv[1:]])


def _flags(settings, names):
    words = []
    for name in names:
        value = getattr(settings, name)
        if value is True:
            words.append(f"--{name}")
        elif value is not None and value is not False:
            words += [f"--{name}", str(value)]
    return words


def plan(root, settings):
    """The stages of the study (a StudySettings) in dependency order (every input made by an
    earlier stage)."""
    return {"grid": _plan_grid, "width": _plan_width, "instability": _plan_instability,
            "symmetry": _plan_symmetry}[settings.kind](root, settings)


def _model_flags(settings, sizes=("in_filters", "latent_dim")):
    """train.py's flags for the model: --arch and its settings, and the sizes the architecture takes
    that --arch_kwargs does not set (the preset's size would otherwise contradict the user's)."""
    from aemc import architectures
    takes = architectures.accepted(settings.arch or "conv")
    own = set(json.loads(settings.arch_kwargs)) if settings.arch_kwargs else set()
    kept = [name for name in sizes if name in takes and name not in own]
    return _flags(settings, ("arch", "arch_kwargs", "norm", "beta", *kept, "lr"))


def _reader_flags(settings):
    """--arch for the stages that read checkpoints, when the model is the user's own (they import it
    only when told)."""
    from aemc import architectures
    return ["--arch", settings.arch] if settings.arch and architectures.is_user(settings.arch) else []


def _endpoint(name, run, settings, loss, init, seed, size, common, extra=()):
    checkpoint = os.path.join(run, f"checkpoint-{settings.epochs}.pt")
    from aemc import architectures
    takes_init = "conv_init" in architectures.accepted(settings.arch or "conv")  # an MLP takes none
    init_flags = ["--conv_init", init] if takes_init else []
    return Stage(name, ["train.py", "--dir", run, "--loss_function", loss, *init_flags, "--seed", str(seed),
                        "--epochs", str(settings.epochs), "--save_freq", str(extra and 1 or settings.epochs), *extra,
                        *size, *common],
                 checkpoint, resume=os.path.join(run, "checkpoint-last.pt"))


def _curve(name, run, settings, loss, ends, common):
    checkpoint = os.path.join(run, f"checkpoint-{settings.curve_epochs}.pt")
    return Stage(name, [
        "train.py", "--dir", run, "--curve", settings.curve, "--num_bends", str(settings.num_bends),
        "--init_start", ends[0], "--init_end", ends[1], "--fix_start", "--fix_end",
        "--epochs", str(settings.curve_epochs), "--save_freq", str(settings.curve_epochs),
        "--loss_function", loss, "--lr", str(settings.lr), *_reader_flags(settings), *common], checkpoint, list(ends),
        resume=os.path.join(run, "checkpoint-last.pt"))


def _evaluation(name, folder, settings, curve, align):
    return Stage(name, ["eval_curve.py", "--ckpt", curve, "--dir", folder, "--num_points", str(settings.num_points),
                        *_flags(settings, ("lpips",)), *(["--align"] if align else []),
                        *_flags(settings, ("device", *SPEED_FLAGS)), *_reader_flags(settings)],
                 reports.walk_report(folder, {"ckpt": curve}, settings.num_points, align), [curve])


def _plan_width(root, settings):
    common = _flags(settings, DATA_FLAGS) + _flags(settings, SPEED_FLAGS)
    loss, init = settings.losses[0], settings.inits[0]
    from aemc import architectures
    if "in_filters" not in architectures.accepted(settings.arch or "conv"):
        raise UserError(f"the width study varies in_filters; the {settings.arch} architecture takes none")
    stages = []
    for f in settings.widths:
        size = ["--in_filters", str(f), *_model_flags(settings, ("latent_dim",))]
        for pair in range(1, settings.pairs + 1):
            folder, ends = width_folder(root, f, pair), []
            for seed in (2 * pair - 1, 2 * pair):  # pair p: seeds 2p - 1 and 2p, never shared between pairs
                stages.append(_endpoint(f"endpoint f={f} pair {pair} seed {seed}", os.path.join(folder, f"seed{seed}"),
                                        settings, loss, init, seed, size, common))
                ends.append(stages[-1].output)
            stages.append(_curve(f"curve f={f} pair {pair}", os.path.join(folder, "curve"), settings, loss, ends,
                                 common))
            stages.append(_evaluation(f"eval_curve f={f} pair {pair}", os.path.join(folder, "eval"), settings,
                                      stages[-1].output, align=True))
    return stages


def _plan_symmetry(root, settings):
    from aemc import symmetry_study
    common = _flags(settings, DATA_FLAGS) + _flags(settings, SPEED_FLAGS)
    size = _model_flags(settings)
    loss, init = settings.losses[0], settings.inits[0]
    flags = [*_flags(settings, ("lpips", "device", *SPEED_FLAGS)), *_reader_flags(settings)]
    return symmetry_study.plan(
        root, settings, lambda name, run, seed: _endpoint(name, run, settings, loss, init, seed, size, common),
        lambda name, run, ends: _curve(name, run, settings, loss, ends, common), Stage, flags)


def width_folder(root, width, pair):
    return os.path.join(root, f"f{width}", f"pair{pair}")


def instability_folder(root, pair):
    return os.path.join(root, f"pair{pair}")


def spawn_seeds(pair):
    """The seeds of pair `pair`'s two copies (its parent's seed is `pair`): none shared."""
    return 1000 * pair + 1, 1000 * pair + 2


def _plan_instability(root, settings):
    common = _flags(settings, DATA_FLAGS) + _flags(settings, SPEED_FLAGS)
    size = _model_flags(settings)
    for k in settings.spawn_epochs:
        if not 0 <= k < settings.epochs:
            raise UserError(f"--spawn_epochs {k}: copies are spawned at an epoch from 0 to {settings.epochs - 1}")
    stages = []
    for pair in range(1, settings.pairs + 1):
        parent = os.path.join(instability_folder(root, pair), "parent")
        stages.append(_endpoint(f"parent run {pair}", parent, settings, settings.losses[0], settings.inits[0], pair,
                                size, common, extra=("--save_init",)))
        for k in settings.spawn_epochs:
            source = os.path.join(parent, f"checkpoint-{k}.pt")
            folder = os.path.join(instability_folder(root, pair), f"spawn-{k}")
            stages.append(Stage(f"spawn at epoch {k} from parent {pair}", [
                "spawn.py", "--from", source, "--seeds", *map(str, spawn_seeds(pair)), "--dir", folder,
                "--num_points", str(settings.num_points), *_flags(settings, ("lpips", "device", *SPEED_FLAGS)),
                *_reader_flags(settings)],
                os.path.join(folder, "spawn.json"), [source]))
    return stages


def _plan_grid(root, settings):
    from aemc import architectures
    if "conv_init" not in architectures.accepted(settings.arch or "conv"):
        raise UserError(f"the {settings.kind} study's curves join endpoints of different init schemes; the "
                        f"{settings.arch} architecture takes no conv_init: use the width or instability preset")
    common = _flags(settings, DATA_FLAGS) + _flags(settings, SPEED_FLAGS)
    size = _model_flags(settings)
    stages, ends = [], {}
    for loss in settings.losses:
        for seed, init in enumerate(settings.inits, start=1):
            stages.append(_endpoint(f"endpoint {loss} {init}", os.path.join(root, "endpoints", f"{loss}-{init}"),
                                    settings, loss, init, seed, size, common))
            ends[loss, init] = stages[-1].output
        for a, b in itertools.combinations(settings.inits, 2):
            pair = f"{loss}-{a}--{b}"
            run = os.path.join(root, "curves", pair)
            stages.append(_curve(f"curve {loss} {a}/{b}", run, settings, loss, (ends[loss, a], ends[loss, b]), common))
            curve = stages[-1].output
            stages.append(Stage(f"check_ends {loss} {a}/{b}", [
                "check_ends.py", "--ckpt", curve, "--dir", run, *_flags(settings, ("device",)),
                *_reader_flags(settings)],
                os.path.join(run, "check_ends-t1.png"), [curve], adopt=False))
            stages.append(_evaluation(f"eval_curve {loss} {a}/{b}", os.path.join(root, "eval", pair), settings, curve,
                                      settings.align))
            if settings.plane:
                plane = os.path.join(root, "plane", pair)
                g = settings.grid_points
                stages.append(Stage(f"plane {loss} {a}/{b}", [
                    "plane.py", "--ckpt", curve, "--dir", plane, "--grid_points", str(g),
                    *_flags(settings, ("device", *SPEED_FLAGS)), *_reader_flags(settings)],
                    reports.plane_base(plane, f"{output_stem(curve)}-plane", g) + ".json", [curve]))
    return stages


def _flag_values(argv):
    """{--flag: its value ("" for a switch)} of a command line."""
    values, flag = {"script": argv[0]}, None
    for word in argv[1:]:
        if word.startswith("--"):
            flag = word
            values[flag] = ""
        elif flag is not None:
            values[flag] = (values[flag] + " " + word).strip()
    return values


class StudyState:
    """study.json: for every stage its command, and once finished its output's and inputs' SHA-256."""

    def __init__(self, root, preset=None, stages=None):
        """The state of the study in `root`. Given `preset` (its name) and `stages` (its plan), a
        folder that holds another preset's study is refused: a study folder belongs to one preset
        (a state file of an earlier version, which did not record it, by its stages' names)."""
        self.root = root
        self.path = os.path.join(root, "study.json")
        self.stages, self.preset = {}, preset
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    saved = json.load(f)
                self.stages = saved["stages"]
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"{self.path} is not a study state file; move it away or choose another --dir")
            recorded = saved.get("preset")
            foreign = (recorded is not None and preset is not None and recorded != preset) or \
                (recorded is None and stages is not None and self.stages
                 and not set(self.stages) & {stage.name for stage in stages})
            if foreign:
                raise UserError(f"--dir {root} holds the study of another preset ({recorded or 'other stages'}); "
                                f"a study folder belongs to one preset: choose another --dir for --preset {preset}")
            self.preset = preset or recorded

    def save(self):
        write_json(self.path, {"preset": self.preset, "stages": self.stages} if self.preset else
                   {"stages": self.stages})

    def check(self, stage):
        """'done', 'todo' or 'resume'; an error when the stage's record says its result is stale. A
        stage whose result is a report is done only when every file the report lists is there
        (a study killed while an evaluation wrote its figures reruns that evaluation)."""
        if stage.output.endswith(".json") and os.path.exists(stage.output) and reports.missing_outputs(stage.output):
            self.stages.pop(stage.name, None)
            return "todo"
        record = self.stages.get(stage.name)
        if record is not None and record["argv"] != stage.argv:
            old, new = _flag_values(record["argv"]), _flag_values(stage.argv)
            diff = "; ".join(f"{k} {old.get(k, '(absent)')} then, {new.get(k, '(absent)')} now"
                             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise UserError(f"stage '{stage.name}' ran with other settings ({diff}): its result would be stale; "
                            "rerun with the same settings, or use another --dir")
        if record is not None and record.get("output_sha256"):
            if not os.path.exists(stage.output) or file_digest(stage.output) != record["output_sha256"]:
                raise UserError(f"stage '{stage.name}': its result {stage.output} changed or went away since "
                                "the study recorded it; restore it, or use another --dir")
            for path, digest in record["inputs"].items():
                if not os.path.exists(path) or file_digest(path) != digest:
                    raise UserError(f"stage '{stage.name}' was computed from {path}, which changed since: "
                                    "its result is stale; use another --dir")
            return "done"
        if stage.adopt and os.path.exists(stage.output):
            self.finished(stage)
            return "done"
        return "resume" if stage.resume and os.path.exists(stage.resume) else "todo"

    def started(self, stage):
        self.stages[stage.name] = {"argv": stage.argv, "output_sha256": None, "inputs": {}}
        self.save()

    def submitted(self, stage, job_id):
        """A stage handed to SLURM as job `job_id` (not finished yet)."""
        self.stages[stage.name] = {"argv": stage.argv, "output_sha256": None, "inputs": {}, "job": job_id}
        self.save()

    def finished(self, stage):
        self.stages[stage.name] = {"argv": stage.argv, "output": stage.output,
                                   "output_sha256": file_digest(stage.output),
                                   "inputs": {p: file_digest(p) for p in stage.inputs}}
        self.save()
