"""Ensembles of autoencoders along paths (Garipov et al. 2018, Sec. 5; FGE), scored like one model.

* A member is an autoencoder (a point theta(t) of a path with BatchNorm re-estimated at its t, or
  a checkpoint), evaluated in eval mode; its output f_k(x) is in [-1, 1].
* The ensemble's reconstruction is the mean of its members' outputs, scored with the run's own
  loss (and L1, and LPIPS) exactly like a single model.
* gain: positive when the ensemble is better than its members on average. For a metric where lower
  is better (a loss, LPIPS) it is the mean of the members' values - the ensemble's value; for one
  where higher is better (PSNR) the ensemble's value - the members' mean (`gain`). For L1 and the
  Laplacian-pyramid loss (a linear map followed by L1) it is never negative, by convexity, and it is
  0 when the members agree. Averaging blurs: LPIPS may get worse while L1 improves, so both are
  reported.
* diversity between two members = mean |f_a(x) - f_b(x)| over the test images and their pixels.
"""
from collections import defaultdict
from typing import NamedTuple

import torch
from torch.func import functional_call

from aemc import repair
from aemc.barriers import higher_is_better
from aemc.losses import reconstruction
from aemc.speed import accumulator_dtype, autocast

GAIN = ("gain > 0: the ensemble is better (the members' mean - the ensemble's value for losses and LPIPS, "
        "the ensemble's value - the members' mean for PSNR)")


def gain(metric, members_mean, ensemble):
    """How much better the ensemble is than its members on average, in `metric`'s units: positive
    when it is better, whichever way the metric points (PSNR: higher is better)."""
    return ensemble - members_mean if higher_is_better(metric) else members_mean - ensemble


class Ensemble(NamedTuple):
    """Which members an ensemble has (their keys) and which family it belongs to: "curve" and
    "segment" (points of those paths), "endpoints", "checkpoints", "snapshots"."""
    family: str
    keys: list

    @property
    def name(self):
        """How tables show it: "endpoints", "curve, 3", ..."""
        return self.family if self.family == "endpoints" else f"{self.family}, {len(self.keys)}"


def _zero(device):
    return torch.zeros((), device=device, dtype=accumulator_dtype(device))


class EndEnsembles:
    """For a walk along a path: at every t, the diversity from each end and the two-member
    ensembles {theta(0), theta(t)} and {theta(1), theta(t)}. The ends are evaluated first and their
    test reconstructions kept (2 x test images x 3 x 64 x 64 float32, on the data's device), so no
    point of the path is evaluated more than once."""

    SIDES = ("start", "end")

    def __init__(self, loss_fns, image_metrics=None):
        self.fns = {**loss_fns, **(image_metrics or {})}
        self.per_image = set(image_metrics or {})
        self.ends = ([], [])

    def keeper(self, side):
        """A test-batch callback that keeps the reconstructions of end `side` (0 or 1)."""
        kept = self.ends[side]
        kept.clear()
        return lambda x, out: kept.append(out.detach().clone())

    def scorer(self, device):
        """A test-batch callback for one point, and a function that turns what it saw into the
        point's metrics, given the point's own and the ends' test metrics ({name: value})."""
        sums = defaultdict(lambda: _zero(device))
        state = {"batch": 0, "images": 0, "pixels": 0}

        def on_batch(x, out):
            i = state["batch"]
            for side, end in zip(self.SIDES, (self.ends[0][i], self.ends[1][i])):
                sums[f"diversity_{side}"] += (out - end).abs().sum()
                mean = (out + end) / 2
                for name, fn in self.fns.items():
                    value = fn(mean, x)
                    sums[f"ensemble_{side}_{name}"] += value.sum() if name in self.per_image else value * len(x)
            state["batch"] += 1
            state["images"] += len(x)
            state["pixels"] += out.numel()

        def finish(point, start, end):
            out = {f"diversity_{side}": (sums[f"diversity_{side}"] / state["pixels"]).item() for side in self.SIDES}
            for side, other in zip(self.SIDES, (start, end)):
                for name in self.fns:
                    value = (sums[f"ensemble_{side}_{name}"] / state["images"]).item()
                    out[f"ensemble_{side}_{name}"] = value
                    out[f"ensemble_{side}_{name}_gain"] = gain(name, 0.5 * (point[name] + other[name]), value)
            return out
        return on_batch, finish


@torch.no_grad()
def score_ensembles(module, members, ensembles, test_batches, loss_fns, image_metrics=None, amp="none"):
    """One pass over the test batches scoring every member and every ensemble.

    module: a module of the members' architecture, run with each member's parameters and buffers
    (`members`: {key: state dict}) through torch.func.functional_call, in eval mode;
    ensembles: [Ensemble]. Returns {ensemble name: {"family", "keys", "members": [per-member
    {metric: value}], "member_mean": {...}, "ensemble": {...}, "gain": {...}}}, metrics per image
    averaged over the test images; "gain" as `gain` (positive: the ensemble is better).
    """
    module.eval()
    device = test_batches.device
    fns = {**loss_fns, **(image_metrics or {})}
    per_image = set(image_metrics or {})
    member_sums = {key: defaultdict(lambda: _zero(device)) for key in members}
    ensemble_sums = {e.name: defaultdict(lambda: _zero(device)) for e in ensembles}

    def score(sums, out, x):
        for name, fn in fns.items():
            value = fn(out, x)
            sums[name] += value.sum() if name in per_image else value * len(x)
    for x in test_batches:
        outputs = {}
        for key, state in members.items():
            with autocast(device, amp):
                outputs[key] = reconstruction(functional_call(module, state, (x,))).float()
            score(member_sums[key], outputs[key], x)
        for e in ensembles:
            score(ensemble_sums[e.name], torch.stack([outputs[k] for k in e.keys]).mean(0), x)
    n = test_batches.num_images
    member_values = {key: {m: (v / n).item() for m, v in sums.items()} for key, sums in member_sums.items()}
    table = {}
    for e in ensembles:
        ensemble = {m: (v / n).item() for m, v in ensemble_sums[e.name].items()}
        mean = {m: sum(member_values[k][m] for k in e.keys) / len(e.keys) for m in fns}
        table[e.name] = {"family": e.family, "keys": list(e.keys), "members": [member_values[k] for k in e.keys],
                         "member_mean": mean, "ensemble": ensemble,
                         "gain": {m: gain(m, mean[m], ensemble[m]) for m in fns}}
    return table


def member_state(evaluator, theta, repair_targets=None):
    """A member: the parameters `theta` with BatchNorm re-estimated by `evaluator` (as at a path's
    point; with `repair_targets`, REPAIRed too), as a state dict of copies, on the evaluator's
    device (REPAIR's corrections are buffers of the state: scoring applies them)."""
    evaluator.load(theta)
    repair.disable(evaluator.module)
    evaluator.estimate_bn()
    if repair_targets is not None:
        evaluator.repair(repair_targets)
    return {k: v.detach().clone() for k, v in evaluator.module.state_dict().items()}
