"""The rules of the permutation-symmetry derivation (models.symmetry): a walk over a torch.fx graph
with shapes that follows each hidden layer's units from the layer that produces them to the layers
that consume them. Every rule says which (tensor, axis) moves with the units, in blocks of how many
consecutive entries, and how a normalisation or a grouped layer constrains the permutations; an
operation without a rule leaves every permutation that reaches it in place (`_Perms.drop`).

A permutation's constraint is (swap, free): runs of `swap` units may be exchanged whole, and
inside each run of `free` units any order is allowed; (free=n, swap=1) allows everything. Two
constraints on one permutation combine as swap = lcm, free = gcd (the permutations allowed by both).
"""
import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

PRODUCERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
PER_CHANNEL = (nn.LeakyReLU, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.ELU, nn.Dropout,
               nn.Identity, nn.Upsample, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ODD = (nn.Tanh, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)  # f(-x) = -f(x)
TRANSPARENT = (nn.Dropout, nn.Identity)  # a BatchNorm after these still follows the layer (REPAIR)
F = torch.nn.functional
UNARY_FUNCTIONS = {torch.exp, torch.tanh, torch.sigmoid, torch.relu, torch.abs, torch.neg, torch.sqrt, operator.neg,
                   F.relu, F.leaky_relu, F.gelu, F.silu, F.softplus, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, operator.abs}
UNARY_METHODS = {"exp", "tanh", "sigmoid", "relu", "abs", "neg", "sqrt", "contiguous", "float", "double", "clone"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div"}
RESHAPES = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
NEW_TENSORS = {torch.randn_like, torch.rand_like, torch.zeros_like, torch.ones_like}  # no perm of their own


@dataclass
class PermutationSpec:
    """sizes: {perm: number of units}; axes: {perm: [(parameter or buffer name, axis), ...]};
    signed: the perms whose units may also be negated (no normalisation between their producer and
    consumer, so a negation multiplies every axis of the perm); blocks: {(name, axis): k} for axes
    where each unit is k consecutive entries (a Linear after a flattened convolution); groups:
    {perm: number of groups} for perms a GroupNorm or a grouped layer constrains (runs of size //
    groups units swapped whole); within: {perm: k} where only runs of k units inside a group may be
    reordered (default: the whole group); producers: {perm: [layer, ...]} the layers whose outputs
    it permutes; consumed: {perm: {(name, axis), ...}} the consumers' input axes among its axes;
    hidden: every layer producing hidden units, permuted or not (all but the output's);
    batchnormed: the hidden layers whose output goes straight into a BatchNorm; fixed: one
    sentence per set of units left alone (not provably permutable)."""
    sizes: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    signed: set = field(default_factory=set)
    blocks: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    within: dict = field(default_factory=dict)
    producers: dict = field(default_factory=dict)
    consumed: dict = field(default_factory=dict)
    hidden: list = field(default_factory=list)
    batchnormed: set = field(default_factory=set)
    fixed: list = field(default_factory=list)

    def by_tensor(self):
        """{tensor name: {axis: perm}}."""
        out = {}
        for perm, axes in self.axes.items():
            for name, axis in axes:
                out.setdefault(name, {})[axis] = perm
        return out


def combine(a, b):
    return math.lcm(a[0], b[0]), math.gcd(a[1], b[1])


class Perms:
    """The perms met while walking the graph, merged when an operation ties them (union-find)."""

    def __init__(self):
        self.parent, self.sizes, self.axes, self.paths = {}, {}, {}, {}
        self.constraint, self.producers, self.consumed = {}, {}, {}
        self.unsigned, self.dropped, self.claimed = set(), {}, {}
        self.hidden_order, self.fixed_layers, self.batchnormed = [], [], set()

    def new(self, name, size, producer):
        self.parent[name], self.sizes[name], self.axes[name], self.paths[name] = name, size, [], []
        self.constraint[name], self.producers[name], self.consumed[name] = (1, size), [producer], set()
        return name

    def find(self, p):
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def tie(self, a, b, where):
        """One perm for a and b (root), or None (both dropped) when their units differ."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.sizes[a] != self.sizes[b]:
            self.drop(a, f"{where} joins {self.sizes[a]} and {self.sizes[b]} units")
            self.drop(b, f"{where} joins {self.sizes[a]} and {self.sizes[b]} units")
            return None
        self.parent[b] = a
        self.axes[a] += self.axes.pop(b)
        self.paths[a] += self.paths.pop(b)
        self.producers[a] += self.producers.pop(b)
        self.consumed[a] |= self.consumed.pop(b)
        self.constraint[a] = combine(self.constraint[a], self.constraint.pop(b))
        self.unsigned |= {a} if b in self.unsigned else set()
        if b in self.dropped:
            self.dropped.setdefault(a, self.dropped[b])
        return a

    def add_axis(self, p, tensor, axis, block, consumer=False, where=""):
        """`tensor`'s `axis` moves with perm p's units, `block` consecutive entries per unit; an axis
        already moved by another perm ties the two (a module called twice, a shared parameter)."""
        p = self.find(p)
        key = (tensor, axis)
        if key in self.claimed:
            q = self.find(self.claimed[key])
            old = next(b for t, a, b in self.axes[q] if (t, a) == key)
            if q != p:
                p = self.tie(p, q, where)
                if p is None:
                    return None
            if old != block:
                self.drop(p, f"{tensor} is used with two layouts")
            return p
        self.claimed[key] = p
        self.axes[p].append((tensor, axis, block))
        if consumer:
            self.consumed[p].add(key)
        return p

    def constrain(self, p, swap, free):
        p = self.find(p)
        self.constraint[p] = combine(self.constraint[p], (swap, free))

    def merge_units(self, p, m, where):
        """Units of p taken m at a time (a reshape to fewer channels): every axis's block grows m-fold."""
        p = self.find(p)
        swap, free = self.constraint[p]
        # a merged unit must hold whole runs of `swap` (m % swap == 0: the runs move whole) or
        # lie inside one (swap % m == 0)
        if self.sizes[p] % m or swap % m and m % swap:
            self.drop(p, f"{where} regroups units across the groups of a normalisation or a grouped layer")
            return p
        self.axes[p] = [(t, a, b * m) for t, a, b in self.axes[p]]
        self.sizes[p] //= m
        self.constraint[p] = (max(swap // m, 1), free // m if free % m == 0 else 1)
        return p

    def drop(self, p, why):
        self.dropped.setdefault(self.find(p), why)


def shape_of(node):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def odd_path(path):
    return any(isinstance(m, nn.Tanh) for m in path) and all(isinstance(m, ODD) for m in path)


def group_norm_constraint(features, groups, block):
    """(swap, free) in units of `block` features each, for a GroupNorm of `groups` groups over `features`."""
    size = features // groups
    if size % block == 0:
        return size // block, size // block
    return math.lcm(size, block) // block, 1
