"""The loss surface on the plane through a curve's ends and middle bend (Garipov et al. 2018, Fig. 1),
or through three independently trained autoencoders; resumable, with contour figures.

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

import numpy as np
import torch

import checkpoints
import dataset as data
import distributed
import figures
import speed
import sweep
from losses import add_loss_args, add_lpips_args, evaluation_losses, lpips_from_args
from paths import PointEvaluator
from plane_geometry import DegeneratePlane, Plane, names_and_shapes, vector
from utils import (ArgParser, RunDir, UserError, default_device, file_digest, output_dir, output_stem, positive,
                   resolve_device, run_cli, write_json)


def margin(text):
    value = float(text)
    if not 0 <= value <= 10:
        raise ValueError(text)
    return value


def get_args_parser():
    p = ArgParser("plane.py", description=__doc__.split("\n")[0])
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
    add_lpips_args(p, "also mean LPIPS (AlexNet) over the test split")
    p.add_argument("--bn_batches", type=positive(int), default=None,
                   help="training batches for BatchNorm re-estimation at each point (default: all)")
    add_loss_args(p)
    p.add_argument("--device", default=default_device())
    speed.add_speed_args(p)
    data.add_data_args(p, inherit=True)
    return p


def load_points(args):
    """The three points spanning the plane ({name: parameter}), all bends, the curve (or None), a
    module of the architecture, the source checkpoints, the run's args, a name."""
    three = (args.init_start, args.init_middle, args.init_end)
    if args.ckpt and any(three):
        raise UserError("give either --ckpt (a curve) or --init_start, --init_middle and --init_end, not both")
    if args.ckpt:
        ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
        checkpoints.verify_endpoints(ck["curve_config"], strict=False)
        curve = checkpoints.build_model(ck)
        n = curve.num_bends
        bends = [{name: curve.bend_parameters(name)[k] for name in curve.names} for k in range(n)]
        corners = [bends[0], bends[n // 2], bends[-1]]
        return (corners, bends, curve, curve.point_at(0.0), {"ckpt": args.ckpt}, ck["args"],
                f"{output_stem(args.ckpt)}-plane")
    if not all(three):
        raise UserError("give --ckpt CURVE, or all three of --init_start, --init_middle and --init_end")
    flags = ("--init_start", "--init_middle", "--init_end")
    loaded = checkpoints.load_endpoints(list(three), flags)
    corners = [dict(model.named_parameters()) for model, _ in loaded]
    name = "--".join(output_stem(p) for p in three) + "-plane"
    return (corners, corners, None, loaded[0][0], dict(zip(("init_start", "init_middle", "init_end"), three)),
            loaded[0][1]["args"], name)


def settings(args, sources, loss_name, lpips, device):
    """Everything that changes the plane's numbers: a resumed plane must match it."""
    keys = ("grid_points", "margin_left", "margin_right", "margin_bottom", "margin_top", "bn_batches",
            "num_filters", "dataset", "max_images", "test_fraction", "batch_size", "amp", "channels_last",
            "compile", "no_tf32")
    return dict({k: getattr(args, k) for k in keys}, loss=loss_name, device=device.type,
                data_path=os.path.abspath(args.data_path) if args.dataset != "synthetic" else None,
                lpips=lpips.source if lpips is not None else None,
                checkpoints={k: file_digest(p) for k, p in sources.items()})


def main(args):
    """Evaluate the plane; returns {"metrics": {name: G x G array}, "geometry": {...}, "files": {...}}
    (under torchrun: on rank 0; the other ranks return None)."""
    if args.grid_points < 2:
        raise UserError(f"--grid_points must be at least 2, got {args.grid_points}")
    device = distributed.setup(resolve_device(args.device))
    speed.check_amp(args.amp, device)
    speed.configure(device, args)
    lpips = lpips_from_args(args, device)
    corners, bends, curve, template, sources, run_args, name = load_points(args)
    labels = ("start", "middle bend", "end") if curve is not None else ("--init_start", "--init_middle", "--init_end")
    try:
        plane = Plane(*(vector(c) for c in corners), labels=labels)
    except DegeneratePlane as e:
        raise UserError(str(e))
    out_dir = output_dir(args, sources, "plane")
    if distributed.is_main():
        RunDir(out_dir)
    data.inherit_data_args(args, run_args)
    loss_name, loss_fns = evaluation_losses(args, run_args, device)
    G = args.grid_points
    base = os.path.join(out_dir, f"{name}-{G}x{G}")

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

    train_loader, test_loader = data.build_loaders(args, device)
    evaluator = PointEvaluator(template, train_loader.ordered(), test_loader, loss_fns,
                               {"lpips": lpips} if lpips is not None else None, args.bn_batches, speed=args)
    layout = names_and_shapes(template)
    print(f"{G} x {G} grid points; loss {loss_name} on images in [-1, 1]; BatchNorm re-estimated on "
          f"{args.bn_batches or len(train_loader)} training batches per point")
    started = time.time()
    points = [(x, y) for x in xs for y in ys]  # row i: x = xs[i]; column j: y = ys[j]
    metrics, _ = sweep.run(base + ".npz", settings(args, sources, loss_name, lpips, device), points,
                           lambda xy: evaluator(plane.weights(*xy, layout, device)), shape=(G, G),
                           extra=geometry, desc="plane")
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return None
    files = write_outputs(base, args, sources, loss_name, lpips, geometry, metrics, curve is not None, labels)
    for key, values in metrics.items():
        finite = values[np.isfinite(values)]
        print(f"  {key:12s} min {finite.min():.5f}  max {finite.max():.5f}"
              + (f"  ({values.size - finite.size} diverged points)" if finite.size < values.size else ""))
    print(f"{time.time() - started:.1f}s; outputs:\n  " + "\n  ".join(files.values()))
    return {"metrics": metrics, "geometry": geometry, "files": files}


def write_outputs(base, args, sources, loss_name, lpips, geometry, metrics, has_curve, labels):
    def plain(a):  # JSON has no NaN: diverged points become null
        return np.where(np.isfinite(a), a, None).tolist() if isinstance(a, np.ndarray) else a
    report = {"config": vars(args), "loss": loss_name, "units": "losses on images in [-1, 1]; "
              "coordinates in weight-space distance (and as fractions of dx, dy)",
              "checkpoints": {k: {"path": os.path.abspath(p), "sha256": file_digest(p)} for k, p in sources.items()},
              "lpips_weights": lpips.source if lpips is not None else None,
              **{k: plain(v) for k, v in geometry.items()}, "metrics": {k: plain(v) for k, v in metrics.items()}}
    write_json(base + ".json", report)
    files = {"npz": base + ".npz", "json": base + ".json"}
    for key in metrics:
        path = f"{base}_plane.png" if key == "test_loss" else f"{base}_{key}_plane.png"
        what = f"{key.replace('_', ' ')}" + (f" ({loss_name}, images in [-1, 1])" if key.endswith("loss") else "")
        figures.plot_plane(geometry, metrics[key], what, path, has_curve, labels)
        files[f"{key}_plane"] = path
    return files


if __name__ == "__main__":
    run_cli(main, get_args_parser())
