"""Computes the loss surface on the plane through a curve's ends and middle bend (Garipov et al. 2018,
Fig. 1), or through three independently trained autoencoders, resumably, with contour figures.

    python plane.py --ckpt runs/curve/checkpoint-100.pt --grid_points 21 --lpips
    python plane.py --init_start A.pt --init_middle B.pt --init_end C.pt --grid_points 11

At each grid point the autoencoder w0 + x u + y v has its BatchNorm statistics re-estimated on the
training split (--bn_batches caps it to the same first batches everywhere), then the loss is
measured on the train and test splits (and LPIPS on the test split). Results are written as each
point completes: rerunning the same command continues an interrupted plane. Losses are on images
in [-1, 1]; plane coordinates are weight-space distances.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import dataset
from aemc import checkpoints, distributed, reports, resumable, tracking
from aemc.barriers import NAMES, barriers, higher_is_better
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.errors import UserError
from aemc.files import file_digest, output_stem
from aemc.geometry import DegeneratePlane, Plane, names_and_shapes, vector
from aemc.repair import interpolate, layers_to_repair
from aemc.settings import Run
from utils import (
    add_evaluation_args,
    loss_settings,
    open_session,
    output_dir,
    tracking_settings,
)


def margin(text):
    value = float(text)
    if not 0 <= value <= 10:
        raise ValueError(text)
    return value


def get_args_parser():
    p = ArgParser("plane.py", description=description(__doc__))
    p.add_argument("--ckpt", default=None, help="curve checkpoint: its ends and its middle bend span the plane")
    p.add_argument("--init_start", default=None, help="without --ckpt: the autoencoder at (0, 0)")
    p.add_argument("--init_middle", default=None, help="without --ckpt: the autoencoder off the axis")
    p.add_argument("--init_end", default=None, help="without --ckpt: the autoencoder at (dx, 0)")
    p.add_argument("--dir", default=None, help="output folder (default: <checkpoint folder>/plane)")
    p.add_argument("--grid_points", type=positive(int), default=21, help="points per side of the grid (21)")
    for side in ("left", "right", "bottom", "top"):
        p.add_argument(f"--margin_{side}", type=margin, default=0.2, metavar="M",
                       help=f"grid extends M dx (or dy) beyond the points on the {side} (0.2)")
    p.add_argument("--curve_points", type=positive(int), default=61, help="points of the projected curve (61)")
    add_evaluation_args(p, "also mean LPIPS (AlexNet) over the test split")
    p.add_argument("--repair", action="store_true",
                   help="REPAIR at every grid point: the layers no BatchNorm follows get the statistics of the three "
                        "corners weighted by the point's position (on the segment: Jordan et al.'s interpolation)")
    dataset.add_data_args(p, inherit=True)
    tracking.add_tracking_args(p)
    return p


@dataclass
class PlanePoints:
    """What spans the plane: its three corners ({name: parameter}), every bend (the corners, without
    a curve), the curve (or None), a module of the architecture, the source checkpoints ({role:
    path}), the settings of the run that made them, and a name for the outputs."""
    corners: list
    bends: list
    curve: object
    template: torch.nn.Module
    sources: dict
    run: Run
    name: str


def load_points(args):
    three = (args.init_start, args.init_middle, args.init_end)
    if args.ckpt and any(three):
        raise UserError("give either --ckpt (a curve) or --init_start, --init_middle and --init_end, not both")
    if args.ckpt:
        ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
        checkpoints.verify_endpoints(ck.curve_config, strict=False)
        curve = checkpoints.build_model(ck)
        n = curve.num_bends
        bends = [{name: curve.bend_parameters(name)[k] for name in curve.names} for k in range(n)]
        corners = [bends[0], bends[n // 2], bends[-1]]
        return PlanePoints(corners, bends, curve, curve.point_at(0.0), {"ckpt": args.ckpt}, ck.settings,
                           f"{output_stem(args.ckpt)}-plane")
    if not all(three):
        raise UserError("give --ckpt CURVE, or all three of --init_start, --init_middle and --init_end")
    flags = ("--init_start", "--init_middle", "--init_end")
    loaded = checkpoints.load_endpoints(list(three), flags)
    corners = [dict(model.named_parameters()) for model, _ in loaded]
    name = "--".join(output_stem(p) for p in three) + "-plane"
    sources = dict(zip(("init_start", "init_middle", "init_end"), three))
    return PlanePoints(corners, corners, None, loaded[0][0], sources, loaded[0][1].settings, name)


def settings(args, session, sources):
    """Everything that changes the plane's numbers: a resumed plane must match it (the keys are
    those of every version, so a plane begun by an earlier one continues)."""
    data, speed = session.data, session.speed
    return dict({k: getattr(args, k) for k in ("grid_points", "margin_left", "margin_right", "margin_bottom",
                                               "margin_top", "bn_batches")},
                num_filters=args.num_filters, dataset=data.dataset, max_images=data.max_images,
                test_fraction=data.test_fraction, batch_size=data.batch_size, amp=speed.amp,
                channels_last=speed.channels_last, compile=speed.compile, no_tf32=not speed.tf32,
                loss=session.loss.loss_function, device=session.device.type,
                data_path=os.path.abspath(data.data_path) if data.dataset != "synthetic" else None,
                lpips=session.lpips.source if session.lpips is not None else None,
                checkpoints={k: file_digest(p) for k, p in sources.items()},
                **({"repair": True} if args.repair else {}))  # absent otherwise: earlier planes still resume


def main(args):
    """Evaluate the plane; returns {"metrics": {name: G x G array}, "geometry": {...}, "files": {...}}
    (under torchrun: on rank 0; the other ranks return None)."""
    tracking.check_wandb(tracking_settings(args))
    if args.grid_points < 2:
        raise UserError(f"--grid_points must be at least 2, got {args.grid_points}")
    session = open_session(args)
    device = session.device
    points = load_points(args)
    curve, bends = points.curve, points.bends
    labels = ("start", "middle bend", "end") if curve is not None else ("--init_start", "--init_middle", "--init_end")
    try:
        plane = Plane(*(vector(c) for c in points.corners), labels=labels)
    except DegeneratePlane as e:
        raise UserError(str(e))
    session.prepare(dataset.data_settings(args, points.run.data), loss_settings(args, points.run.loss),
                    output_dir(args.dir, points.sources, "plane"))
    G = args.grid_points
    base = reports.plane_base(session.out_dir, points.name, G)

    xs, ys = plane.grid(G, (args.margin_left, args.margin_right, args.margin_bottom, args.margin_top))
    geometry = dict(dx=plane.dx, dy=plane.dy, xs=xs, ys=ys, xs_fraction=xs / plane.dx, ys_fraction=ys / plane.dy,
                    bend_coordinates=np.array([plane.coordinates(vector(b))[:2] for b in bends]))
    if curve is not None:
        ts = np.linspace(0, 1, args.curve_points)
        with torch.no_grad():
            projected = np.array([plane.coordinates(vector(curve.weights(t))) for t in ts])
        geometry.update(curve_ts=ts, curve_coordinates=projected[:, :2], curve_distance_from_plane=projected[:, 2])
    print(f"plane through the {', the '.join(labels)}: dx = {plane.dx:.4f}, dy = {plane.dy:.4f} (weight-space "
          f"distance); the {labels[1]} at x = {geometry['bend_coordinates'][len(bends) // 2][0]:.4f}"
          + (f"; the curve leaves the plane by up to {geometry['curve_distance_from_plane'].max():.4g}"
             if curve is not None and curve.num_bends > 3 else ""))

    evaluator = session.evaluator(points.template,
                                  repair_layers=layers_to_repair(points.template) if args.repair else None)
    layout = names_and_shapes(points.template)
    corners = [evaluator.statistics(c) for c in points.corners] if args.repair else None

    def evaluate(xy):  # with --repair: the corners' statistics, weighted by the point's position
        theta = plane.weights(*xy, layout, device)
        return evaluator(theta, repair_targets=interpolate(corners, plane.barycentric(*xy)) if corners else None)
    loss_name = session.loss.loss_function
    print(f"{G} x {G} grid points; loss {loss_name} on images in [-1, 1]; BatchNorm re-estimated on "
          f"{args.bn_batches or len(session.train_loader)} training batches per point"
          + ("; REPAIR at every point" if args.repair else ""))
    started = time.time()
    grid = [(x, y) for x in xs for y in ys]  # row i: x = xs[i]; column j: y = ys[j]
    metrics, _ = resumable.run(base + ".npz", settings(args, session, points.sources), grid, evaluate, shape=(G, G),
                               extra=geometry, desc="plane")
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return None
    along = path_barriers(geometry, metrics, curve is not None)
    for path, by_metric in along.items():
        b = by_metric["test_loss"]
        print(f"  along the {path} (from the grid): test loss barrier_mean_ends {b['barrier_mean_ends']:.5f}, "
              f"barrier_line {b['barrier_line']:.5f}")
    files = reports.write_plane(base, geometry=geometry, metrics=metrics, loss_name=loss_name, sources=points.sources,
                                config={"flags": vars(args)}, has_curve=curve is not None, labels=labels,
                                lpips_source=session.lpips.source if session.lpips is not None else None,
                                extra={"path_barriers": along})
    for key, values in metrics.items():
        finite = values[np.isfinite(values)]
        print(f"  {key:12s} min {finite.min():.5f}  max {finite.max():.5f}"
              + (f"  ({values.size - finite.size} diverged points)" if finite.size < values.size else ""))
    print(f"{time.time() - started:.1f}s; outputs:\n  " + "\n  ".join(files.values()))
    trackers = tracking.open_trackers(tracking_settings(args), os.path.dirname(base), {"flags": vars(args)}, "plane",
                                      name=os.path.basename(base))
    for tracker in trackers:
        tracker.media({role: path for role, path in files.items() if path.endswith(".png")})
        tracker.table("path_barriers", ["path", "metric", *NAMES],
                      [[path, key, *(b[n] for n in NAMES)] for path, by in along.items() for key, b in by.items()])
    tracking.close(trackers)
    return {"metrics": metrics, "geometry": geometry, "files": files}


def path_barriers(geometry, metrics, has_curve):
    """The named barriers of every metric along the segment (y = 0) and the projected curve, read
    off the grid by bilinear interpolation (an estimate: eval_curve.py measures the paths
    themselves); {path: {metric: {name: value}}}."""
    from scipy.interpolate import RegularGridInterpolator
    ts = geometry["curve_ts"] if has_curve else np.linspace(0, 1, 61)
    tracks = {"segment": np.stack([ts * geometry["dx"], np.zeros_like(ts)], 1)}
    if has_curve:
        tracks["curve"] = geometry["curve_coordinates"]
    out = {}
    for path, coordinates in tracks.items():
        out[path] = {}
        for key, values in metrics.items():
            along = RegularGridInterpolator((geometry["xs"], geometry["ys"]), values, bounds_error=False)(coordinates)
            out[path][key] = barriers(ts, along, higher_is_better(key))
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
