"""The speed options every script shares (`aemc.settings.Speed`): mixed precision, memory layout,
torch.compile, where the data live, TF32. They change how fast results come, not the results
(beyond round-off)."""
import os

import torch
from torch import nn

from aemc.errors import UserError
from models.curves import CurveNet

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, which oneDNN uses for bf16
    convolutions and matrix products). The environment variable AEMC_NATIVE_BF16=0 or 1 overrides
    the detection (the test suite sets 0: its references are float32 on every CPU)."""
    forced = os.environ.get("AEMC_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def native_bf16(device):
    """Whether `device` computes in bf16 natively: a CUDA device of compute capability 8.0 (Ampere)
    or later, a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_bf16()


def resolve_amp(amp, device):
    """--amp as a run records it: "auto" (the default) is bf16 where `device` computes bf16
    natively and none (float32) elsewhere; any other value is kept."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


def check_amp(amp, device):
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (it uses a gradient scaler); use --amp bf16 on {device.type}")
    if amp == "auto":
        raise ValueError("resolve --amp auto first (aemc.speed.resolve_amp)")
    if amp == "bf16" and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} ({device}, compute capability "
                        f"{major}.{minor}) has no native bf16 and would run slower than fp32; "
                        "use --amp fp16 there")


def configure(device, speed):
    """Backend switches for a run on `device` with `speed` (a Speed): cuDNN benchmarks its
    convolution algorithms for the run's fixed shapes and keeps the fastest; without `speed.tf32`
    float32 convolutions and matrix products are computed in full float32 (PyTorch uses TF32 for
    convolutions by default on Ampere and later)."""
    check_amp(speed.amp, device)
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if not speed.tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device, amp="none"):
    """Mixed precision for the forward pass: --amp bf16 | fp16 | none."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp in AMP_DTYPES)


def make_scaler(device, amp):
    """The gradient scaler fp16 training needs (None otherwise)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def prepare_model(model, speed, data_parallel=False):
    """Apply `speed.channels_last` (in place), wrap the model in DistributedDataParallel when
    `data_parallel` (training under torchrun), and `speed.compile`; returns the module to run."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    runner = model
    if data_parallel:
        device = next(model.parameters()).device
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(runner) if speed.compile else runner


def sync_batchnorm(model):
    """The model with SyncBatchNorm in place of every BatchNorm layer that runs (--sync_bn). A
    CurveNet runs only its base module, which holds the buffers while functional_call supplies the
    parameters of theta(t): its base's BatchNorm layers are converted, buffers kept, parameters
    left to functional_call; the bends, mere holders of parameters, are untouched. (torch's own
    conversion reads the running statistics of every BatchNorm, which the bends do not have.)"""
    if not isinstance(model, CurveNet):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.base = _sync_buffers_only(model.base)
    return model


def _sync_buffers_only(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        for key in [k for k, v in synced._parameters.items() if v is not None]:
            del synced._parameters[key]
        for name, buffer in module.named_buffers(recurse=False):
            setattr(synced, name, buffer)
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _sync_buffers_only(child))
    return module


def accumulator_dtype(device):
    """float64 for running sums of losses, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64
