"""The permutation symmetry of a network, derived from its module graph (not typed by hand).

The units of every hidden layer can be reordered without changing what the network computes, if
the same permutation is applied to the output axis of the layer that produces them (its weight and
bias, and the normalisation's weight, bias, running mean and running variance that follow) and to
the input axis of the layer that consumes them. Where an odd activation (Tanh) sits between
producer and consumer with nothing but other odd, element-wise modules, each unit may also be
negated.

`permutation_spec(model)` traces the model with torch.fx and follows each hidden layer's channel
axis from the Conv2d / Linear that produces it to the layers that consume it:

* through element-wise modules and functions (activations, dropout, upsampling, exp, scaling);
* through BatchNorm and LayerNorm-like normalisations, whose parameters move with their channels;
  through a GroupNorm, which allows only permutations that keep each channel in its group (within
  a group, and whole groups swapped): the perm records its groups;
* through an addition of two tensors (a residual block, a VAE's mean + scaled noise), which ties
  the permutations of what it adds into one;
* through Flatten / Unflatten / view between a convolution and a Linear, where each channel is a
  block of consecutive features: the Linear's columns (or rows) move in blocks.

The model's input and output channels are fixed (for a model returning a tuple, such as a VAE's
(reconstruction, mean, log-variance), the reconstruction's). Where the derivation cannot prove an
axis permutable (a module or function it does not know, a concatenation, ...) it leaves every
permutation that reaches it alone and says which in `spec.fixed`: the result never changes what
the network computes, only how much of its symmetry is used.

Example::
    >>> spec = permutation_spec(Autoencoder())
    >>> perms, signs = random_permutation(spec, torch.Generator().manual_seed(0))
    >>> permuted = apply_permutation(spec, model.state_dict(), perms, signs)  # same function
"""
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

WEIGHTED = (nn.Conv2d, nn.Linear)
CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
ELEMENTWISE = (nn.LeakyReLU, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity, nn.Upsample)
ODD = (nn.Tanh, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)  # f(-x) = -f(x), element-wise
ELEMENTWISE_FUNCTIONS = {torch.exp, torch.tanh, torch.sigmoid, torch.relu, torch.nn.functional.relu,
                         torch.nn.functional.leaky_relu, torch.nn.functional.gelu, torch.nn.functional.silu,
                         operator.mul, operator.truediv, operator.neg, torch.mul}
ELEMENTWISE_METHODS = {"exp", "tanh", "sigmoid", "relu", "mul", "div", "neg", "contiguous", "float", "clone"}
ADDITIONS = {operator.add, operator.sub, torch.add, torch.sub}
NEW_TENSORS = {torch.randn_like, torch.rand_like, torch.zeros_like, torch.ones_like}  # no perm of their own


@dataclass
class PermutationSpec:
    """sizes: {perm: number of units}; axes: {perm: [(parameter or buffer name, axis), ...]};
    signed: the perms whose units may also be negated (no normalisation between their producer and
    consumer, so a negation multiplies every axis of the perm); blocks: {(name, axis): k} for axes
    where each unit is k consecutive entries (a Linear after a flattened convolution); groups:
    {perm: number of groups} for perms a GroupNorm constrains; fixed: one sentence per axis left
    alone (not provably permutable)."""
    sizes: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    signed: set = field(default_factory=set)
    blocks: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    fixed: list = field(default_factory=list)

    def by_tensor(self):
        """{tensor name: {axis: perm}}."""
        out = {}
        for perm, axes in self.axes.items():
            for name, axis in axes:
                out.setdefault(name, {})[axis] = perm
        return out


class _Perms:
    """The perms met while walking the graph, merged when an addition ties them (union-find)."""

    def __init__(self):
        self.parent, self.sizes, self.axes, self.paths = {}, {}, {}, {}
        self.groups, self.blocks, self.unsigned, self.dropped = {}, {}, set(), {}

    def new(self, name, size):
        self.parent[name], self.sizes[name], self.axes[name], self.paths[name] = name, size, [], []
        return name

    def find(self, p):
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def tie(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.sizes[a] != self.sizes[b]:
            raise ValueError(f"an addition of {self.sizes[a]} and {self.sizes[b]} channels")
        self.parent[b] = a
        self.axes[a] += self.axes.pop(b)
        self.paths[a] += self.paths.pop(b)
        self.unsigned |= {a} if b in self.unsigned else set()
        for d in (self.groups, self.dropped):
            if b in d:
                d.setdefault(a, d[b])
        return a

    def drop(self, p, why):
        self.dropped.setdefault(self.find(p), why)


def _example_shape(model):
    config = getattr(model, "config", {}) or {}
    first = next(m for m in model.modules() if isinstance(m, WEIGHTED))
    channels = config.get("in_channels", first.in_channels if isinstance(first, nn.Conv2d) else 1)
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
    device = next(model.parameters()).device
    model.eval()  # shapes without touching BatchNorm's statistics
    shape = example_shape or _example_shape(model)
    try:
        ShapeProp(graph).propagate(torch.zeros(shape, device=device))
    except RuntimeError as e:
        raise ValueError(f"cannot run {type(model).__name__} on a batch of shape {tuple(shape)} to derive its "
                         "permutations: give its factory in_channels and image_size arguments (they are filled in "
                         "from the data), or the model a config dict with them") from e
    finally:
        model.train(was_training)
    modules = dict(graph.named_modules())
    perms = _Perms()
    perm_of = {}  # fx node -> the perm of its channel axis (None: fixed or none)

    def incoming_of(arg):
        p = perm_of.get(arg) if isinstance(arg, fx.Node) else None
        return perms.find(p) if p is not None else None

    def channels_of(node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    for node in graph.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            perm_of[node] = None
            continue
        if node.op == "output":
            result = node.args[0]
            first = result[0] if isinstance(result, (tuple, list)) else result
            p = incoming_of(first)
            if p is not None:  # the reconstruction's channels are the image's: never permuted
                perms.drop(p, None)
            continue
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        incoming = [incoming_of(a) for a in tensor_args]
        source = tensor_args[0] if tensor_args else None
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, WEIGHTED):
                p_in = incoming[0]
                if p_in is not None:
                    block = _block(channels_of(source), module, perms.sizes[p_in])
                    if block is None:
                        perms.drop(p_in, f"{node.target} takes its input in a layout the derivation does not follow")
                    else:
                        perms.axes[p_in].append((f"{node.target}.weight", 1, block))
                        if not _odd_path(perms.paths[p_in]):
                            perms.unsigned.add(p_in)
                perm = perms.new(node.target, module.weight.shape[0])
                perms.axes[perm].append((f"{node.target}.weight", 0, 1))
                if module.bias is not None:
                    perms.axes[perm].append((f"{node.target}.bias", 0, 1))
                perm_of[node] = perm
            elif isinstance(module, CHANNEL_NORMS):
                p = incoming[0]
                if p is not None:
                    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                        perms.drop(p, f"{node.target} normalises over more than the channels")
                    else:
                        perms.axes[p] += [(f"{node.target}.{k}", 0, 1) for k in
                                          ("weight", "bias", "running_mean", "running_var")
                                          if getattr(module, k, None) is not None]
                        if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
                            perms.groups[p] = module.num_groups
                        perms.paths[p].append(module)
                perm_of[node] = p
            elif isinstance(module, ELEMENTWISE + (nn.Flatten, nn.Unflatten)):
                p = incoming[0]
                if p is not None:
                    perms.paths[p].append(module)
                    if isinstance(module, nn.Unflatten):
                        p = _unflatten(perms, p, channels_of(node), node.name)
                perm_of[node] = p
            else:
                for p in incoming:
                    if p is not None:
                        perms.drop(p, f"no rule for {type(module).__name__} ({node.target})")
                perm_of[node] = None
            continue
        target = node.target
        known = [p for p in incoming if p is not None]
        if node.op == "call_function" and target in ADDITIONS and len(tensor_args) == 2:
            if len(known) == 2:
                perm_of[node] = perms.tie(*known)
            elif len(known) == 1 and any(a.op == "call_function" and a.target in NEW_TENSORS for a in tensor_args):
                perm_of[node] = known[0]
            else:  # a tensor without a perm added to one with: that axis is pinned
                for p in known:
                    perms.drop(p, f"{node.name} adds a tensor the derivation cannot follow")
                perm_of[node] = None
            for p in known:
                perms.paths[perms.find(p)].append("add")
        elif node.op == "call_function" and target in NEW_TENSORS:
            perm_of[node] = None
        elif (node.op == "call_function" and target in ELEMENTWISE_FUNCTIONS) or \
                (node.op == "call_method" and target in ELEMENTWISE_METHODS):
            if len(known) > 1:
                for p in known:
                    perms.drop(p, f"{node.name} multiplies two permuted tensors")
                perm_of[node] = None
            else:
                perm_of[node] = known[0] if known else None
                if known:
                    perms.paths[known[0]].append(str(target))
        elif (node.op == "call_method" and target in ("view", "reshape", "flatten")) or \
                (node.op == "call_function" and target in (torch.flatten, torch.reshape)):
            p = known[0] if known else None  # flattening: a Linear after it checks the layout (_block)
            shape = channels_of(node)
            if p is not None and shape is not None and len(shape) > 2:
                p = _unflatten(perms, p, shape, node.name)
            perm_of[node] = p
        elif node.op == "call_function" and target is operator.getitem:
            perm_of[node] = known[0] if known and isinstance(node.args[1], int) is False else None
            if known and perm_of[node] is None:
                perms.drop(known[0], f"{node.name} indexes a permuted tensor")
        else:
            for p in known:
                perms.drop(p, f"no rule for {node.op} {getattr(target, '__name__', target)} ({node.name})")
            perm_of[node] = None
    return _spec(perms)


def _unflatten(perms, p, shape, where):
    """Features of a Linear reshaped to (N, C, H, W): the perm, produced on C * H * W features,
    becomes one on C channels, each a block of H * W of the Linear's rows."""
    channels = shape[1] if shape is not None else None
    if channels is None or channels == perms.sizes[p]:
        return p
    block = perms.sizes[p] // channels
    if perms.sizes[p] % channels or any(axis != 0 or b != 1 for _, axis, b in perms.axes[p]):
        perms.drop(p, f"{where} reshapes features the derivation cannot follow")
        return None
    perms.axes[p] = [(tensor, 0, block) for tensor, _, _ in perms.axes[p]]
    perms.sizes[p] = channels
    return p


def _block(shape, module, units):
    """How many consecutive input features of `module` each of `units` channels is: 1 for a
    Conv2d or a Linear on (N, C); H * W for a Linear on a flattened (N, C, H, W); None when the
    layout does not match."""
    if isinstance(module, nn.Conv2d):
        return 1 if shape is None or shape[1] == units else None
    features = module.in_features
    return features // units if features % units == 0 else None


def _spec(perms):
    spec = PermutationSpec()
    for name in list(perms.parent):
        if perms.parent[name] != name:
            continue
        if name in perms.dropped:
            if perms.dropped[name] is not None:
                spec.fixed.append(f"the units of {name} stay in place: {perms.dropped[name]}")
            continue
        spec.sizes[name] = perms.sizes[name]
        spec.axes[name] = [(tensor, axis) for tensor, axis, _ in perms.axes[name]]
        spec.blocks.update({(tensor, axis): block for tensor, axis, block in perms.axes[name] if block > 1})
        if name in perms.groups:
            spec.groups[name] = perms.groups[name]
        if name not in perms.unsigned and _odd_path(perms.paths[name]):
            spec.signed.add(name)
    return spec


def _odd_path(path):
    return any(isinstance(m, nn.Tanh) for m in path) and all(isinstance(m, ODD) for m in path)


def identity(spec):
    """The identity permutations and all-positive signs of `spec`."""
    return ({p: torch.arange(n) for p, n in spec.sizes.items()},
            {p: torch.ones(n) for p, n in spec.sizes.items() if p in spec.signed})


def random_permutation(spec, generator, signs=True):
    """Random permutations (and, for signed perms, random signs when `signs`) of every perm; a
    grouped perm is shuffled within its groups and its groups among themselves."""
    perms = {}
    for p, n in spec.sizes.items():
        groups = spec.groups.get(p, 1)
        k = n // groups
        within = torch.stack([torch.randperm(k, generator=generator) for _ in range(groups)])
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
