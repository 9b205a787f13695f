"""The fast options change speed, not results."""
import os
import sys

import pytest
import torch

import eval_curve
import trainer
from aemc import checkpoints
from aemc.data.loader import TensorLoader, to_float
from aemc.data.synthetic import synthetic_faces
from aemc.errors import UserError
from aemc.objective import training_objective
from aemc.settings import Run, Training
from aemc.speed import autocast
from conftest import TINY, read_log, train_main
from models.autoencoder import Autoencoder
from models.curves import Bezier, CurveNet

# bf16 keeps 8 bits of mantissa: a loss computed from bf16 activations agrees with float32 to
# about 1% (measured: under 0.5% on these batches); channels_last only reorders memory, so one
# forward pass agrees to 1e-5. Training runs with channels_last or torch.compile also draw their
# dropout masks in another order, so their losses agree within that noise (measured: 0.4%), not bitwise.
BF16_RTOL = 2e-2
LAYOUT_RTOL = 1e-5
DROPOUT_RTOL = 2e-2


def _batch():
    return to_float(synthetic_faces(16, seed=5))


@pytest.mark.parametrize("curve", [False, True])
def test_bf16_and_channels_last_forward_losses_match_fp32(curve):
    torch.manual_seed(0)
    model = Autoencoder(in_filters=8, latent_dim=16)
    if curve:
        model = CurveNet(model, Bezier, 3)
        model.init_linear()
    model.eval()
    x = _batch()
    t = torch.tensor(0.3)
    run = (lambda m, inp: m(inp, t)) if curve else (lambda m, inp: m(inp))
    with torch.no_grad():
        ref = (run(model, x) - x).abs().mean().item()
        with autocast(x.device, "bf16"):
            bf16 = (run(model, x).float() - x).abs().mean().item()
        model.to(memory_format=torch.channels_last)
        cl = (run(model, x.contiguous(memory_format=torch.channels_last)) - x).abs().mean().item()
    assert bf16 == pytest.approx(ref, rel=BF16_RTOL) and bf16 != ref
    assert cl == pytest.approx(ref, rel=LAYOUT_RTOL)


@pytest.mark.slow
def test_training_with_fast_options_stays_close_to_fp32(tmp_path, monkeypatch):
    logs = {}
    for name, extra in {"fp32": [], "bf16": ["--amp", "bf16"], "cl": ["--channels_last"],
                        "both": ["--amp", "bf16", "--channels_last"], "auto_native": []}.items():
        if name == "auto_native":  # the default --amp auto on a CPU with AVX512-BF16 or AMX
            monkeypatch.setenv("AEMC_NATIVE_BF16", "1")
        train_main("--dir", tmp_path / name, *TINY, "--epochs", "2", *extra)
        logs[name] = read_log(tmp_path / name)
    # auto is float32 where bf16 is not native (the suite's setting) and bf16 where it is, as recorded
    for name, amp in (("fp32", "none"), ("auto_native", "bf16")):
        assert checkpoints.load(str(tmp_path / name / "checkpoint-2.pt")).settings.speed.amp == amp
    strip = lambda log: [{k: r[k] for k in ("train_loss", "test_loss")} for r in log]  # noqa: E731
    assert strip(logs["auto_native"]) == strip(logs["bf16"])
    for epoch in range(2):
        ref = logs["fp32"][epoch]
        assert logs["cl"][epoch]["train_loss"] == pytest.approx(ref["train_loss"], rel=DROPOUT_RTOL)
        assert logs["cl"][epoch]["test_loss"] == pytest.approx(ref["test_loss"], rel=DROPOUT_RTOL)
        for name in ("bf16", "both"):
            assert logs[name][epoch]["train_loss"] == pytest.approx(ref["train_loss"], rel=BF16_RTOL)
            assert logs[name][epoch]["test_loss"] == pytest.approx(ref["test_loss"], rel=BF16_RTOL)


def test_resident_and_host_pipelines_yield_identical_batches():
    images = synthetic_faces(70)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        loaders = [TensorLoader(images, 16, device, shuffle=True, seed=3, resident=r) for r in (True, False)]
        assert [ld.resident for ld in loaders] == [True, False]
        for epoch in range(3):
            for ld in loaders:
                ld.set_epoch(epoch)
            for a, b in zip(*loaders):
                assert torch.equal(a, b)
            assert all(torch.equal(a, b) for a, b in zip(loaders[0].ordered(), loaders[1].ordered()))


def test_channels_last_loader_gives_the_same_values_in_nhwc_layout():
    images = synthetic_faces(20)
    plain = next(iter(TensorLoader(images, 8)))
    nhwc = next(iter(TensorLoader(images, 8, channels_last=True)))
    assert torch.equal(plain, nhwc) and nhwc.is_contiguous(memory_format=torch.channels_last)


def test_no_host_sync_per_training_step(monkeypatch):
    torch.manual_seed(0)
    model = Autoencoder(in_filters=4, latent_dim=8)
    loader = TensorLoader(synthetic_faces(240), 2)  # 120 steps
    calls = {"n": 0}

    def counting(real):  # count the host syncs the training loop itself asks for
        def call(self):
            if sys._getframe(1).f_code.co_filename == trainer.__file__:
                calls["n"] += 1
            return real(self)
        return call
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    settings = Run(training=Training(noise_std=0.05))  # the L1 loss
    trainer.train_one_epoch(model, loader, torch.optim.Adam(model.parameters()),
                            training_objective(settings, curve=False, device=loader.device), settings, verbose=False)
    # the sums are read at a few periodic checks and at the end: at most one sync per ten steps
    assert 1 <= calls["n"] <= 120 // 10


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
        train_main("--dir", tmp_path, *TINY, "--amp", "fp16")


@pytest.mark.slow
def test_eval_curve_fast_options_match(trained_curve, tmp_path):
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    base = ["--ckpt", ckpt, "--num_points", "3", "--no_segment", "--device", "cpu", "--bn_batches", "4"]
    parse = eval_curve.get_args_parser().parse_args
    ref = eval_curve.main(parse([*base, "--dir", str(tmp_path / "a")]))["paths"]
    fast = eval_curve.main(parse([*base, "--dir", str(tmp_path / "b"), "--amp", "bf16", "--channels_last"]))["paths"]
    (r,), (f,) = ref.values(), fast.values()
    for split in ("train_loss", "test_loss"):
        assert f[split] == pytest.approx(r[split], rel=BF16_RTOL)
        assert f[split] != r[split]  # bf16 really ran: the numbers moved, within its precision


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    # On the CPU, torch.compile's default backend spends minutes generating C++; "aot_eager" traces
    # the same graphs (dynamo and AOT autograd: where our wrappers, checkpoints and BatchNorm passes
    # meet torch.compile) and runs them eagerly. tests/test_gpu.py runs the default backend on CUDA.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{"backend": "aot_eager", **kw}))
    train_main("--dir", tmp_path / "eager", *TINY, "--epochs", "1")
    train_main("--dir", tmp_path / "compiled", *TINY, "--epochs", "1", "--compile")
    eager, compiled = read_log(tmp_path / "eager")[0], read_log(tmp_path / "compiled")[0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=DROPOUT_RTOL)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=DROPOUT_RTOL)
    ck = checkpoints.load(str(tmp_path / "compiled" / "checkpoint-last.pt"))
    assert not any(k.startswith("_orig_mod") for k in ck.state_dict)  # the plain model is saved
