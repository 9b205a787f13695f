"""Results over several seed pairs: the mean, the standard deviation and the number of pairs of a
barrier, and the paired difference of two barriers measured on the same pairs, with a Student-t
interval (the differences d_i = a_i - b_i are taken as a sample: mean(d) +- t_{(1+c)/2, n-1} *
sd(d) / sqrt(n), sd with n - 1 in the denominator).

"Lower" or "higher" is said only where the interval excludes zero; otherwise the pairs cannot tell
the two apart, whatever the sign of the mean (`verdict`). One pair gives no interval.

Example::
    >>> d = paired_difference([0.20, 0.18, 0.15], [0.17, 0.18, 0.19], 0.95)
    >>> round(d.mean, 4), d.n, d.excludes_zero
    (-0.0033, 3, False)
"""
import math
from typing import NamedTuple

import numpy as np


class Summary(NamedTuple):
    mean: float
    std: float      # nan for one value
    n: int

    def cell(self, digits=3):
        """'0.170 +- 0.012' (or the one value)."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def summary(values):
    """The Summary of `values` (one per pair)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to summarise")
    return Summary(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size))


class Interval(NamedTuple):
    mean: float
    low: float      # nan with fewer than 2 pairs
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self):
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def cell(self, digits=3):
        """'-0.012 [-0.030, 0.006]' (or the one difference)."""
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (1 pair)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_difference(a, b, confidence):
    """The Interval of mean(a - b) over pairs (a[i] and b[i] measured on pair i), at `confidence`
    (e.g. 0.95), by Student's t with n - 1 degrees of freedom."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values must be two equally long lists, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy import stats  # here: scripts start without it (tests/test_layout.py)
    d = a - b
    n, mean = d.size, float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, confidence)


def verdict(interval, lower, higher):
    """The words for an Interval of a - b: `lower` (a is below b) or `higher` only where it
    excludes zero; else that its pairs cannot tell them apart."""
    if interval.n < 2:
        return "one pair: no interval, no comparison"
    if interval.excludes_zero:
        return lower if interval.high < 0 else higher
    return f"{interval.n} pairs cannot tell them apart"
