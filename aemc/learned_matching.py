"""Learned matching: B's units permuted to minimise the loss of the segment between A and pi(B), by
Git Re-Basin's straight-through estimator (Ainsworth, Hayase, Srinivasa, ICLR 2023, Alg. 3; their
src/mnist_mlp_ste2.py).

Weight matching (aemc.alignment) brings pi(B) close to A in weight space and hopes the segment is
then low; this method lowers the segment's loss itself. Trainable weights W~, initialised at A's
parameters as in their code, stand for the midpoint's partner. Each step:

    pi     = weight_matching(W~, B)             B's units matched to W~'s (warm-started from the
                                                last step's permutations: usually one sweep)
    W_ste  = pi(B) + (W~ - stopgrad(W~))         forward: pi(B); backward: the identity onto W~
    L      = objective((1 - t) A + t W_ste, x)   a training batch x; t = 0.5, or t ~ U(0, 1) per step
    W~    <- W~ - Adam(dL/dW~)                    dL/dW~ = t * dL/dtheta at theta = (1 - t) A + t pi(B)

The loss is the run's objective (aemc.objective: the reconstruction, + beta * KL for a VAE) of the
clean batch, run through torch.func.functional_call with BatchNorm on batch statistics and every
other module in eval mode (a VAE codes with its posterior's mean, as evaluation does). The symmetry
is the derived one (models.symmetry), so any model the derivation handles works, with signs where
it allows them. Where their code uses SGD with momentum 0.9 (lr 1e-2) we use Adam, whose steps do
not depend on the loss's scale (an L1 and a pyramid loss differ by orders of magnitude).

The result is the best projection seen, not merely the last: weight matching's own permutations
(with `restarts`) are the first candidate, then every new projection of W~ (before each step and
after the last), each scored by the midpoint's loss measured as the evaluation measures it
(BatchNorm re-estimated with update_bn on `bn_batches`, then the objective on `loss_batches`, in
eval mode). So the method never returns permutations whose midpoint is worse than weight
matching's on those batches; on other batches (the test split) it can be, by what the choice
overfits them. Their code keeps the best by the noisy loss of each step's batch.

Cost per step: one weight-matching sweep or two (a linear assignment and n x n products of every
tensor a permutation moves, on the CPU, in float32 and float64), one forward and backward pass of a
batch, and, when the projection changed, the scoring: len(bn_batches) + len(loss_batches) forward
passes.

Example::
    >>> perms, signs, record = straight_through(a, b, spec, objective, batches=loader, bn_batches=first,
    ...     loss_batches=second, steps=200, seconds=None, lr=1e-2, t="midpoint", seed=0, restarts=1,
    ...     use_signs=True)
    >>> record["best_step"], record["best_midpoint_loss"], record["weight_matching_midpoint_loss"]
"""
import copy
import hashlib
import itertools
import json
from time import perf_counter

import torch
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from aemc import distributed
from aemc.alignment import weight_matching
from aemc.errors import UserError
from aemc.evaluation import update_bn
from models.symmetry import apply_permutation

T_CHOICES = ("midpoint", "random")


def interpolated_loss(module, objective, params_a, params_b, t, x):
    """objective((1 - t) A + t B) on the clean batch `x`, `module` run with those parameters (and
    its own buffers) through functional_call: the Terms' total."""
    theta = {name: (1 - t) * params_a[name] + t * params_b[name] for name in params_a}
    return objective(functional_call(module, theta, (x,)), x).total


def straight_through_weights(projected, trainable):
    """pi(B) in the forward pass; in the backward pass the identity onto W~ (`trainable`)."""
    return {name: projected[name] + (w - w.detach()) for name, w in trainable.items()}


def batch_statistics_mode(module):
    """`module` in eval mode but for its BatchNorm layers, which normalise by the batch's statistics."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return module


def project(spec, trainable, params_b, perms, signs, seed, use_signs):
    """Weight matching of B onto W~, warm-started at (perms, signs): matched from pi(B) (B already
    permuted by them, so a good start costs one sweep) and composed with them. Unit i of the
    result is unit q[i] of pi(B), i.e. unit perms[q[i]] of B, signed s[i] * signs[q[i]]."""
    w = {name: v.detach().cpu().double() for name, v in trainable.items()}
    q, s, _ = weight_matching(spec, w, apply_permutation(spec, params_b, perms, signs), 1, seed, use_signs)
    return {p: perms[p][q[p]] for p in perms}, {p: s[p] * signs[p][q[p]] for p in signs}


class _Candidates:
    """The projections scored so far by the midpoint's evaluated loss, and the best of them."""

    def __init__(self, model, objective, spec, params_a, params_b, bn_batches, loss_batches):
        self.module = copy.deepcopy(model)
        self.objective, self.spec, self.a, self.b = objective, spec, params_a, params_b
        self.bn_batches, self.loss_batches = bn_batches, loss_batches
        self.seen, self.steps, self.losses, self.best = set(), [], [], None

    @torch.no_grad()
    def midpoint_loss(self, perms, signs):
        projected = apply_permutation(self.spec, self.b, perms, signs)
        for name, p in self.module.named_parameters():
            p.copy_(0.5 * (self.a[name] + projected[name]))
        update_bn(self.bn_batches, self.module)
        self.module.eval()
        total = sum(float(self.objective(self.module(x), x).total) * len(x) for x in self.loss_batches)
        return total / sum(len(x) for x in self.loss_batches)

    def offer(self, step, perms, signs):
        key = tuple((p, perms[p].numpy().tobytes(), signs[p].numpy().tobytes() if p in signs else b"")
                    for p in sorted(perms))
        if key in self.seen:
            return
        self.seen.add(key)
        loss = self.midpoint_loss(perms, signs)
        self.steps.append(step)
        self.losses.append(loss)
        if self.best is None or loss < self.best[0]:
            self.best = (loss, step, perms, signs)


def _forever(batches):
    while True:
        yield from batches


def straight_through(model_a, model_b, spec, objective, *, batches, bn_batches, loss_batches, steps, seconds, lr, t,
                     seed, restarts, use_signs, verbose=True):
    """Permutations (and signs) of B's units learned by the straight-through estimator (see the
    module docstring): (perms, signs, record of plain types).

    spec: B's PermutationSpec (with a latent map folded in, the latent's permutation left out).
    objective: the run's (aemc.objective.Objective; its total is minimised). batches: training
    batches for the steps, cycled. bn_batches, loss_batches: fixed training batches scoring each
    projection. steps: at most this many; seconds: or stop once this long has passed (None: no
    limit). lr: Adam's. t: "midpoint" (0.5) or "random" (U(0, 1) per step, seeded by `seed`).
    seed, restarts: of the weight matching that gives the first candidate (and the steps' seeds).
    use_signs: negate units where the symmetry allows it (through Tanh).

    The record: steps done, seconds, stopped ("steps" or "seconds"), the loss of each step, each
    scored candidate (candidate_steps: how many steps W~ had taken, 0 for weight matching's own;
    candidate_losses), best_step, best_midpoint_loss and weight_matching_midpoint_loss."""
    if t not in T_CHOICES:
        raise ValueError(f"t must be one of {T_CHOICES}, got {t!r}")
    start = perf_counter()
    a = {name: p.detach() for name, p in model_a.named_parameters()}
    b = {name: p.detach() for name, p in model_b.named_parameters()}
    b64 = {name: v.cpu().double() for name, v in b.items()}
    perms, signs, _ = weight_matching(spec, {name: v.cpu().double() for name, v in a.items()}, b64, restarts, seed,
                                      use_signs)
    candidates = _Candidates(model_a, objective, spec, a, b, bn_batches, loss_batches)
    candidates.offer(0, perms, signs)
    template = batch_statistics_mode(copy.deepcopy(model_a))  # its buffers absorb the steps' BatchNorm updates
    trainable = {name: v.clone().requires_grad_() for name, v in a.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    stream = _forever(batches)
    history, stopped = [], "steps"
    bar = tqdm(total=steps, desc="straight-through matching", leave=False, disable=not verbose)
    for step in range(steps):
        if seconds is not None and perf_counter() - start >= seconds:
            stopped = "seconds"
            break
        perms, signs = project(spec, trainable, b64, perms, signs, seed * 1_000_003 + step + 1, use_signs)
        candidates.offer(step, perms, signs)
        at = 0.5 if t == "midpoint" else float(torch.rand((), generator=generator))
        projected = apply_permutation(spec, b, perms, signs)
        loss = interpolated_loss(template, objective, a, straight_through_weights(projected, trainable), at,
                                 next(stream))
        if not torch.isfinite(loss):
            raise UserError(f"straight-through matching: the loss is {float(loss)} at step {step + 1}; "
                            "try a smaller --lr")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        bar.update()
        bar.set_postfix(loss=f"{history[-1]:.5f}", best_midpoint=f"{candidates.best[0]:.5f}")
    bar.close()
    done = len(history)
    if done:  # the projection of the last step's W~
        candidates.offer(done, *project(spec, trainable, b64, perms, signs, seed * 1_000_003, use_signs))
    best_loss, best_step, perms, signs = candidates.best
    record = dict(steps=done, seconds=perf_counter() - start, stopped=stopped, lr=lr, t=t, loss=history,
                  candidate_steps=candidates.steps, candidate_losses=candidates.losses, best_step=best_step,
                  best_midpoint_loss=best_loss, weight_matching_midpoint_loss=candidates.losses[0])
    return perms, signs, record


def learn(model_a, model_b, spec, settings, train_loader, objective):
    """straight_through as `settings` (an aemc.settings.Alignment) says, on `train_loader`: its
    shuffled batches for the steps; of its fixed order, the first `settings.batches` batches score
    the projections: the first half re-estimates BatchNorm, the second half measures the loss (one
    batch each at least; fewer when the split has fewer batches)."""
    ordered = train_loader.ordered()
    k = min(max(settings.batches // 2, 1), len(ordered) // 2)
    if k == 0:
        raise UserError("straight-through matching needs at least 2 training batches (one re-estimates "
                        "BatchNorm, one scores the midpoint): use more images or a smaller --batch_size")
    fixed = list(itertools.islice(ordered, 2 * k))
    # under torchrun every process learns and all take rank 0's result: a budget in seconds, or a GPU's
    # non-deterministic kernels, could make them differ, and the processes must share one aligned end
    learned = straight_through(model_a, model_b, spec, objective, batches=train_loader, bn_batches=fixed[:k],
                               loss_batches=fixed[k:], steps=settings.steps, seconds=settings.seconds, lr=settings.lr,
                               t=settings.ste_t, seed=settings.seed, restarts=settings.restarts,
                               use_signs=settings.latent_signs, verbose=distributed.is_main())
    return distributed.broadcast(learned)


def summary(record):
    """One line on what a straight-through record (align's record["ste"]) did."""
    kept = "weight matching's own" if record["best_step"] == 0 else f"the projection after step {record['best_step']}"
    return (f"straight-through matching: {record['steps']} steps in {record['seconds']:.1f} s "
            f"(stopped by {record['stopped']}); the midpoint's loss on training batches: "
            f"{record['weight_matching_midpoint_loss']:.5f} weight-matched, {record['best_midpoint_loss']:.5f} kept "
            f"({kept}, of {len(record['candidate_steps'])} scored)")


def identity(record):
    """{"permutations_sha256": ...} of an align record of method "ste", else {}: what a resumed walk
    must find again, since a budget in seconds need not stop at the same step twice."""
    if record["method"] != "ste":
        return {}
    text = json.dumps([record["permutations"], record["signs"]], sort_keys=True)
    return {"permutations_sha256": hashlib.sha256(text.encode()).hexdigest()}
