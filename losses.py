"""Reconstruction losses (inputs in [-1, 1]): mean absolute error and the Laplacian-pyramid loss."""
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("mae", "laplacian")


def _binomial_kernel(channels):
    """5x5 binomial kernel [1,4,6,4,1] x [1,4,6,4,1] / 256, one copy per channel: (C, 1, 5, 5)."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k2 = torch.outer(k1, k1) / 256.0
    return k2.expand(channels, 1, 5, 5).contiguous()


def _blur(x, kernel):
    """Depthwise 5x5 blur with reflect padding 2: (N, C, H, W) -> (N, C, H, W)."""
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, kernel.to(dtype=x.dtype), groups=x.shape[1])


def _upsample(x, kernel):
    """Zero insertion (values at even positions), then blur with 4x the kernel: 2x size."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, 4 * kernel)


def laplacian_pyramid(img, max_levels=5, kernel=None):
    """Band-pass levels and the low-pass residual of `img` (N, C, H, W).

    Level l = current - upsample(downsample(blur(current))), current halves each level;
    returns (bands, residual) with len(bands) == max_levels. Adding the residual back through
    `reconstruct` gives `img` exactly.
    """
    if kernel is None:
        kernel = _binomial_kernel(img.shape[1]).to(img.device)
    smallest = min(img.shape[-2:]) / 2 ** (max_levels - 1)
    if smallest < 3:  # reflect padding of 2 needs at least 3 pixels at the coarsest level
        raise ValueError(f"{max_levels} pyramid levels are too many for {tuple(img.shape[-2:])} images")
    bands, current = [], img
    for _ in range(max_levels):
        down = _blur(current, kernel)[:, :, ::2, ::2]
        bands.append(current - _upsample(down, kernel))
        current = down
    return bands, current


def reconstruct(bands, residual):
    """Inverse of `laplacian_pyramid`."""
    kernel = _binomial_kernel(residual.shape[1]).to(residual.device)
    current = residual
    for band in reversed(bands):
        current = band + _upsample(current, kernel)
    return current


class LaplacianPyramidLoss(nn.Module):
    """Sum over pyramid levels of the mean absolute difference of the band-pass images.

    The default reproduces the pyramid loss the original project used (alper111's LapLoss):
    binomial 5x5 kernel, reflect padding, `max_levels` band-pass levels, no low-pass term.
    Options: `residual=True` adds the L1 of the low-pass residual; `weights` scales each level.
    """

    def __init__(self, max_levels=5, channels=3, residual=False, weights=None):
        super().__init__()
        if weights is not None and len(weights) != max_levels:
            raise ValueError(f"{len(weights)} level weights given for {max_levels} levels")
        self.max_levels = max_levels
        self.residual = residual
        self.weights = list(weights) if weights is not None else [1.0] * max_levels
        self.register_buffer("kernel", _binomial_kernel(channels), persistent=False)

    def forward(self, output, target):
        pyr_out, low_out = laplacian_pyramid(output, self.max_levels, self.kernel)
        pyr_tgt, low_tgt = laplacian_pyramid(target, self.max_levels, self.kernel)
        loss = sum(w * F.l1_loss(a, b) for w, a, b in zip(self.weights, pyr_out, pyr_tgt))
        if self.residual:
            loss = loss + F.l1_loss(low_out, low_tgt)
        return loss


def build_loss(name, num_filters=5, channels=3):
    """The reconstruction loss a run trains with: 'mae' or 'laplacian' (num_filters levels)."""
    if name == "mae":
        return nn.L1Loss()
    if name == "laplacian":
        return LaplacianPyramidLoss(max_levels=num_filters, channels=channels)
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")
