"""The checkpoint schema: one dict of plain types and tensors, saved atomically, loaded safely,
enough on its own to rebuild the model.

On disk (format 2, `aemc.settings.FORMAT`) a checkpoint holds: format; kind ("autoencoder" or
"curve"); architecture ({"name", "kwargs"}: the factory and its arguments); curve_config (None, or
curve, num_bends, fix_start, fix_end, init_linear, alignment and each endpoint's path and
SHA-256); state_dict; optimizer and scaler (None for an autoencoder that is not a training state:
a point of a curve, an aligned endpoint); epoch, batch and sums (a mid-epoch position); settings
(the run's `aemc.settings.Run`, as plain dicts); rng; and source (where a derived checkpoint came
from). Format 1 stored `model_config` (the autoencoder's arguments) and `args` (the run's flags)
instead of architecture and settings; `load` reads both formats into a `Checkpoint`.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from aemc import architectures, distributed
from aemc.errors import UserError, warn
from aemc.files import atomic_write, file_digest, unreadable
from aemc.settings import FORMAT, FORMATS, Architecture, Run
from models.curves import CurveNet

ENDPOINT_FLAGS = {"init_start": "--init_start", "init_end": "--init_end"}


@dataclass
class Checkpoint:
    kind: str                          # "autoencoder" or "curve"
    architecture: Architecture
    state_dict: dict
    settings: Run = field(default_factory=Run)  # the run that made it: later commands inherit its data and loss
    curve_config: Optional[dict] = None
    optimizer: Optional[dict] = None   # None: not a training state
    scaler: Optional[dict] = None
    epoch: int = 0
    batch: int = 0                     # > 0: saved in the middle of epoch `epoch + 1`, after this many batches
    sums: Optional[dict] = None        # that epoch's running sums
    rng: Optional[dict] = None
    source: Optional[dict] = None
    format: str = FORMAT               # the format it was read from
    origin: Optional[str] = field(default=None, compare=False)  # "<flag> <path>" it was loaded as (for errors)

    @property
    def is_training_state(self):
        return self.optimizer is not None

    def to_dict(self):
        return dict(format=FORMAT, kind=self.kind, architecture=self.architecture.to_dict(),
                    curve_config=self.curve_config, state_dict=self.state_dict, optimizer=self.optimizer,
                    scaler=self.scaler, epoch=self.epoch, batch=self.batch, sums=self.sums,
                    settings=self.settings.to_dict(), rng=self.rng, source=self.source)


def save(path, checkpoint):
    """Write `checkpoint` atomically: a crash or kill at any moment leaves either the previous file
    or the new one, never a half-written file."""
    with atomic_write(path) as f:
        torch.save(checkpoint.to_dict(), f)


def load(path, kind=None, flag="checkpoint", map_location="cpu"):
    """Load a checkpoint of this tool safely (`weights_only=True`: unpickling can never run code).

    Every problem is a UserError naming the file: missing, corrupt, unsafe, not ours, wrong kind.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} does not exist")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises a zoo of types for files that are not checkpoints
        raise UserError(f"{flag} {path} {unreadable(e, path)}")
    if not isinstance(raw, dict) or raw.get("format") not in FORMATS:
        if isinstance(raw, dict) and str(raw.get("format", "")).startswith("ae-mode-connectivity/"):
            raise UserError(f"{flag} {path} has format {raw['format']}, newer than this version reads; update the tool")
        raise UserError(f"{flag} {path} is not a checkpoint written by this tool")
    needed = ("kind", "architecture" if raw["format"] == FORMAT else "model_config", "state_dict")
    missing = [k for k in needed if not isinstance(raw.get(k), dict if k != "kind" else str)]
    if missing:
        raise UserError(f"{flag} {path} is damaged: it has this tool's format tag but no valid "
                        f"{', '.join(missing)}; use another checkpoint")
    if kind is not None and raw.get("kind") != kind:
        raise UserError(f"{flag} {path} holds {_a(raw.get('kind'))}, expected {_a(kind)}")
    try:
        if raw["format"] == FORMAT:
            architecture = Architecture(**raw["architecture"])
            settings = Run.from_dict(raw.get("settings") or {}, f"{flag} {path}")
        else:  # format 1: the original autoencoder's arguments and the run's flags
            architecture = Architecture("conv", dict(raw["model_config"]))
            settings = Run.from_flags(raw.get("args"))
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{flag} {path} is damaged: its architecture or settings cannot be read "
                        f"({type(e).__name__}: {e}); use another checkpoint")
    return Checkpoint(kind=raw["kind"], architecture=architecture, state_dict=raw["state_dict"], settings=settings,
                      curve_config=raw.get("curve_config"), optimizer=raw.get("optimizer"),
                      scaler=raw.get("scaler"), epoch=raw.get("epoch", 0), batch=raw.get("batch", 0),
                      sums=raw.get("sums"), rng=raw.get("rng"), source=raw.get("source"), format=raw["format"],
                      origin=f"{flag} {path}")


def _a(noun):
    return f"{'an' if str(noun)[:1] in 'aeiou' else 'a'} {noun}"


def build_model(checkpoint):
    """Rebuild the saved autoencoder or CurveNet from a checkpoint alone, weights loaded (a model
    of the user's own only when the command line named its factory: aemc.architectures)."""
    model = architectures.build(checkpoint.architecture)
    if checkpoint.kind == "curve":
        c = checkpoint.curve_config
        model = CurveNet(model, c["curve"], c["num_bends"], c["fix_start"], c["fix_end"])
    try:
        model.load_state_dict(checkpoint.state_dict)
    except (RuntimeError, TypeError) as e:  # names or shapes that are not its architecture's
        problems = [ln.strip().rstrip(".") for ln in str(e).splitlines()[1:] if ln.strip()]
        first = problems[0] if problems else str(e).splitlines()[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{checkpoint.origin or 'the checkpoint'} is damaged: its weights do not fit the "
                        f"{checkpoint.architecture.name} model it describes ({first}{more})")
    return model


def load_endpoint(path, flag):
    """An endpoint checkpoint -> (autoencoder with its weights and buffers, checkpoint)."""
    checkpoint = load(path, kind="autoencoder", flag=flag)
    return build_model(checkpoint), checkpoint


def load_endpoints(paths, flags=None):
    """Several endpoint checkpoints of one architecture -> [(model, checkpoint), ...]; `flags` name
    them in errors (default: --init_start, --init_end)."""
    flags = flags or tuple(ENDPOINT_FLAGS.values())
    loaded = [load_endpoint(p, f) for p, f in zip(paths, flags)]
    for (_, ck), path in zip(loaded[1:], paths[1:]):
        check_same_architecture([loaded[0][1], ck], (paths[0], path))
    return loaded


def autoencoder(model, architecture, settings, epoch=0, source=None):
    """The checkpoint of an ordinary autoencoder that is not a training state (a point of a curve,
    an aligned endpoint): usable wherever an endpoint is, refused by --resume."""
    return Checkpoint(kind="autoencoder", architecture=architecture, state_dict=model.state_dict(),
                      settings=settings, epoch=epoch, source=source)


# ----------------------------------------------------------------------------- settings

def check_config(given, saved, what):
    """Raise naming every setting in `given` (None = not given) that differs from `saved`."""
    diffs = [f"{k}: {given[k]} given, {saved.get(k)} in {what}"
             for k in given if given[k] is not None and given[k] != saved.get(k)]
    if diffs:
        raise UserError(f"settings differ from {what}: " + "; ".join(diffs))


def check_same_architecture(checkpoints, names):
    """Checkpoints (autoencoders or curves) must hold models of one architecture: the same factory,
    and parameters and buffers of the same names and shapes (their kwargs may differ only where
    that keeps them, e.g. the init scheme)."""
    (a, b), (na, nb) = checkpoints, names
    if a.architecture.name == b.architecture.name and module_shapes(a) == module_shapes(b):
        return
    ka, kb = a.architecture.kwargs, b.architecture.kwargs
    diffs = [f"{k} {ka.get(k)} ({na}) vs {kb.get(k)} ({nb})"
             for k in sorted(set(ka) | set(kb)) if ka.get(k) != kb.get(k)]
    if a.architecture.name != b.architecture.name:
        diffs.insert(0, f"architecture {a.architecture.name} ({na}) vs {b.architecture.name} ({nb})")
    raise UserError("the endpoints have different architectures: "
                    + ("; ".join(diffs) or "their tensors' shapes differ"))


def module_shapes(checkpoint):
    """{name: shape} of every parameter and buffer of the autoencoder a checkpoint holds (of a
    curve: of its base module, i.e. of each point)."""
    state = checkpoint.state_dict
    if checkpoint.kind != "curve":
        return {k: tuple(v.shape) for k, v in state.items()}
    shapes = {}
    for k, v in state.items():
        for prefix in ("bends.0.", "base."):
            if k.startswith(prefix):
                shapes[k[len(prefix):]] = tuple(v.shape)
    return shapes


# ----------------------------------------------------------------------------- curve endpoints

def endpoint_record(paths):
    """What a curve checkpoint records of its endpoint files: {init_start, init_start_sha256, ...}."""
    record = {}
    for key, path in zip(ENDPOINT_FLAGS, paths):
        record[key] = os.path.abspath(path) if path else None
        record[key + "_sha256"] = file_digest(path) if path else None
    return record


def endpoint_changes(curve_config, keys=tuple(ENDPOINT_FLAGS)):
    """One sentence per recorded endpoint file (of `keys`) that is gone or no longer has its
    recorded SHA-256."""
    problems = []
    for key in keys:
        flag = ENDPOINT_FLAGS[key]
        path, digest = curve_config.get(key), curve_config.get(key + "_sha256")
        if not path or not digest:
            continue
        if not os.path.isfile(path):
            problems.append(f"the {flag} endpoint {path} recorded in the curve is gone")
        elif file_digest(path) != digest:
            problems.append(f"the {flag} endpoint {path} has changed since the curve was trained "
                            "(its SHA-256 differs)")
    return problems


def verify_endpoints(curve_config, strict, keys=tuple(ENDPOINT_FLAGS)):
    """Check the curve's recorded endpoint files. `strict` (the caller compares against those
    files): a change is an error. Otherwise (the curve holds its own copy of its ends) a change is
    one warning line, and the run goes on with the curve's own ends."""
    problems = endpoint_changes(curve_config, keys)
    if not problems:
        return
    if strict:
        raise UserError("; ".join(problems) + "; pass the endpoints the curve was trained from "
                        "with --init_start / --init_end, or train a new curve")
    warn("warning: " + "; ".join(problems) + "; this run uses the curve's own copy of its ends "
         "(train a new curve to connect the new endpoint)")


# ----------------------------------------------------------------------------- RNG state

def rng_state(device):
    """The random state a run depends on: the CPU generator and that of the run's device only
    (never every GPU's: a --device cpu run on a GPU machine does not touch CUDA)."""
    state = {"torch": torch.get_rng_state(), "device": str(device)}
    if device.type == "cuda":
        state["device_state"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore `rng_state`'s result for a run on `device`. A run resumed on another kind of device
    (GPU to CPU or back) cannot continue the saved device stream: it says so and goes on with the
    CPU state restored; a checkpoint from cuda:3 resumes on whichever GPU this run uses."""
    torch.set_rng_state(state["torch"])
    saved, device_state = state.get("device"), state.get("device_state")
    if saved is None:  # checkpoints of the first version saved every visible GPU's state
        every = state.get("cuda") or []
        saved = "cuda" if every else "cpu"
        device_state = every[min(device.index or 0, len(every) - 1)] if every else None
    if torch.device(saved).type != device.type:
        warn(f"note: the checkpoint was saved on {saved} and this run is on {device}: the random "
             "stream of noise and dropout differs from an uninterrupted run from here on")
    elif device.type == "cuda" and device_state is not None:
        torch.cuda.set_rng_state(device_state, device)


def run_rng_state(device, t_sampler=None):
    """The random state of a run: this process's (rng_state), its curve t-sampler's, and under
    torchrun every process's (gathered, so every process must call it), in "ranks"."""
    mine = rng_state(device)
    if t_sampler is not None:
        mine["t_sampler"] = t_sampler.get_state()
    everyone = distributed.all_gather(mine)
    return mine if len(everyone) == 1 else {**everyone[0], "ranks": everyone}


def set_run_rng_state(state, device, t_sampler=None):
    """Restore `run_rng_state`'s result in this process: its own part when the checkpoint was
    written by as many processes; otherwise rank 0's, with a note that the streams differ."""
    ranks = state.get("ranks")
    writers = len(ranks) if ranks is not None else 1
    matched = writers == distributed.world()
    mine = ranks[distributed.rank()] if ranks is not None and matched else state
    if not matched:
        warn(f"note: the checkpoint was written by {writers} process(es) and this run has "
             f"{distributed.world()}: the random streams of noise, dropout and t differ from an "
             "uninterrupted run from here on")
    set_rng_state(mine, device)
    if t_sampler is not None and matched and mine.get("t_sampler") is not None:
        t_sampler.set_state(mine["t_sampler"])
