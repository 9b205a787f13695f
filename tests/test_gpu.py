"""The CUDA code paths on a real GPU. They run with the ordinary test command wherever CUDA is
present and are skipped cleanly without it (tests needing two GPUs are skipped with fewer). The
device logic behind them is also checked with mocks on every machine (tests/test_devices.py)."""
import os
import signal

import numpy as np
import pytest
import torch

import trainer
from aemc import checkpoints, speed
from aemc.data.loader import TensorLoader, fits_on_device
from aemc.data.synthetic import synthetic_faces
from aemc.errors import Interrupted
from aemc.evaluation import PointEvaluator, update_bn
from aemc.losses import LPIPS
from aemc.objective import training_objective
from aemc.paths import walk
from aemc.settings import Optimizer, Run, Speed, Training
from conftest import DATA, hook_loss, read_log, run_script, train_main
from models.autoencoder import Autoencoder
from models.curves import Bezier, connect

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

GPU = [a if a != "cpu" else "cuda" for a in DATA]  # the curve tests' data, on the GPU
TINY_GPU = [*GPU, "--in_filters", "8", "--latent_dim", "16", "--lr", "1e-3"]
ADAM = Optimizer(optim_name="Adam", lr=1e-3)
FP_RTOL = 5e-2  # fp16 / bf16 / TF32 training runs against fp32: epoch losses within 5%


@pytest.mark.parametrize("device", ["cuda:0", pytest.param("cuda:1", marks=two_gpus)])
def test_resident_and_staged_loaders_agree_while_the_gpu_lags(device):
    images = synthetic_faces(300)
    resident = TensorLoader(images, 32, device, shuffle=True, seed=3, resident=True)
    staged = TensorLoader(images, 32, device, shuffle=True, seed=3, resident=False)
    with torch.cuda.device(device):  # the copies run on this device's stream: keep it busy
        for epoch in range(3):
            resident.set_epoch(epoch), staged.set_epoch(epoch)
            got = []
            for batch in staged:
                torch.cuda._sleep(2_000_000)  # the device lags: copies queue behind this
                got.append(batch)
            expected = list(resident)
            torch.cuda.synchronize(device)
            assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(expected, got))
        ordered = [b.clone() for b in staged.ordered()]
        assert all(torch.equal(a, b) for a, b in zip(resident.ordered(), ordered))


def test_cached_but_unallocated_memory_counts_as_free():
    device = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(device)
    block = torch.empty(int(free * 0.6), dtype=torch.uint8, device=device)
    del block  # now held in PyTorch's cache: not free for the driver, free for us
    images = torch.empty(int(free * 0.4), dtype=torch.uint8)
    assert fits_on_device(images, device)
    torch.cuda.empty_cache()


def _allow_item_syncs(monkeypatch):
    """Let `.item()` and `.tolist()` (the periodic host syncs) through sync-debug mode, counting them."""
    calls = {"n": 0}

    def allowed(real):
        def call(self):
            calls["n"] += 1
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real(self)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return call
    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, allowed(getattr(torch.Tensor, name)))
    return calls


@pytest.mark.parametrize("resident,amp", [(True, "none"), (False, "none"), (True, "fp16"), (False, "fp16")])
def test_a_training_epoch_syncs_with_the_host_only_periodically(resident, amp, monkeypatch):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Autoencoder(in_filters=8, latent_dim=16).to(device)
    loader = TensorLoader(synthetic_faces(16 * 45), 16, device, shuffle=True, resident=resident)
    optimizer = trainer.make_optimizer(ADAM, model.parameters(), 0.0, device)
    scaler = speed.make_scaler(device, amp)

    settings = Run(training=Training(noise_std=0.05), speed=Speed(amp=amp))  # the L1 loss
    objective = training_objective(settings, curve=False, device=device)

    def epoch():
        trainer.train_one_epoch(model, loader, optimizer, objective, settings, scaler=scaler, verbose=False)
    epoch()  # warm-up: lazy initialisation, pinned staging blocks, the scaler's first steps
    calls = _allow_item_syncs(monkeypatch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        epoch()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls["n"] <= 45 // 10  # at most one (explicit) sync per ten steps: nothing per step


def test_batchnorm_re_estimation_never_waits_for_the_host_and_matches_the_cpu():
    torch.manual_seed(0)
    model = Autoencoder(in_filters=8, latent_dim=16)
    images = synthetic_faces(200)
    update_bn(TensorLoader(images, 32), model)
    cpu = {k: v.clone() for k, v in model.named_buffers()}
    gpu_model = model.cuda()
    loader = TensorLoader(images, 32, "cuda", resident=True)
    next(iter(loader))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        update_bn(loader, gpu_model)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, value in gpu_model.named_buffers():
        assert torch.allclose(value.cpu().float(), cpu[name].float(), rtol=1e-3, atol=1e-4), name


def test_lpips_on_the_gpu_equals_the_cpu():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    metric = LPIPS()
    with torch.no_grad():
        cpu = metric(x, y)
        gpu = metric.cuda()(x.cuda(), y.cuda()).cpu()
    assert torch.allclose(gpu, cpu, rtol=1e-3, atol=1e-5)


def test_fp16_training_interrupted_and_resumed_restores_its_scaler_and_stays_near_fp32(tmp_path, monkeypatch):
    common = [*TINY_GPU, "--epochs", "2", "--save_freq", "1"]
    train_main("--dir", tmp_path / "fp32", *common)

    def ctrl_c(call, loss):
        if call == 16:  # epoch 2, batch 3 (an epoch is 10 train batches, then 3 test batches)
            signal.raise_signal(signal.SIGINT)
        return loss
    hook_loss(monkeypatch, ctrl_c)
    with pytest.raises(Interrupted):
        train_main("--dir", tmp_path / "fp16", *common, "--amp", "fp16")
    monkeypatch.undo()
    last = tmp_path / "fp16" / "checkpoint-last.pt"
    saved = checkpoints.load(str(last))
    assert saved.batch == 3 and saved.scaler["scale"] > 0
    loaded = []
    real_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, state: (loaded.append(dict(state)), real_load(self, state))[1])
    train_main("--dir", tmp_path / "fp16", *common, "--amp", "fp16", "--resume", last)
    assert loaded == [saved.scaler]
    for fp16, fp32 in zip(read_log(tmp_path / "fp16"), read_log(tmp_path / "fp32")):
        assert fp16["train_loss"] == pytest.approx(fp32["train_loss"], rel=FP_RTOL)
        assert fp16["test_loss"] == pytest.approx(fp32["test_loss"], rel=FP_RTOL)


def test_bf16_channels_last_compiled_training_stays_near_fp32(tmp_path):
    common = [*TINY_GPU, "--epochs", "2"]
    train_main("--dir", tmp_path / "fp32", *common)
    train_main("--dir", tmp_path / "fast", *common, "--amp", "bf16", "--channels_last", "--compile")
    for fast, ref in zip(read_log(tmp_path / "fast"), read_log(tmp_path / "fp32")):
        assert fast["train_loss"] == pytest.approx(ref["train_loss"], rel=FP_RTOL)
        assert fast["test_loss"] == pytest.approx(ref["test_loss"], rel=FP_RTOL)


def test_checkpoints_move_between_cpu_and_gpu_both_ways(tmp_path, capsys):
    cpu = [a if a != "cuda" else "cpu" for a in TINY_GPU]
    train_main("--dir", tmp_path / "a", *cpu, "--epochs", "1")
    train_main("--dir", tmp_path / "a", *TINY_GPU, "--epochs", "2", "--resume", tmp_path / "a" / "checkpoint-last.pt")
    assert "saved on cpu and this run is on cuda" in capsys.readouterr().err
    train_main("--dir", tmp_path / "b", *TINY_GPU, "--epochs", "1")
    train_main("--dir", tmp_path / "b", *cpu, "--epochs", "2", "--resume", tmp_path / "b" / "checkpoint-last.pt")
    assert "saved on cuda" in capsys.readouterr().err
    for run in ("a", "b"):
        log = read_log(tmp_path / run)
        assert [r["epoch"] for r in log] == [1, 2] and all(np.isfinite(r["test_loss"]) for r in log)


def test_a_checkpoint_from_a_gpu_that_is_not_visible_resumes(tmp_path):
    train_main("--dir", tmp_path, *TINY_GPU, "--epochs", "1")
    last = str(tmp_path / "checkpoint-last.pt")
    ck = checkpoints.load(last)
    ck.rng["device"] = f"cuda:{torch.cuda.device_count() + 3}"  # saved on a bigger machine
    checkpoints.save(last, ck)
    train_main("--dir", tmp_path, *TINY_GPU, "--epochs", "2", "--resume", last)
    assert [r["epoch"] for r in read_log(tmp_path)] == [1, 2]


def test_a_compiled_evaluator_walks_a_curve_without_recompiling_per_point():
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    a, b = Autoencoder(in_filters=8, latent_dim=16), Autoencoder(in_filters=8, latent_dim=16)
    curve = connect(a, b, Bezier, 3).cuda()
    train, test = (TensorLoader(x, 32, "cuda") for x in (synthetic_faces(128), synthetic_faces(64, seed=1)))
    evaluator = PointEvaluator(curve.point_at(0), train, test, {"loss": torch.nn.L1Loss()},
                               speed=Speed(compile=True))
    first = walk(curve, [0.0, 0.5], evaluator, verbose=False)
    compiled = dict(torch._dynamo.utils.counters["stats"])
    later = walk(curve, [0.1, 0.3, 0.7, 1.0], evaluator, verbose=False)
    assert dict(torch._dynamo.utils.counters["stats"]) == compiled  # no new graphs for new points
    eager = PointEvaluator(curve.point_at(0), train, test, {"loss": torch.nn.L1Loss()})
    assert later["test_loss"][-1] == pytest.approx(eager(curve.weights(1.0))["test_loss"], rel=1e-3)
    assert first["test_loss"][1] == pytest.approx(eager(curve.weights(0.5))["test_loss"], rel=1e-3)
    # the curve's training step under compile
    model = torch.compile(curve)
    optimizer = trainer.make_optimizer(ADAM, [p for p in curve.parameters() if p.requires_grad], 0.0,
                                       torch.device("cuda"))
    settings = Run(training=Training(noise_std=0.0), optim=Optimizer(wd=1e-6))  # the L1 loss
    sums = trainer.train_one_epoch(model, train, optimizer, training_objective(settings, curve=True, device=train.device),
                                   settings, verbose=False)
    assert np.isfinite(sums["loss_sum"]) and sums["batches"] == len(train)


def test_the_scripts_run_on_the_gpu(tmp_path):
    amp = speed.resolve_amp("auto", torch.device("cuda"))  # bf16 where it is native
    train_main("--dir", tmp_path / "a", *TINY_GPU, "--epochs", "1", "--seed", "1")
    train_main("--dir", tmp_path / "b", *TINY_GPU, "--epochs", "1", "--seed", "2", "--conv_init", "kaiming_normal")
    ends = [str(tmp_path / r / "checkpoint-1.pt") for r in ("a", "b")]
    train_main("--dir", tmp_path / "c", *GPU, "--curve", "Bezier", "--init_start", ends[0], "--init_end", ends[1],
               "--fix_start", "--fix_end", "--epochs", "1", "--amp", amp)
    curve = str(tmp_path / "c" / "checkpoint-1.pt")
    for script, *argv in (
            ("check_ends.py", "--ckpt", curve, "--device", "cuda"),
            ("eval_curve.py", "--ckpt", curve, "--num_points", "3", "--lpips", "--amp", amp,
             "--device", "cuda", "--dir", tmp_path / "eval"),
            ("extract_point.py", "--ckpt", curve, "--t", "0.5", "--out", tmp_path / "mid.pt", "--device", "cuda"),
            ("bench.py", "--quick", "--device", "cuda", "--json", tmp_path / "bench.json")):
        r = run_script(script, *argv)
        assert r.returncode == 0, (script, r.stderr[-2000:])
    assert os.path.isfile(tmp_path / "mid.pt") and os.path.isfile(tmp_path / "bench.json")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_nccl_training_with_sync_batchnorm_and_distributed_evaluation(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def torchrun(*argv):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    gpu = [a if a != "cpu" else "cuda" for a in DATA]
    for name, extra in (("a", ["--sync_bn"]), ("b", ["--seed", "2"])):
        r = torchrun("train.py", "--dir", tmp_path / name, *gpu, "--in_filters", "8", "--latent_dim", "16",
                     "--epochs", "1", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert [rec["epoch"] for rec in read_log(tmp_path / name)] == [1]
    ends = [tmp_path / name / "checkpoint-1.pt" for name in ("a", "b")]
    curve = ["train.py", "--dir", tmp_path / "c", *gpu, "--curve", "Bezier", "--init_start", ends[0],
             "--init_end", ends[1], "--fix_start", "--fix_end", "--epochs", "1", "--sync_bn"]
    r = torchrun(*curve)
    assert r.returncode != 0 and "add --t_sampling shared" in r.stderr
    r = torchrun(*curve, "--t_sampling", "shared")
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["--ckpt", tmp_path / "c" / "checkpoint-1.pt", "--num_points", "3", "--bn_batches", "3", "--device", "cuda"]
    r = torchrun("eval_curve.py", *common, "--dir", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_script("eval_curve.py", *common, "--dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    (npz,) = [f for f in os.listdir(tmp_path / "one") if f.endswith(".npz")]
    a, b = np.load(tmp_path / "one" / npz), np.load(tmp_path / "two" / npz)
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a.files if not k.endswith("seconds"))
