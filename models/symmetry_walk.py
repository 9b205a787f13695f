"""The walk of models.symmetry's derivation over a traced graph with shapes (the rules it applies
to each node); its result is a PermutationSpec."""
import math
import operator

import torch
from torch import fx, nn

from models import symmetry_rules as rules
from models.symmetry_rules import Perms, PermutationSpec, group_norm_constraint, odd_path, shape_of


class Walk:
    """One pass over the traced graph in order: perm_of[node] is the perm of the node's channel
    axis (None: not permuted); param_of[node] the parameter a node is an element-wise function of."""

    def __init__(self, graph):
        self.modules = dict(graph.named_modules())
        self.perms = Perms()
        self.perm_of, self.param_of, self.direct, self.last = {}, {}, {}, {}
        self.param_claims = {}
        self.output_perm, self.output_layer = None, None
        for node in graph.graph.nodes:
            self.perm_of[node] = None
            self.visit(node)

    def known(self, arg):
        p = self.perm_of.get(arg) if isinstance(arg, fx.Node) else None
        return self.perms.find(p) if p is not None else None

    def drop_all(self, nodes, why):
        for a in nodes:
            p = self.known(a)
            if p is not None:
                self.perms.drop(p, why)

    def block(self, node, p):
        """Entries of `node`'s axis 1 per unit of p, or None when they do not divide."""
        shape = shape_of(node)
        if shape is None or len(shape) < 2 or shape[1] % self.perms.sizes[self.perms.find(p)]:
            return None
        return shape[1] // self.perms.sizes[self.perms.find(p)]

    def visit(self, node):
        if node.op == "placeholder":
            return
        if node.op == "get_attr":
            self.param_of[node] = node.target
            return
        if node.op == "output":
            result = node.args[0]
            first = result[0] if isinstance(result, (tuple, list)) else result
            self.output_perm, self.output_layer = self.known(first), self.last.get(first)
            return
        tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        for a in list(node.args) + list(node.kwargs.values()):  # a list of tensors (torch.cat)
            if isinstance(a, (list, tuple)):
                tensors += [b for b in a if isinstance(b, fx.Node)]
        if node.op == "call_module":
            return self.module(node, self.modules[node.target], tensors)
        target, name = node.target, getattr(node.target, "__name__", node.target)
        shape = shape_of(node)
        if shape is None and not isinstance(node.meta.get("tensor_meta"), (list, tuple)):
            return  # not a tensor (x.size(1), x.shape): nothing to permute
        known = [p for p in (self.known(a) for a in tensors) if p is not None]
        function = node.op == "call_function"
        if (function and target in rules.BINARY) or (node.op == "call_method" and target in rules.BINARY_METHODS):
            return self.binary(node, name)
        if function and target in rules.NEW_TENSORS:
            return
        method = node.op == "call_method"
        if (function and target in rules.UNARY_FUNCTIONS) or (method and target in rules.UNARY_METHODS):
            source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            others = [a for a in tensors if a is not source]
            if source is not None and not [a for a in others if self.known(a) or a in self.param_of]:
                self.pass_through(node, source, name)
                if source in self.param_of:
                    self.param_of[node] = self.param_of[source]
                return
        if (function and target in rules.RESHAPES) or (node.op == "call_method" and target in rules.RESHAPE_METHODS):
            return self.reshape(node, node.args[0], name)
        if function and target is torch.cat:
            return self.concatenate(node, tensors, name)
        if function and target is operator.getitem and tensors:
            return self.index(node, tensors[0], node.args[1], name)
        if known:
            self.drop_all(tensors, f"no rule for {node.op} {name} ({node.name})")

    def pass_through(self, node, source, what):
        p = self.known(source)
        self.perm_of[node] = p
        self.last[node] = self.last.get(source)
        if p is not None:
            self.perms.paths[p].append(what)
            if isinstance(what, rules.TRANSPARENT):
                self.direct[node] = self.direct.get(source, set())

    def module(self, node, module, tensors):
        source = tensors[0] if tensors else None
        p = self.known(source)
        if isinstance(module, rules.PRODUCERS):
            return self.producer(node, module, source, p)
        if isinstance(module, rules.BATCH_NORMS + (nn.GroupNorm,)):
            if p is not None:
                block = self.block(source, p)
                if block is None:
                    self.perms.drop(p, f"{node.target} normalises a layout the derivation does not follow")
                    return
                for k in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(module, k, None) is not None:
                        p = self.perms.add_axis(p, f"{node.target}.{k}", 0, block, where=node.target)
                if p is None:
                    return
                if isinstance(module, nn.GroupNorm):
                    self.perms.constrain(p, *group_norm_constraint(shape_of(source)[1], module.num_groups, block))
                else:
                    self.perms.batchnormed |= self.direct.get(source, set())
                self.perms.paths[p].append(module)
                self.perm_of[node] = p
            return
        if isinstance(module, nn.LayerNorm):
            if p is None:
                return
            shape = shape_of(source)
            over = len(module.normalized_shape)
            if len(shape) - over >= 2:  # over trailing axes only (the width): per channel, parameters stay
                self.pass_through(node, source, module)
            elif len(shape) - over == 1 and self.block(source, p) is not None:  # over the channels and the rest
                for k in ("weight", "bias"):
                    if getattr(module, k, None) is not None and p is not None:
                        p = self.perms.add_axis(p, f"{node.target}.{k}", 0, self.block(source, p), where=node.target)
                if p is not None:
                    self.perms.paths[p].append(module)
                self.perm_of[node] = p
            else:
                self.perms.drop(p, f"{node.target} normalises over the batch")
            return
        if isinstance(module, rules.PER_CHANNEL):
            return self.pass_through(node, source, module)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, source, module)
        self.drop_all(tensors, f"no rule for {type(module).__name__} ({node.target})")

    def producer(self, node, module, source, p_in):
        transposed, target = isinstance(module, nn.ConvTranspose2d), node.target
        groups = getattr(module, "groups", 1)
        if p_in is not None:
            block = self.block(source, p_in)
            if block is None or (isinstance(module, nn.Linear) and len(shape_of(source)) != 2):
                self.perms.drop(p_in, f"{target} takes its input in a layout the derivation does not follow")
            elif groups > 1 and not transposed:
                self.perms.drop(p_in, f"{target} is a grouped convolution: its weight holds one group's input "
                                "channels")
            else:
                if not odd_path(self.perms.paths[p_in]):
                    self.perms.unsigned.add(p_in)
                p_in = self.perms.add_axis(p_in, f"{target}.weight", 0 if transposed else 1, block, consumer=True,
                                           where=target)
                if p_in is not None and groups > 1:  # inputs stay in their group: no swaps of groups
                    channels = shape_of(source)[1] // groups
                    free = channels // block if channels % block == 0 else 1
                    self.perms.constrain(p_in, self.perms.sizes[p_in], free)
        self.last[node] = target
        if target not in self.perms.hidden_order:
            self.perms.hidden_order.append(target)
        if transposed and groups > 1:
            self.perms.fixed_layers.append(f"the units of {target} stay in place: a grouped ConvTranspose2d's "
                                           "weight holds one group's output channels")
            return
        size = module.weight.shape[1] * groups if transposed else module.weight.shape[0]
        perm = self.perms.new(node.name, size, target)
        perm = self.perms.add_axis(perm, f"{target}.weight", 1 if transposed else 0, 1, where=target)
        if perm is not None and module.bias is not None:
            perm = self.perms.add_axis(perm, f"{target}.bias", 0, 1, where=target)
        if perm is not None and groups > 1:
            self.perms.constrain(perm, size, size // groups)
        self.perm_of[node] = perm
        self.direct[node] = {target}

    def binary(self, node, name):
        """a + b, a * b, ...: two permuted tensors are tied; a tensor and a per-channel parameter (or a
        function of one) move together; a scalar or a tensor constant along the channels changes nothing."""
        operands = list(node.args[:2])
        permuted = [a for a in operands if self.known(a) is not None]
        if len(permuted) == 2:
            a, b = permuted
            sa, sb = shape_of(a), shape_of(b)
            if sa is None or sb is None or len(sa) != len(sb) or sa[1] != sb[1]:
                self.drop_all(permuted, f"{node.name} combines tensors whose channels do not line up")
                return
            pa, pb = self.known(a), self.known(b)
            na, nb = self.perms.sizes[pa], self.perms.sizes[pb]
            if na != nb and max(na, nb) % min(na, nb) == 0:  # e.g. a flattened conv + a Linear's features:
                finer = pa if na > nb else pb  # the finer perm's units taken together, in blocks of the coarser
                self.perms.merge_units(finer, max(na, nb) // min(na, nb), node.name)
            self.perm_of[node] = self.perms.tie(self.known(a), self.known(b), node.name)
            if self.perm_of[node] is not None:
                self.perms.paths[self.perm_of[node]].append(name)
            return
        if not permuted:  # a function of one parameter (and numbers) is followed as the parameter
            nodes = [a for a in operands if isinstance(a, fx.Node)]
            if len(nodes) == 1 and nodes[0] in self.param_of:
                self.param_of[node] = self.param_of[nodes[0]]
            return
        source = permuted[0]
        other = operands[1] if operands[0] is source else operands[0]
        p, shape = self.known(source), shape_of(source)
        self.perm_of[node] = p
        self.perms.paths[p].append(name)
        if not isinstance(other, fx.Node):
            return
        other_shape = shape_of(other)
        if other_shape is None or len(other_shape) > len(shape) or shape_of(node) != shape:
            self.perms.drop(p, f"{node.name} broadcasts a permuted tensor")
            self.perm_of[node] = None
            return
        axis = 1 - (len(shape) - len(other_shape))
        if axis < 0 or other_shape[axis] == 1:
            return  # constant along the channels
        if other in self.param_of and other_shape[axis] == shape[1]:
            name = self.param_of[other]
            self.param_claims[name] = self.param_claims.get(name, 0) + 1
            self.perm_of[node] = self.perms.add_axis(p, self.param_of[other], axis, self.block(source, p),
                                                     where=node.name)
            return
        if self.known(other) is None and any(a.target in rules.NEW_TENSORS for a in [other] if a.op == "call_function"):
            return
        self.perms.drop(p, f"{node.name} combines a permuted tensor with one the derivation cannot follow")
        self.perm_of[node] = None

    def reshape(self, node, source, what):
        """A view of (N, C, ...) as (N, C', ...) in the same order: C' a multiple of the units (each unit
        now spans more channels, or features) keeps the perm; C' a divisor takes units together."""
        p = self.known(source)
        if p is None:
            return
        before, after = shape_of(source), shape_of(node)
        n = self.perms.sizes[p]
        if after is None or len(after) < 2 or after[0] != before[0] or math.prod(after) != math.prod(before):
            self.perms.drop(p, f"{node.name} reshapes the batch or the channels away")
            return
        if after[1] % n == 0:
            self.pass_through(node, source, what if isinstance(what, nn.Module) else "view")
        elif n % after[1] == 0:
            p = self.perms.merge_units(p, n // after[1], node.name)
            self.perms.paths[p].append(what if isinstance(what, nn.Module) else "view")
            self.perm_of[node] = p
        else:
            self.perms.drop(p, f"{node.name} reshapes the channels in a way the derivation does not follow")

    def concatenate(self, node, tensors, name):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        shape = shape_of(node)
        if dim % len(shape) != 1 and all(self.known(a) is not None for a in tensors):
            p = self.known(tensors[0])
            for a in tensors[1:]:
                p = self.perms.tie(p, self.known(a), node.name) if p is not None else None
            self.perm_of[node] = p
            return
        self.drop_all(tensors, f"{node.name} concatenates along the channels")

    def index(self, node, source, index, name):
        index = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        if shape_of(source) is not None and index[0] == full and (len(index) < 2 or index[1] == full) and \
                all(isinstance(i, slice) for i in index):
            return self.pass_through(node, source, "index")
        self.drop_all([source], f"{node.name} indexes the batch or the channels of a permuted tensor")

    def spec(self):
        perms = self.perms
        if self.output_perm is not None:  # the reconstruction's channels are the image's: never permuted
            root = perms.find(self.output_perm)
            perms.dropped[root] = None
        uses = {}  # a parameter permuted where it meets a permuted tensor must not be used elsewhere
        for node, name in self.param_of.items():
            uses[name] = uses.get(name, 0) + sum(user not in self.param_of for user in node.users)
        for name, claims in self.param_claims.items():
            if uses.get(name, 0) != claims:
                for p, axes in list(perms.axes.items()):
                    if any(t == name for t, _, _ in axes):
                        perms.drop(p, f"{name} is also used where its channels cannot move")
        spec = PermutationSpec(fixed=list(perms.fixed_layers))
        output_layers = set(perms.producers[perms.find(self.output_perm)]) if self.output_perm is not None else set()
        output_layers.add(self.output_layer)
        spec.hidden = [layer for layer in perms.hidden_order if layer not in output_layers]
        spec.batchnormed = perms.batchnormed & set(spec.hidden)
        for name in list(perms.parent):
            if perms.parent[name] != name:
                continue
            if name in perms.dropped:
                if perms.dropped[name] is not None:
                    layers = ", ".join(dict.fromkeys(perms.producers[name]))
                    spec.fixed.append(f"the units of {layers} stay in place: {perms.dropped[name]}")
                continue
            root = perms.producers[name][0]  # named by the first layer producing them
            n = perms.sizes[name]
            spec.sizes[root] = n
            spec.axes[root] = [(tensor, axis) for tensor, axis, _ in perms.axes[name]]
            spec.blocks.update({(tensor, axis): block for tensor, axis, block in perms.axes[name] if block > 1})
            spec.producers[root] = list(dict.fromkeys(perms.producers[name]))
            spec.consumed[root] = set(perms.consumed[name])
            swap, free = perms.constraint[name]
            if free < n:  # otherwise every permutation is allowed
                spec.groups[root] = n // swap
                if free != swap:
                    spec.within[root] = free
            if name not in perms.unsigned and odd_path(perms.paths[name]):
                spec.signed.add(root)
        return spec
