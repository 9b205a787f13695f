"""Small CLI plumbing shared by the scripts: devices, and the flags every script shares, each group
with the one function that turns it into typed settings (aemc.settings)."""
import os

import torch

from aemc import architectures, speed
from aemc.channel_maps import MAPS
from aemc.cli import positive
from aemc.errors import UserError
from aemc.evaluation import Session
from aemc.learned_matching import T_CHOICES
from aemc.losses import LOSSES
from aemc.settings import Alignment, Evaluation, Loss, Speed, Stitching, Tracking


def given(args, kind):
    """{field: value} of the flags named like the fields of the settings class `kind` that were
    given (not None)."""
    return {name: getattr(args, name) for name in kind.__dataclass_fields__
            if name in vars(args) and getattr(args, name) is not None}


# ----------------------------------------------------------------------------- devices

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arg(parser):
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda if present)")


def resolve_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} requested but MPS is not available; use --device cpu")
    return device


# ----------------------------------------------------------------------------- speed

def add_speed_args(parser):
    g = parser.add_argument_group("speed (results stay within tolerance of the defaults)")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="mixed-precision forward passes: bf16 (CPU or CUDA), fp16 (CUDA, with gradient "
                        "scaling) or none (float32); auto (default): bf16 where the device computes it "
                        "natively (CUDA compute capability 8.0+, a CPU with AVX512-BF16 or AMX), else none. "
                        "Losses are computed in float32; the run records what auto chose")
    g.add_argument("--channels_last", action="store_true",
                   help="NHWC memory layout for weights and images (faster convolutions)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--no_gpu_data", action="store_true",
                   help="on CUDA, keep the dataset in host memory (copied through pinned staging "
                        "buffers) even when it fits on the GPU")
    g.add_argument("--no_tf32", action="store_true",
                   help="on Ampere and later GPUs, compute float32 convolutions in full float32 "
                        "instead of PyTorch's default TF32 (slower; reproducible to more digits)")
    return g


def tracking_settings(args):
    """The Tracking of the --tensorboard / --wandb flags (aemc.tracking.add_tracking_args)."""
    return Tracking(tensorboard=args.tensorboard, wandb=args.wandb, wandb_project=args.wandb_project,
                    wandb_entity=args.wandb_entity, wandb_group=args.wandb_group)


def speed_settings(args):
    """The Speed of the flags, --amp auto resolved for the run's device."""
    amp = speed.resolve_amp(args.amp, resolve_device(args.device))
    return Speed(amp=amp, channels_last=args.channels_last, compile=args.compile,
                 gpu_data=not args.no_gpu_data, tf32=not args.no_tf32)


# ----------------------------------------------------------------------------- evaluation

def add_loss_args(parser):
    """--loss_function and --num_filters of an evaluation (default: the run's)."""
    parser.add_argument("--loss_function", choices=LOSSES, default=None, help="default: the run's loss")
    parser.add_argument("--num_filters", type=positive(int), default=None, help="pyramid levels (the run's)")


def loss_settings(args, inherited):
    """The Loss of an evaluation: the flags given, else `inherited` (the run's)."""
    return Loss(**{**vars(inherited), **given(args, Loss)})


def add_arch_arg(parser):
    """--arch of the scripts that read checkpoints: naming a model factory of the user's own
    allows importing it (a checkpoint never imports code by itself)."""
    parser.add_argument("--arch", default=None, metavar="PACKAGE.MODULE:FACTORY",
                        help="the factory of a model of your own that built the checkpoints: naming it here lets "
                             "it be imported (built-in architectures need nothing)")


def allow_architecture(args):
    architectures.allow(args.arch)


def add_evaluation_args(parser, lpips_help, bn_help="training batches for BatchNorm re-estimation at each point",
                        loss=True, points=True):
    """The flags of every evaluation script: LPIPS, BatchNorm batches and the training split's
    batches (unless `points` is off: a script that evaluates models with their own statistics on
    the test split only), the loss (unless `loss` is off), the device, the speed options and --arch."""
    parser.add_argument("--lpips", action="store_true", help=lpips_help)
    parser.add_argument("--lpips_weights", default=None, help="AlexNet weights file for LPIPS (see docs/usage.md)")
    if points:
        parser.add_argument("--bn_batches", type=positive(int), default=None, help=f"{bn_help} (default: all)")
        parser.add_argument("--train_batches", type=positive(int), default=None,
                            help="the training split's losses on its first N batches, the same at every point "
                                 "(default: all; the test split is always evaluated whole)")
    else:
        parser.set_defaults(bn_batches=None, train_batches=None)
    if loss:
        add_loss_args(parser)
    add_device_arg(parser)
    add_speed_args(parser)
    add_arch_arg(parser)


def evaluation_settings(args):
    return Evaluation(bn_batches=args.bn_batches, train_batches=args.train_batches, lpips=args.lpips,
                      lpips_weights=args.lpips_weights)


def open_session(args):
    """The evaluation Session of an evaluation script's flags (see aemc.evaluation.Session)."""
    allow_architecture(args)
    return Session(resolve_device(args.device), speed_settings(args), evaluation_settings(args))


def output_dir(given_dir, sources, folder):
    """`given_dir` (--dir), or by default <folder> beside the first source checkpoint."""
    return given_dir or os.path.join(os.path.dirname(os.path.abspath(next(iter(sources.values())))), folder)


# ----------------------------------------------------------------------------- alignment

def add_align_args(parser, prefix="align_"):
    """The alignment flags: align.py's own (prefix "": --method, --restarts, --seed, --steps, ...),
    and those of --align in train.py and eval_curve.py (--align_method, --align_restarts, ...)."""
    g = parser.add_argument_group("alignment")
    g.add_argument(f"--{prefix}method", dest="align_method", choices=("weight", "activation", "ste"), default="weight",
                   help="weight matching (Git Re-Basin), activation matching on training batches, or ste: "
                        "permutations learned by the straight-through estimator to lower the segment's loss (weight)")
    g.add_argument(f"--{prefix}restarts", dest="align_restarts", metavar="N", type=positive(int), default=1,
                   help="weight matching: keep the best of N random update orders (1)")
    g.add_argument(f"--{prefix}seed", dest="align_seed", metavar="SEED", type=int, default=0,
                   help="seed of the update orders (0)")
    g.add_argument("--no_latent_signs", action="store_true",
                   help="match the latent units by permutation only (default: also negate them: Tanh is odd)")
    g.add_argument("--align_batches", type=positive(int), default=20,
                   help="activation matching and the latent map: training batches read; ste: training "
                        "batches scoring each new projection's midpoint, half re-estimating BatchNorm, half measuring "
                        "the loss (20)")
    g.add_argument(f"--{prefix}steps", dest="align_steps", metavar="N", type=positive(int), default=200,
                   help="ste: straight-through steps, one training batch each (200)")
    g.add_argument(f"--{prefix}seconds", dest="align_seconds", metavar="S", type=positive(float), default=None,
                   help="ste: stop after this many seconds if the steps are not done by then (no limit)")
    g.add_argument(f"--{prefix}lr", dest="align_lr", metavar="LR", type=positive(float), default=1e-2,
                   help="ste: Adam's learning rate for the straight-through weights (1e-2)")
    g.add_argument(f"--{prefix}ste_t", dest="align_ste_t", choices=T_CHOICES, default="midpoint",
                   help="ste: the loss at the segment's midpoint, or at a t ~ U(0, 1) drawn each step (midpoint)")
    g.add_argument(f"--{prefix}latent", dest="align_latent", choices=("orthogonal", "linear"), default=None,
                   help="first fit a map of the end's latent code onto the start's (orthogonal: Procrustes; linear: "
                        "least squares) and fold it into the end's weights, where the code is linear (default: none)")
    return g


def check_align_flags(args):
    """train.py and eval_curve.py: a method or a latent map asked for without --align would be ignored;
    say so in one line instead."""
    stray = [f"--align_method {args.align_method}"] if args.align_method != "weight" else []
    stray += [f"--align_latent {args.align_latent}"] if args.align_latent else []
    if stray and not args.align:
        raise UserError(f"{' and '.join(stray)} take effect with --align: add --align, or drop them")


def alignment_settings(args):
    return Alignment(method=args.align_method, restarts=args.align_restarts, seed=args.align_seed,
                     latent_signs=not args.no_latent_signs, batches=args.align_batches, steps=args.align_steps,
                     seconds=args.align_seconds, lr=args.align_lr, ste_t=args.align_ste_t, latent=args.align_latent)


# ----------------------------------------------------------------------------- stitching

MAP_HELP = ("the map between the parts, on the channels of the point (at every position of a feature map), "
            "fitted on training batches: identity; permutation (channels paired by correlation); orthogonal "
            "(Procrustes, no centring); affine (least squares with a bias: on a feature map a 1x1 convolution)")


def add_stitch_args(parser, prefix=""):
    """The stitching flags: stitch.py's own (prefix "": --map, --fit_batches), and eval_curve.py's
    (prefix "stitch": --stitch MAP, off unless given, and --stitch_batches)."""
    g = parser.add_argument_group("stitching")
    if prefix:
        g.add_argument(f"--{prefix}", dest="stitch_map", choices=MAPS, default=None, metavar="MAP",
                       help="also stitch the two ends at the bottleneck, both ways (encoder A, map, decoder B and "
                            f"the reverse; see stitch.py), with MAP: {MAP_HELP}")
    else:
        g.add_argument("--map", dest="stitch_map", choices=MAPS, default=Stitching.map,
                       help=f"{MAP_HELP} ({Stitching.map})")
    g.add_argument(f"--{prefix or 'fit'}_batches", dest="stitch_batches", type=positive(int),
                   default=Stitching.fit_batches, metavar="N",
                   help=f"training batches the map is fitted on ({Stitching.fit_batches})")
    return g


def stitching_settings(args):
    return Stitching(map=args.stitch_map, fit_batches=args.stitch_batches)
