"""Where runs are logged besides stdout and log.jsonl: TensorBoard (--tensorboard) and Weights &
Biases (--wandb, an optional extra: pip install ".[wandb]").

A tracker takes a training run's per-epoch records (`epoch`), figures and GIFs (`media`), tables
(`table`) and final numbers (`summary`). W&B runs are made with the run's settings as their
config, in the run's folder (`<dir>/wandb/`), named after it; a study passes --wandb_group to
its stages so that they are grouped. Under torchrun only rank 0 logs. WANDB_MODE=offline keeps
everything in that folder (`wandb sync` uploads it later).
"""
import os

from aemc.errors import UserError, warn
from aemc.settings import Tracking

DEFAULT_PROJECT = Tracking.wandb_project


def add_tracking_args(parser, tensorboard=False):
    g = parser.add_argument_group("logging")
    if tensorboard:
        g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    else:
        parser.set_defaults(tensorboard=False)
    g.add_argument("--wandb", action="store_true",
                   help='also log to Weights & Biases (pip install ".[wandb]"; WANDB_MODE=offline to keep it local)')
    g.add_argument("--wandb_project", default=DEFAULT_PROJECT, help=f"({DEFAULT_PROJECT})")
    g.add_argument("--wandb_entity", default=None, help="team or user (default: yours)")
    g.add_argument("--wandb_group", default=None, help="group of runs (study.py: the study's folder name)")
    return g


def wandb_flags(tracking):
    """The --wandb flags of `tracking` (a Tracking) as command-line words (for a study's stages)."""
    if not tracking.wandb:
        return []
    words = ["--wandb", "--wandb_project", tracking.wandb_project]
    if tracking.wandb_entity:
        words += ["--wandb_entity", tracking.wandb_entity]
    if tracking.wandb_group:
        words += ["--wandb_group", tracking.wandb_group]
    return words


def check_wandb(tracking):
    """Fail now, in one line, when --wandb is asked for without the package."""
    if tracking.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError('--wandb needs the wandb package, an optional extra: pip install ".[wandb]" '
                            "(or pip install wandb)")


def open_trackers(tracking, folder, config, job_type, name=None):
    """The trackers `tracking` (a Tracking) asks for (a list; empty without --tensorboard and --wandb)."""
    from aemc import distributed
    if not distributed.is_main():
        return []
    trackers = []
    if tracking.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            trackers.append(TensorBoard(SummaryWriter(log_dir=os.path.join(folder, "tensorboard"))))
        except ImportError:
            warn("note: --tensorboard needs the tensorboard package (pip install tensorboard); "
                 "logging to log.jsonl only")
    if tracking.wandb:
        trackers.append(WandB(tracking, folder, config, job_type, name))
    return trackers


class TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def epoch(self, record):
        for k in ("lr", "train_loss", "test_loss", "reg", "kl"):
            if k in record:
                self.writer.add_scalar(k, record[k], record["epoch"])

    def media(self, files):
        pass

    def table(self, key, columns, rows):
        pass

    def summary(self, values):
        pass

    def close(self):
        self.writer.close()


class WandB:
    """One W&B run (wandb.init), its metrics, media, tables and summary."""

    def __init__(self, tracking, folder, config, job_type, name=None):
        check_wandb(tracking)
        import wandb
        self.wandb = wandb
        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(project=tracking.wandb_project, entity=tracking.wandb_entity, group=tracking.wandb_group,
                              job_type=job_type, name=name or os.path.basename(os.path.abspath(folder)),
                              dir=folder, config=config, reinit="finish_previous")

    def epoch(self, record):
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"},
                     step=int(record["epoch"]))

    def media(self, files):
        """{key: path}: PNG figures as images, GIFs as animated images."""
        logged = {}
        for key, path in files.items():
            if path.endswith(".gif"):
                logged[key] = self.wandb.Video(path, format="gif")
            elif path.endswith(".png"):
                logged[key] = self.wandb.Image(path)
        if logged:
            self.run.log(logged)

    def table(self, key, columns, rows):
        self.run.log({key: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def summary(self, values):
        for k, v in values.items():
            self.run.summary[k] = v

    def close(self):
        self.run.finish()


def close(trackers):
    for tracker in trackers:
        tracker.close()


def log_walks(trackers, walks, files, length_ratio=None):
    """A walk's (eval_curve.py) figures and GIFs, its barrier table, its per-t metrics and, in the
    summary, every barrier as <path>/<metric>/<name>."""
    from aemc.barriers import NAMES
    if not trackers:
        return
    rows, points, summary = [], [], {}
    for key, res in walks.items():
        for metric, values in res["barriers"].items():
            rows.append([key.name, metric, *(values[n] for n in NAMES)])
            summary.update({f"{key.name}/{metric}/{n}": values[n] for n in NAMES})
        metrics = [k for k in res if k.startswith(("train_", "test_"))]
        points += [[key.name, t, *(res[k][i] for k in metrics)] for i, t in enumerate(res["ts"])]
    if length_ratio is not None:
        summary["length_ratio"] = length_ratio
    for tracker in trackers:
        tracker.media({role: path for role, path in files.items() if path.endswith((".png", ".gif"))})
        tracker.table("barriers", ["path", "metric", *NAMES], rows)
        tracker.table("points", ["path", "t", *metrics], points)
        tracker.summary(summary)
