"""The speed options every script shares: mixed precision, memory layout, torch.compile, where the
data live. They change how fast results come, not the results (beyond round-off)."""
import torch

from utils import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_speed_args(parser):
    g = parser.add_argument_group("speed (results stay within tolerance of the defaults)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed-precision forward passes: bf16 (CPU or CUDA) or fp16 (CUDA, with "
                        "gradient scaling); losses are computed in float32 (none)")
    g.add_argument("--channels_last", action="store_true",
                   help="NHWC memory layout for weights and images (faster convolutions)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    g.add_argument("--no_gpu_data", action="store_true",
                   help="on CUDA, keep the dataset in pinned host memory even when it fits on the GPU")
    return g


def check_amp(amp, device):
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (it uses a gradient scaler); use --amp bf16 on {device.type}")


def autocast(device, amp="none"):
    """Mixed precision for the forward pass: --amp bf16 | fp16 | none."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp in AMP_DTYPES)


def make_scaler(device, amp):
    """The gradient scaler fp16 training needs (None otherwise)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def prepare_model(model, speed):
    """Apply --channels_last (in place) and --compile from `speed` (args or any object with those
    attributes; None: neither); returns the module to run."""
    if getattr(speed, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if getattr(speed, "compile", False) else model


def accumulator_dtype(device):
    """float64 for running sums of losses, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64
