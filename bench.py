"""Benchmarks: what the training and evaluation paths cost, as ratios measured in one process.

    python bench.py                 # default architecture, batch 64, on the default device
    python bench.py --quick         # tiny configuration (seconds; the test suite runs this)

Each figure is the median over repeated, interleaved measurements after warm-up, so that the
ratios compare like with like on a shared, noisy machine. Prints a table and writes JSON.
"""
import json
import platform
import statistics
import time

import torch

from models.autoencoder import Autoencoder
from models.curves import Bezier, CurveNet
from utils import ArgParser, default_device, positive, resolve_device, run_cli, write_json


def get_args_parser():
    p = ArgParser("bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--quick", action="store_true", help="tiny configuration, few repeats")
    p.add_argument("--in_filters", type=positive(int), default=None, help="width f (64; quick: 4)")
    p.add_argument("--batch_size", type=positive(int), default=None, help="(64; quick: 8)")
    p.add_argument("--repeats", type=positive(int), default=None, help="timed repeats (7; quick: 3)")
    p.add_argument("--json", default="bench.json", help="where to write the results (bench.json)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns, device, repeats, warmup=2):
    """Median seconds of each of `fns`, run in turn (a, b, a, b, ...) after `warmup` rounds."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = timed(fn, device)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_step(model, optimizer, x, curve_wd=0.0):
    """One denoising training step as trainer.train_one_epoch takes it."""
    def step():
        out = model(x + 0.05 * torch.randn_like(x))
        loss = (out - x).abs().mean()
        if curve_wd:
            loss = loss + 0.5 * curve_wd * model.sq_norm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_curve_step(cfg, device):
    """Endpoint step vs 3-bend Bezier curve step (fixed ends), same data."""
    torch.manual_seed(0)
    x = torch.rand(cfg["batch_size"], 3, 64, 64, device=device) * 2 - 1
    endpoint = Autoencoder(in_filters=cfg["in_filters"]).to(device)
    curve = CurveNet(Autoencoder(in_filters=cfg["in_filters"]), Bezier, 3).to(device)
    curve.init_linear()
    opt_e = torch.optim.Adam(endpoint.parameters(), lr=1e-4)
    opt_c = torch.optim.Adam([p for p in curve.parameters() if p.requires_grad], lr=1e-4)
    t = interleaved({"endpoint": training_step(endpoint, opt_e, x),
                     "curve": training_step(curve, opt_c, x, curve_wd=1e-6)}, device, cfg["repeats"])
    return {"endpoint_step_s": t["endpoint"], "curve_step_s": t["curve"],
            "endpoint_images_per_s": cfg["batch_size"] / t["endpoint"],
            "curve_over_endpoint": t["curve"] / t["endpoint"]}


def bench_eval_point(cfg, device):
    """One point of eval_curve.walk (BN re-estimation + train and test evaluation) against the
    same three passes of bare forward calls; and the same point with LPIPS on the test split."""
    import dataset
    from eval_curve import walk
    from losses import LPIPS
    from utils import update_bn
    torch.manual_seed(0)
    images = dataset.synthetic_faces(cfg["eval_images"])
    train, test = dataset.split_images(images, 0.2)
    train_loader = dataset.TensorLoader(train, cfg["batch_size"], device)
    test_loader = dataset.TensorLoader(test, cfg["batch_size"], device)
    curve = CurveNet(Autoencoder(in_filters=cfg["eval_filters"]), Bezier, 3).to(device)
    curve.init_linear()
    model = curve.point_at(0.5)
    l1 = {"loss": torch.nn.L1Loss()}
    lpips = LPIPS().to(device)
    samples = next(iter(test_loader))[:4]

    @torch.no_grad()
    def bare():  # what a point needs at the least: BN pass, forward over train, forward over test
        update_bn(train_loader, model)
        model.eval()
        for loader in (train_loader, test_loader):
            for x in loader:
                model(x)

    def point(metrics):
        return lambda: walk(curve, [0.5], (train_loader, test_loader), (l1, metrics), samples,
                            "bench", verbose=False)
    t = interleaved({"bare": bare, "point": point(None), "point_lpips": point({"lpips": lpips})},
                    device, cfg["repeats"])
    return {"bare_passes_s": t["bare"], "point_s": t["point"], "point_lpips_s": t["point_lpips"],
            "point_over_bare": t["point"] / t["bare"],
            "lpips_point_over_point": t["point_lpips"] / t["point"]}


def main(args):
    device = resolve_device(args.device)
    cfg = dict(in_filters=args.in_filters or (4 if args.quick else 64),
               batch_size=args.batch_size or (8 if args.quick else 64),
               repeats=args.repeats or (3 if args.quick else 7),
               # evaluation of a path point: a small configuration, as the demo uses
               eval_filters=4 if args.quick else 16, eval_images=40 if args.quick else 2000)
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), **cfg)
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    results = {"curve_step": bench_curve_step(cfg, device), "eval_point": bench_eval_point(cfg, device)}
    for section, values in results.items():
        print(f"[{section}]")
        for k, v in values.items():
            print(f"  {k:28s} {v:12.4f}")
    write_json(args.json, {"config": env, "results": results})
    print(f"written: {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
