"""Typed settings: the library's parameters, and what a checkpoint records of the run that made it.

Each script builds these from its flags in one place; library functions take them (or plain
keyword arguments) and never an argparse namespace. A checkpoint stores them as plain dicts under
`settings` (format 2); `Run.from_dict` reads them back, taking the defaults for fields a file does
not have (it was written before they existed) and refusing fields it does not know (it was written
by a newer version). Format 1 checkpoints stored the run's flags instead: `Run.from_flags` reads
those, so every checkpoint ever written still loads.

Example::
    >>> run = Run(data=Data(dataset="synthetic", max_images=4000), optim=Optimizer(lr=1e-3))
    >>> Run.from_dict(run.to_dict()) == run
    True
"""
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Optional

from aemc.errors import UserError

FORMAT = "ae-mode-connectivity/2"
FORMATS = ("ae-mode-connectivity/1", FORMAT)  # every format this version reads


@dataclass(frozen=True)
class Data:
    """Where the images come from and how they are split and batched."""
    dataset: str = "celeba"          # celeba | folder | synthetic | mnist | fashion_mnist | cifar10
    data_path: str = "data"          # CelebA root or image folder
    max_images: Optional[int] = None  # the first N images only
    test_fraction: float = 0.2       # test share of the fixed split
    batch_size: int = 64
    num_workers: int = 4             # processes decoding images for the cache
    image_size: Optional[int] = None  # synthetic, folder, celeba: the side images are resized to (None: 64)
    channels: Optional[int] = None   # synthetic, folder, celeba: 3 (RGB, None) or 1 (grey)
    native_split: bool = True        # mnist, fashion_mnist, cifar10: the dataset's own train/test split


@dataclass(frozen=True)
class Loss:
    """The reconstruction loss a run optimises (on images in [-1, 1])."""
    loss_function: str = "mae"       # mae | laplacian
    num_filters: int = 5             # Laplacian pyramid levels
    beta: float = 1.0                # a VAE's loss: reconstruction + beta * KL (aemc.losses.kl_divergence)


@dataclass(frozen=True)
class Optimizer:
    optim_name: str = "Adam"         # Adam | SGD
    lr: float = 1e-4
    beta_1: float = 0.5
    beta_2: float = 0.999
    momentum: float = 0.9            # SGD
    wd: float = 1e-6                 # weight decay; for a curve 0.5 * wd * ||theta(t)||^2 of the sampled point


@dataclass(frozen=True)
class Speed:
    """How fast results come, not which (beyond round-off)."""
    amp: str = "none"                # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    gpu_data: bool = True            # on CUDA, the dataset in GPU memory when it fits
    tf32: bool = True                # on Ampere and later, PyTorch's default TF32 convolutions


@dataclass(frozen=True)
class Training:
    epochs: int = 100
    seed: int = 1                    # init, shuffling, noise, dropout, t
    noise_std: float = 0.05          # denoising objective
    save_freq: int = 5
    save_final: bool = True
    t_sampling: str = "stratified"   # curves under torchrun: shared | per_rank | stratified
    midpoint_bn_batches: int = 10    # curves: BatchNorm batches of the per-epoch t = 0.5 report
    sync_bn: bool = False


@dataclass(frozen=True)
class Cycle:
    """Fast Geometric Ensembling's cyclic schedule, and the endpoint it starts from."""
    cycle: int = 4
    lr_1: float = 1e-4
    lr_2: float = 1e-6
    source_sha256: Optional[str] = None


@dataclass(frozen=True)
class Evaluation:
    """How a set of weights is evaluated."""
    bn_batches: Optional[int] = None  # BatchNorm re-estimated on the first N training batches (None: all)
    train_batches: Optional[int] = None  # the training split's metrics on its first N batches (None: all)
    lpips: bool = False
    lpips_weights: Optional[str] = None


@dataclass(frozen=True)
class Alignment:
    method: str = "weight"           # weight | activation | ste
    restarts: int = 1
    seed: int = 0
    latent_signs: bool = True        # also negate latent units (Tanh is odd)
    batches: int = 20                # activation, latent map: batches read; ste: scoring batches (half BN, half loss)
    steps: int = 200                 # ste: straight-through steps (at most)
    seconds: Optional[float] = None  # ste: stop after this long, whatever `steps` says
    lr: float = 1e-2                 # ste: Adam's learning rate for the straight-through weights
    ste_t: str = "midpoint"          # ste: the loss at t = 0.5 (midpoint) or a t ~ U(0, 1) each step (random)
    latent: Optional[str] = None     # orthogonal | linear: a map of the code folded in first (aemc.latent); None: none


@dataclass(frozen=True)
class Stitching:
    """Model stitching (aemc.stitching): the map between the parts, fitted on the first N training batches."""
    map: str = "affine"              # identity | permutation | orthogonal | affine
    fit_batches: int = 20


@dataclass(frozen=True)
class Tracking:
    """Where a run is logged besides stdout and log.jsonl (aemc.tracking); not part of what it computes."""
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "ae-mode-connectivity"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None   # study.py: the study's folder name


@dataclass(frozen=True)
class Architecture:
    """A model factory's name and its keyword arguments (see models.build)."""
    name: str = "conv"
    kwargs: dict = field(default_factory=dict)

    def to_dict(self):
        return {"name": self.name, "kwargs": dict(self.kwargs)}


@dataclass(frozen=True)
class Run:
    """Everything a training run was told, as a checkpoint records it."""
    data: Data = Data()
    loss: Loss = Loss()
    optim: Optimizer = Optimizer()
    training: Training = Training()
    speed: Speed = Speed()
    fge: Optional[Cycle] = None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, what="the checkpoint"):
        """The settings a checkpoint of format 2 recorded."""
        _check_known(cls, d, what)
        parts = {}
        for f in fields(cls):
            part = _part_type(f)
            value = d.get(f.name)
            if value is None:
                parts[f.name] = None if f.name == "fge" else part()
            else:
                _check_known(part, value, f"{what}'s {f.name} settings")
                parts[f.name] = part(**value)
        return cls(**parts)

    @classmethod
    def from_flags(cls, flags):
        """The settings of a format 1 checkpoint, which recorded the run's command-line flags
        ({flag name: value}; flags it lacks take the defaults)."""
        flags = dict(flags or {})
        if "no_gpu_data" in flags:
            flags["gpu_data"] = not flags["no_gpu_data"]
        if "no_tf32" in flags:
            flags["tf32"] = not flags["no_tf32"]
        fge = None
        if "cycle" in flags:  # an FGE run
            fge = Cycle(cycle=flags["cycle"], lr_1=flags["lr_1"], lr_2=flags["lr_2"],
                        source_sha256=flags.get("ckpt_sha256"))
        return cls(**{f.name: _from_flags(_part_type(f), flags) for f in fields(cls) if f.name != "fge"}, fge=fge)


def _part_type(f):
    return Cycle if f.name == "fge" else f.type


def _from_flags(kind, flags):
    return kind(**{f.name: flags[f.name] for f in fields(kind) if flags.get(f.name) is not None})


def _check_known(kind, d, what):
    if not isinstance(d, dict):
        raise UserError(f"{what} holds settings of an unknown form ({type(d).__name__})")
    unknown = sorted(set(d) - {f.name for f in fields(kind)})
    if unknown:
        raise UserError(f"{what} has settings this version does not know ({', '.join(unknown)}): "
                        "it was written by a newer version of the tool; update it")


def replace(settings, **changes):
    """A copy of `settings` with the fields in `changes` (those not None) replaced."""
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})


# the settings that change what a run computes: a resumed run may not change them (its epochs, device,
# speed and worker flags may change; the data's path may too, the data having moved)
RESULT_SETTINGS = {"data": [f for f in Data.__dataclass_fields__ if f not in ("num_workers", "data_path")],
                   "loss": list(Loss.__dataclass_fields__), "optim": list(Optimizer.__dataclass_fields__),
                   "training": ["seed", "noise_std"]}


def flag_text(name, value):
    """A setting as the flag that gives it: "--max_images 64", "--random_split"."""
    if name == "native_split":
        return "no --random_split" if value else "--random_split"
    return f"--{name} {value}"


def changed_results(then, now):
    """The RESULT_SETTINGS on which two Runs differ, as "--flag now (the checkpoint's: --flag then)"."""
    a, b = dataclasses.asdict(then), dataclasses.asdict(now)
    return [f"{flag_text(k, b[part][k])} (the checkpoint's: {flag_text(k, a[part][k])})"
            for part, keys in RESULT_SETTINGS.items() for k in keys if b[part][k] != a[part][k]]
