"""Walk a path in weight space (a trained curve, and the straight segment between its ends) and
report losses, LPIPS, path statistics, barrier heights, plots and GIFs of reconstructions.

    python eval_curve.py --ckpt runs/curve/checkpoint-100.pt --num_points 21 --lpips
    python eval_curve.py --connect TRIVIAL --init_start A.pt --init_end B.pt

At each of --num_points evenly spaced t in [0, 1], BatchNorm statistics are re-estimated on the
training split (--bn_batches caps it to the same first batches at every t), then the loss is
measured on the train and test splits (and LPIPS on the test split). Losses are on images in [-1, 1].
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
from losses import add_loss_args, add_lpips_args, evaluation_losses, lpips_from_args
from alignment import add_align_args, align_from_args
from ensembles import EndEnsembles
from models.curves import connect, curve_name
from paths import PointEvaluator, summary, update_bn, walk
from utils import (ArgParser, RunDir, UserError, atomic_write, default_device, file_digest,
                   output_dir, output_stem, positive, resolve_device, run_cli, write_json)


def get_args_parser():
    p = ArgParser("eval_curve.py", description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=None, help="output folder (default: <checkpoint folder>/eval)")
    p.add_argument("--ckpt", default=None, help="curve checkpoint (for --connect CURVE)")
    p.add_argument("--connect", type=str.upper, choices=("CURVE", "TRIVIAL"), default="CURVE",
                   help="CURVE: the trained curve (and its segment); TRIVIAL: the segment between "
                        "--init_start and --init_end")
    p.add_argument("--curve", type=curve_name, default=None, help="checked against the checkpoint")
    p.add_argument("--num_bends", type=positive(int), default=None, help="checked against the checkpoint")
    p.add_argument("--init_start", default=None, help="endpoint checkpoint at t = 0 (TRIVIAL)")
    p.add_argument("--init_end", default=None, help="endpoint checkpoint at t = 1 (TRIVIAL)")
    p.add_argument("--num_points", type=int, default=10, help="evenly spaced t in [0, 1] (10)")
    p.add_argument("--no_segment", action="store_true", help="do not also walk the curve's segment")
    p.add_argument("--ensemble", action="store_true",
                   help="also, at every t: the diversity mean |f_t(x) - f_end(x)| from each end and the loss "
                        "and gain of the ensembles {theta(0), theta(t)} and {theta(1), theta(t)}. Keeps the "
                        "two ends' test reconstructions in memory: 2 x 49,152 bytes per test image "
                        "(4.0 GB for CelebA's 40,520), on the data's device")
    p.add_argument("--align", action="store_true",
                   help="also walk the segment from the start to the end with its units permuted to "
                        "match the start's (see align.py and the alignment flags)")
    add_lpips_args(p, "also mean LPIPS (AlexNet) over the test split")
    p.add_argument("--bn_batches", type=positive(int), default=None,
                   help="training batches for BatchNorm re-estimation at each t (default: all)")
    p.add_argument("--num_images", type=positive(int), default=4, help="test images in the GIFs (4)")
    add_loss_args(p)
    p.add_argument("--device", default=default_device())
    p.add_argument("--seed", type=int, default=1)
    add_align_args(p)
    speed.add_speed_args(p)
    data.add_data_args(p, inherit=True)
    return p


# ----------------------------------------------------------------------------- main

def load_paths(args):
    """{label: CurveNet} to walk, the two ends (autoencoders), the source checkpoints
    {flag: path}, the run's args, a name."""
    if args.connect == "TRIVIAL":
        if not (args.init_start and args.init_end):
            raise UserError("--connect TRIVIAL needs both --init_start and --init_end")
        (a, ack), (b, _) = checkpoints.load_endpoints([args.init_start, args.init_end])
        name = f"{output_stem(args.init_start)}--{output_stem(args.init_end)}-segment"
        sources = {"init_start": args.init_start, "init_end": args.init_end}
        return {"segment": connect(a, b)}, (a, b), sources, ack["args"], name
    if not args.ckpt:
        raise UserError("--connect CURVE needs --ckpt (a curve checkpoint)")
    ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
    cfg = ck["curve_config"]
    checkpoints.check_config({"curve": args.curve, "num_bends": args.num_bends}, cfg, "the checkpoint")
    checkpoints.verify_endpoints(cfg, strict=False)
    curve = checkpoints.build_model(ck)
    paths = {f"curve ({cfg['curve']}, {cfg['num_bends']} bends)": curve}
    ends = (curve.point_at(0.0), curve.point_at(1.0))
    if not args.no_segment:  # a curve trained with --align ends at the aligned copy of its endpoint
        paths["segment (end aligned by --align)" if cfg.get("alignment") else "segment"] = connect(*ends)
    return paths, ends, {"ckpt": args.ckpt}, ck["args"], f"{output_stem(args.ckpt)}-curve"


def main(args):
    """Walk the paths; returns {"paths": {label: walk result}, "files": {role: path}} (under
    torchrun: on rank 0; the other ranks return None)."""
    if args.num_points < 2:
        raise UserError(f"--num_points must be at least 2 (both ends), got {args.num_points}")
    device = distributed.setup(resolve_device(args.device))
    speed.check_amp(args.amp, device)
    speed.configure(device, args)
    torch.manual_seed(args.seed)
    lpips = lpips_from_args(args, device)
    paths, ends, sources, run_args, name = load_paths(args)
    out_dir = output_dir(args, sources, "eval")
    if distributed.is_main():
        RunDir(out_dir)  # fails early, in one line, when it cannot be written
    data.inherit_data_args(args, run_args)
    loss_name, loss_fns = evaluation_losses(args, run_args, device)
    name = f"{name}-{args.num_points}pts" + ("-aligned" if args.align else "")

    train_loader, test_loader = data.build_loaders(args, device)
    alignment = None
    if args.align:  # the segment from the start to the end with its units matched to the start's
        a, b = (m.to(device) for m in ends)
        if args.connect == "CURVE":  # points of a curve carry no BatchNorm statistics of their own
            for m in (a, b):
                update_bn(train_loader.ordered(), m, num_batches=args.bn_batches)
        aligned, alignment = align_from_args(a, b, args, train_loader)
        paths["aligned segment"] = connect(a, aligned)
        print(f"{args.align_method} matching: ||start - end|| = {alignment['distance_before']:.4f}, "
              f"||start - aligned end|| = {alignment['distance_after']:.4f}")
    samples = next(iter(test_loader))[:args.num_images]
    template = next(iter(paths.values())).point_at(0.0)
    evaluator = PointEvaluator(template, train_loader.ordered(), test_loader, loss_fns,
                               {"lpips": lpips} if lpips is not None else None, args.bn_batches,
                               speed=args, samples=samples)
    ts = np.linspace(0.0, 1.0, args.num_points)
    print(f"walking {', '.join(paths)} at {args.num_points} points; loss {loss_name} on images in "
          f"[-1, 1]; BatchNorm re-estimated on {args.bn_batches or len(train_loader)} training batches per t")
    started = time.time()
    results = {label: walk(net.to(device), ts, evaluator, label.split()[0],
                           ensemble=EndEnsembles(loss_fns, evaluator.image_metrics) if args.ensemble else None)
               for label, net in paths.items()}
    walk_seconds, processes, main = time.time() - started, distributed.world(), distributed.is_main()
    distributed.shutdown()
    if not main:
        return None

    curve_label = next((label for label in results if label.startswith("curve")), None)
    segment_label = next((label for label in results if label.startswith("segment")), None)
    ratio = None
    if curve_label and segment_label and results[segment_label]["length"] > 0:
        ratio = results[curve_label]["length"] / results[segment_label]["length"]
    for label, res in results.items():
        print(summary(label, res, ratio if label == curve_label else None))

    files = write_outputs(out_dir, name, args, sources, results, ratio, samples.cpu(), loss_name, lpips,
                          alignment, dict(processes=processes, walk_seconds=walk_seconds))
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"paths": results, "files": files}


def write_outputs(out_dir, name, args, sources, results, ratio, samples, loss_name, lpips, alignment=None,
                  timing=None):
    base = os.path.join(out_dir, name)
    arrays = {}
    report = {"config": vars(args), "loss": loss_name, "units": "losses on images in [-1, 1]",
              "checkpoints": {k: {"path": os.path.abspath(p), "sha256": file_digest(p)} for k, p in sources.items()},
              "lpips_weights": lpips.source if lpips is not None else None,
              "length_ratio": ratio, "alignment": alignment, **(timing or {}), "paths": {}}
    for label, res in results.items():
        key = label.split()[0]
        report["paths"][label] = {k: v for k, v in res.items() if k != "recons"}
        for k, v in res.items():
            if isinstance(v, list) and k != "recons":
                arrays[f"{key}_{k}"] = np.asarray(v)
    if ratio is not None:
        arrays["length_ratio"] = np.asarray(ratio)
    write_json(base + ".json", report)
    with atomic_write(base + ".npz") as f:
        np.savez(f, **arrays)
    files = {"json": base + ".json", "npz": base + ".npz", "loss_plot": base + "_loss.png"}
    title = f"{name} ({loss_name}, images in [-1, 1])"
    figures.plot_metric(results, "loss", f"{loss_name} loss", files["loss_plot"], title)
    if lpips is not None:
        files["lpips_plot"] = base + "_lpips.png"
        figures.plot_metric(results, "lpips", "LPIPS (AlexNet)", files["lpips_plot"], title)
    if args.ensemble:
        files["ensemble_plot"] = base + "_ensemble.png"
        figures.plot_ensemble(results, loss_name, files["ensemble_plot"], title)
    for label, res in results.items():
        key = label.split()[0]
        files[f"{key}_gif"], files[f"{key}_strip"] = f"{base}_{key}.gif", f"{base}_{key}_strip.png"
        frames = figures.reconstruction_frames(samples, res["recons"], res["ts"], label)
        figures.save_gif(frames, files[f"{key}_gif"])
        figures.save_strip(samples, res["recons"], res["ts"], label, files[f"{key}_strip"])
    return files


if __name__ == "__main__":
    run_cli(main, get_args_parser())
