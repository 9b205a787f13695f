"""Save one point theta(t) of a trained curve as an ordinary autoencoder checkpoint.

    python extract_point.py --ckpt runs/curve/checkpoint-last.pt --t 0.5 --out runs/mid.pt

BatchNorm statistics are re-estimated at t on the training split (all of it by default), so the
file works wherever an endpoint checkpoint does (--init_start/--init_end, check_ends.py,
eval_curve.py --connect TRIVIAL).
"""
import os

import dataset
from aemc import checkpoints, distributed
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.errors import UserError
from aemc.evaluation import update_bn
from aemc.files import check_output_file, file_digest
from utils import add_arch_arg, add_device_arg, allow_architecture, resolve_device


def get_args_parser():
    p = ArgParser("extract_point.py", description=description(__doc__))
    p.add_argument("--ckpt", required=True, help="curve checkpoint")
    p.add_argument("--t", type=float, required=True, help="curve parameter in [0, 1]")
    p.add_argument("--out", required=True, help="autoencoder checkpoint to write (an existing file is refused)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_device_arg(p)
    add_arch_arg(p)
    p.add_argument("--bn_batches", type=positive(int), default=None,
                   help="training batches for BatchNorm re-estimation (default: all)")
    dataset.add_data_args(p, inherit=True)
    return p


def main(args):
    if not 0 <= args.t <= 1:
        raise UserError(f"--t must be in [0, 1], got {args.t}")
    distributed.refuse_several("extract_point.py")
    check_output_file(args.out, "--out", force=args.force)  # before the work, not after it
    allow_architecture(args)
    device = resolve_device(args.device)
    ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
    train_loader, _ = dataset.build_loaders(dataset.data_settings(args, ck.settings.data), device)
    point = checkpoints.build_model(ck).to(device).point_at(args.t)
    update_bn(train_loader.ordered(), point, num_batches=args.bn_batches)
    source = dict(curve=os.path.abspath(args.ckpt), curve_sha256=file_digest(args.ckpt), t=args.t)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        checkpoints.save(args.out, checkpoints.autoencoder(point, ck.architecture, ck.settings, ck.epoch, source))
    except OSError as e:
        raise UserError(f"cannot write --out {args.out}: {e.strerror or e}")
    print(f"theta({args.t:g}) of {args.ckpt} saved as an autoencoder checkpoint: {args.out}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
