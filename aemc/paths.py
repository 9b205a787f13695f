"""Sets of weights, evaluated with BatchNorm re-estimated, and paths of them: statistics, barriers,
length (Garipov et al., NeurIPS 2018, Sec. 3 and their `eval_curve.py`).

Every evaluation of a set of weights (a point on a curve or a segment, a grid point of a plane, an
ensemble member) goes through `PointEvaluator`: load theta into one reusable module, re-estimate
BatchNorm on the same training batches, evaluate the requested metrics.

Example::
    >>> evaluator = PointEvaluator(curve.point_at(0), train_loader.ordered(), test_loader,
    ...                            {"loss": torch.nn.L1Loss()}, bn_batches=50)
    >>> evaluator(curve.weights(0.5))          # {"train_loss": ..., "test_loss": ...}
    >>> result = walk(curve, np.linspace(0, 1, 11), evaluator, "curve")
    >>> result["barriers"]["test_loss"]
"""
import copy
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import distributed
from speed import autocast, prepare_model
from trainer import evaluate

STATS = ("start", "end", "min", "max", "avg", "int")


def parameter_vector(model):
    """All parameters of `model` (not its buffers) as one flat vector, detached."""
    return nn.utils.parameters_to_vector(model.parameters()).detach()


def weight_distance(a, b):
    """||w_b - w_a|| over all parameters, and ||w_a||."""
    wa, wb = parameter_vector(a), parameter_vector(b)
    return (wb - wa).norm().item(), wa.norm().item()


@torch.no_grad()
def output_difference(a, b, batches):
    """(max, mean) of |a(x) - b(x)| over all pixels of the batches, both models in eval mode."""
    a.eval(), b.eval()
    peak, total, count = 0.0, 0.0, 0
    for x in batches:
        d = (a(x) - b(x)).abs()
        peak, total, count = max(peak, d.max().item()), total + d.double().sum().item(), count + d.numel()
    return peak, total / count


@torch.no_grad()
def update_bn(batches, model, num_batches=None):
    """Re-estimate the BatchNorm running statistics of `model` over `batches`.

    Like `torch.optim.swa_utils.update_bn` (Izmailov et al. 2018; used by Garipov et al. 2018 at
    every point of a curve): each BN layer ends with the plain average over batches of the
    per-batch mean and of the per-batch unbiased variance. Unlike torch's version, only the BN
    layers are put in train mode; dropout and everything else stay in eval mode, so the statistics
    are those of the network that will be evaluated. The average is accumulated on the device
    (momentum 1 gives each batch's statistics, which are summed), so the pass never waits for the
    host. Modes, momenta and the BN buffers' layout are restored afterwards.

    batches: any iterable of tensors (or of tuples whose first item is the input), e.g. a loader.
    num_batches: use only the first `num_batches` batches (the same ones on every call when the
    iterable is deterministic).

    Example::
        >>> model = curve_net.point_at(0.5)
        >>> update_bn(train_loader, model, num_batches=50)
        >>> model.eval(); test_loss = evaluate(model, test_loader)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    sums = {bn: (torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)) for bn in bns}
    model.eval()
    for bn in bns:
        bn.reset_running_stats()  # momentum 1 still multiplies the old value by 0: NaN would stay NaN
        bn.momentum = 1.0
        bn.train()
    seen = 0
    try:
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            model(batch[0] if isinstance(batch, (list, tuple)) else batch)
            for bn in bns:
                sums[bn][0].add_(bn.running_mean)
                sums[bn][1].add_(bn.running_var)
            seen += 1
        for bn in bns:
            bn.reset_running_stats()
            if seen:
                bn.running_mean.copy_(sums[bn][0] / seen)
                bn.running_var.copy_(sums[bn][1] / seen)
                bn.num_batches_tracked.fill_(seen)
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        for m, mode in was_training.items():
            m.train(mode)


class PointEvaluator:
    """Evaluates sets of weights of one architecture, always the same way.

    `template`: a module of the architecture (copied once; its parameters are overwritten for each
    point, so one module, and one compiled graph under --compile, serves a whole walk or grid).
    For each theta ({parameter name: tensor}): BatchNorm is re-estimated on `train_batches` (the
    first `bn_batches` of them, the same at every point), then every loss in `loss_fns` is measured
    on the train and the test batches and every metric in `image_metrics` (one value per image,
    e.g. LPIPS) on the test batches. `speed` carries --amp / --channels_last / --compile. With
    `samples`, the reconstructions of those images are returned too.
    """

    def __init__(self, template, train_batches, test_batches, loss_fns, image_metrics=None,
                 bn_batches=None, speed=None, samples=None):
        self.module = copy.deepcopy(template).to(train_batches.device)
        self.runner = prepare_model(self.module, speed)
        self.amp = getattr(speed, "amp", "none")
        self.train_batches, self.test_batches = train_batches, test_batches
        self.loss_fns, self.image_metrics = loss_fns, image_metrics
        self.bn_batches, self.samples = bn_batches, samples

    @torch.no_grad()
    def load(self, theta):
        for name, p in self.module.named_parameters():
            p.copy_(theta[name])

    def estimate_bn(self):
        with autocast(self.train_batches.device, self.amp):
            update_bn(self.train_batches, self.runner, num_batches=self.bn_batches)

    def __call__(self, theta, on_test_batch=None):
        """{"train_<loss>": float, ..., "test_<metric>": float, ["recons": (K, 3, 64, 64) on the CPU]}.
        `on_test_batch(x, out)` sees every test batch and the point's reconstructions of it."""
        self.load(theta)
        self.estimate_bn()
        train = evaluate(self.runner, self.train_batches, self.loss_fns, amp=self.amp)
        test = evaluate(self.runner, self.test_batches, self.loss_fns, self.image_metrics, amp=self.amp,
                        on_batch=on_test_batch)
        result = {**{"train_" + k: v for k, v in train.items()}, **{"test_" + k: v for k, v in test.items()}}
        if self.samples is not None:
            with torch.no_grad(), autocast(self.train_batches.device, self.amp):
                result["recons"] = self.runner(self.samples).float().cpu()
        return result


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
