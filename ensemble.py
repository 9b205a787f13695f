"""Scores ensembles of points along a curve, along its straight segment, or of separately trained
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
from dataclasses import dataclass

import numpy as np
import torch

import dataset
from aemc import checkpoints, distributed, reports
from aemc.barriers import barriers, higher_is_better
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.ensembles import Ensemble, member_state, score_ensembles
from aemc.errors import UserError
from aemc.files import output_stem
from aemc.repair import interpolate, layers_to_repair
from aemc.settings import Run
from models.curves import connect
from utils import (
    add_evaluation_args,
    loss_settings,
    open_session,
    output_dir,
)


def member_list(text):
    try:
        ts = [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(text)
    if any(not 0 <= t <= 1 for t in ts):
        raise ValueError(text)
    return ts


def get_args_parser():
    p = ArgParser("ensemble.py", description=description(__doc__))
    p.add_argument("--ckpt", default=None, help="curve checkpoint: ensembles of its points and its segment's")
    p.add_argument("--num_members", type=positive(int), default=None, help="K: equally spaced members, k = 2..K")
    p.add_argument("--members", type=member_list, default=None, metavar="T1,T2,...",
                   help="the curve parameters of the members, in the order they join")
    p.add_argument("--ckpts", nargs="+", default=None, metavar="CKPT",
                   help="instead of --ckpt: separately trained autoencoders, joining in this order")
    p.add_argument("--dir", default=None, help="output folder (default: <checkpoint folder>/ensemble)")
    add_evaluation_args(p, "also LPIPS (AlexNet) of members and ensembles",
                        "training batches for each member's BatchNorm re-estimation")
    p.add_argument("--repair", action="store_true",
                   help="REPAIR the members on the segment (Jordan et al. 2023; see eval_curve.py --repair)")
    dataset.add_data_args(p, inherit=True)
    return p


@dataclass
class Plan:
    """The members ({key: (model or curve, t or None)}), the ensembles ([Ensemble]), a module of
    the architecture, the source checkpoints ({role: path}), the settings of the run that made them,
    and a name for the outputs."""
    members: dict
    ensembles: list
    template: torch.nn.Module
    sources: dict
    run: Run
    name: str


def plan(args):
    if args.ckpts:
        if args.ckpt or args.num_members or args.members:
            raise UserError("--ckpts takes no --ckpt, --num_members or --members")
        if len(args.ckpts) < 2:
            raise UserError("an ensemble needs at least 2 members: give 2 or more --ckpts")
        flags = [f"--ckpts[{i}]" for i in range(len(args.ckpts))]
        loaded = checkpoints.load_endpoints(args.ckpts, flags)
        members = {f"ckpt {i}": (model, None) for i, (model, _) in enumerate(loaded)}
        keys = list(members)
        ensembles = [Ensemble("checkpoints", keys[:k]) for k in range(2, len(keys) + 1)]
        sources = {flag: path for flag, path in zip(flags, args.ckpts)}
        return Plan(members, ensembles, loaded[0][0], sources, loaded[0][1].settings,
                    f"{output_stem(args.ckpts[0])}-ckpts")
    if not args.ckpt:
        raise UserError("give --ckpt CURVE (with --num_members or --members) or --ckpts A B ...")
    if (args.num_members is None) == (args.members is None):
        raise UserError("give exactly one of --num_members K and --members T1,T2,...")
    if (args.num_members or 2) < 2 or (args.members is not None and len(set(args.members)) < 2):
        raise UserError("an ensemble needs at least 2 members")
    ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
    checkpoints.verify_endpoints(ck.curve_config, strict=False)
    curve = checkpoints.build_model(ck)
    segment = connect(curve.point_at(0.0), curve.point_at(1.0))
    if args.num_members:
        groups = {k: list(np.linspace(0, 1, k)) for k in range(2, args.num_members + 1)}
    else:
        groups = {k: args.members[:k] for k in range(2, len(args.members) + 1)}

    def key(path, t):  # the two paths share their ends: the same member
        return "start" if t == 0 else "end" if t == 1 else f"{path} t={t:.4g}"
    members, ensembles = {}, [Ensemble("endpoints", ["start", "end"])]
    for path, net in (("curve", curve), ("segment", segment)):
        for ts in groups.values():
            ensembles.append(Ensemble(path, [key(path, float(t)) for t in ts]))
            members.update({key(path, float(t)): (net, float(t)) for t in ts})
    return Plan(members, ensembles, curve.point_at(0.0), {"ckpt": args.ckpt}, ck.settings,
                f"{output_stem(args.ckpt)}-curve")


def main(args):
    """Score the ensembles; returns {"table": {name: {...}}, "files": {...}} (under torchrun: on
    rank 0, which scores them all in one test pass; the other ranks return None)."""
    session = open_session(args)
    device = session.device
    chosen = plan(args)
    members = chosen.members
    session.prepare(dataset.data_settings(args, chosen.run.data), loss_settings(args, chosen.run.loss),
                    output_dir(args.dir, chosen.sources, "ensemble"))
    if args.repair and args.ckpts:
        raise UserError("--repair applies to the members on a segment: give --ckpt CURVE, not --ckpts")
    evaluator = session.evaluator(chosen.template, image_metrics=False,
                                  repair_layers=layers_to_repair(chosen.template) if args.repair else None)
    segment = next((source for key, (source, t) in members.items() if key.startswith("segment")), None)
    ends = [evaluator.statistics(segment.to(device).weights(t)) for t in (0.0, 1.0)] if args.repair else None
    loss_name = session.loss.loss_function
    print(f"{len(members)} members, {len(chosen.ensembles)} ensembles; BatchNorm re-estimated on "
          f"{args.bn_batches or len(session.train_loader)} training batches per member; loss {loss_name} "
          "on images in [-1, 1]")
    mine = {}  # under torchrun each process re-estimates BatchNorm for its share of the members
    for key in distributed.share(list(members)):
        source, t = members[key]
        theta = dict(source.named_parameters()) if t is None else source.to(device).weights(t)
        targets = interpolate(ends, (1 - t, t)) if ends and key.startswith("segment") else None
        mine[key] = {k: v.cpu() for k, v in member_state(evaluator, theta, targets).items()}
    everyone, main = distributed.gather(mine), distributed.is_main()
    distributed.shutdown()
    if not main:
        return None
    states = {key: {k: v.to(device) for k, v in part[key].items()} for key in members
              for part in everyone if key in part}
    table = score_ensembles(evaluator.module, states, chosen.ensembles, session.test_loader, session.loss_fns,
                            session.image_metrics, session.speed.amp)
    print(format_table(table, loss_name))
    along = member_barriers(table, members)
    for family, by_metric in along.items():
        b = by_metric["loss"]
        print(f"  the {family}'s members: test loss barrier_mean_ends {b['barrier_mean_ends']:.5f}, "
              f"barrier_line {b['barrier_line']:.5f}")
    files = reports.write_ensembles(os.path.join(session.out_dir, f"{chosen.name}-ensembles"), table=table,
                                    loss_name=loss_name, sources=chosen.sources, config={"flags": vars(args)},
                                    lpips_source=session.lpips.source if session.lpips is not None else None,
                                    extra={"path_barriers": along, "repair": args.repair})
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"table": table, "files": files}


def member_barriers(table, members):
    """The named barriers of every test metric along the curve and the segment, from the members of
    each family's largest ensemble (their own scores, at their t): {family: {metric: {...}}}."""
    out = {}
    for family in ("curve", "segment"):
        rows = [row for row in table.values() if row["family"] == family]
        if not rows:
            continue
        row = max(rows, key=lambda r: len(r["keys"]))
        order = sorted(range(len(row["keys"])), key=lambda i: members[row["keys"][i]][1])
        ts = [members[row["keys"][i]][1] for i in order]
        out[family] = {m: barriers(ts, [row["members"][i][m] for i in order], higher_is_better(m))
                       for m in row["members"][0]}
    return out


def format_table(table, loss_name):
    metrics = list(next(iter(table.values()))["ensemble"])
    lines = [f"{'ensemble':18s} {'members':>7s} " + " ".join(
        f"{m + ' ' + what:>16s}" for m in metrics for what in ("mean", "ens", "gain"))]
    for name, row in table.items():
        lines.append(f"{name:18s} {len(row['keys']):7d} " + " ".join(
            f"{row[part][m]:16.5f}" for m in metrics for part in ("member_mean", "ensemble", "gain")))
    return (f"test metrics (loss: {loss_name}; mean of the members, the ensemble, gain > 0: the ensemble is "
            "better: mean - ensemble, for PSNR ensemble - mean)\n") + \
        "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
