"""Permutation alignment of one autoencoder to another: reorder (and, through Tanh, negate) the
hidden units of B so that it computes the same function but lies as close as the method can make
it to A in weight space.

* Weight matching (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR 2023, Alg. 1): coordinate
  descent over the permutations, each step a linear assignment (scipy's linear_sum_assignment)
  maximising the summed inner products of all tensors that share the permutation, with the other
  permutations applied. Every step can only raise <A, pi(B)>, so ||A - pi(B)|| never grows.
* Activation matching (their Sec. 3.1; Li et al. 2016): units paired by the correlation of their
  activations on training batches, one assignment per layer.
* Learned matching (their Alg. 3, the straight-through estimator): aemc.learned_matching.

Example::
    >>> aligned, record = align(a, b, method="weight", restarts=3, seed=0)
    >>> record["objective"]          # <A, pi(B)> after each sweep, never decreasing
"""
import copy

import numpy as np
import torch

from aemc.architectures import permutation_spec
from aemc.latent import fold_latent, replay
from models.symmetry import apply_permutation, expand, identity

MAX_SWEEPS = 100


def _parameters(model):
    return {name: p.detach().cpu().double() for name, p in model.named_parameters()}


def objective(spec, params_a, params_b, perms, signs):
    """<A, pi(B)>: the inner product of A's parameters with B's, permuted and signed."""
    permuted = apply_permutation(spec, params_b, perms, signs)
    return float(sum((params_a[k] * permuted[k]).sum() for k in params_a))


def _assignment(score, groups, within=None):
    """The column assigned to each row maximising the total score (a permutation as a tensor).
    With `groups` (a GroupNorm's, a grouped layer's), rows and columns come in that many
    consecutive groups and a row may only take a column of the group its group is assigned; with
    `within`, each group is runs of that many units and a row only a column of the same run of the
    assigned group: the best assignment within every pair of runs, then of groups to groups."""
    from scipy.optimize import linear_sum_assignment  # a second to import: only when aligning
    n = len(score)
    k = n // groups
    run = within or k
    if groups == 1 and run == n:
        rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
        return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
    blocks = score.reshape(groups, k, groups, k).permute(0, 2, 1, 3)
    runs = range(0, k, run)
    within = [[torch.cat([r + _assignment(blocks[a, b][r:r + run, r:r + run], 1) for r in runs])
               for b in range(groups)] for a in range(groups)]
    totals = torch.tensor([[float(blocks[a, b][torch.arange(k), within[a][b]].sum()) for b in range(groups)]
                           for a in range(groups)])
    to = _assignment(totals, 1)
    return torch.cat([to[a] * k + within[a][int(to[a])] for a in range(groups)])


def weight_matching(spec, params_a, params_b, restarts=1, seed=0, use_signs=True):
    """Permutations (and signs) of B's units maximising <A, pi(B)> by coordinate descent, best of
    `restarts` random update orders. Returns (perms, signs, objective after each sweep of the best
    restart, starting with the unaligned value)."""
    best = None
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + restart)
        state = _Matching(spec, params_a, params_b, use_signs)
        history = [state.objective]
        for _ in range(MAX_SWEEPS):
            order = [list(spec.sizes)[i] for i in torch.randperm(len(spec.sizes), generator=generator)]
            progress = [state.improve(p) for p in order]
            history.append(state.objective)
            if not any(progress):
                break
        if best is None or history[-1] > best[2][-1]:
            best = (state.perms, state.signs, history)
    return best


class _Matching:
    """The coordinate descent's state: B's parameters with the current permutations and signs
    applied (float64, and a float32 copy for the cost matrices), kept up to date incrementally."""

    def __init__(self, spec, params_a, params_b, use_signs):
        self.spec, self.use_signs = spec, use_signs
        self.perms, self.signs = identity(spec)
        self.b = {k: v.clone() for k, v in params_b.items()}       # = pi(B), float64
        self.b32 = {k: v.float() for k, v in params_b.items()}
        # A does not change: its rows for every (tensor, axis), in float64 and float32
        self.a = {(name, axis): self._rows(params_a, name, axis, spec.sizes[p])
                  for p in spec.sizes for name, axis in spec.axes[p] if name in params_a}
        self.a32 = {key: rows.float() for key, rows in self.a.items()}
        self.objective = objective(spec, params_a, params_b, self.perms, self.signs)

    @staticmethod
    def _rows(tensors, name, axis, n):
        return tensors[name].movedim(axis, 0).reshape(n, -1)

    def improve(self, p):
        """One step: the best assignment for perm p with the others fixed; True if it raised the
        objective. The assignment is chosen on a float32 cost matrix (the expensive part); whether
        it raises <A, pi(B)> is then decided exactly, in float64, on the units it moves."""
        n = self.spec.sizes[p]
        axes = [key for key in self.spec.axes[p] if key in self.a]  # not BN statistics
        perm, sign = self.perms[p], self.signs.get(p, torch.ones(n, dtype=torch.float64)).double()
        current = torch.zeros(n, n, dtype=torch.float32)  # [i, k] = <A_i, pi(B)_k>
        for name, axis in axes:
            current += self.a32[name, axis] @ self._rows(self.b32, name, axis, n).T
        cost = torch.empty_like(current)  # [i, j] = <A_i, unit j of B, other perms applied>
        cost[:, perm] = current * sign.float()
        signed = self.use_signs and p in self.spec.signed
        new = _assignment(cost.abs() if signed else cost, self.spec.groups.get(p, 1), self.spec.within.get(p))
        new_sign = torch.where(cost[torch.arange(n), new] < 0, -1.0, 1.0).double() if signed else sign
        inverse = perm.argsort()
        source = inverse[new]                # row of pi(B) that becomes row i
        factor = new_sign * sign[source]     # and the sign it is multiplied by
        moved = ((source != torch.arange(n)) | (factor != 1)).nonzero().flatten()
        if len(moved) == 0:
            return False
        delta = 0.0
        for name, axis in axes:
            a, b = self.a[name, axis], self._rows(self.b, name, axis, n)
            delta += float(((a[moved] * b[source[moved]]).sum(1) * factor[moved]).sum() - (a[moved] * b[moved]).sum())
        if delta <= 1e-12 * max(1.0, abs(self.objective)):
            return False
        for name, axis in axes:
            shape = [1] * self.b[name].dim()
            shape[axis] = -1
            block = self.spec.blocks.get((name, axis), 1)
            moved_b = self.b[name].index_select(axis, expand(source, block)) \
                * factor.repeat_interleave(block).view(shape)
            self.b[name], self.b32[name] = moved_b, moved_b.float()
        self.perms[p] = new
        if p in self.signs:
            self.signs[p] = new_sign.float()
        self.objective += delta
        return True


@torch.no_grad()
def activation_matching(spec, model_a, model_b, batches, use_signs=True):
    """Permutations (and signs) pairing each unit of B with the unit of A whose activations (the
    input of the layer that consumes them, all images and pixels of `batches`) correlate most."""
    consumers = {name[:-len(".weight")]: p for p in spec.sizes for name, _ in spec.consumed[p]}
    stats = {p: None for p in set(consumers.values())}  # a perm no layer reads (only returned) stays as it is
    inputs = {}

    def hook(key, which):
        units = spec.sizes[consumers[key]]

        def record(module, args):  # (N, C, ...) or a flattened (N, C * k): per unit, every image and position
            x = args[0].detach().double()
            inputs[(key, which)] = x.reshape(x.shape[0], units, -1).movedim(1, 0).reshape(units, -1)
        return record
    handles = [m.get_submodule(name).register_forward_pre_hook(hook(name, which))
               for which, m in (("a", model_a), ("b", model_b)) for name in consumers]
    model_a.eval(), model_b.eval()
    try:
        for x in batches:
            model_a(x), model_b(x)
            for name, p in consumers.items():
                a, b = inputs[(name, "a")].cpu(), inputs[(name, "b")].cpu()
                s = (a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), a @ b.T, a.shape[1])
                stats[p] = s if stats[p] is None else tuple(u + v for u, v in zip(stats[p], s))
    finally:
        for h in handles:
            h.remove()
    perms, signs = identity(spec)
    for p, (sa, sb, saa, sbb, sab, count) in stats.items():
        mean_a, mean_b = sa / count, sb / count
        cov = sab / count - torch.outer(mean_a, mean_b)
        std_a, std_b = ((s / count - m ** 2).clamp(min=0).sqrt() for s, m in ((saa, mean_a), (sbb, mean_b)))
        std = torch.outer(std_a, std_b)
        corr = cov / (std + 1e-12)
        signed = use_signs and p in spec.signed
        perms[p] = _assignment(corr.abs() if signed else corr, spec.groups.get(p, 1), spec.within.get(p))
        if signed:
            signs[p] = torch.where(corr[torch.arange(len(corr)), perms[p]] < 0, -1.0, 1.0)
    return perms, signs


def align(model_a, model_b, method="weight", restarts=1, seed=0, use_signs=True, batches=None, latent=None,
          learner=None):
    """B's units reordered (and signed) to match A: (the aligned copy of B, a record of plain types:
    method, permutations, signs, objective per sweep, distances before and after). With `latent`
    (orthogonal | linear; None: no map), a map of B's code onto A's, fitted on `batches`, is first
    folded into B (aemc.latent) and the permutations matched with the latent's held at the identity;
    the record's `latent` entry says which map, or why none could be folded. Method "ste" calls
    `learner(model_a, B, spec)` (aemc.learned_matching) on B as folded, for (perms, signs, its record)."""
    spec = permutation_spec(model_b)
    distance_raw = _distance(_parameters(model_a), _parameters(model_b))
    entry = None
    if latent is not None:
        model_b, spec, entry = fold_latent(model_a, model_b, spec, latent, batches)
    params_a, params_b = _parameters(model_a), _parameters(model_b)
    if method == "weight":
        perms, signs, history = weight_matching(spec, params_a, params_b, restarts, seed, use_signs)
    elif method in ("activation", "ste"):
        if method == "activation":
            perms, signs = activation_matching(spec, model_a, model_b, batches, use_signs)
        else:
            perms, signs, learned = learner(model_a, model_b, spec)
        history = [objective(spec, params_a, params_b, *identity(spec)),
                   objective(spec, params_a, params_b, perms, signs)]
    else:
        raise ValueError(f"unknown alignment method {method!r}")
    aligned = copy.deepcopy(model_b)
    aligned.load_state_dict(apply_permutation(spec, model_b.state_dict(), perms, signs))
    norm_a, norm_b = (sum(float((v ** 2).sum()) for v in params.values()) for params in (params_a, params_b))
    distance_after = float(np.sqrt(max(norm_a + norm_b - 2 * history[-1], 0.0)))
    record = dict(method=method, restarts=restarts if method in ("weight", "ste") else None, seed=seed,
                  latent_signs=use_signs, permutations={p: v.tolist() for p, v in perms.items()},
                  signs={p: v.tolist() for p, v in signs.items()}, objective=history,
                  distance_before=distance_raw, distance_after=distance_after, latent=entry)
    if method == "ste":
        record["ste"] = learned
    return aligned, record


def _distance(params_a, params_b):
    return float(sum(((params_a[k] - params_b[k]) ** 2).sum() for k in params_a)) ** 0.5


def apply_record(model, record):
    """The copy of `model` that a recorded alignment (align's record) turns it into: its latent
    map folded in (where one was), then its permutations (a unit not recorded stays in place)."""
    spec = permutation_spec(model)
    if record.get("latent"):
        model, spec = replay(model, spec, record["latent"])
    perms, signs = identity(spec)
    perms.update({p: torch.tensor(v) for p, v in record["permutations"].items()})
    signs.update({p: torch.tensor(v, dtype=torch.float32) for p, v in record["signs"].items()})
    aligned = copy.deepcopy(model)
    aligned.load_state_dict(apply_permutation(spec, model.state_dict(), perms, signs))
    return aligned


def align_to(model_a, model_b, settings, train_loader, *, objective):
    """align(model_a, model_b) as `settings` (an aemc.settings.Alignment) says; activation matching
    and the latent map (settings.latent) read the first `settings.batches` training batches; learned
    matching (ste) minimises `objective` (the run's, aemc.objective) along the segment, after the map."""
    batches = learner = None
    if settings.method == "activation" or settings.latent:
        batches = [x for _, x in zip(range(settings.batches), train_loader.ordered())]
    if settings.method == "ste":
        from aemc.learned_matching import learn  # it imports this module

        def learner(a, b, spec):
            return learn(a, b, spec, settings, train_loader, objective)
    return align(model_a, model_b, settings.method, settings.restarts, settings.seed, settings.latent_signs, batches,
                 settings.latent, learner)
