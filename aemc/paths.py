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

from aemc import distributed


@dataclass(frozen=True)
class PathKey:
    """What a path is: a trained curve or a straight segment (a 2-bend PolyChain), and whether its
    end's units were permuted to match its start's. Results, arrays, files and colours are keyed
    by it."""
    kind: str                   # "curve" or "segment"
    curve: str = "PolyChain"
    num_bends: int = 2
    aligned: bool = False

    @property
    def name(self):
        """A short, file-safe name, unique among the paths of one evaluation."""
        return "curve" if self.kind == "curve" else "aligned_segment" if self.aligned else "segment"

    @property
    def label(self):
        """How figures and printed tables call it."""
        if self.kind == "curve":
            return f"curve ({self.curve}, {self.num_bends} bends" + (", end aligned)" if self.aligned else ")")
        return "aligned segment" if self.aligned else "segment"

    def to_dict(self):
        return asdict(self)


STATS = ("start", "end", "min", "max", "avg", "int")


def walk(net, ts, evaluator, label="path", verbose=True, ensemble=None):
    """Evaluate the curve `net` (a CurveNet; a segment is a 2-bend PolyChain) at each t.

    Returns per-t lists: ts, dl (weight-space distance to the previous point), every metric of the
    evaluator (train_<m>, test_<m>), seconds, recons (when the evaluator has samples); and the
    path's length, Garipov's statistics of each metric and its barrier heights. With `ensemble`
    (an ensembles.EndEnsembles) the two ends are evaluated first, and every t also gets the
    diversity from each end and the two-member ensembles with each end (diversity_*, ensemble_*).

    Under torchrun the points are shared round-robin between the processes (with `ensemble`, each
    process evaluates the two ends itself, as its points need their reconstructions); rank 0
    gathers them and returns the result, the other ranks return None.
    """
    ts = [float(t) for t in ts]
    last = len(ts) - 1
    main = distributed.is_main()
    if ensemble is None:
        mine = distributed.share(list(range(len(ts))))
    else:
        mine = [0, last, *distributed.share(list(range(1, last)))]
    values, seconds = {}, {}

    def test_metrics(v):
        return {k[len("test_"):]: x for k, x in v.items() if k.startswith("test_")}
    for i in tqdm(mine, desc=label, leave=False, disable=not (verbose and main)):
        started = time.time()
        with torch.no_grad():
            theta = net.weights(ts[i])
        on_batch = finish = None
        if ensemble is not None:
            on_batch, finish = ((ensemble.keeper(0 if i == 0 else 1), None) if i in (0, last)
                                else ensemble.scorer(evaluator.test_batches.device))
        values[i] = evaluator(theta, on_test_batch=on_batch)
        if finish is not None:
            values[i].update(finish(test_metrics(values[i]), test_metrics(values[0]), test_metrics(values[last])))
        if ensemble is not None and i == last:  # both ends known: their rows, from what was kept
            for j, kept in ((0, ensemble.ends[0]), (last, ensemble.ends[1])):
                on_kept, finish_kept = ensemble.scorer(evaluator.test_batches.device)
                for x, out in zip(evaluator.test_batches, kept):
                    on_kept(x, out)
                values[j].update(finish_kept(test_metrics(values[j]), test_metrics(values[0]),
                                             test_metrics(values[last])))
        seconds[i] = time.time() - started
        if verbose and main:
            row = "  ".join(f"{k} {v:.5f}" for k, v in values[i].items() if k.startswith(("train_", "test_")))
            tqdm.write(f"{label:8s} t={ts[i]:.3f}  {row}  {seconds[i]:.1f}s")
    gathered = distributed.gather((values, seconds))
    if not main:
        return None
    for other_values, other_seconds in reversed(gathered):  # rank 0's own entries win
        values.update(other_values)
        seconds.update(other_seconds)
    values = [values[i] for i in range(len(ts))]
    out = {"ts": ts, "dl": [0.0], "seconds": [seconds[i] for i in range(len(ts))],
           "recons": [v.pop("recons") for v in values if "recons" in v]}
    with torch.no_grad():
        vectors = [torch.cat([v.flatten() for v in net.weights(t).values()]) for t in ts[:2]]
        for k in range(1, len(ts)):
            out["dl"].append((vectors[1] - vectors[0]).norm().item())
            if k < last:
                vectors = [vectors[1], torch.cat([v.flatten() for v in net.weights(ts[k + 1]).values()])]
    for name in values[0]:
        out[name] = [v[name] for v in values]
    out["length"] = float(sum(out["dl"]))
    out["stats"] = {k: path_stats(out[k], out["dl"]) for k in metric_keys(out, ensemble=True)}
    out["barriers"] = {k: dict(zip(("above_mean_of_ends", "above_line_between_ends"),
                                   barrier_heights(out["ts"], out[k]))) for k in metric_keys(out)}
    return out


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


def barrier_heights(ts, values):
    """(max_t m(t) - (m(0) + m(1)) / 2, max_t [m(t) - ((1 - t) m(0) + t m(1))])."""
    ts, v = np.asarray(ts, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return v.max() - 0.5 * (v[0] + v[-1]), (v - ((1 - ts) * v[0] + ts * v[-1])).max()


def summary(label, result, ratio=None):
    """Printable summary of a walk: length, statistics per metric, barrier heights."""
    lines = [f"{label}: length {result['length']:.4f}" + (f" ({ratio:.3f}x the segment)" if ratio else ""),
             f"  {'metric':14s}" + "".join(f"{s:>10s}" for s in STATS)]
    for key, st in result["stats"].items():
        lines.append(f"  {key:14s}" + "".join(f"{st[s]:10.5f}" for s in STATS))
    for key, b in result["barriers"].items():
        lines.append(f"  barrier {key}: {b['above_mean_of_ends']:.5f} above the mean of the ends, "
                     f"{b['above_line_between_ends']:.5f} above the line between them")
    return "\n".join(lines)
