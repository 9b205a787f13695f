"""Training: the epoch loop of a run (resumable, interruptible), one epoch, evaluation, the
optimizer and the learning-rate schedules."""
import os
import time

import torch
from tqdm import tqdm

import checkpoints
import figures
from speed import accumulator_dtype, autocast
from utils import Interrupted, StopRequest, UserError

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


def cyclic_learning_rate(epoch, fraction, cycle, lr_1, lr_2):
    """Garipov et al.'s FGE schedule: within each cycle of `cycle` epochs the rate falls linearly
    from lr_1 to lr_2 at mid-cycle and rises back; `fraction` is how far into the epoch the step is."""
    t = ((epoch % cycle) + fraction) / cycle
    return lr_1 * (1 - 2 * t) + lr_2 * 2 * t if t < 0.5 else lr_1 * (2 * t - 1) + lr_2 * (2 - 2 * t)


def snapshot_epochs(cycle, epochs):
    """The epochs (counted from 1) after which FGE takes a snapshot: each cycle's midpoint, where the
    rate reaches lr_2 (Garipov's fge.py: (epoch % cycle + 1) == cycle // 2, epochs from 0)."""
    return [e for e in range(1, epochs + 1) if e % cycle == cycle // 2]


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
                    scaler=None, start=0, sums=None, stop=None, lr_at=None, desc="train", verbose=True):
    """One pass over `loader` (denoising: input + N(0, noise_std^2), loss against the clean image).

    For a curve (`curve_wd` > 0) the loss adds 0.5 * curve_wd * ||theta(t)||^2 of the point the
    forward pass sampled (`model.sq_norm`). Losses are accumulated on the device; the host syncs
    only every FINITE_CHECK_EVERY batches, to check they are finite and update the bar.
    `start`/`sums` continue a partly done epoch; when `stop.requested` turns true the epoch ends
    early. `amp` runs the forward pass in mixed precision (the loss is computed in float32);
    `scaler` is the gradient scaler fp16 needs. `lr_at(fraction)`, when given, sets the learning
    rate before every step from how far into the epoch it is. Returns the accumulators:
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
        if lr_at is not None:
            set_learning_rate(optimizer, lr_at(done / len(loader)))
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
def evaluate(model, loader, loss_fns, image_metrics=None, amp="none", on_batch=None):
    """Mean of each loss over all images of `loader` (clean inputs, eval mode): {name: float}.

    `image_metrics` ({name: fn(output, input) -> one value per image}, e.g. LPIPS) are computed
    in the same pass and averaged over images (not over batches). With `amp` only the model's
    forward pass is in mixed precision; losses and metrics are computed in float32.
    `on_batch(x, out)` sees every batch and its (float32) reconstructions.
    """
    model.eval()
    fns = {**loss_fns, **(image_metrics or {})}
    sums = {name: torch.zeros((), device=loader.device, dtype=accumulator_dtype(loader.device)) for name in fns}
    for x in loader:
        with autocast(loader.device, amp):
            out = model(x)
        out = out.float()
        if on_batch is not None:
            on_batch(x, out)
        for name, fn in loss_fns.items():
            sums[name] += fn(out, x).detach() * len(x)
        for name, fn in (image_metrics or {}).items():
            sums[name] += fn(out, x).detach().to(sums[name].dtype).sum()
    return {name: (s / loader.num_images).item() for name, s in sums.items()}


def fit(*, model, runner, optimizer, loss_fn, train_loader, test_loader, run, epochs, lr_at, checkpoint,
        evaluate, start_epoch=0, position=None, noise_std=0.0, curve_wd=0.0, amp="none", scaler=None,
        save_freq=1, save_final=True, writer=None, on_epoch_end=None):
    """Train from `start_epoch` (and a mid-epoch `position`) to `epochs`, as every training script does.

    Each epoch: the learning rate `lr_at(epoch, fraction)` at every step; one epoch of training;
    `evaluate()` -> (test loss, extra log fields, the module whose reconstructions are saved); one
    printed line, one JSON line in log.jsonl (and TensorBoard), recon/epoch-NNN.png, then
    checkpoint-last.pt and every `save_freq` epochs checkpoint-<epoch>.pt, each the dict
    `checkpoint(epoch, sums)` returns, written atomically; then `on_epoch_end(epoch, state)`.
    Ctrl-C ends the current step, saves a resumable checkpoint-last.pt and raises Interrupted; a
    non-finite loss stops with the last good checkpoint kept.
    """
    last = run.file("checkpoint-last.pt")
    sample = next(iter(test_loader))[:8]
    epoch = start_epoch
    with StopRequest().installed() as stop:
        while epoch < epochs:
            started = time.time()
            train_loader.set_epoch(epoch)
            try:
                sums = train_one_epoch(
                    runner, train_loader, optimizer, loss_fn, noise_std=noise_std, curve_wd=curve_wd, amp=amp,
                    scaler=scaler, start=position["batches"] if position else 0, sums=position, stop=stop,
                    lr_at=lambda fraction: lr_at(epoch, fraction), desc=f"epoch {epoch + 1}/{epochs}")
            except NonFiniteLoss as e:
                kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
                raise UserError(f"the training loss became non-finite in epoch {epoch + 1} ({e}); "
                                f"stopped, {kept}; try a lower --lr")
            position = None
            if sums["batches"] < len(train_loader):  # Ctrl-C mid-epoch
                checkpoints.save(last, checkpoint(epoch, sums))
                raise Interrupted(f"interrupted in epoch {epoch + 1} at batch {sums['batches']}; "
                                  f"resume with --resume {last}")
            train_loss = sums["loss_sum"] / sums["count"]
            test_loss, extra, evaluated = evaluate()
            lr = lr_at(epoch, 0.0)
            epoch += 1
            record = dict(epoch=epoch, lr=lr, train_loss=train_loss, test_loss=test_loss, **extra)
            if curve_wd > 0:
                record["reg"] = sums["reg_sum"] / sums["count"]
            record["time"] = round(time.time() - started, 2)
            reg = f"  reg {record['reg']:.5f}" if "reg" in record else ""
            at = f"@{extra['test_loss_at']}" if "test_loss_at" in extra else ""
            print(f"epoch {epoch:4d}/{epochs}  lr {lr:.2e}  train {train_loss:.5f}{reg}  "
                  f"test{at} {test_loss:.5f}  {record['time']:.1f}s", flush=True)
            run.log(record)
            if writer is not None:
                for k in ("lr", "train_loss", "test_loss"):
                    writer.add_scalar(k, record[k], epoch)
            evaluated.eval()
            with torch.no_grad():
                recon = evaluated(sample)
            os.makedirs(run.file("recon"), exist_ok=True)
            figures.save_rows([sample, recon], run.file(f"recon/epoch-{epoch:03d}.png"))
            state = checkpoint(epoch, None)
            checkpoints.save(last, state)
            if epoch % save_freq == 0 or (epoch == epochs and save_final):
                checkpoints.save(run.file(f"checkpoint-{epoch}.pt"), state)
            if on_epoch_end is not None:
                on_epoch_end(epoch, state)
            if stop.requested and epoch < epochs:
                raise Interrupted(f"interrupted after epoch {epoch}; resume with --resume {last}")
