"""Training and evaluation of one epoch, the learning-rate schedule, and checkpoints."""
import os
import pickle
import zipfile

import torch
from tqdm import tqdm

from utils import UserError, accumulator_dtype, autocast

CHECKPOINT_FORMAT = "ae-mode-connectivity/1"
ARCH_DEFAULTS = dict(in_channels=3, in_filters=64, latent_dim=128)  # the original architecture
FINITE_CHECK_EVERY = 20  # batches between host syncs (non-finite check, progress bar update)


class NonFiniteLoss(Exception):
    pass


def learning_rate(base_lr, epoch, epochs):
    """Garipov et al.'s schedule: constant for the first half, linear down to 1% at 90%, then 1%."""
    alpha = epoch / epochs
    if alpha <= 0.5:
        factor = 1.0
    elif alpha <= 0.9:
        factor = 1.0 - (alpha - 0.5) / 0.4 * 0.99
    else:
        factor = 0.01
    return factor * base_lr


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_one_epoch(model, loader, optimizer, loss_fn, *, noise_std=0.0, curve_wd=0.0, amp="none",
                    scaler=None, start=0, sums=None, stop=None, desc="train", verbose=True):
    """One pass over `loader` (denoising: input + N(0, noise_std^2), loss against the clean image).

    For a curve (`curve_wd` > 0) the loss adds 0.5 * curve_wd * ||theta(t)||^2 of the point the
    forward pass sampled (`model.sq_norm`). Losses are accumulated on the device; the host syncs
    only every FINITE_CHECK_EVERY batches, to check they are finite and update the bar.
    `start`/`sums` continue a partly done epoch; when `stop.requested` turns true the epoch ends
    early. `amp` runs the forward pass in mixed precision (the loss is computed in float32);
    `scaler` is the gradient scaler fp16 needs. Returns the accumulators:
    {"loss_sum", "reg_sum", "count", "batches"}.
    """
    model.train()
    device = loader.device
    if sums is None:
        sums = {"loss_sum": 0.0, "reg_sum": 0.0, "count": 0, "batches": 0}
    loss_sum = torch.tensor(float(sums["loss_sum"]), device=device, dtype=accumulator_dtype(device))
    reg_sum = torch.tensor(float(sums["reg_sum"]), device=device, dtype=accumulator_dtype(device))
    count, done = sums["count"], start
    bar = tqdm(total=len(loader), initial=start, desc=desc, leave=False, disable=not verbose)

    def snapshot():
        finite = torch.isfinite(loss_sum + reg_sum).item()
        if not finite:
            raise NonFiniteLoss(f"batch {done}")
        return {"loss_sum": loss_sum.item(), "reg_sum": reg_sum.item(), "count": count, "batches": done}

    for x in loader.batches(start):
        noisy = x + noise_std * torch.randn_like(x) if noise_std > 0 else x
        with autocast(device, amp):
            out = model(noisy)
        loss = loss_fn(out.float(), x)
        total = loss
        if curve_wd > 0:
            reg = 0.5 * curve_wd * model.sq_norm
            total = loss + reg
            reg_sum += reg.detach() * len(x)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        loss_sum += loss.detach() * len(x)
        count += len(x)
        done += 1
        bar.update(1)
        if done % FINITE_CHECK_EVERY == 0:
            snap = snapshot()
            bar.set_postfix(loss=f"{snap['loss_sum'] / count:.4f}")
        if stop is not None and stop.requested:
            break
    bar.close()
    return snapshot()


@torch.no_grad()
def evaluate(model, loader, loss_fns, image_metrics=None, amp="none"):
    """Mean of each loss over all images of `loader` (clean inputs, eval mode): {name: float}.

    `image_metrics` ({name: fn(output, input) -> one value per image}, e.g. LPIPS) are computed
    in the same pass and averaged over images (not over batches). With `amp` only the model's
    forward pass is in mixed precision; losses and metrics are computed in float32.
    """
    model.eval()
    fns = {**loss_fns, **(image_metrics or {})}
    sums = {name: torch.zeros((), device=loader.device, dtype=accumulator_dtype(loader.device)) for name in fns}
    for x in loader:
        with autocast(loader.device, amp):
            out = model(x)
        out = out.float()
        for name, fn in loss_fns.items():
            sums[name] += fn(out, x).detach() * len(x)
        for name, fn in (image_metrics or {}).items():
            sums[name] += fn(out, x).detach().to(sums[name].dtype).sum()
    return {name: (s / loader.num_images).item() for name, s in sums.items()}


# ----------------------------------------------------------------------------- checkpoints

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


def prepare_model(model, args):
    """Apply --channels_last (in place) and --compile; returns the module to run."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if args.compile else model


def make_scaler(device, amp):
    """The gradient scaler fp16 training needs (None otherwise)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` (a dict of plain types and tensors) atomically: a crash or kill at any
    moment leaves either the previous file or the new one, never a half-written file."""
    checkpoint = {"format": CHECKPOINT_FORMAT, **checkpoint}
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu", kind=None, flag="checkpoint"):
    """Load a checkpoint of this tool safely (`weights_only=True`: unpickling can never run code).

    Every problem is a UserError naming the file: missing, corrupt, unsafe, not ours, wrong kind.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{flag} {path} was refused: it is not a plain checkpoint and loading it "
                        f"could run code ({first[:160]})")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{flag} {path} is corrupt or not a PyTorch checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{flag} {path} is not a checkpoint written by this tool")
    if kind is not None and checkpoint.get("kind") != kind:
        raise UserError(f"{flag} {path} holds a {checkpoint.get('kind')}, expected a {kind}")
    return checkpoint


def check_config(given, saved, what):
    """Raise naming every setting in `given` (None = not given) that differs from `saved`."""
    diffs = [f"{k}: {given[k]} given, {saved.get(k)} in {what}"
             for k in given if given[k] is not None and given[k] != saved.get(k)]
    if diffs:
        raise UserError(f"settings differ from {what}: " + "; ".join(diffs))


def model_from_checkpoint(checkpoint):
    """Rebuild the saved Autoencoder or CurveNet from a checkpoint alone, weights loaded."""
    from models.autoencoder import Autoencoder
    from models.curves import CurveNet
    model = Autoencoder(**checkpoint["model_config"])
    if checkpoint["kind"] == "curve":
        c = checkpoint["curve_config"]
        model = CurveNet(model, c["curve"], c["num_bends"], c["fix_start"], c["fix_end"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_endpoint(path, flag, map_location="cpu"):
    """An endpoint checkpoint -> (Autoencoder with its weights and buffers, checkpoint)."""
    ck = load_checkpoint(path, map_location=map_location, kind="autoencoder", flag=flag)
    return model_from_checkpoint(ck), ck


def check_same_architecture(configs, names):
    """Two endpoints must share every architecture setting."""
    (a, b), (na, nb) = configs, names
    diffs = [f"{k} {a[k]} ({na}) vs {b[k]} ({nb})" for k in ARCH_DEFAULTS if a[k] != b[k]]
    if diffs:
        raise UserError("the endpoints have different architectures: " + "; ".join(diffs))
