"""Barriers along a path, under the names the literature uses, for any metric.

For a metric m sampled at t in [0, 1] along a path (m(0), m(1) its ends):

* `barrier_mean_ends` = max_t m(t) - (m(0) + m(1)) / 2: Frankle et al. (ICML 2020, "linear mode
  connectivity and the lottery ticket hypothesis") and Ainsworth et al. (ICLR 2023, "Git
  Re-Basin"), whose plots show the loss barrier this way. With unequal ends it is at least
  |m(0) - m(1)| / 2 even on a path that never rises above the line between its ends.
* `barrier_line` = max_t [m(t) - ((1 - t) m(0) + t m(1))]: Entezari et al. (ICLR 2022, "the role of
  permutation invariance in linear mode connectivity"); 0 for a monotone or convex path, the
  natural definition for unequal ends. Garipov et al. (NeurIPS 2018) show the curve directly.
* `barrier_midpoint` = m(0.5) - (m(0) + m(1)) / 2: the cheap estimate of Jordan et al. (ICLR 2023,
  "REPAIR"), from the path's midpoint only (None when t = 0.5 was not sampled). Frankle et al.'s
  instability analysis takes the maximum over t (`barrier_mean_ends`), not the midpoint.
* each also `..._relative`: divided by the mean of the end values.

For metrics where higher is better (PSNR), the barrier is computed on -m, so that a barrier is
always a loss of quality; the relative versions divide by the (positive) mean end value of m.

Example::
    >>> barriers([0, 0.5, 1], [0.1, 0.4, 0.3])["barrier_line"]   # 0.4 - 0.2
    0.2
"""
import numpy as np

NAMES = ("barrier_mean_ends", "barrier_line", "barrier_midpoint")
HIGHER_IS_BETTER = ("psnr",)  # metric names (after their train_/test_ prefix) where more is better


def higher_is_better(metric):
    """Whether `metric` ("test_psnr", "psnr", ...) measures quality rather than loss."""
    return metric.rsplit("_", 1)[-1] in HIGHER_IS_BETTER


def barriers(ts, values, higher_is_better=False):
    """{name: value} of every barrier of `values` sampled at `ts` (see the module's docstring)."""
    ts, v = np.asarray(ts, dtype=np.float64), np.asarray(values, dtype=np.float64)
    sign = -1.0 if higher_is_better else 1.0
    m = sign * v
    ends = 0.5 * (m[0] + m[-1])
    line = (1 - ts) * m[0] + ts * m[-1]
    middle = np.flatnonzero(np.isclose(ts, 0.5, rtol=0, atol=1e-9))
    out = {"barrier_mean_ends": float(m.max() - ends), "barrier_line": float((m - line).max()),
           "barrier_midpoint": float(m[middle[0]] - ends) if len(middle) else None}
    scale = abs(0.5 * (v[0] + v[-1]))
    for name in NAMES:
        value = out[name]
        out[f"{name}_relative"] = value / scale if value is not None and scale > 0 else None
    return out


def from_format_1(entry):
    """The named barriers of a format-1 report's entry {"above_mean_of_ends", "above_line_between_ends"}."""
    return {"barrier_mean_ends": entry["above_mean_of_ends"], "barrier_line": entry["above_line_between_ends"]}
