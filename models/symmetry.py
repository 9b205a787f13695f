"""The permutation symmetry of a network, derived from its modules (not typed by hand).

The units of every hidden layer can be reordered without changing what the network computes, if
the same permutation is applied to the output axis of the layer that produces them (its weight and
bias, and the BatchNorm weight, bias, running mean and running variance that follow) and to the
input axis of the layer that consumes them. Where an odd activation (Tanh) sits between producer
and consumer with nothing but other odd, element-wise modules, each unit may also be negated.

`permutation_spec(model)` traces the model with torch.fx, follows each hidden layer's channel axis
from the Conv2d / Linear that produces it through BatchNorm and element-wise modules (and through
Flatten / Unflatten where the spatial size is 1 x 1) to the layer that consumes it, and returns
which axis of which parameter and buffer each permutation acts on. The model's input and output
axes are fixed. A module it does not know is an error, so a change of architecture is never
silently mis-aligned.

Example::
    >>> spec = permutation_spec(Autoencoder())
    >>> perms, signs = random_permutation(spec, torch.Generator().manual_seed(0))
    >>> permuted = apply_permutation(spec, model.state_dict(), perms, signs)  # same function
"""
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

WEIGHTED = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ELEMENTWISE = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Dropout, nn.Identity, nn.Upsample)
ODD = (nn.Tanh, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)  # f(-x) = -f(x), element-wise


@dataclass
class PermutationSpec:
    """sizes: {perm: number of units}; axes: {perm: [(parameter or buffer name, axis), ...]};
    signed: the perms whose units may also be negated (no BatchNorm between their producer and
    consumer, so a negation multiplies every axis of the perm)."""
    sizes: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    signed: set = field(default_factory=set)

    def by_tensor(self):
        """{tensor name: {axis: perm}}."""
        out = {}
        for perm, axes in self.axes.items():
            for name, axis in axes:
                out.setdefault(name, {})[axis] = perm
        return out


def permutation_spec(model, image_size=64):
    """Derive the PermutationSpec of `model` (an nn.Module taking a batch of images)."""
    graph = fx.symbolic_trace(model)
    first = next(m for m in model.modules() if isinstance(m, WEIGHTED))
    example = torch.zeros(2, first.in_channels, image_size, image_size, device=first.weight.device)
    was_training = model.training
    model.eval()
    ShapeProp(graph).propagate(example)
    model.train(was_training)
    spec = PermutationSpec()
    modules = dict(graph.named_modules())
    perm_of = {}      # fx node -> the perm of its channel axis (None: fixed)
    path = {}         # perm -> element-wise modules it has passed since its producer
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            perm_of[node] = None
            continue
        if node.op == "output":
            fixed = perm_of[node.args[0]]
            if fixed is not None:  # the model's output channels are the image's: never permuted
                del spec.sizes[fixed], spec.axes[fixed]
            continue
        if node.op != "call_module":
            raise NotImplementedError(f"permutation_spec: {node.op} {node.target} is not a module call")
        module, source = modules[node.target], node.args[0]
        incoming = perm_of[source]
        if isinstance(module, WEIGHTED):
            if incoming is not None:
                spec.axes[incoming].append((f"{node.target}.weight", 1))
                if _odd_path(path[incoming]):
                    spec.signed.add(incoming)
            perm = node.target
            spec.sizes[perm] = module.weight.shape[0]
            spec.axes[perm] = [(f"{node.target}.weight", 0)]
            if module.bias is not None:
                spec.axes[perm].append((f"{node.target}.bias", 0))
            perm_of[node], path[perm] = perm, []
        elif isinstance(module, NORMS):
            if incoming is not None:
                spec.axes[incoming] += [(f"{node.target}.{k}", 0) for k in
                                        ("weight", "bias", "running_mean", "running_var")
                                        if getattr(module, k, None) is not None]
                path[incoming].append(module)
            perm_of[node] = incoming
        elif isinstance(module, ELEMENTWISE + (nn.Flatten, nn.Unflatten)):
            if isinstance(module, (nn.Flatten, nn.Unflatten)) and incoming is not None:
                spatial = source if isinstance(module, nn.Flatten) else node  # the side with the channel axis
                shape = spatial.meta["tensor_meta"].shape
                if any(s != 1 for s in shape[2:]):
                    raise NotImplementedError(f"permutation_spec: {node.target} reshapes channels with "
                                              f"spatial size {tuple(shape[2:])}; only 1 x 1 is supported")
            if incoming is not None:
                path[incoming].append(module)
            perm_of[node] = incoming
        else:
            raise NotImplementedError(f"permutation_spec: no rule for {type(module).__name__} ({node.target})")
    return spec


def _odd_path(modules):
    return any(isinstance(m, nn.Tanh) for m in modules) and all(isinstance(m, ODD) for m in modules)


def identity(spec):
    """The identity permutations and all-positive signs of `spec`."""
    return ({p: torch.arange(n) for p, n in spec.sizes.items()},
            {p: torch.ones(n) for p, n in spec.sizes.items() if p in spec.signed})


def random_permutation(spec, generator, signs=True):
    """Random permutations (and, for signed perms, random signs when `signs`) of every perm."""
    perms = {p: torch.randperm(n, generator=generator) for p, n in spec.sizes.items()}
    flips = {p: (torch.randint(0, 2, (spec.sizes[p],), generator=generator) * 2 - 1).float() if signs
             else torch.ones(spec.sizes[p]) for p in spec.signed}
    return perms, flips


def apply_permutation(spec, state, perms, signs=None):
    """A new state dict: unit i of every perm p is the old unit perms[p][i], negated where
    signs[p][i] is -1. Tensors the spec does not mention are returned as they are."""
    signs = signs or {}
    out = {}
    by_tensor = spec.by_tensor()
    for name, tensor in state.items():
        for axis, perm in by_tensor.get(name, {}).items():
            tensor = tensor.index_select(axis, perms[perm].to(tensor.device))
            if perm in signs:
                shape = [1] * tensor.dim()
                shape[axis] = -1
                tensor = tensor * signs[perm].to(tensor.device, tensor.dtype).view(shape)
        out[name] = tensor
    return out
