"""The original project's experiment as a plan of stages: endpoints for every (loss, init), curves
between every pair of inits, the check of their ends, their evaluation (and planes), each stage one
command line of the project's own scripts; and the state file that makes the study resumable.

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
from aemc.files import atomic_write, file_digest, output_stem, write_json
from aemc.paths import PathKey


@dataclass(frozen=True)
class StudySettings:
    """What a study runs: the grid (losses x pairs of inits), the sizes, and what each stage is
    told. A None is a flag left out of the stages' command lines (the scripts' defaults)."""
    dataset: str = "synthetic"
    data_path: Optional[str] = None
    max_images: Optional[int] = None
    in_filters: int = 64
    latent_dim: int = 128
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


PRESETS = {
    # CPU, minutes, built-in faces: the tests run it
    "tiny": StudySettings(dataset="synthetic", max_images=400, in_filters=4, latent_dim=8, batch_size=32, lr=1e-3,
                          epochs=2, curve_epochs=2, num_points=5, grid_points=5, device="cpu", num_workers=0,
                          lpips=False),
    # the demo's size (make demo), on built-in faces
    "small": StudySettings(dataset="synthetic", max_images=4000, in_filters=16, latent_dim=64, batch_size=64,
                           lr=1e-3, epochs=8, curve_epochs=8, num_points=11, grid_points=11, num_workers=4,
                           lpips=True),
    # the original project's settings on CelebA (a GPU's work)
    "paper": StudySettings(dataset="celeba", max_images=None, in_filters=64, latent_dim=128, batch_size=64, lr=1e-4,
                           epochs=100, curve_epochs=100, num_points=21, grid_points=21, num_workers=4, lpips=True),
}
DATA_FLAGS = ("dataset", "data_path", "max_images", "batch_size", "num_workers", "device")
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
    common = _flags(settings, DATA_FLAGS) + _flags(settings, SPEED_FLAGS)
    size = _flags(settings, ("in_filters", "latent_dim", "lr"))
    stages, ends = [], {}
    for loss in settings.losses:
        for seed, init in enumerate(settings.inits, start=1):
            run = os.path.join(root, "endpoints", f"{loss}-{init}")
            ends[loss, init] = os.path.join(run, f"checkpoint-{settings.epochs}.pt")
            stages.append(Stage(f"endpoint {loss} {init}", [
                "train.py", "--dir", run, "--loss_function", loss, "--conv_init", init, "--seed", str(seed),
                "--epochs", str(settings.epochs), "--save_freq", str(settings.epochs), *size, *common],
                ends[loss, init], resume=os.path.join(run, "checkpoint-last.pt")))
        for a, b in itertools.combinations(settings.inits, 2):
            pair = f"{loss}-{a}--{b}"
            run = os.path.join(root, "curves", pair)
            curve = os.path.join(run, f"checkpoint-{settings.curve_epochs}.pt")
            stages.append(Stage(f"curve {loss} {a}/{b}", [
                "train.py", "--dir", run, "--curve", settings.curve, "--num_bends", str(settings.num_bends),
                "--init_start", ends[loss, a], "--init_end", ends[loss, b], "--fix_start", "--fix_end",
                "--epochs", str(settings.curve_epochs), "--save_freq", str(settings.curve_epochs),
                "--loss_function", loss, "--lr", str(settings.lr), *common],
                curve, [ends[loss, a], ends[loss, b]], resume=os.path.join(run, "checkpoint-last.pt")))
            stages.append(Stage(f"check_ends {loss} {a}/{b}", [
                "check_ends.py", "--ckpt", curve, "--dir", run, *_flags(settings, ("device",))],
                os.path.join(run, "check_ends-t1.png"), [curve], adopt=False))
            evaluation = os.path.join(root, "eval", pair)
            stages.append(Stage(f"eval_curve {loss} {a}/{b}", [
                "eval_curve.py", "--ckpt", curve, "--dir", evaluation, "--num_points", str(settings.num_points),
                *_flags(settings, ("lpips", "align", "device", *SPEED_FLAGS))],
                reports.walk_report(evaluation, {"ckpt": curve}, settings.num_points, settings.align), [curve]))
            if settings.plane:
                plane = os.path.join(root, "plane", pair)
                g = settings.grid_points
                stages.append(Stage(f"plane {loss} {a}/{b}", [
                    "plane.py", "--ckpt", curve, "--dir", plane, "--grid_points", str(g),
                    *_flags(settings, ("device", *SPEED_FLAGS))],
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

    def __init__(self, root):
        self.path = os.path.join(root, "study.json")
        self.stages = {}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.stages = json.load(f)["stages"]
            except (OSError, ValueError, KeyError):
                raise UserError(f"{self.path} is not a study state file; move it away or choose another --dir")

    def save(self):
        write_json(self.path, {"stages": self.stages})

    def check(self, stage):
        """'done', 'todo' or 'resume'; an error when the stage's record says its result is stale."""
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

    def finished(self, stage):
        self.stages[stage.name] = {"argv": stage.argv, "output": stage.output,
                                   "output_sha256": file_digest(stage.output),
                                   "inputs": {p: file_digest(p) for p in stage.inputs}}
        self.save()


def results(root, settings):
    """One row per (loss, pair of inits), from each evaluation's own report (read by the function of
    the code that wrote it)."""
    rows = []
    for loss in settings.losses:
        for a, b in itertools.combinations(settings.inits, 2):
            curve = os.path.join(root, "curves", f"{loss}-{a}--{b}", f"checkpoint-{settings.curve_epochs}.pt")
            report_path = reports.walk_report(os.path.join(root, "eval", f"{loss}-{a}--{b}"), {"ckpt": curve},
                                              settings.num_points, settings.align)
            report = reports.read_walks(report_path)
            paths = report.paths
            curve_walk = next(walk for key, walk in paths.items() if key.kind == "curve")
            segment = paths[PathKey("segment")]
            row = {"loss": loss, "start": a, "end": b,
                   "start_test_loss": curve_walk["test_loss"][0], "end_test_loss": curve_walk["test_loss"][-1],
                   "segment_peak": max(segment["test_loss"]),
                   "segment_barrier": segment["barriers"]["test_loss"]["above_mean_of_ends"],
                   "curve_peak": max(curve_walk["test_loss"]),
                   "curve_barrier": curve_walk["barriers"]["test_loss"]["above_mean_of_ends"],
                   "length_ratio": report.length_ratio}
            if "test_lpips" in segment:
                row.update(segment_lpips_peak=max(segment["test_lpips"]),
                           curve_lpips_peak=max(curve_walk["test_lpips"]))
            aligned = paths.get(PathKey("segment", aligned=True))
            if aligned is not None:
                row["aligned_segment_barrier"] = aligned["barriers"]["test_loss"]["above_mean_of_ends"]
            row["walks"] = {key: {"ts": walk["ts"], "test_loss": walk["test_loss"]} for key, walk in paths.items()}
            row["report"] = report_path
            rows.append(row)
    return rows


COLUMNS = {"loss": "loss", "start": "start init", "end": "end init", "start_test_loss": "start test",
           "end_test_loss": "end test", "segment_peak": "segment peak", "segment_barrier": "segment barrier",
           "curve_peak": "curve peak", "curve_barrier": "curve barrier", "segment_lpips_peak": "segment LPIPS peak",
           "curve_lpips_peak": "curve LPIPS peak", "length_ratio": "curve / segment length",
           "aligned_segment_barrier": "aligned segment barrier"}


def write_tables(root, rows):
    """results.csv and results.md: the columns every row has, numbers to 4 decimals."""
    keys = [k for k in COLUMNS if all(k in row for row in rows)]

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    csv = [",".join(keys)] + [",".join(cell(row[k]) for k in keys) for row in rows]
    md = ["Test losses (each row's own loss) on images in [-1, 1]; peak = the highest point of the path, "
          "barrier = the peak minus the mean of the ends; LPIPS: AlexNet, mean over the test images.", "",
          "| " + " | ".join(COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    md += ["", "Each evaluation's files (JSON, NPZ, plots, GIFs of reconstructions along the paths):", ""]
    md += [f"* {row['loss']} {row['start']} / {row['end']}: `{os.path.dirname(row['report'])}`" for row in rows]
    paths = {"csv": os.path.join(root, "results.csv"), "md": os.path.join(root, "results.md")}
    for kind, lines in (("csv", csv), ("md", md)):
        with atomic_write(paths[kind], "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths
