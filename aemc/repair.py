"""REPAIR (Jordan, Sedghi, Saukh, Entezari, Neyshabur, ICLR 2023): at a point between two networks,
rescale every hidden layer's per-channel statistics to the interpolation of the ends' statistics.

Interpolating two networks shrinks the variance of hidden units that do not match (their weighted
sum cancels): "variance collapse". Re-estimating BatchNorm at the point repairs the layers followed
by BatchNorm; REPAIR repairs the others. After each such layer a `RepairNorm` standardises the
layer's output per channel with the output's own statistics at the point and rescales it to the
target mean and standard deviation: the interpolation of the two ends' statistics of that layer.

How a point is repaired (`PointEvaluator.repair`): BatchNorm is re-estimated as at any point; then
the repaired layers' outputs are measured over the same training batches (eval mode, the
corrections found so far in place: per-channel mean and standard deviation over images and
pixels) and their corrections set, once per repaired layer (a layer's statistics depend only on
the layers before it, so round k settles the k-th layer of a chain); BatchNorm is re-estimated on
the corrected activations, and the rounds repeated for the layers after it. The repaired layers'
statistics then equal their targets (to 1e-3, tested; measured: to float precision), and a point
equal to an end is left exactly as it is (the ends' statistics are measured the same way). Jordan
et al. reset every statistic in one train-mode pass instead, which leaves the batch-to-batch
variation and the chained layers' interplay in them. A measuring pass stops after the last
repaired layer, before the decoder's large convolutions: a repaired point of the original
autoencoder costs about twice an ordinary one.

Which layers: every hidden layer (a Conv2d, ConvTranspose2d or Linear whose output is not the
reconstruction, found by models.symmetry from the module graph) whose output does not go straight
into a BatchNorm: every layer of a residual stream, a VAE's log-variance head as well as its mean
head. In the original autoencoder these are the first and the last encoder convolution, the latent
Linear before Tanh and the decoder's first Linear: four of its eleven hidden layers.

Example::
    >>> layers = layers_to_repair(model)                      # ["encoder.0", "encoder.15", ...]
    >>> evaluator = PointEvaluator(model, ..., repair_layers=layers)
    >>> ends = [evaluator.statistics(theta) for theta in (theta_a, theta_b)]
    >>> evaluator(theta_mid, repair_targets=interpolate(ends, (0.5, 0.5)))
"""
import torch
from torch import nn

from aemc.architectures import permutation_spec
from aemc.errors import UserError

EPS = 1e-12  # added to variances: far below any unit's, so a point equal to an end stays itself


class RepairNorm(nn.Module):
    """REPAIR's correction after one layer: (x - mean) / std * target_std + target_mean per channel
    (`mean`, `std`: the layer's output statistics at the point), or x while `enabled` is 0. Only
    buffers: the module's parameters do not change. Works after convolutions (N, C, H, W) and
    Linear layers (N, C)."""

    def __init__(self, channels):
        super().__init__()
        for name, value in (("mean", 0.0), ("std", 1.0), ("target_mean", 0.0), ("target_std", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.register_buffer("enabled", torch.zeros(()))
        self.sums = None  # while measuring: [count, sum, sum of squares] per channel
        self.pending = None  # while measuring: the RepairNorms this batch has not reached yet (shared)

    def forward(self, x):
        if self.sums is not None:
            values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
            self.sums[0] += values.shape[1]
            self.sums[1] += values.sum(1)
            self.sums[2] += (values * values).sum(1)
            self.pending.discard(id(self))
            if not self.pending:
                raise _Measured
        shape = (1, -1) + (1,) * (x.dim() - 2)
        repaired = (x - self.mean.view(shape)) / self.std.view(shape) * self.target_std.view(shape) \
            + self.target_mean.view(shape)
        return torch.where(self.enabled > 0, repaired, x)


class _Measured(Exception):
    """Raised after the last repaired layer of a measuring pass: the rest of the network is not needed."""


def layers_to_repair(model):
    """The names of the hidden layers of `model` (every Conv2d, ConvTranspose2d and Linear but the
    one producing the reconstruction, found by models.symmetry from the module graph, each layer of
    a group that shares a permutation too) whose output does not go straight into a BatchNorm."""
    try:
        spec = permutation_spec(model)
    except NotImplementedError as e:
        raise UserError(f"--repair needs the hidden layers derived from the model's graph: {e}")
    return [layer for layer in spec.hidden if layer not in spec.batchnormed]


def install(module, layers):
    """Attach a RepairNorm (disabled) after each of `layers` of `module`, as a child named `repair`
    (a buffer-only child: the module's parameters do not change) run by a forward hook."""
    for name in layers:
        layer = module.get_submodule(name)
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        layer.add_module("repair", RepairNorm(channels).to(layer.weight.device))
        layer.register_forward_hook(lambda m, inputs, output: m.repair(output))


def repair_norms(module):
    """{layer name: its RepairNorm} of a module `install` prepared."""
    return {name[:-len(".repair")]: m for name, m in module.named_modules() if isinstance(m, RepairNorm)}


@torch.no_grad()
def measure(module, batches, num_batches=None):
    """{layer: (mean, std)} of each repaired layer's output (before its correction) over `batches`,
    in eval mode, per channel over images and pixels."""
    norms = repair_norms(module)
    for norm in norms.values():
        norm.sums = [0, 0.0, 0.0]
    was_training = module.training
    module.eval()
    try:
        for i, x in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            pending = {id(norm) for norm in norms.values()}  # the pass stops once every layer was measured
            for norm in norms.values():
                norm.pending = pending
            try:
                module(x)
            except _Measured:
                pass
    finally:
        module.train(was_training)
    out = {}
    for name, norm in norms.items():
        count, total, squares = norm.sums
        norm.sums, norm.pending = None, None
        mean = total / count
        out[name] = (mean.float(), (squares / count - mean * mean).clamp(min=0).add(EPS).sqrt().float())
    return out


@torch.no_grad()
def disable(module):
    for norm in repair_norms(module).values():
        norm.enabled.fill_(0.0)


@torch.no_grad()
def correct(module, measured, targets):
    """Standardise each repaired layer's output with `measured` and rescale it to `targets`."""
    for name, norm in repair_norms(module).items():
        norm.mean.copy_(measured[name][0])
        norm.std.copy_(measured[name][1])
        norm.target_mean.copy_(targets[name][0])
        norm.target_std.copy_(targets[name][1])
        norm.enabled.fill_(1.0)


def interpolate(ends, weights):
    """The targets at a point: sum_k weights[k] * ends[k] of every layer's mean and std (the std
    kept positive when the weights extrapolate, off the segment of a plane)."""
    out = {}
    for name in ends[0]:
        mean = sum(w * end[name][0] for w, end in zip(weights, ends))
        std = sum(w * end[name][1] for w, end in zip(weights, ends))
        out[name] = (mean, std.clamp(min=EPS ** 0.5))
    return out
