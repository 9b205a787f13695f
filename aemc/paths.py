"""Paths in weight space, walked: a curve or a segment evaluated at many t, with Garipov et al.'s
statistics, barrier heights and length (NeurIPS 2018, Sec. 3 and their `eval_curve.py`).

Every point is evaluated by an `aemc.evaluation.PointEvaluator`; a path's results are keyed by
what the path is (`PathKey`), never by a display label.

Example::
    >>> key = PathKey("curve", "Bezier", 3)
    >>> result = walk(curve, np.linspace(0, 1, 11), evaluator, key.label)
    >>> result["barriers"]["test_loss"]
"""
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from aemc import distributed, resumable
from aemc.barriers import NAMES, barriers, higher_is_better
from aemc.repair import interpolate


@dataclass(frozen=True)
class PathKey:
    """What a path is: a trained curve or a straight segment (a 2-bend PolyChain), whether its
    end's units were permuted to match its start's, whether REPAIR rescales its points' statistics,
    and, for a layer-wise path, the group of layers it interpolates (the rest stays at the start).
    Results, arrays, files and colours are keyed by it."""
    kind: str                   # "curve", "segment" or "layerwise"
    curve: str = "PolyChain"
    num_bends: int = 2
    aligned: bool = False
    repaired: bool = False
    group: str = None           # layer-wise paths: the group of layers interpolated

    @property
    def name(self):
        """A short, file-safe name, unique among the paths of one evaluation."""
        if self.kind == "curve":
            return "curve"
        if self.kind == "layerwise":
            return f"{'aligned_' if self.aligned else ''}layers_{self.group.replace('.', '_')}"
        return f"{'aligned_' if self.aligned else ''}{'repaired_' if self.repaired else ''}segment"

    @property
    def label(self):
        """How figures and printed tables call it."""
        if self.kind == "curve":
            return f"curve ({self.curve}, {self.num_bends} bends" + (", end aligned)" if self.aligned else ")")
        if self.kind == "layerwise":
            return f"{'aligned, ' if self.aligned else ''}{self.group} only"
        return ("aligned segment" if self.aligned else "segment") + (" + REPAIR" if self.repaired else "")

    def to_dict(self):
        return {k: v for k, v in asdict(self).items() if v is not None}


STATS = ("start", "end", "min", "max", "avg", "int")
IMAGES = ("recons", "prior_decodes")  # per-t images of a walk: reconstructions, a VAE's decoded prior samples


def walk(net, ts, evaluator, label="path", verbose=True, ensemble=None, sweep=None, repair=None):
    """Evaluate the path `net` (anything with `weights(t)`: a CurveNet, a segment as a 2-bend
    PolyChain, a layer-wise path) at each t.

    Returns per-t lists: ts, dl (weight-space distance to the previous point), every metric of the
    evaluator (train_<m>, test_<m>), seconds, recons (when the evaluator has samples) and
    prior_decodes (when it has prior samples); and the
    path's length, Garipov's statistics of each metric and its named barriers (aemc.barriers).
    With `ensemble` (an ensembles.EndEnsembles) the two ends are evaluated first, and every t also
    gets the diversity from each end and the two-member ensembles with each end (diversity_*,
    ensemble_*). With `repair` (the two ends' statistics, aemc.repair), every point is repaired to
    (1 - t) start + t end. With `sweep` (file, config), every point's results are written to the
    file as soon as they are computed (aemc.resumable), and the same call after a stop continues
    with the points not done and ends with the same result; `config` holds every setting that
    changes them.

    Under torchrun the points are shared round-robin between the processes (with `ensemble`, each
    process evaluates the two ends itself, as its points need their reconstructions); every
    process returns the whole result.
    """
    ts = [float(t) for t in ts]
    last = len(ts) - 1
    main = distributed.is_main()

    def evaluate_at(i, on_batch=None):
        started = time.time()
        with torch.no_grad():
            theta = net.weights(ts[i])
        targets = interpolate(repair, (1 - ts[i], ts[i])) if repair is not None else None
        values = evaluator(theta, on_test_batch=on_batch, repair_targets=targets)
        values["seconds"] = time.time() - started
        if verbose and main:
            row = "  ".join(f"{k} {v:.5f}" for k, v in values.items() if k.startswith(("train_", "test_")))
            tqdm.write(f"{label:8s} t={ts[i]:.3f}  {row}  {values['seconds']:.1f}s")
        return values

    evaluate = evaluate_at
    if ensemble is not None:
        ends = {0: evaluate_at(0, ensemble.keeper(0)), last: evaluate_at(last, ensemble.keeper(1))}
        device = evaluator.test_batches.device
        for j, kept in ((0, ensemble.ends[0]), (last, ensemble.ends[1])):  # the ends' own rows, from what was kept
            on_kept, finish = ensemble.scorer(device)
            for x, out in zip(evaluator.test_batches, kept):
                on_kept(x, out)
            ends[j].update(finish(_test(ends[j]), _test(ends[0]), _test(ends[last])))

        def evaluate(i):
            if i in ends:
                return ends[i]
            on_batch, finish = ensemble.scorer(device)
            values = evaluate_at(i, on_batch)
            values.update(finish(_test(values), _test(ends[0]), _test(ends[last])))
            return values
    path, config = sweep if sweep is not None else (None, {})
    metrics, _ = resumable.run(path, {**config, "ts": ts}, list(range(len(ts))), evaluate, desc=label,
                               verbose=verbose and sweep is not None)
    out = {"ts": ts, "dl": [0.0]}
    for images in IMAGES:
        if images in metrics:
            out[images] = [torch.from_numpy(r) for r in metrics.pop(images)]
    with torch.no_grad():
        vectors = [torch.cat([v.flatten() for v in net.weights(t).values()]) for t in ts[:2]]
        for k in range(1, len(ts)):
            out["dl"].append((vectors[1] - vectors[0]).norm().item())
            if k < last:
                vectors = [vectors[1], torch.cat([v.flatten() for v in net.weights(ts[k + 1]).values()])]
    for name, values in metrics.items():
        out[name] = values.tolist()
    out["length"] = float(sum(out["dl"]))
    out["stats"] = {k: path_stats(out[k], out["dl"]) for k in metric_keys(out, ensemble=True)}
    out["barriers"] = {k: barriers(out["ts"], out[k], higher_is_better(k)) for k in metric_keys(out)}
    return out


def _test(values):
    """{metric: value} of a point's test metrics, without their prefix."""
    return {k[len("test_"):]: x for k, x in values.items() if k.startswith("test_")}


def metric_keys(result, ensemble=False):
    """The names of the per-t metrics in a walk's result (with `ensemble`, the ensemble ones too)."""
    prefixes = ("train_", "test_") + (("diversity_", "ensemble_") if ensemble else ())
    return [k for k in result if k.startswith(prefixes)]


def path_stats(values, dl):
    """Garipov's summary of a metric along a path: start, end, min, max, avg (over the points)
    and int, the arc-length weighted average: the trapezoid integral over the path's length
    (cumulative sum of `dl`) divided by that length."""
    v, dl = np.asarray(values, dtype=np.float64), np.asarray(dl, dtype=np.float64)
    length = dl[1:].sum()
    integral = np.trapezoid(v, x=np.cumsum(dl)) / length if length > 0 else v.mean()
    return dict(start=v[0], end=v[-1], min=v.min(), max=v.max(), avg=v.mean(), int=integral)


def summary(label, result, ratio=None):
    """Printable summary of a walk: length, statistics per metric, barrier heights."""
    lines = [f"{label}: length {result['length']:.4f}" + (f" ({ratio:.3f}x the segment)" if ratio else ""),
             f"  {'metric':14s}" + "".join(f"{s:>10s}" for s in STATS)]
    for key, st in result["stats"].items():
        lines.append(f"  {key:14s}" + "".join(f"{st[s]:10.5f}" for s in STATS))
    lines.append(f"  {'barrier':14s}" + "".join(f"{n[len('barrier_'):]:>12s}" for n in NAMES)
                 + ("  (PSNR: the loss of dB)" if any(higher_is_better(k) for k in result["barriers"]) else ""))
    for key, b in result["barriers"].items():
        lines.append(f"  {key:14s}" + "".join(f"{b[n]:12.5f}" if b[n] is not None else f"{'-':>12s}"
                                              for n in NAMES))
    return "\n".join(lines)
