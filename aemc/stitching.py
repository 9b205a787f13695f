"""Model stitching: network A's layers up to a hidden layer joined to network B's layers after it
through a fitted map, scored like any model (Lenc & Vedaldi, CVPR 2015, "Understanding image
representations by measuring their equivariance and equivalence"; Bansal, Nakkiran & Barak, NeurIPS
2021, "Revisiting model stitching to compare neural representations").

Stitch points. A model is traced with torch.fx in evaluation mode (a VAE's code is then its mean).
For each hidden layer models.symmetry derives (`spec.hidden`, in order of depth) the point is the
value the next layer reads: from the layer's output along nodes with a single user (normalisation,
activation, dropout, upsampling, a residual addition, ...), stopping before the next weighted layer,
a node with several users, the output, or a reshape (Flatten, Unflatten, view: so the map acts on
the layer's own units, a convolution's channels or a Linear's features). A point is usable only
where it cuts the network: the reconstruction depends on the input through it alone. Points inside
a residual block (the skip connection goes around them) and a VAE's log-variance (it does not lead
to the reconstruction) are skipped, each with its reason.

Maps (aemc.channel_maps) act on the channel axis, at every position of a feature map, fitted on
paired activations of the two models on training batches: identity, permutation, orthogonal
(Procrustes), affine (least squares; on a feature map a 1x1 convolution with bias).

The stitched model: everything before the cut is the bottom's, everything after it the top's, and
each part keeps its own BatchNorm statistics (the endpoint's own, not re-estimated). Of a tuple
output (a VAE's reconstruction, mean, log-variance) an element that depends on the cut comes from
the top, one that does not from the bottom: a VAE stitched at its mean returns (the top's decoding
of map(mean_A), map(mean_A), logvar_A), so its KL is A's for the identity, a permutation or an
orthogonal map (|R mu| = |mu|), and only a number for an affine one.

Example::
    >>> points, skipped = stitch_points(a)
    >>> moments = measure(a, b, points, train_batches, amp="none")
    >>> weight, bias = fit("affine", moments[points[0].layer])
    >>> stitched = Stitched(a, b, points[0].layer, ChannelMap("affine", weight, bias))   # A into B
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from aemc.architectures import permutation_spec
from aemc.barriers import higher_is_better
from aemc.channel_maps import ChannelMap, Moments, fit, unexplained
from aemc.errors import UserError
from aemc.evaluation import evaluate
from aemc.speed import autocast
from models.symmetry import default_example_shape
from models.symmetry_rules import PRODUCERS, RESHAPE_METHODS, RESHAPES

DIRECTIONS = {"a_into_b": "A into B", "b_into_a": "B into A"}  # A's bottom and B's top; the reverse
BATCHNORM = "each part keeps its endpoint's own BatchNorm statistics (not re-estimated)"
PENALTY = "the stitched model's test metric minus the mean of A's and B's (PSNR negated: a loss of quality)"


@dataclass(frozen=True)
class StitchPoint:
    """Where a model is cut: after hidden layer `layer` (the `depth`-th of spec.hidden), at the fx
    node `node`, whose value has `shape` per sample ((C,) or (C, H, W))."""
    layer: str
    depth: int
    node: str
    shape: tuple

    @property
    def features(self):
        return math.prod(self.shape)


@contextlib.contextmanager
def _evaluating(*models):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def trace(model):
    """`model`'s torch.fx GraphModule in evaluation mode (it shares the model's modules)."""
    with _evaluating(model):
        try:
            return fx.symbolic_trace(model)
        except Exception as e:  # fx raises many kinds on Python it cannot follow
            raise UserError(f"torch.fx cannot trace {type(model).__name__} in evaluation mode ({e}): stitching "
                            "needs a model it can trace")


def _is_producer(gm, node):
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), PRODUCERS)


def _is_reshape(gm, node):
    return ((node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Flatten, nn.Unflatten)))
            or (node.op == "call_function" and node.target in RESHAPES)
            or (node.op == "call_method" and node.target in RESHAPE_METHODS))


def _outputs(graph):
    """The output's elements (one, or a tuple's) and whether it is a tuple."""
    value = next(n for n in graph.nodes if n.op == "output").args[0]
    return (list(value), True) if isinstance(value, (tuple, list)) else ([value], False)


def _reaches(source, target, avoiding=None):
    """Whether `target` is `source` or computed from it, on paths that do not pass `avoiding`."""
    stack, seen = [target], set()
    while stack:
        node = stack.pop()
        if node is source:
            return True
        if node is avoiding or node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return False


def _point(gm, layer):
    """(the node where the next layer reads `layer`'s units, None), or (None, why there is no point)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        return None, "it runs more than once" if calls else "it does not run in evaluation mode"
    node = calls[0]
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or _is_producer(gm, user) or _is_reshape(gm, user):
            break
        node = user
    reconstruction = _outputs(gm.graph)[0][0]
    if not _reaches(node, reconstruction):
        return None, "it does not lead to the reconstruction (as a VAE's log-variance)"
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(_reaches(x, reconstruction, avoiding=node) for x in inputs):
        return None, f"a skip connection goes around it: the input reaches the reconstruction also around {node.name}"
    return node, None


def _probe(gm, nodes):
    """A GraphModule returning copies of the values of `nodes` (copies: a later in-place operation
    cannot change them)."""
    graph, env = fx.Graph(), {}
    graph.graph_copy(gm.graph, env)
    copies = []
    for node in nodes:
        with graph.inserting_after(env[node]):
            copies.append(graph.call_method("clone", (env[node],)))
    graph.output(tuple(copies))
    return _pruned(fx.GraphModule(gm, graph))


def _pruned(gm):
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


@torch.no_grad()
def stitch_points(model):
    """([StitchPoint, ...] in order of depth, {layer: why it is skipped}) of `model` (its shapes
    from a batch of the shape models.symmetry derives it on: its config's image size)."""
    gm = trace(model)
    points, skipped, found = [], {}, {}
    for depth, layer in enumerate(permutation_spec(model).hidden):
        node, reason = _point(gm, layer)
        if node is None:
            skipped[layer] = reason
        elif any(node is n for _, n in found.values()):
            first = next(k for k, (_, n) in found.items() if n is node)
            skipped[layer] = f"its point ({node.name}) is {first}'s"
        else:
            found[layer] = (depth, node)
    with _evaluating(model):
        parameter = next(model.parameters())
        images = torch.zeros(default_example_shape(model), device=parameter.device, dtype=parameter.dtype)
        values = _probe(gm, [node for _, node in found.values()])(images)
    for (layer, (depth, node)), value in zip(found.items(), values):
        if value.dim() < 2:
            skipped[layer] = f"its point ({node.name}) is not a batch of features"
        else:
            points.append(StitchPoint(layer, depth, node.name, tuple(value.shape[1:])))
    return points, skipped


def bottleneck(points):
    """The point with the fewest features per sample (the first of equals): the latent code."""
    return min(points, key=lambda p: p.features)


def select(points, skipped, layers):
    """The points `layers` names: "latent" (the bottleneck), "all", or comma-separated layer names."""
    if not points:
        raise UserError("the model has no stitch point: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if layers == "latent":
        return [bottleneck(points)]
    if layers == "all":
        return list(points)
    by_name = {p.layer: p for p in points}
    names = [name.strip() for name in layers.split(",") if name.strip()]
    if not names or {"all", "latent"} & set(names):
        raise UserError(f"--layers {layers!r}: give latent, all, or layer names (not with latent or all); the "
                        f"stitch points are {', '.join(by_name)}")
    for name in names:
        if name not in by_name:
            why = f"it is skipped ({skipped[name]})" if name in skipped else "the model has no such hidden layer"
            raise UserError(f"cannot stitch at {name}: {why}; the stitch points are {', '.join(by_name)}")
    return sorted((by_name[name] for name in dict.fromkeys(names)), key=lambda p: p.depth)


def _part(gm, outputs, replace=None):
    """A copy of `gm`'s graph returning `outputs` (nodes of gm); with `replace`, that node's value
    is a second input (`stitched`) instead, and what only computed it is gone."""
    graph, env = fx.Graph(), {}
    graph.graph_copy(gm.graph, env)
    graph.output(tuple(env[n] if isinstance(n, fx.Node) else n for n in outputs))
    if replace is not None:
        with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
            stitched = graph.placeholder("stitched")
        env[replace].replace_all_uses_with(stitched)
    return _pruned(fx.GraphModule(gm, graph))


def _cut(gm, layer):
    node, reason = _point(gm, layer)
    if node is None:
        raise UserError(f"cannot stitch at {layer}: {reason}")
    return node


class Stitched(nn.Module):
    """`bottom`'s layers up to the stitch point after `layer`, `stitch_map`, `top`'s layers from
    there on (Bansal et al. 2021). Each part keeps its own modules and BatchNorm statistics (shared
    with `bottom` and `top`, not copied). Of a tuple output, an element computed from the cut comes
    from the top, any other from the bottom (see the module's docstring for a VAE)."""

    def __init__(self, bottom, top, layer, stitch_map):
        super().__init__()
        low, high = trace(bottom), trace(top)
        cut_low, cut_high = _cut(low, layer), _cut(high, layer)
        elements, self.is_tuple = _outputs(high.graph)
        self.from_top = [_reaches(cut_high, e) for e in elements]
        kept = [e for e, top_made in zip(_outputs(low.graph)[0], self.from_top) if not top_made]
        self.bottom = _part(low, [cut_low, *kept])
        self.top = _part(high, [e for e, top_made in zip(elements, self.from_top) if top_made], replace=cut_high)
        self.map, self.layer = stitch_map, layer

    def forward(self, x):
        h, *kept = self.bottom(x)
        made, kept = iter(self.top(x, self.map(h))), iter(kept)
        out = [next(made) if top_made else next(kept) for top_made in self.from_top]
        return tuple(out) if self.is_tuple else out[0]


@torch.no_grad()
def measure(model_a, model_b, points, batches, amp):
    """{layer: Moments} of A's (a) and B's (b) activations at `points`, over `batches` (one pass of
    each model per batch, in evaluation mode, with the mixed precision `amp` the stitched models are
    evaluated with: a map is fitted to the activations it will see, their rounding included)."""
    probes = []
    for model in (model_a, model_b):
        gm = trace(model)
        probes.append(_probe(gm, [_cut(gm, p.layer) for p in points]))
    moments = {p.layer: Moments() for p in points}
    with _evaluating(model_a, model_b):
        for x in batches:
            with autocast(x.device, amp):
                values = probes[0](x), probes[1](x)
            for p, a, b in zip(points, *values):
                if a.shape[1] != b.shape[1]:
                    raise UserError(f"cannot stitch at {p.layer}: A has {a.shape[1]} channels there, B "
                                    f"{b.shape[1]}: a map needs as many on both sides")
                moments[p.layer].add(a, b)
    return moments


def penalty(metrics, ends):
    """{metric: the stitched model's value - the mean of the ends' values} (PSNR negated, so that a
    penalty is always a loss of quality)."""
    return {k: (-1.0 if higher_is_better(k) else 1.0) * (v - (ends[0][k] + ends[1][k]) / 2)
            for k, v in metrics.items() if k in ends[0] and k in ends[1]}


def scorer(session):
    """score(model): its test metrics as `session` (aemc.evaluation.Session) evaluates them, with the
    model's own BatchNorm statistics."""
    return lambda model: evaluate(model, session.test_loader, session.loss_fns, session.image_metrics,
                                  amp=session.speed.amp, beta=session.loss.beta)


def stitch_layers(model_a, model_b, points, kind, batches, amp, score, ends):
    """For each of `points`, both directions (A into B: A's bottom, B's top; B into A): the map of
    `kind` fitted on `batches` (activations in the mixed precision `amp` that `score` evaluates
    with), the stitched model scored by `score` (model -> {metric: value}) and
    its penalty against `ends` (A's and B's scores). Yields (record, {direction: (W, b) as numpy})
    per point: record = {layer, depth, shape, fit_samples (images x positions), directions:
    {direction: {label, metrics, penalty, unexplained}}}."""
    moments = measure(model_a, model_b, points, batches, amp)
    device = next(model_a.parameters()).device
    for p in points:
        record = {"layer": p.layer, "depth": p.depth, "shape": list(p.shape), "fit_samples": moments[p.layer].count,
                  "directions": {}}
        maps = {}
        sides = {"a_into_b": (model_a, model_b, moments[p.layer]),
                 "b_into_a": (model_b, model_a, moments[p.layer].swapped())}
        for key, (bottom, top, m) in sides.items():
            weight, bias = fit(kind, m)
            metrics = score(Stitched(bottom, top, p.layer, ChannelMap(kind, weight, bias).to(device)))
            record["directions"][key] = dict(label=DIRECTIONS[key], metrics=metrics, penalty=penalty(metrics, ends),
                                             unexplained=unexplained(m, weight, bias))
            maps[key] = (weight.numpy(), bias.numpy())
        yield record, maps


def describe(record, loss_name):
    """One line per direction of a stitched point's record (and a warning when the map was fitted on
    fewer samples than twice its channels: a least-squares fit then (nearly) interpolates them)."""
    channels, samples = record["shape"][0], record["fit_samples"]
    few = f" (fitted on only {samples} samples for {channels} channels)" if samples < 2 * channels else ""
    return [f"{record['layer']} (depth {record['depth']}, {tuple(record['shape'])}) {d['label']}: test {loss_name} "
            f"{d['metrics']['loss']:.5f}, penalty {d['penalty']['loss']:+.5f}; the map's relative residual on the "
            f"fitting batches {d['unexplained']:.3f}{few}" for d in record["directions"].values()]
