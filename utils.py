"""Small shared helpers: CLI plumbing, seeding, devices, BatchNorm re-estimation, run logging."""
import argparse
import contextlib
import hashlib
import json
import os
import random
import shlex
import signal
import sys

import numpy as np
import torch
from torch import nn


class UserError(Exception):
    """An expected failure the user can act on: printed as one line, no traceback, exit 2."""
    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C was handled: the state is saved; exit 130 like an interrupted shell command."""
    exit_code = 130


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus a hint) and exits with status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} -h)", file=sys.stderr)
        sys.exit(2)


def run_cli(main, parser):
    """Parse the command line and run `main(args)`; expected failures exit without a traceback."""
    args = parser.parse_args()
    try:
        main(args)
    except Interrupted as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def positive(kind):
    """argparse type: a strictly positive int or float."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} requested but MPS is not available; use --device cpu")
    return device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp, device):
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (it uses a gradient scaler); use --amp bf16 on {device.type}")


def autocast(device, amp="none"):
    """Mixed precision for the forward pass: --amp bf16 | fp16 | none."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp in AMP_DTYPES)


def accumulator_dtype(device):
    """float64 for running sums of losses, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def file_digest(path, algorithm="sha256", chunk=1 << 20):
    """Hex digest of a file's bytes (sha256, md5, ...), read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parameter_vector(model):
    """All parameters of `model` as one flat vector (for distances in weight space)."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@torch.no_grad()
def update_bn(batches, model, device=None, num_batches=None):
    """Re-estimate the BatchNorm running statistics of `model` over `batches`.

    Like `torch.optim.swa_utils.update_bn` (Izmailov et al. 2018; used by Garipov et al. 2018 at
    every point of a curve): the running statistics are reset and momentum is set to None, so
    each BN layer ends with the plain average over batches of the per-batch mean and of the
    per-batch unbiased variance. Unlike torch's version, only the BN layers are put in train mode;
    dropout and everything else stay in eval mode, so the statistics are those of the network
    that will be evaluated. Modes and momenta are restored afterwards.

    batches: any iterable of tensors (or of tuples whose first item is the input), e.g. a loader.
    num_batches: use only the first `num_batches` batches (the same ones on every call when the
    iterable is deterministic).

    Example::
        >>> model = curve_net.point_at(0.5)
        >>> update_bn(train_loader, model, num_batches=50)
        >>> model.eval(); test_loss = evaluate(model, test_loader)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = {m: m.training for m in model.modules()}
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None
    model.eval()
    for bn in bns:
        bn.train()
    try:
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            model(batch)
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        for m, mode in was_training.items():
            m.train(mode)


class RunDir:
    """The run directory: the exact command, args.json, and one JSON line per epoch in log.jsonl."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".write-test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to --dir {path}: {e.strerror}")
        with open(os.path.join(path, "command.txt"), "a") as f:
            f.write(shlex.join([sys.executable] + sys.argv) + "\n")

    def save_args(self, args):
        write_json(self.file("args.json"), vars(args))

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, record):
        with open(self.file("log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path, obj):
    """Write JSON atomically (temporary file + rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a flag the training loop checks between steps, so
    the model and optimizer are never caught half-updated; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing the current step and saving a resumable checkpoint "
              "(press again to abort without saving)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self):
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread (e.g. some notebook runners): no handler
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
