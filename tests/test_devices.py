"""The device logic of the CUDA paths, checked on any machine: CUDA's answers are mocked where
needed. (tests/test_gpu.py runs the same paths on a real GPU where one is present.)"""
import warnings

import pytest
import torch

import trainer
from aemc import checkpoints, speed
from aemc.errors import UserError
from aemc.settings import Optimizer, Speed


def test_the_fp16_gradient_scaler_is_built_for_a_cuda_device():
    with warnings.catch_warnings():  # on a machine without CUDA the scaler disables itself, noisily
        warnings.simplefilter("ignore")
        scaler = speed.make_scaler(torch.device("cuda:1"), "fp16")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "cuda"
    assert speed.make_scaler(torch.device("cuda"), "bf16") is None
    assert speed.make_scaler(torch.device("cpu"), "none") is None


def test_bf16_is_refused_on_gpus_without_native_bf16_checking_the_runs_device(monkeypatch):
    capability = {0: (9, 0), 1: (7, 5)}  # an H100 as cuda:0 (the current device), a T4 as cuda:1
    asked = []

    def get_capability(device=None):
        index = torch.device(device).index or 0
        asked.append(index)
        return capability[index]
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(UserError, match=r"Tesla T4 \(cuda:1, compute capability 7.5\) has no native bf16.*--amp fp16"):
        speed.check_amp("bf16", torch.device("cuda:1"))
    assert asked == [1, 1]
    speed.check_amp("bf16", torch.device("cuda:0"))   # native: fine
    speed.check_amp("fp16", torch.device("cuda:1"))   # fp16 is what the message suggests
    speed.check_amp("bf16", torch.device("cpu"))      # the CPU is not asked at all
    # --amp auto: bf16 where native, float32 elsewhere (never fp16: it needs a scaler and can overflow)
    assert speed.resolve_amp("auto", torch.device("cuda:0")) == "bf16"
    assert speed.resolve_amp("auto", torch.device("cuda:1")) == "none"
    assert speed.resolve_amp("fp16", torch.device("cuda:1")) == "fp16"  # what the user says is kept


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, "none"), (True, False, "bf16"),
                                                      (False, True, "bf16"), (True, True, "bf16")])
def test_amp_auto_on_the_cpu_is_bf16_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.delenv("AEMC_NATIVE_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert speed.resolve_amp("auto", torch.device("cpu")) == expected
    assert speed.resolve_amp("none", torch.device("cpu")) == "none"
    assert speed.resolve_amp("auto", torch.device("mps")) == "none"
    monkeypatch.setenv("AEMC_NATIVE_BF16", "0")  # the override the test suite runs under
    assert speed.resolve_amp("auto", torch.device("cpu")) == "none"


class FakeCudaRNG:
    """Per-device CUDA generator states, as `torch.cuda` would keep them, with a visible device count."""

    def __init__(self, monkeypatch, count):
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.set_calls = []
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, self.forbidden)

    @staticmethod
    def index(device):
        device = torch.device(device)
        return device.index or 0

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, state, device="cuda"):
        if self.index(device) not in self.states:
            raise RuntimeError(f"invalid device {device}")
        self.set_calls.append((str(device), state.clone()))

    @staticmethod
    def forbidden(*args, **kwargs):
        raise AssertionError("every GPU's state was touched")


def test_rng_state_holds_the_runs_device_only_and_resumes_where_fewer_gpus_are_visible(monkeypatch, capsys):
    fake = FakeCudaRNG(monkeypatch, count=4)
    state = checkpoints.rng_state(torch.device("cuda:3"))
    assert state["device"] == "cuda:3" and state["device_state"].tolist() == [3]
    fake = FakeCudaRNG(monkeypatch, count=1)   # resumed on a machine with one GPU
    checkpoints.set_rng_state(state, torch.device("cuda:0"))
    assert [(d, s.tolist()) for d, s in fake.set_calls] == [("cuda:0", [3])]  # cuda:3's stream, continued
    assert capsys.readouterr().err == ""


def test_cpu_runs_never_touch_cuda_and_crossing_devices_is_said(monkeypatch, capsys):
    fake = FakeCudaRNG(monkeypatch, count=2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.forbidden)
    torch.manual_seed(5)
    state = checkpoints.rng_state(torch.device("cpu"))
    assert state["device"] == "cpu" and "device_state" not in state
    expected = torch.rand(3)
    checkpoints.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)  # the CPU stream continues exactly
    assert capsys.readouterr().err == ""
    gpu_state = {**state, "device": "cuda:1", "device_state": torch.tensor([1], dtype=torch.uint8)}
    checkpoints.set_rng_state(gpu_state, torch.device("cpu"))  # GPU checkpoint, CPU run
    assert "saved on cuda:1 and this run is on cpu" in capsys.readouterr().err


def test_first_version_checkpoints_with_every_gpus_state_still_resume(monkeypatch):
    fake = FakeCudaRNG(monkeypatch, count=1)
    legacy = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([7], dtype=torch.uint8),
                                                         torch.tensor([8], dtype=torch.uint8)]}
    checkpoints.set_rng_state(legacy, torch.device("cuda:0"))
    assert [(d, s.tolist()) for d, s in fake.set_calls] == [("cuda:0", [7])]


def test_an_optimizer_state_keeps_this_runs_implementation():
    # a state saved by a GPU run (fused Adam) loads into a CPU run's optimizer, and back
    params = [torch.nn.Parameter(torch.randn(3))]
    adam = Optimizer(optim_name="Adam", lr=1e-3)
    cpu = trainer.make_optimizer(adam, params, 0.0, torch.device("cpu"))
    params[0].grad = torch.ones(3)
    cpu.step()
    saved = cpu.state_dict()
    saved["param_groups"][0]["fused"] = True  # as a CUDA run writes it
    fresh = trainer.make_optimizer(adam, params, 0.0, torch.device("cpu"))
    trainer.load_optimizer_state(fresh, saved)
    assert fresh.param_groups[0]["fused"] is None and fresh.param_groups[0]["lr"] == 1e-3
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], cpu.state_dict()["state"][0]["exp_avg"])
    fresh.step()  # runs with the CPU implementation


def test_tf32_and_cudnn_switches_are_set_for_cuda_runs_only():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.benchmark, cudnn.allow_tf32 = False, True
        speed.configure(torch.device("cpu"), Speed(tf32=False))
        assert cudnn.allow_tf32 and not cudnn.benchmark  # a CPU run leaves the CUDA backends alone
        speed.configure(torch.device("cuda"), Speed())
        assert cudnn.benchmark and cudnn.allow_tf32      # PyTorch's TF32 default kept
        speed.configure(torch.device("cuda"), Speed(tf32=False))
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
