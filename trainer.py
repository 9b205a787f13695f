"""Training and evaluation of one epoch, the optimizer and the learning-rate schedule."""
import torch
from tqdm import tqdm

from speed import accumulator_dtype, autocast

FINITE_CHECK_EVERY = 20  # batches between host syncs (non-finite check, progress bar update)


class NonFiniteLoss(Exception):
    pass


def learning_rate(base_lr, epoch, epochs):
    """Garipov et al.'s schedule: constant for the first half, linear down to 1% at 90%, then 1%.

    `epoch` is the 0-based index of the epoch about to run. Garipov's loop counts epochs from 1 and
    evaluates the schedule at (epoch / epochs), so epoch e (0-based) of E uses factor((e + 1) / E):
    for 8 epochs the factors are 1, 1, 1, 1, 0.690625, 0.38125, 0.071875, 0.01.
    """
    alpha = (epoch + 1) / epochs
    if alpha <= 0.5:
        factor = 1.0
    elif alpha <= 0.9:
        factor = 1.0 - (alpha - 0.5) / 0.4 * 0.99
    else:
        factor = 0.01
    return factor * base_lr


def make_optimizer(args, params, weight_decay, device):
    """Adam (lr, betas) or SGD (lr, momentum) from the run's flags, with this weight decay. On CUDA
    the fused implementation: one kernel per step, and with fp16 the gradient scaler's inf check
    stays on the device instead of syncing with the host every step."""
    fused = True if device.type == "cuda" else None  # None: PyTorch's own choice elsewhere
    if args.optim_name == "Adam":
        return torch.optim.Adam(params, lr=args.lr, betas=(args.beta_1, args.beta_2),
                                weight_decay=weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=weight_decay,
                           fused=fused)


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer state but keep this run's implementation (fused or not): a state
    saved on a GPU resumes on the CPU and back."""
    implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, implementation):
        group.update(keep)


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
