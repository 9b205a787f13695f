"""Files that never end half-written: atomic writes, digests, run directories."""
import contextlib
import hashlib
import json
import os
import pickle
import re
import shlex
import sys
import zipfile

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


def unreadable(error, path=None):
    """Why torch.load(..., weights_only=True) (or a restricted unpickler) did not read a file, as
    the end of a sentence about it: not a PyTorch file at all, a pickle that names code (refused:
    loading it could run that code), or a damaged one."""
    text = str(error)
    code = re.search(r"(?:GLOBAL|refusing to load) ([\w.]+)", text)
    if code:
        return (f"was refused: it is a pickle that names {code.group(1)}, code that loading it could run "
                "(only tensors and plain values are read)")
    not_zip = path is not None and os.path.isfile(path) and not zipfile.is_zipfile(path)  # torch.save writes zips
    if not_zip or isinstance(error, (KeyError, zipfile.BadZipFile)) or \
            re.search(r"Unsupported operand|invalid load key", text):
        return "is not a PyTorch file (neither a zip archive nor a pickle of tensors)"
    if isinstance(error, EOFError) or "EOF" in text:
        return "is truncated (it ends too early): it was not completely written or copied"
    if isinstance(error, pickle.UnpicklingError) and "Weights only" not in text:  # the plain unpickler
        return f"is damaged or not a pickle ({text.strip().splitlines()[0] if text.strip() else 'unpickling failed'})"
    if isinstance(error, pickle.UnpicklingError):  # refused by the weights-only unpickler for another reason
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("WeightsUnpickler error", "Unsupported"))), lines[-1:])
        return f"was refused: it holds something other than tensors and plain values ({''.join(detail)})"
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else ""
    return f"is corrupt or not a PyTorch checkpoint ({type(error).__name__}: {first})"


def make_folder(path, flag="--dir"):
    """Make folder `path` (and missing parents) and check that it can be written, now, in one line
    naming `flag` (a read-only place, a file in the way). Returns the outermost folder this call
    created (None if `path` existed): what a failed start may remove again (`discard_if_unused`)."""
    created = None
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        created, probe = probe, os.path.dirname(probe)
        if probe == os.path.dirname(probe):
            break
    try:
        os.makedirs(path, exist_ok=True)
        test = os.path.join(path, f".write-test.tmp-{os.getpid()}")
        with open(test, "w"):
            pass
        os.remove(test)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {path}: {e.strerror or e}")
    return created


def check_output_file(path, flag="--out", force=False):
    """Refuse, before any work, an output file that exists (unless `force`), is a folder, or lies
    where nothing can be written."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; name the file to write")
    if os.path.exists(path) and not force:
        raise UserError(f"{flag} {path} exists; choose another file, or pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {path}: {folder} is read-only")


_OPENED = []  # (run folder, outermost folder this process created for it or None), for discard_if_unused


def forget_run_folders():
    """A new command starts (in this process): the folders of earlier ones are theirs."""
    _OPENED.clear()


def discard_if_unused():
    """After a failed start: remove each run folder this process created that holds nothing but
    its command.txt (and the folders made above it for it). Folders that existed are left alone."""
    while _OPENED:
        path, created = _OPENED.pop()
        if created is None or not os.path.isdir(path):
            continue
        if set(os.listdir(path)) - {"command.txt"}:
            continue
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
        folder = os.path.abspath(path)
        while True:
            try:
                os.rmdir(folder)
            except OSError:  # not empty: something else is there
                break
            if folder == created:
                break
            folder = os.path.dirname(folder)


class RunDir:
    """The run directory: the exact command, args.json, and one JSON line per epoch in log.jsonl.
    Temporaries left there by a killed earlier run are removed when it is opened. A folder made for
    a run that then fails before writing anything is removed again by the command line's
    error handling (aemc.cli.run_cli calls `discard_if_unused`)."""

    def __init__(self, path, flag="--dir"):
        self.path = path
        _OPENED.append((path, make_folder(path, flag)))
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
