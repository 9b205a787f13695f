"""Measures what data loading, training and evaluation cost, as ratios measured in one process.

    python bench.py                          # default architecture (f=64), batch 64, default device
    python bench.py --quick                  # tiny configuration (seconds; the test suite runs it)
    python bench.py --device cuda --gpu_targets   # adds batch-256 training and a 61-point walk
                                                  # over a CelebA-sized synthetic set

Figures are medians over repeated measurements after warm-up; the variants of one section run in
turn (a, b, c, a, b, c, ...) so that their ratios compare like with like on a shared, noisy
machine. Training steps go through trainer.train_one_epoch and evaluation through
paths.PointEvaluator and paths.walk: the code users run. Prints a table and writes JSON.
"""
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import dataset
import trainer
from aemc import architectures, checkpoints, resumable, speed
from aemc.alignment import align
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.data import folder
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import synthetic_faces
from aemc.errors import UserError
from aemc.evaluation import PointEvaluator, update_bn
from aemc.files import write_json
from aemc.geometry import Plane, names_and_shapes, vector
from aemc.losses import LPIPS
from aemc.objective import training_objective
from aemc.paths import walk
from aemc.settings import Architecture, Data, Run, Speed
from models.autoencoder import Autoencoder
from models.curves import Bezier, CurveNet, connect
from models.symmetry import apply_permutation, permutation_spec, random_permutation
from utils import add_device_arg, resolve_device


def get_args_parser():
    p = ArgParser("bench.py", description=description(__doc__))
    add_device_arg(p)
    p.add_argument("--quick", action="store_true", help="tiny configuration, few repeats")
    p.add_argument("--in_filters", type=positive(int), default=None, help="width f (64; quick: 4)")
    p.add_argument("--batch_size", type=positive(int), default=None, help="(64; quick: 8)")
    p.add_argument("--repeats", type=positive(int), default=None, help="timed repeats (5; quick: 2)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    p.add_argument("--gpu_targets", action="store_true",
                   help="CUDA: batch-256 training and a 61-point walk over 202,599 images")
    p.add_argument("--sections", default=None, metavar="A,B",
                   help=f"run only these sections ({', '.join(SECTIONS)}; default: all)")
    p.add_argument("--json", default="bench.json", help="where to write the results (bench.json)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns, device, repeats, warmup=1):
    """Median seconds of each of `fns`, run in turn after `warmup` rounds."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- data

def bench_data(cfg, device):
    """Images/s: the in-memory pipeline against a per-image PIL loader over the same folder."""
    import torchvision.transforms as T
    from PIL import Image

    class PerImagePIL(torch.utils.data.Dataset):  # what the original project did for every item
        transform = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

        def __init__(self, files):
            self.files = files

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert("RGB"))

    with tempfile.TemporaryDirectory() as root:
        faces = synthetic_faces(cfg["data_images"])
        for i, face in enumerate(faces):  # CelebA-like files: 178x218 JPEGs
            img = Image.fromarray(face.permute(1, 2, 0).numpy()).resize((178, 218))
            img.save(os.path.join(root, f"{i:06d}.jpg"), quality=95)
        files = [os.path.join(root, f) for f in folder.list_images(root)]
        baseline = torch.utils.data.DataLoader(PerImagePIL(files), batch_size=cfg["batch_size"],
                                               shuffle=True, num_workers=2)
        images = folder.load_folder(root, verbose=False)
        memory = TensorLoader(images, cfg["batch_size"], device, shuffle=True)

        def pil_epoch():
            for x in baseline:
                x.to(device)

        def memory_epochs(n=20):
            for e in range(n):
                memory.set_epoch(e)
                for _ in memory:
                    pass
        t = interleaved({"pil": pil_epoch, "memory": memory_epochs}, device, cfg["repeats"])
    n = len(files)
    return {"pil_images_per_s": n / t["pil"], "memory_images_per_s": 20 * n / t["memory"],
            "memory_over_pil": (20 * n / t["memory"]) / (n / t["pil"])}


# ----------------------------------------------------------------------------- training

def epoch_runner(model, loader, curve=False, amp="none", compile=False, channels_last=False):
    """A function running one training epoch over `loader` exactly as train.py does (its default
    settings: L1 loss, denoising noise 0.05, weight decay 1e-6; a curve's the explicit term)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compile else model
    settings = Run(speed=Speed(amp=amp, channels_last=channels_last, compile=compile))
    objective = training_objective(settings, curve=curve, device=loader.device)
    opt = trainer.make_optimizer(settings.optim, [p for p in model.parameters() if p.requires_grad],
                                 objective.optimizer_weight_decay, loader.device)
    scaler = speed.make_scaler(loader.device, amp)
    return lambda: trainer.train_one_epoch(runner, loader, opt, objective, settings, scaler=scaler, verbose=False)


def step_images(device, batch_size, channels_last=False, steps=2):
    images = synthetic_faces(batch_size * steps)
    return TensorLoader(images, batch_size, device, shuffle=True, channels_last=channels_last)


def bench_training(cfg, device, batch_size=None, steps=2):
    """Endpoint training step, fp32 and each fast option: images/s and speed-up over fp32."""
    batch_size = batch_size or cfg["batch_size"]
    variants = {"fp32": {}, "channels_last": dict(channels_last=True), "bf16": dict(amp="bf16"),
                "bf16+channels_last": dict(amp="bf16", channels_last=True)}
    if device.type == "cuda":
        variants["fp16+channels_last"] = dict(amp="fp16", channels_last=True)
    if cfg["compile"]:
        variants["bf16+channels_last+compile"] = dict(amp="bf16", channels_last=True, compile=True)
    fns = {}
    for name, opts in variants.items():
        torch.manual_seed(0)
        model = Autoencoder(in_filters=cfg["in_filters"]).to(device)
        loader = step_images(device, batch_size, opts.get("channels_last", False), steps)
        fns[name] = epoch_runner(model, loader, **opts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = interleaved(fns, device, cfg["repeats"])
    out = {}
    for name, seconds in t.items():
        out[f"{name}_images_per_s"] = batch_size * steps / seconds
        out[f"{name}_speedup"] = t["fp32"] / seconds
    if device.type == "cuda":
        out["peak_memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # the process's peak resident memory so far (Linux reports KiB)
        out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def arch_sizes(cfg):
    """Each built-in architecture at the bench's width, on images of the size it is meant for:
    {name: (Architecture, channels, image size)}."""
    f = cfg["in_filters"]
    return {"conv": (Architecture("conv", dict(in_filters=f)), 3, 64),
            "resnet": (Architecture("resnet", dict(in_filters=max(f // 4, 4))), 3, 64),
            "vae": (Architecture("vae", dict(in_filters=max(f // 2, 4))), 3, 64),
            "mlp": (Architecture("mlp", dict(in_channels=1, image_size=28, hidden=8 * f, latent_dim=32)), 1, 28)}


def bench_curve_step(cfg, device):
    """Endpoint step vs 3-bend Bezier curve step (fixed ends), same data, same code path, for each
    built-in architecture (conv at width f; resnet f/4 and vae f/2, their default ratio to conv's;
    mlp 784-8f-32 on 28x28 grey)."""
    fns = {}
    for name, (arch, channels, size) in arch_sizes(cfg).items():
        torch.manual_seed(0)
        images = synthetic_faces(cfg["batch_size"] * 2, size=size)
        images = images[:, :1].contiguous() if channels == 1 else images
        loader = TensorLoader(images, cfg["batch_size"], device, shuffle=True)
        endpoint = architectures.build(arch).to(device)
        curve = CurveNet(architectures.build(arch), Bezier, 3).to(device)
        curve.init_linear()
        fns[f"{name}_endpoint"] = epoch_runner(endpoint, loader)
        fns[f"{name}_curve"] = epoch_runner(curve, loader, curve=True)
    t = interleaved(fns, device, cfg["repeats"])
    out = {"endpoint_step_s": t["conv_endpoint"] / 2, "curve_step_s": t["conv_curve"] / 2,
           "curve_over_endpoint": t["conv_curve"] / t["conv_endpoint"]}
    for name in arch_sizes(cfg):
        if name != "conv":
            out[f"{name}_curve_over_endpoint"] = t[f"{name}_curve"] / t[f"{name}_endpoint"]
    return out


# ----------------------------------------------------------------------------- evaluation

def bench_eval_point(cfg, device):
    """One point of a walk (BN re-estimation + train and test evaluation, as eval_curve.py) and one
    grid point of a plane (as plane.py: the point's weights from its plane coordinates, evaluated,
    its results written to the sweep's file) against the same three passes of bare forward calls;
    and the walk's point with LPIPS on the test split."""
    torch.manual_seed(0)
    train, test = dataset.split_images(synthetic_faces(cfg["eval_images"]), 0.2)
    train_loader = TensorLoader(train, cfg["batch_size"], device)
    test_loader = TensorLoader(test, cfg["batch_size"], device)
    curve = CurveNet(Autoencoder(in_filters=cfg["eval_filters"]), Bezier, 3).to(device)
    curve.init_linear()
    model = curve.point_at(0.5)
    l1 = {"loss": torch.nn.L1Loss()}
    lpips = LPIPS().to(device)
    samples = next(iter(test_loader))[:4]
    plain = PointEvaluator(model, train_loader, test_loader, l1, samples=samples)
    with_lpips = PointEvaluator(model, train_loader, test_loader, l1, {"lpips": lpips}, samples=samples)

    @torch.no_grad()
    def bare():  # what a point needs at the least: BN pass, forward over train, forward over test
        update_bn(train_loader, model)
        model.eval()
        for loader in (train_loader, test_loader):
            for x in loader:
                model(x)

    def point(evaluator):
        def run():
            evaluator.done.clear()  # the same weights every time: evaluate them, not their cached results
            walk(curve, [0.5], evaluator, "bench", verbose=False)
        return run

    corners = [Autoencoder(in_filters=cfg["eval_filters"]) for _ in range(3)]
    plane = Plane(*(vector(m) for m in corners))
    layout, plane_evaluator = names_and_shapes(model), PointEvaluator(model, train_loader, test_loader, l1)
    files = tempfile.mkdtemp()
    counter = itertools.count()

    def plane_point():  # a fresh sweep file each time, so the point is never "already done"
        plane_evaluator.done.clear()
        resumable.run(os.path.join(files, f"{next(counter)}.npz"), {}, [(0.3 * plane.dx, 0.6 * plane.dy)],
                  lambda xy: plane_evaluator(plane.weights(*xy, layout, device)), verbose=False)
    t = interleaved({"bare": bare, "point": point(plain), "point_lpips": point(with_lpips),
                     "plane_point": plane_point}, device, cfg["repeats"])
    shutil.rmtree(files)
    return {"bare_passes_s": t["bare"], "point_s": t["point"], "point_lpips_s": t["point_lpips"],
            "plane_point_s": t["plane_point"], "point_over_bare": t["point"] / t["bare"],
            "plane_point_over_bare": t["plane_point"] / t["bare"],
            "lpips_point_over_point": t["point_lpips"] / t["point"]}


def bench_alignment(cfg, device):
    """Weight matching (align.py's default) at the benchmark's width: of two independently
    initialised autoencoders, and of an autoencoder and a randomly permuted copy of itself."""
    torch.manual_seed(0)
    a, b = Autoencoder(in_filters=cfg["in_filters"]), Autoencoder(in_filters=cfg["in_filters"])
    spec = permutation_spec(a)
    planted = Autoencoder(in_filters=cfg["in_filters"])
    perms, signs = random_permutation(spec, torch.Generator().manual_seed(1))
    planted.load_state_dict(apply_permutation(spec, a.state_dict(), perms, signs))
    out = {}
    for name, other in (("independent", b), ("planted", planted)):
        start = time.perf_counter()
        _, record = align(a, other, "weight")
        out[f"{name}_seconds"] = time.perf_counter() - start
        out[f"{name}_sweeps"] = len(record["objective"]) - 1
        out[f"{name}_distance_after_over_before"] = record["distance_after"] / record["distance_before"]
    return out


def bench_distributed_eval(cfg, device):
    """eval_curve.py over a curve and its segment: 2 processes under torchrun (one thread each)
    against 1 process with one thread; points per second from the walks' own wall time."""
    if device.type != "cpu":
        return {}
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        a, b = Autoencoder(in_filters=cfg["eval_filters"]), Autoencoder(in_filters=cfg["eval_filters"])
        curve = connect(a, b, Bezier, 3)
        run = Run(data=Data(dataset="synthetic", max_images=cfg["eval_images"], batch_size=cfg["batch_size"],
                            num_workers=0))
        ckpt = os.path.join(root, "curve", "checkpoint.pt")
        os.makedirs(os.path.dirname(ckpt))
        checkpoints.save(ckpt, checkpoints.Checkpoint(
            kind="curve", architecture=Architecture("conv", a.config), state_dict=curve.state_dict(), settings=run,
            curve_config=dict(curve="Bezier", num_bends=3, fix_start=True, fix_end=True)))
        points = cfg["dist_points"]
        argv = ["eval_curve.py", "--ckpt", ckpt, "--num_points", str(points), "--device", "cpu"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        seconds = {}
        for name, launcher in (("one_process", [sys.executable]),
                               ("two_processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", "2"])):
            out = os.path.join(root, name)
            subprocess.run([*launcher, *argv, "--dir", out], cwd=os.path.dirname(os.path.abspath(__file__)),
                           env=env, check=True, capture_output=True)
            (report,) = [f for f in os.listdir(out) if f.endswith(".json")]
            with open(os.path.join(out, report)) as f:
                seconds[name] = json.load(f)["walk_seconds"]
    return {"one_process_points_per_s": 2 * points / seconds["one_process"],
            "two_processes_points_per_s": 2 * points / seconds["two_processes"],
            "two_over_one": seconds["one_process"] / seconds["two_processes"]}


def training_flops_per_image():
    """FLOPs of one training step (forward, L1 loss, backward) per image at the default
    architecture, counted by torch.utils.flop_counter on the CPU."""
    model, x = Autoencoder(), torch.rand(2, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        (model(x) - x).abs().mean().backward()
    return counter.get_total_flops() / len(x)


def bench_gpu_targets(cfg, device):
    """Default architecture at batch 64 and 256 with bf16 + channels_last + data on the GPU (images/s
    and the TFLOP/s they amount to: divide by the chip's dense bf16 peak for its fraction), and a
    61-point walk (BN pass + train + test evaluation at every t) over 202,599 synthetic images."""
    flops = training_flops_per_image()
    out = {"training_GFLOP_per_image": flops / 1e9}
    for batch in (64, 256):
        torch.manual_seed(0)
        loader = step_images(device, batch, channels_last=True, steps=10)
        run = epoch_runner(Autoencoder().to(device), loader, amp="bf16", channels_last=True)
        seconds = interleaved({"run": run}, device, cfg["repeats"])["run"]
        out[f"batch{batch}_bf16_channels_last_images_per_s"] = batch * 10 / seconds
        out[f"batch{batch}_bf16_channels_last_TFLOP_per_s"] = batch * 10 / seconds * flops / 1e12
    train, test = dataset.split_images(synthetic_faces(202_599), 0.2)
    loaders = (TensorLoader(train, 1024, device, channels_last=True),
               TensorLoader(test, 1024, device, channels_last=True))
    curve = CurveNet(Autoencoder(), Bezier, 3).to(device)
    curve.init_linear()
    options = Speed(amp="bf16", channels_last=True)
    samples = next(iter(loaders[1]))[:4]  # through the loader, as every caller: float, on the device
    evaluator = PointEvaluator(curve.point_at(0.0), *loaders, {"loss": torch.nn.L1Loss()}, speed=options,
                               samples=samples)
    start = time.perf_counter()
    walk(curve, np.linspace(0, 1, 61), evaluator, "curve", verbose=False)
    sync(device)
    out["walk_61_points_202599_images_s"] = time.perf_counter() - start
    return out


SECTIONS = {"data": bench_data, "training": bench_training, "curve_step": bench_curve_step,
            "eval_point": bench_eval_point, "alignment": bench_alignment,
            "distributed_eval": bench_distributed_eval, "gpu_targets": bench_gpu_targets}


def main(args):
    device = resolve_device(args.device)
    speed.configure(device, Speed())
    chosen = args.sections.split(",") if args.sections else [s for s in SECTIONS if s != "gpu_targets"]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.gpu_targets and "gpu_targets" not in chosen:
        chosen.append("gpu_targets")
    if "gpu_targets" in chosen and device.type != "cuda":
        raise UserError("--gpu_targets measures the CUDA targets; run it with --device cuda")
    q = args.quick
    cfg = dict(in_filters=args.in_filters or (4 if q else 64), batch_size=args.batch_size or (8 if q else 64),
               repeats=args.repeats or (2 if q else 5), compile=args.compile,
               data_images=64 if q else 2000,
               # evaluation of a path point: a small configuration, as the demo uses
               eval_filters=4 if q else 16, eval_images=40 if q else 2000, dist_points=2 if q else 8)
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), **cfg)
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    results = {}
    for name, fn in ((name, SECTIONS[name]) for name in chosen):
        results[name] = fn(cfg, device)
        print(f"[{name}]")
        for k, v in results[name].items():
            print(f"  {k:40s} {v:12.4f}")
    write_json(args.json, {"config": env, "results": results})
    print(f"written: {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
