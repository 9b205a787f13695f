"""Training: the epoch loop of a run (resumable, interruptible), one epoch, the optimizer, the
learning-rate schedules, and what a training run saves and restores (`TrainingState`)."""
import contextlib
import copy
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from aemc import checkpoints, distributed, figures
from aemc.errors import Interrupted, UserError, warn
from aemc.losses import reconstruction
from aemc.settings import changed_results
from aemc.speed import accumulator_dtype, autocast

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


def make_optimizer(optim, params, weight_decay, device):
    """Adam (lr, betas) or SGD (lr, momentum) of `optim` (an aemc.settings.Optimizer), with this
    weight decay. On CUDA the fused implementation: one kernel per step, and with fp16 the gradient
    scaler's inf check stays on the device instead of syncing with the host every step."""
    fused = True if device.type == "cuda" else None  # None: PyTorch's own choice elsewhere
    if optim.optim_name == "Adam":
        return torch.optim.Adam(params, lr=optim.lr, betas=(optim.beta_1, optim.beta_2),
                                weight_decay=weight_decay, fused=fused)
    if optim.optim_name == "SGD":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=weight_decay,
                               fused=fused)
    raise UserError(f"unknown optimizer {optim.optim_name!r}; choose Adam or SGD")


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer state but keep this run's implementation (fused or not): a state
    saved on a GPU resumes on the CPU and back. The state is copied: torch's loading keeps the
    saved tensors where it can, and the steps would change them in place (two runs from one
    loaded checkpoint would share their moments)."""
    implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(copy.deepcopy(state))
    for group, keep in zip(optimizer.param_groups, implementation):
        group.update(keep)


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def unwrap(module):
    """The module inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def train_one_epoch(model, loader, optimizer, objective, settings, *, scaler=None, start=0, sums=None, stop=None,
                    lr_at=None, desc="train", verbose=True):
    """One pass over `loader`, minimising `objective` (aemc.objective.Objective, built from the run's
    `settings`, an aemc.settings.Run) on every batch: the reconstruction of the clean image from the
    input + N(0, settings.training.noise_std^2) (the denoising objective), beta * KL for a VAE-like
    model, and for a curve 0.5 * wd * ||theta(t)||^2 of the point the forward pass sampled
    (`model.sq_norm`).

    Losses are accumulated on the device; the host syncs only every FINITE_CHECK_EVERY batches, to
    check they are finite and update the bar. `start`/`sums` continue a partly done epoch; when
    `stop.requested` turns true the epoch ends early. settings.speed.amp runs the forward pass in
    mixed precision (the objective is computed in float32); `scaler` is the gradient scaler fp16
    needs. `lr_at(fraction)`, when given, sets the learning rate before every step from how far into
    the epoch it is. Returns the accumulators, summed over all processes: {"loss_sum" (reconstruction),
    "kl_sum" (the KL term before beta), "reg_sum" (the curve's decay term), "count", "batches"}.

    Under torchrun (a DistributedDataParallel `model`, a sharded `loader`) each process trains on
    its part of every batch; its objective is weighted by its part's share of the batch, so the
    averaged gradient is that of the whole batch's mean objective. The processes agree on stopping
    (Ctrl-C, non-finite loss) at the periodic syncs.
    """
    objective.check(settings)
    noise_std, amp = settings.training.noise_std, settings.speed.amp
    model.train()
    device = loader.device
    inner = unwrap(model)
    world = distributed.world()
    if sums is None or not distributed.is_main():  # a resumed epoch's sums live on rank 0
        sums = {"loss_sum": 0.0, "kl_sum": 0.0, "reg_sum": 0.0, "count": 0, "batches": sums["batches"] if sums else 0}
    elif "kl_sum" not in sums:  # written before the KL had its own sum: an endpoint's reg_sum was its KL's
        sums = {**sums, "kl_sum": 0.0 if objective.curve else sums["reg_sum"],
                "reg_sum": sums["reg_sum"] if objective.curve else 0.0}
    dtype = accumulator_dtype(device)
    totals = torch.tensor([sums["loss_sum"], sums["kl_sum"], sums["reg_sum"], sums["count"], 0.0],
                          device=device, dtype=dtype)
    done = start
    bar = tqdm(total=len(loader), initial=start, desc=desc, leave=False, disable=not verbose)

    def snapshot():
        """Everyone's sums (one all-reduce under torchrun) and whether anyone was asked to stop."""
        now = totals.clone()
        now[4] = float(stop is not None and stop.requested)
        distributed.all_reduce_sum(now)
        loss_sum, kl_sum, reg_sum, count, stopping = now.tolist()  # the one host sync
        if not all(math.isfinite(v) for v in (loss_sum, kl_sum, reg_sum)):
            raise NonFiniteLoss(f"batch {done}")
        return {"loss_sum": loss_sum, "kl_sum": kl_sum, "reg_sum": reg_sum, "count": int(count),
                "batches": done}, stopping > 0

    for x, batch_size in loader.shares(start):
        if lr_at is not None:
            set_learning_rate(optimizer, lr_at(done / len(loader)))
        noisy = x + noise_std * torch.randn_like(x) if noise_std > 0 else x
        with autocast(device, amp):
            out = model(noisy)
        terms = objective(out, x, inner.sq_norm if objective.curve else None)
        total = terms.total
        if world > 1:
            total = total * (len(x) * world / batch_size)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        totals[0] += terms.loss.detach() * len(x)
        if terms.kl is not None:
            totals[1] += terms.kl.detach() * len(x)
        if terms.reg is not None:
            totals[2] += terms.reg.detach() * len(x)
        totals[3] += len(x)
        done += 1
        bar.update(1)
        if done % FINITE_CHECK_EVERY == 0:
            snap, stopping = snapshot()
            bar.set_postfix(loss=f"{snap['loss_sum'] / snap['count']:.4f}")
            if stopping:
                break
        elif world == 1 and stop is not None and stop.requested:
            break
    bar.close()
    return snapshot()[0]


def fit(*, model, runner, optimizer, objective, settings, train_loader, test_loader, run, lr_at, checkpoint,
        evaluate, start_epoch=0, position=None, scaler=None, trackers=(), on_epoch_end=None):
    """Train from `start_epoch` (and a mid-epoch `position`) to settings.training.epochs, as every
    training script does, minimising `objective` (aemc.objective.training_objective of `settings`,
    the run's aemc.settings.Run).

    Each epoch: the learning rate `lr_at(epoch, fraction)` at every step; one epoch of training;
    `evaluate()` -> (test loss, extra log fields, the module whose reconstructions are saved); one
    printed line, one JSON line in log.jsonl (and `trackers`: aemc.tracking), recon/epoch-NNN.png, then
    checkpoint-last.pt and every settings.training.save_freq epochs (and at the end, with save_final)
    checkpoint-<epoch>.pt, each the dict `checkpoint(epoch, sums)` returns, written atomically; then
    `on_epoch_end(epoch, state)`. Ctrl-C ends the current step, saves a resumable checkpoint-last.pt
    and raises Interrupted; a non-finite loss stops with the last good checkpoint kept. Under torchrun
    every process trains and calls `checkpoint` (which may gather from all of them); rank 0 alone
    evaluates, prints and writes (`run`, the RunDir, may be None elsewhere).
    """
    objective.check(settings)
    epochs, save_freq, save_final = settings.training.epochs, settings.training.save_freq, settings.training.save_final
    main = distributed.is_main()
    last = run.file("checkpoint-last.pt") if main else None
    sample = next(iter(test_loader))[:8]
    epoch = start_epoch
    with StopRequest().installed() as stop:
        while epoch < epochs:
            started = time.time()
            train_loader.set_epoch(epoch)
            try:
                sums = train_one_epoch(
                    runner, train_loader, optimizer, objective, settings, scaler=scaler,
                    start=position["batches"] if position else 0, sums=position, stop=stop,
                    lr_at=lambda fraction: lr_at(epoch, fraction), desc=f"epoch {epoch + 1}/{epochs}",
                    verbose=main)
            except NonFiniteLoss as e:
                kept = f"the last good checkpoint is {last}" if last and os.path.exists(last) else \
                    "no checkpoint was written"
                raise UserError(f"the training loss became non-finite in epoch {epoch + 1} ({e}); "
                                f"stopped, {kept}; try a lower --lr")
            position = None
            if sums["batches"] < len(train_loader):  # Ctrl-C mid-epoch (agreed by every process)
                state = checkpoint(epoch, sums)
                if main:
                    checkpoints.save(last, state)
                raise Interrupted(f"interrupted in epoch {epoch + 1} at batch {sums['batches']}; "
                                  f"resume with --resume {last}")
            lr = lr_at(epoch, 0.0)
            epoch += 1
            if main:
                _report(run, trackers, epoch, epochs, lr, sums, evaluate, sample, started)
            state = checkpoint(epoch, None)
            if main:
                checkpoints.save(last, state)
                if epoch % save_freq == 0 or (epoch == epochs and save_final):
                    checkpoints.save(run.file(f"checkpoint-{epoch}.pt"), state)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, state)
            if distributed.any_rank(stop.requested, train_loader.device) and epoch < epochs:
                raise Interrupted(f"interrupted after epoch {epoch}; resume with --resume {last}")


def _report(run, trackers, epoch, epochs, lr, sums, evaluate, sample, started):
    """Evaluate after an epoch; one printed line, one log line, the reconstructions' PNG."""
    test_loss, extra, evaluated = evaluate()
    train_loss = sums["loss_sum"] / sums["count"]
    record = dict(epoch=epoch, lr=lr, train_loss=train_loss, test_loss=test_loss, **extra)
    if sums.get("kl_sum", 0.0) > 0:  # a VAE: its KL term (per pixel value), the loss being reconstruction + beta * KL
        record["kl"] = sums["kl_sum"] / sums["count"]
    if sums["reg_sum"] > 0:  # a curve: its weight-decay term
        record["reg"] = sums["reg_sum"] / sums["count"]
    record["time"] = round(time.time() - started, 2)
    reg = "".join(f"  {k} {record[k]:.5f}" for k in ("kl", "reg") if k in record)
    at = f"@{extra['test_loss_at']}" if "test_loss_at" in extra else ""
    print(f"epoch {epoch:4d}/{epochs}  lr {lr:.2e}  train {train_loss:.5f}{reg}  "
          f"test{at} {test_loss:.5f}  {record['time']:.1f}s", flush=True)
    run.log(record)
    for tracker in trackers:
        tracker.epoch(record)
    evaluated.eval()
    with torch.no_grad():
        recon = reconstruction(evaluated(sample))
    os.makedirs(run.file("recon"), exist_ok=True)
    figures.save_rows([sample, recon], run.file(f"recon/epoch-{epoch:03d}.png"))
    for tracker in trackers:
        tracker.media({"reconstructions": run.file(f"recon/epoch-{epoch:03d}.png")})


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def check_resumed_settings(resume_flag, saved, run):
    """Refuse, in one line, a resume whose settings would change what the run computes (the
    checkpoint's `saved` Run against the `run` the flags make); a moved --data_path is a note."""
    changed = changed_results(saved, run)
    if changed:
        raise UserError(f"--resume {resume_flag}: the run was trained with other settings: {', '.join(changed)}; "
                        "leave those flags out to continue it (--epochs, the device and speed flags may change), "
                        "or train a new run in a new --dir")
    if run.data.data_path != saved.data.data_path:
        warn(f"note: --data_path {run.data.data_path}: the run was trained on {saved.data.data_path}; "
             "resuming on the same images there")


def check_fresh_run_dir(path, resume_path, resume=None):
    """Refuse what would overwrite a run already in `path`: a fresh run (no `resume_path`) on top
    of it, or a resume from any state but its newest (that would rewrite its later checkpoints and
    log). `resume` is the loaded Checkpoint at `resume_path`; a resume into a folder without a run
    (a branch) is fine."""
    last = os.path.join(path, "checkpoint-last.pt")
    holds_run = os.path.isfile(os.path.join(path, "log.jsonl")) or os.path.isfile(last)
    if resume_path is None:
        if holds_run:
            raise UserError(f"{path} already holds a run; continue it with --resume {last} or choose a new --dir")
        return
    if resume is None or not holds_run:
        return
    newest, name = newest_state(path)
    given = (resume.epoch, resume.batch)
    if given != newest:
        raise UserError(
            f"--resume {resume_path} is the state after {_position(*given)}, but {path} holds its run up to "
            f"{_position(*newest)} ({name}); resuming there would overwrite the later checkpoints and log: "
            f"resume {name}, or branch off into a new --dir")


def _position(epoch, batch):
    return f"epoch {epoch}" + (f" and {batch} batches of epoch {epoch + 1}" if batch else "")


def newest_state(path):
    """The newest training state of the run in `path`, from what it recorded (never file times):
    ((epoch, batch), file name) of checkpoint-last.pt (rewritten after every epoch and on Ctrl-C),
    or of the last epoch log.jsonl records when that is later."""
    import json
    found = [((-1, 0), "nothing")]
    last = os.path.join(path, "checkpoint-last.pt")
    if os.path.isfile(last):
        ck = checkpoints.load(last, flag=f"the run's {last}")
        found.append(((ck.epoch, ck.batch), last))
    log = os.path.join(path, "log.jsonl")
    if os.path.isfile(log):
        epochs = []
        with open(log) as f:
            for line in f:
                try:
                    epochs.append(int(json.loads(line)["epoch"]))
                except (ValueError, KeyError, TypeError):  # a line cut by a kill, or not an epoch's
                    pass
        if epochs:
            found.append(((max(epochs), 0), os.path.join(path, f"checkpoint-{max(epochs)}.pt")))
    return max(found, key=lambda found: found[0])  # a tie: checkpoint-last.pt


class TrainingState:
    """What a training run (train.py, fge.py) saves in its checkpoints and restores on --resume:
    the model, the optimizer and gradient scaler, the position (epoch, batch, running sums), the
    random state of every process (and of a curve's t-sampler), the architecture, the curve and
    the run's settings."""

    def __init__(self, *, kind, architecture, settings, model, optimizer, scaler, device, curve_config=None,
                 t_sampler=None):
        self.kind, self.architecture, self.settings, self.curve_config = kind, architecture, settings, curve_config
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.t_sampler = device, t_sampler

    def checkpoint(self, epoch, sums=None):
        """The checkpoint after `epoch` epochs (and, mid-epoch, `sums`' batches). Under torchrun
        every process must call it: the random states are gathered."""
        return checkpoints.Checkpoint(
            kind=self.kind, architecture=self.architecture, curve_config=self.curve_config,
            state_dict=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None, epoch=epoch,
            batch=sums["batches"] if sums else 0, sums=sums, settings=self.settings,
            rng=checkpoints.run_rng_state(self.device, self.t_sampler))

    def restore(self, checkpoint):
        """Load a training state's optimizer, scaler and random state (the weights are loaded
        when the model is built); returns (epoch, mid-epoch position or None) to continue from."""
        load_optimizer_state(self.optimizer, checkpoint.optimizer)
        if self.scaler is not None and checkpoint.scaler:
            self.scaler.load_state_dict(checkpoint.scaler)
        checkpoints.set_run_rng_state(checkpoint.rng, self.device, self.t_sampler)
        return checkpoint.epoch, checkpoint.sums if checkpoint.batch > 0 else None
