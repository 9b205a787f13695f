"""Small shared helpers: CLI plumbing, devices, seeding, files and run directories."""
import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import signal
import sys

import numpy as np
import torch


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


def run_cli(main, parser, argv=None):
    """Parse the command line (or `argv`) and run `main(args)`; expected failures exit without a
    traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except Interrupted as e:
        warn(f"{parser.prog}: {e}")
        sys.exit(e.exit_code)
    except UserError as e:  # under torchrun every process meets the same error: rank 0 says it
        warn(f"{parser.prog}: error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        warn(f"{parser.prog}: interrupted")
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


def is_rank_zero():
    """Whether this is the main process (always, unless torchrun started several)."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(message):
    """One line on stderr, from the main process only."""
    if is_rank_zero():
        print(message, file=sys.stderr)


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


def file_digest(path, algorithm="sha256", chunk=1 << 20):
    """Hex digest of a file's bytes (sha256, md5, ...), read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def output_stem(path):
    """A name for outputs derived from a checkpoint: runs/curve/checkpoint-8.pt -> curve_checkpoint-8."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}_{os.path.splitext(os.path.basename(path))[0]}"


def output_dir(args, sources, folder):
    """--dir, or by default <folder> beside the first source checkpoint."""
    return args.dir or os.path.join(os.path.dirname(os.path.abspath(next(iter(sources.values())))), folder)


# ----------------------------------------------------------------------------- files

def temporary_name(path):
    """The hidden temporary file an atomic write of `path` goes through: .<name>.tmp-<pid>."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def remove_stale_temporaries(folder, prefix=""):
    """Delete temporaries of atomic writes (of files named `prefix`...) whose writer is gone (a
    killed run leaves them behind); those of live processes, which may still be writing, are kept.
    Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = _TEMPORARY.match(name)
        if match is None or not name.startswith("." + prefix) or _process_alive(int(match.group(1))):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary beside `path` for writing; on success fsync it and rename it over `path`,
    so a crash or kill at any moment leaves either the old file or the new one, never half of one."""
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write JSON atomically (temporary file + rename)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


class RunDir:
    """The run directory: the exact command, args.json, and one JSON line per epoch in log.jsonl.
    Temporaries left there by a killed earlier run are removed when it is opened."""

    def __init__(self, path):
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".write-test.tmp-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to --dir {path}: {e.strerror}")
        remove_stale_temporaries(path)
        with open(os.path.join(path, "command.txt"), "a") as f:
            f.write(shlex.join([sys.executable] + sys.argv) + "\n")

    def save_args(self, args):
        write_json(self.file("args.json"), vars(args))

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, record):
        with open(self.file("log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


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
