"""The permutation symmetry of a network, derived from its module graph (not typed by hand).

The units of every hidden layer can be reordered without changing what the network computes, if
the same permutation is applied to the output axis of the layer that produces them (its weight and
bias, and the normalisation's weight, bias, running mean and running variance that follow) and to
the input axis of the layer that consumes them. Where an odd activation (Tanh) sits between
producer and consumer with nothing but other odd, element-wise modules, each unit may also be
negated.

`permutation_spec(model)` traces the model with torch.fx and follows each hidden layer's channel
axis (axis 1 of the activation) from the Conv2d / ConvTranspose2d / Linear that produces it (the
output axis of its weight: 0, or 1 for a ConvTranspose2d, whose weight is (in, out / groups, kH,
kW)) to the layers that consume it (the weight's input axis: 1, or 0 for a ConvTranspose2d):

* through per-channel modules and functions (activations, dropout, pooling, upsampling, exp);
* through BatchNorm, whose parameters and statistics move with their channels; through a
  GroupNorm, which allows only permutations that keep each channel in its group (within a group,
  and whole groups swapped); two GroupNorms on one stream allow what both allow; through a
  LayerNorm over the channels (and what follows them), whose parameters move with the channels,
  or over trailing axes only (the width: a per-channel operation whose parameters stay);
* through a per-channel parameter multiplied, divided or added in (`h * self.gamma`, with a
  (1, C, 1, 1) or (C,) parameter, or a function of one such as `self.scale.abs() + 1`): its
  channel axis moves too;
* through an addition or a product of two tensors (a residual block, a VAE's mean + scaled noise,
  a gate), which ties the permutations of what it combines into one;
* through Flatten / Unflatten / view / reshape between a convolution and a Linear, where each
  channel is a block of consecutive features: the Linear's columns (or rows) move in blocks;
* a grouped convolution allows permutations within its groups only; the axis of its weight that
  holds one group's channels (a grouped Conv2d's input, a grouped ConvTranspose2d's output) is
  left in place.

The model's input and output channels are fixed (for a model returning a tuple, such as a VAE's
(reconstruction, mean, log-variance), the reconstruction's). Where the derivation cannot prove an
axis permutable (a module or function it does not know, a concatenation along the channels, a
reshape it cannot follow, ...) it leaves every permutation that reaches it alone and names its
layers in `spec.fixed`: the result never changes what the network computes, only how much of its
symmetry is used. tests/test_symmetry_fuzz.py checks this on models drawn from a grammar of the
layers users write.

Example::
    >>> spec = permutation_spec(Autoencoder())
    >>> perms, signs = random_permutation(spec, torch.Generator().manual_seed(0))
    >>> permuted = apply_permutation(spec, model.state_dict(), perms, signs)  # same function
"""
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from models.symmetry_rules import PRODUCERS, PermutationSpec
from models.symmetry_walk import Walk

__all__ = ["PermutationSpec", "permutation_spec", "default_example_shape", "identity", "random_permutation", "expand",
           "apply_permutation"]


def default_example_shape(model):
    """The batch shape a model is run on to derive its symmetry: two images of its config's in_channels
    and image_size (default: the first layer's input channels, 64x64)."""
    config = getattr(model, "config", {}) or {}
    first = next(m for m in model.modules() if isinstance(m, PRODUCERS))
    channels = config.get("in_channels", first.in_features if isinstance(first, nn.Linear) else first.in_channels)
    size = config.get("image_size", 64)
    return (2, channels, size, size)


def permutation_spec(model, example_shape=None):
    """Derive the PermutationSpec of `model` (an nn.Module taking a batch of images of
    `example_shape`, default from its `config`: in_channels, image_size)."""
    was_training = model.training
    model.train()  # the training graph: a VAE samples its code there, tying its two heads' units
    try:
        graph = fx.symbolic_trace(model)
    except Exception as e:  # fx raises RuntimeError, TypeError, TraceError, ... on Python it cannot follow
        model.train(was_training)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"torch.fx cannot trace {type(model).__name__} ({reason}): the permutation symmetry "
                         "(alignment, REPAIR, layer-wise paths) needs a model it can trace") from e
    parameter = next(model.parameters())
    model.eval()  # shapes without touching BatchNorm's statistics
    shape = example_shape or default_example_shape(model)
    try:
        ShapeProp(graph).propagate(torch.zeros(shape, device=parameter.device, dtype=parameter.dtype))
    except RuntimeError as e:
        raise ValueError(f"cannot run {type(model).__name__} on a batch of shape {tuple(shape)} to derive its "
                         "permutations: give its factory in_channels and image_size arguments (they are filled in "
                         "from the data), or the model a config dict with them") from e
    finally:
        model.train(was_training)
    return Walk(graph).spec()


def identity(spec):
    """The identity permutations and all-positive signs of `spec`."""
    return ({p: torch.arange(n) for p, n in spec.sizes.items()},
            {p: torch.ones(n) for p, n in spec.sizes.items() if p in spec.signed})


def random_permutation(spec, generator, signs=True):
    """Random permutations (and, for signed perms, random signs when `signs`) of every perm; a
    grouped perm is shuffled within its groups (within each run of `spec.within` units of a
    group, where given) and its groups among themselves."""
    perms = {}
    for p, n in spec.sizes.items():
        groups = spec.groups.get(p, 1)
        k = n // groups
        run = spec.within.get(p, k)
        within = torch.stack([torch.cat([j * run + torch.randperm(run, generator=generator) for j in range(k // run)])
                              for _ in range(groups)])
        order = torch.randperm(groups, generator=generator)
        perms[p] = (order[:, None] * k + within).flatten()
    flips = {p: (torch.randint(0, 2, (spec.sizes[p],), generator=generator) * 2 - 1).float() if signs
             else torch.ones(spec.sizes[p]) for p in spec.signed}
    return perms, flips


def expand(index, block):
    """A permutation of units as a permutation of their `block` consecutive entries each."""
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block, device=index.device)).flatten()


def apply_permutation(spec, state, perms, signs=None):
    """A new state dict: unit i of every perm p is the old unit perms[p][i], negated where
    signs[p][i] is -1. Tensors the spec does not mention are returned as they are."""
    signs = signs or {}
    out = {}
    by_tensor = spec.by_tensor()
    for name, tensor in state.items():
        for axis, perm in by_tensor.get(name, {}).items():
            block = spec.blocks.get((name, axis), 1)
            tensor = tensor.index_select(axis, expand(perms[perm].to(tensor.device), block))
            if perm in signs:
                shape = [1] * tensor.dim()
                shape[axis] = -1
                sign = signs[perm].to(tensor.device, tensor.dtype).repeat_interleave(block)
                tensor = tensor * sign.view(shape)
        out[name] = tensor
    return out
