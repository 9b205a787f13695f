"""Ensembles of points along a curve, along its straight segment, or of separately trained
autoencoders: each member's loss, their mean, the ensemble's loss, its gain, and LPIPS.

    python ensemble.py --ckpt runs/curve/checkpoint-100.pt --num_members 5 --lpips
    python ensemble.py --ckpt runs/curve/checkpoint-100.pt --members 0,0.5,1
    python ensemble.py --ckpts A.pt B.pt C.pt

With --num_members K, for every k = 2..K: the ensemble of k equally spaced points of the curve
(t = 0, 1/(k-1), ..., 1), the same on its segment, and the two endpoints alone. With --members
t1,t2,...: the ensembles of the first k of those points, k = 2..K, on the curve and the segment.
With --ckpts: the ensembles of the first k checkpoints. Every member's BatchNorm is re-estimated
on the training split first (as at a point of eval_curve.py); then one pass over the test split
scores every member and every ensemble. Losses are on images in [-1, 1].
"""
import os

import numpy as np

import checkpoints
import dataset as data
import distributed
import figures
import speed
from ensembles import member_state, score_ensembles
from losses import add_loss_args, add_lpips_args, evaluation_losses, lpips_from_args
from models.curves import connect
from paths import PointEvaluator
from utils import (ArgParser, RunDir, UserError, atomic_write, default_device, file_digest, output_dir, output_stem,
                   positive, resolve_device, run_cli, write_json)


def member_list(text):
    try:
        ts = [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(text)
    if any(not 0 <= t <= 1 for t in ts):
        raise ValueError(text)
    return ts


def get_args_parser():
    p = ArgParser("ensemble.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="curve checkpoint: ensembles of its points and its segment's")
    p.add_argument("--num_members", type=positive(int), default=None, help="K: equally spaced members, k = 2..K")
    p.add_argument("--members", type=member_list, default=None, metavar="T1,T2,...",
                   help="the curve parameters of the members, in the order they join")
    p.add_argument("--ckpts", nargs="+", default=None, metavar="CKPT",
                   help="instead of --ckpt: separately trained autoencoders, joining in this order")
    p.add_argument("--dir", default=None, help="output folder (default: <checkpoint folder>/ensemble)")
    add_lpips_args(p, "also LPIPS (AlexNet) of members and ensembles")
    p.add_argument("--bn_batches", type=positive(int), default=None,
                   help="training batches for each member's BatchNorm re-estimation (default: all)")
    add_loss_args(p)
    p.add_argument("--device", default=default_device())
    speed.add_speed_args(p)
    data.add_data_args(p, inherit=True)
    return p


def plan(args):
    """The members ({key: (path or model, t)}), the ensembles ({name: [keys]}), a template module,
    the source checkpoints, the run's args and a name."""
    if args.ckpts:
        if args.ckpt or args.num_members or args.members:
            raise UserError("--ckpts takes no --ckpt, --num_members or --members")
        if len(args.ckpts) < 2:
            raise UserError("an ensemble needs at least 2 members: give 2 or more --ckpts")
        flags = [f"--ckpts[{i}]" for i in range(len(args.ckpts))]
        loaded = checkpoints.load_endpoints(args.ckpts, flags)
        members = {f"ckpt {i}": (model, None) for i, (model, _) in enumerate(loaded)}
        keys = list(members)
        ensembles = {f"checkpoints, {k}": keys[:k] for k in range(2, len(keys) + 1)}
        sources = {flag: path for flag, path in zip(flags, args.ckpts)}
        return members, ensembles, loaded[0][0], sources, loaded[0][1]["args"], f"{output_stem(args.ckpts[0])}-ckpts"
    if not args.ckpt:
        raise UserError("give --ckpt CURVE (with --num_members or --members) or --ckpts A B ...")
    if (args.num_members is None) == (args.members is None):
        raise UserError("give exactly one of --num_members K and --members T1,T2,...")
    if (args.num_members or 2) < 2 or (args.members is not None and len(set(args.members)) < 2):
        raise UserError("an ensemble needs at least 2 members")
    ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
    checkpoints.verify_endpoints(ck["curve_config"], strict=False)
    curve = checkpoints.build_model(ck)
    segment = connect(curve.point_at(0.0), curve.point_at(1.0))
    if args.num_members:
        groups = {k: list(np.linspace(0, 1, k)) for k in range(2, args.num_members + 1)}
    else:
        groups = {k: args.members[:k] for k in range(2, len(args.members) + 1)}

    def key(path, t):  # the two paths share their ends: the same member
        return "start" if t == 0 else "end" if t == 1 else f"{path} t={t:.4g}"
    members, ensembles = {}, {"endpoints": ["start", "end"]}
    for path, net in (("curve", curve), ("segment", segment)):
        for k, ts in groups.items():
            ensembles[f"{path}, {k}"] = [key(path, float(t)) for t in ts]
            members.update({key(path, float(t)): (net, float(t)) for t in ts})
    return members, ensembles, curve.point_at(0.0), {"ckpt": args.ckpt}, ck["args"], f"{output_stem(args.ckpt)}-curve"


def main(args):
    """Score the ensembles; returns {"table": {name: {...}}, "files": {...}} (under torchrun: on
    rank 0, which scores them all in one test pass; the other ranks return None)."""
    device = distributed.setup(resolve_device(args.device))
    speed.check_amp(args.amp, device)
    speed.configure(device, args)
    lpips = lpips_from_args(args, device)
    members, ensembles, template, sources, run_args, name = plan(args)
    out_dir = output_dir(args, sources, "ensemble")
    if distributed.is_main():
        RunDir(out_dir)
    data.inherit_data_args(args, run_args)
    loss_name, loss_fns = evaluation_losses(args, run_args, device)
    train_loader, test_loader = data.build_loaders(args, device)
    evaluator = PointEvaluator(template, train_loader.ordered(), test_loader, loss_fns, bn_batches=args.bn_batches,
                               speed=args)
    print(f"{len(members)} members, {len(ensembles)} ensembles; BatchNorm re-estimated on "
          f"{args.bn_batches or len(train_loader)} training batches per member; loss {loss_name} on images in [-1, 1]")
    mine = {}  # under torchrun each process re-estimates BatchNorm for its share of the members
    for key in distributed.share(list(members)):
        source, t = members[key]
        theta = dict(source.named_parameters()) if t is None else source.to(device).weights(t)
        mine[key] = {k: v.cpu() for k, v in member_state(evaluator, theta).items()}
    everyone, main = distributed.gather(mine), distributed.is_main()
    distributed.shutdown()
    if not main:
        return None
    states = {key: {k: v.to(device) for k, v in part[key].items()} for key in members
              for part in everyone if key in part}
    image_metrics = {"lpips": lpips} if lpips is not None else None
    table = score_ensembles(evaluator.module, states, ensembles, test_loader, loss_fns, image_metrics, args.amp)
    print(format_table(table, loss_name))
    files = write_outputs(os.path.join(out_dir, f"{name}-ensembles"), args, sources, loss_name, lpips, table)
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"table": table, "files": files}


def format_table(table, loss_name):
    metrics = list(next(iter(table.values()))["ensemble"])
    lines = [f"{'ensemble':18s} {'members':>7s} " + " ".join(
        f"{m + ' ' + what:>16s}" for m in metrics for what in ("mean", "ens", "gain"))]
    for name, row in table.items():
        lines.append(f"{name:18s} {len(row['keys']):7d} " + " ".join(
            f"{row[part][m]:16.5f}" for m in metrics for part in ("member_mean", "ensemble", "gain")))
    return f"test metrics (loss: {loss_name}; mean of the members, the ensemble, gain = mean - ensemble)\n" + \
        "\n".join(lines)


def write_outputs(base, args, sources, loss_name, lpips, table):
    report = {"config": vars(args), "loss": loss_name, "units": "test metrics on images in [-1, 1]; "
              "gain = mean of the members' values - the ensemble's value",
              "checkpoints": {k: {"path": os.path.abspath(p), "sha256": file_digest(p)} for k, p in sources.items()},
              "lpips_weights": lpips.source if lpips is not None else None, "ensembles": table}
    write_json(base + ".json", report)
    with atomic_write(base + ".csv", "w") as f:
        metrics = list(next(iter(table.values()))["ensemble"])
        f.write("ensemble,members," + ",".join(f"{m}_{w}" for m in metrics for w in ("mean", "ensemble", "gain")) + "\n")
        for name, row in table.items():
            f.write(f"\"{name}\",{len(row['keys'])}," + ",".join(
                f"{row[p][m]:.6f}" for m in metrics for p in ("member_mean", "ensemble", "gain")) + "\n")
    files = {"json": base + ".json", "csv": base + ".csv", "plot": base + ".png"}
    figures.plot_ensembles(table, loss_name, files["plot"], os.path.basename(base))
    return files


if __name__ == "__main__":
    run_cli(main, get_args_parser())
