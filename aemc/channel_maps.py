"""Linear maps between two networks' activations on the channel axis (dim 1, at every position of
a feature map), fitted on paired activations from float64 statistics streamed over batches, never
keeping the activations (samples = images x positions). Model stitching (aemc.stitching) joins two
networks through them.

* identity;
* permutation: channel i of the first paired with the channel j of the second it correlates with,
  a linear assignment maximising the total correlation (scipy's linear_sum_assignment);
* orthogonal: R = argmin ||H_a R - H_b||_F over orthogonal R, no centring (Procrustes: U V^T of the
  SVD of H_a^T H_b; Schoenemann 1966, as scipy.linalg.orthogonal_procrustes);
* affine: W, b = argmin ||H_a W + b - H_b||_F (least squares with a bias; on a feature map a 1x1
  convolution with bias, the stitching layer of Bansal et al., NeurIPS 2021).

Example::
    >>> moments = Moments()
    >>> for a, b in activations: moments.add(a, b)          # (N, C, ...) each
    >>> weight, bias = fit("affine", moments)
    >>> ChannelMap("affine", weight, bias)(a)               # ~ b
"""
import torch
from torch import nn

MAPS = ("identity", "permutation", "orthogonal", "affine")
RCOND = 1e-10  # the affine fit: singular values of the first's covariance below this share of the largest are 0


class ChannelMap(nn.Module):
    """h -> h W + b on the channel axis (dim 1) of h, at every position (on a feature map a 1x1
    convolution with bias), computed in float32 or h's dtype if wider, returned in h's dtype; the
    identity and a permutation as exact reindexing."""

    def __init__(self, kind, weight, bias):
        super().__init__()
        self.kind = kind
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("source", weight.argmax(0))  # a permutation's output channel j is input channel source[j]

    def forward(self, h):
        if self.kind == "identity":
            return h
        if self.kind == "permutation":
            return h.index_select(1, self.source)
        # in float32 at least, whatever autocast says: a least-squares map can have large weights whose
        # products cancel, which bf16 (8 bits of mantissa) turns into noise; the result in h's dtype
        dtype = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            y = h.movedim(1, -1).to(dtype) @ self.weight.to(dtype) + self.bias.to(dtype)
        return y.movedim(-1, 1).to(h.dtype)


class Moments:
    """Float64 sums over paired activations a (the map's input: a stitch's bottom) and b (its target:
    the top), each (N, C, ...) with the channels on dim 1, as rows = samples (images x positions):
    the count, sum a, sum b, a^T a, a^T b, b^T b. Everything a map's fit and residual need, without
    keeping the activations."""

    def __init__(self, count=0, terms=None):
        self.count, self.terms = count, terms

    def add(self, a, b):
        a, b = _rows(a), _rows(b)
        terms = (a.sum(0), b.sum(0), a.T @ a, a.T @ b, b.T @ b)
        self.terms = terms if self.terms is None else tuple(s + t for s, t in zip(self.terms, terms))
        self.count += len(a)

    def swapped(self):
        """The moments with a and b exchanged (the other direction)."""
        sum_a, sum_b, aa, ab, bb = self.terms
        return Moments(self.count, (sum_b, sum_a, bb, ab.T, aa))


def _rows(h):
    device = "cpu" if h.device.type == "mps" else h.device  # MPS has no float64
    return h.detach().movedim(1, -1).reshape(-1, h.shape[1]).to(device, torch.float64)


def procrustes(cross):
    """The orthogonal R minimising ||H_a R - H_b||_F, from cross = H_a^T H_b (Schoenemann 1966):
    U V^T of its SVD (float64 tensors)."""
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def fit(kind, moments):
    """The map of `kind` (MAPS) taking a's activations to b's: (W, b), float64 on the CPU, with the
    map h -> h W + b on the channels."""
    from scipy.optimize import linear_sum_assignment  # a second to import: only when fitting
    n = moments.count
    sum_a, sum_b, aa, ab, bb = (t.cpu() for t in moments.terms)
    channels = len(sum_a)
    weight, bias = torch.eye(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    mean_a, mean_b = sum_a / n, sum_b / n
    cov_ab = ab / n - torch.outer(mean_a, mean_b)
    if kind == "permutation":  # a's channel i -> the b channel it correlates with, one each
        std_a, std_b = ((m.diagonal() / n - mean ** 2).clamp(min=0).sqrt() for m, mean in ((aa, mean_a), (bb, mean_b)))
        correlation = cov_ab / (torch.outer(std_a, std_b) + 1e-12)
        rows, cols = linear_sum_assignment(correlation.numpy(), maximize=True)
        weight = torch.zeros_like(weight)
        weight[rows, cols] = 1.0
    elif kind == "orthogonal":
        weight = procrustes(ab)
    elif kind == "affine":  # the normal equations with a bias column, the bias eliminated: centred moments
        cov_aa = aa / n - torch.outer(mean_a, mean_a)
        # least norm where a's units are collinear (dead units, units that never leave one side of
        # a LeakyReLU): directions with a variance below RCOND of the largest are noise (float32 activations,
        # the centred moments' cancellation), whose weights would be as large as 1 / sqrt(ratio)
        weight = torch.linalg.lstsq(cov_aa, cov_ab, rcond=RCOND, driver="gelsd").solution
        bias = mean_b - mean_a @ weight
    elif kind != "identity":
        raise ValueError(f"unknown map {kind!r}: one of {', '.join(MAPS)}")
    return weight, bias


def unexplained(moments, weight, bias):
    """||H_a W + b - H_b||_F^2 / ||H_b||_F^2, from the moments: the relative residual of the map on
    the fitting batches (0: a perfect fit; 1: no better than mapping everything to 0). Not about
    b's mean: a map without a bias cannot fit a mean, and a nearly constant b would blow that up."""
    n = moments.count
    sum_a, sum_b, aa, ab, bb = (t.cpu() for t in moments.terms)
    residual = ((weight.T @ aa @ weight).trace() + 2 * bias @ (weight.T @ sum_a) + n * bias @ bias
                - 2 * (weight * ab).sum() - 2 * bias @ sum_b + bb.trace())
    energy = bb.trace()
    return max(float(residual / energy), 0.0) if energy > 0 else 0.0
