"""Files that never end half-written: atomic writes, digests, run directories."""
import contextlib
import hashlib
import json
import os
import re
import shlex
import sys

from aemc.errors import UserError


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

    def save_args(self, flags):
        """args.json: the run's flags ({name: value}), for the record."""
        write_json(self.file("args.json"), flags)

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, record):
        with open(self.file("log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
