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
from tqdm import tqdm

import dataset as data
import figures
import trainer
from losses import LOSSES, LPIPS, LPIPSUnavailable, build_loss
from models.autoencoder import Autoencoder
from models.curves import CurveNet, PolyChain
from train import curve_name
from utils import (ArgParser, RunDir, UserError, autocast, check_amp, default_device, file_digest,
                   parameter_vector, positive, resolve_device, run_cli, update_bn, write_json)

STATS = ("start", "end", "min", "max", "avg", "int")


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
    p.add_argument("--lpips", action="store_true", help="also mean LPIPS (AlexNet) over the test split")
    p.add_argument("--lpips_weights", default=None, help="AlexNet weights file for LPIPS (see README)")
    p.add_argument("--bn_batches", type=positive(int), default=None,
                   help="training batches for BatchNorm re-estimation at each t (default: all)")
    p.add_argument("--num_images", type=positive(int), default=4, help="test images in the GIFs (4)")
    p.add_argument("--loss_function", choices=LOSSES, default=None, help="default: the run's loss")
    p.add_argument("--num_filters", type=positive(int), default=None, help="pyramid levels (the run's)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--seed", type=int, default=1)
    trainer.add_speed_args(p)
    data.add_data_args(p, inherit=True)
    return p


# ----------------------------------------------------------------------------- statistics

def path_stats(values, dl):
    """Garipov's summary of a metric along a path: start, end, min, max, avg (over the points)
    and int, the arc-length weighted trapezoid average sum 0.5 (v_{i-1} + v_i) dl_i / sum dl_i."""
    v, dl = np.asarray(values, dtype=np.float64), np.asarray(dl, dtype=np.float64)
    total = dl[1:].sum()
    integral = (0.5 * (v[:-1] + v[1:]) * dl[1:]).sum() / total if total > 0 else v.mean()
    return dict(start=v[0], end=v[-1], min=v.min(), max=v.max(), avg=v.mean(), int=integral)


def barrier_heights(ts, values):
    """(max_t m(t) - (m(0) + m(1)) / 2, max_t [m(t) - ((1 - t) m(0) + t m(1))])."""
    ts, v = np.asarray(ts, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return v.max() - 0.5 * (v[0] + v[-1]), (v - ((1 - ts) * v[0] + ts * v[-1])).max()


# ----------------------------------------------------------------------------- the walk

def walk(net, ts, loaders, metrics, samples, label, bn_batches=None, verbose=True, speed=None):
    """Evaluate `net` (a CurveNet) at each t. Returns per-t lists: ts, dl (distance to the
    previous point in weight space), train_<m> / test_<m> for every metric, seconds, and the
    reconstructions of `samples` at each t. `speed` holds the --amp / --channels_last / --compile
    settings; one module is reused for every point (and compiled once)."""
    train_loader, test_loader = loaders
    loss_fns, image_metrics = metrics
    amp = getattr(speed, "amp", "none")
    out = {"ts": list(ts), "dl": [], "seconds": [], "recons": []}
    previous = point = runner = None
    for t in tqdm(ts, desc=label, leave=False, disable=not verbose):
        started = time.time()
        point = net.point_at(float(t), out=point)
        if runner is None:
            runner = trainer.prepare_model(point, speed) if speed is not None else point
        with autocast(train_loader.device, amp):
            update_bn(train_loader, runner, num_batches=bn_batches)
        train = trainer.evaluate(runner, train_loader, loss_fns, amp=amp)
        test = trainer.evaluate(runner, test_loader, loss_fns, image_metrics, amp=amp)
        with torch.no_grad(), autocast(train_loader.device, amp):
            out["recons"].append(runner(samples).float().cpu())
        theta = parameter_vector(point)
        out["dl"].append(0.0 if previous is None else (theta - previous).norm().item())
        previous = theta
        for name, value in [*(("train_" + k, v) for k, v in train.items()),
                            *(("test_" + k, v) for k, v in test.items())]:
            out.setdefault(name, []).append(value)
        out["seconds"].append(time.time() - started)
        if verbose:
            row = "  ".join(f"{k} {out[k][-1]:.5f}" for k in out if k.startswith(("train_", "test_")))
            tqdm.write(f"{label:8s} t={t:.3f}  {row}  {out['seconds'][-1]:.1f}s")
    out["length"] = float(sum(out["dl"]))
    metric_keys = [k for k in out if k.startswith(("train_", "test_"))]
    out["stats"] = {k: path_stats(out[k], out["dl"]) for k in metric_keys}
    out["barriers"] = {k: dict(zip(("above_mean_of_ends", "above_line_between_ends"),
                                   barrier_heights(out["ts"], out[k]))) for k in metric_keys}
    return out


def segment_between(start, end):
    """The straight segment between two autoencoders: a 2-bend PolyChain."""
    seg = CurveNet(Autoencoder(**start.config), PolyChain, 2)
    seg.import_base(start, 0)
    seg.import_base(end, 1)
    return seg


def summary(label, result, ratio=None):
    lines = [f"{label}: length {result['length']:.4f}" + (f" ({ratio:.3f}x the segment)" if ratio else ""),
             f"  {'metric':14s}" + "".join(f"{s:>10s}" for s in STATS)]
    for key, st in result["stats"].items():
        lines.append(f"  {key:14s}" + "".join(f"{st[s]:10.5f}" for s in STATS))
    for key, b in result["barriers"].items():
        lines.append(f"  barrier {key}: {b['above_mean_of_ends']:.5f} above the mean of the ends, "
                     f"{b['above_line_between_ends']:.5f} above the line between them")
    return "\n".join(lines)


def stem(path):
    """runs/curve/checkpoint-8.pt -> curve_checkpoint-8."""
    return f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{os.path.splitext(os.path.basename(path))[0]}"


# ----------------------------------------------------------------------------- main

def load_paths(args, device):
    """{label: CurveNet} to walk, the source checkpoints {flag: path}, the run's args, a name."""
    if args.connect == "TRIVIAL":
        if not (args.init_start and args.init_end):
            raise UserError("--connect TRIVIAL needs both --init_start and --init_end")
        (a, ack), (b, bck) = [trainer.load_endpoint(p, f) for p, f in
                              ((args.init_start, "--init_start"), (args.init_end, "--init_end"))]
        trainer.check_same_architecture([ack["model_config"], bck["model_config"]], (args.init_start, args.init_end))
        name = f"{stem(args.init_start)}--{stem(args.init_end)}-segment"
        sources = {"init_start": args.init_start, "init_end": args.init_end}
        return {"segment": segment_between(a, b).to(device)}, sources, ack["args"], name
    if not args.ckpt:
        raise UserError("--connect CURVE needs --ckpt (a curve checkpoint)")
    ck = trainer.load_checkpoint(args.ckpt, kind="curve", flag="--ckpt")
    cfg = dict(ck["curve_config"])
    given = {"curve": args.curve, "num_bends": args.num_bends}
    trainer.check_config(given, cfg, "the checkpoint")
    curve = trainer.model_from_checkpoint(ck).to(device)
    paths = {f"curve ({cfg['curve']}, {cfg['num_bends']} bends)": curve}
    if not args.no_segment:
        paths["segment"] = segment_between(curve.point_at(0.0), curve.point_at(1.0)).to(device)
    return paths, {"ckpt": args.ckpt}, ck["args"], f"{stem(args.ckpt)}-curve"


def main(args):
    if args.num_points < 2:
        raise UserError(f"--num_points must be at least 2 (both ends), got {args.num_points}")
    device = resolve_device(args.device)
    check_amp(args.amp, device)
    torch.manual_seed(args.seed)
    lpips = None
    if args.lpips:  # fail at start, before any work, when no real backbone can be had
        try:
            lpips = LPIPS(args.lpips_weights).to(device)
        except LPIPSUnavailable as e:
            raise UserError(f"--lpips: {e}")
    paths, sources, run_args, name = load_paths(args, device)
    out_dir = args.dir or os.path.join(os.path.dirname(os.path.abspath(next(iter(sources.values())))), "eval")
    RunDir(out_dir)  # fails early, in one line, when it cannot be written
    data.inherit_data_args(args, run_args)
    loss_name = args.loss_function or run_args.get("loss_function") or "mae"
    levels = args.num_filters or run_args.get("num_filters") or 5
    loss_fns = {"loss": build_loss(loss_name, levels).to(device)}
    if loss_name != "mae":
        loss_fns["l1"] = build_loss("mae")
    image_metrics = {"lpips": lpips} if lpips is not None else None
    name = f"{name}-{args.num_points}pts"

    train_loader, test_loader = data.build_loaders(args, device)
    loaders = (train_loader.ordered(), test_loader)
    samples = next(iter(test_loader))[:args.num_images]
    ts = np.linspace(0.0, 1.0, args.num_points)
    print(f"walking {', '.join(paths)} at {args.num_points} points; loss {loss_name} on images in "
          f"[-1, 1]; BatchNorm re-estimated on {args.bn_batches or len(train_loader)} training batches per t")
    results = {label: walk(net, ts, loaders, (loss_fns, image_metrics), samples, label.split()[0],
                           args.bn_batches, speed=args) for label, net in paths.items()}

    seg = results.get("segment")
    ratio = None
    if seg is not None and len(results) == 2 and seg["length"] > 0:
        ratio = next(iter(results.values()))["length"] / seg["length"]
    for label, res in results.items():
        print(summary(label, res, ratio if label != "segment" else None))

    files = write_outputs(out_dir, name, args, sources, results, ratio, samples.cpu(), loss_name, lpips)
    print("outputs:\n  " + "\n  ".join(files))
    return results


def write_outputs(out_dir, name, args, sources, results, ratio, samples, loss_name, lpips):
    base = os.path.join(out_dir, name)
    arrays = {}
    report = {"config": vars(args), "loss": loss_name, "units": "losses on images in [-1, 1]",
              "checkpoints": {k: {"path": os.path.abspath(p), "sha256": file_digest(p)} for k, p in sources.items()},
              "lpips_weights": lpips.source if lpips is not None else None,
              "length_ratio": ratio, "paths": {}}
    for label, res in results.items():
        key = label.split()[0]
        report["paths"][label] = {k: v for k, v in res.items() if k != "recons"}
        for k, v in res.items():
            if isinstance(v, list) and k != "recons":
                arrays[f"{key}_{k}"] = np.asarray(v)
    if ratio is not None:
        arrays["length_ratio"] = np.asarray(ratio)
    write_json(base + ".json", report)
    np.savez(base + ".npz", **arrays)
    files = [base + ".json", base + ".npz"]
    title = f"{name} ({loss_name}, images in [-1, 1])"
    figures.plot_metric(results, "loss", f"{loss_name} loss", base + "_loss.png", title)
    files.append(base + "_loss.png")
    if lpips is not None:
        figures.plot_metric(results, "lpips", "LPIPS (AlexNet)", base + "_lpips.png", title)
        files.append(base + "_lpips.png")
    for label, res in results.items():
        key = label.split()[0]
        frames = figures.reconstruction_frames(samples, res["recons"], res["ts"], label)
        figures.save_gif(frames, f"{base}_{key}.gif")
        figures.save_strip(samples, res["recons"], res["ts"], label, f"{base}_{key}_strip.png")
        files += [f"{base}_{key}.gif", f"{base}_{key}_strip.png"]
    return files


if __name__ == "__main__":
    run_cli(main, get_args_parser())
