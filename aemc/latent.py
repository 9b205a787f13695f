"""Latent alignment folded into the weights: B's latent space mapped onto A's by an invertible T
that B's own weights absorb, so that B computes exactly what it computed (issue 30, part 2).

Two autoencoders trained from different seeds may encode the same information in latent spaces
that differ by a rotation or another linear map, which no permutation undoes (Moschella et al.,
ICLR 2023, "Relative representations"; Bansal et al., NeurIPS 2021, "Revisiting model stitching").
Where the code is *linear* -- the layer P that makes it and the layers C that read it are joined by
nothing but identities, dropout (in evaluation) and reshapes -- any invertible T (d x d, on the
code's channel axis) folds into the weights exactly:

    P's rows:      W -> T W,  b -> T b      (the code becomes T z)
    C's columns:   W_c -> W_c T^-1          (for a Linear after a flattened feature map: per block of H x W)

`find_latent` picks the code (the hidden layer with the fewest features per sample, traced in
evaluation mode: a VAE's code is its mean) and says why not where T cannot be folded (a Tanh, which
commutes only with signed permutations; another nonlinearity; a normalisation; ...). `fit_map`
fits T on A's and B's codes on training batches, from streamed float64 sums (no code is stored):

    orthogonal:  T = argmin_{T^T T = I} ||Z_b T^T - Z_a||_F = V U^T,  U S V^T = svd(Z_b^T Z_a)
                 (Procrustes; Schoenemann 1966), no centering;
    linear:      T^T = (Z_b^T Z_b)^-1 Z_b^T Z_a  (least squares, no bias).

aemc.alignment.align folds T into B first, then matches the other layers' permutations with the
latent's held at the identity. For a VAE only the reconstruction from the mean is exact: see
`posterior_effect` and docs/usage.md.

Example::
    >>> latent = find_latent(model_b, permutation_spec(model_b))
    >>> fit = fit_map(model_a, model_b, latent, batches, "orthogonal")
    >>> folded = fold(model_b, latent, fit["matrix"])      # the same function; its code is T z
"""
import collections
import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from aemc.channel_maps import procrustes
from aemc.errors import UserError
from aemc.losses import kl_divergence
from models.symmetry import default_example_shape
from models.symmetry_rules import PRODUCERS, RESHAPE_METHODS, RESHAPES, shape_of

MAPS = ("orthogonal", "linear")
PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten)  # linear in evaluation
PASS_METHODS = RESHAPE_METHODS | {"unflatten", "contiguous", "float", "double", "clone"}
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
TANH = "which commutes only with signed permutations"


@dataclass
class Latent:
    """The code: `layer` makes it with `channels` units (a Linear's features, a conv's channels),
    `producers` its layers, `consumers` {layer: features per unit of its input (H x W after a
    Flatten, else 1)}, `returned` whether the model also returns it (a VAE's mean); `reason` says
    why no T folds into the weights (None: any invertible T does)."""
    layer: str
    channels: int
    producers: list
    consumers: dict
    returned: bool = False
    reason: Optional[str] = None


def find_latent(model, spec, example_shape=None):
    """The Latent of `model` among `spec.hidden` (models.symmetry): the layer whose output has the
    fewest features per sample, traced in evaluation mode; of equals (an MLP as wide as its code), the
    first whose code is linear, else the first."""
    was_training = model.training
    model.eval()  # the evaluation graph: a VAE's code is its mean
    try:
        graph = fx.symbolic_trace(model)
        parameter = next(model.parameters())
        shape = example_shape or default_example_shape(model)
        ShapeProp(graph).propagate(torch.zeros(shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
    made = {n.target: n for n in graph.graph.nodes if n.op == "call_module" and n.target in spec.hidden}
    if not made:
        return Latent(None, 0, [], {}, reason=f"{type(model).__name__} has no hidden layer")
    fewest = min(math.prod(shape_of(n)[1:]) for n in made.values())
    equals = sorted((n for n in made.values() if math.prod(shape_of(n)[1:]) == fewest),
                    key=lambda n: spec.hidden.index(n.target))
    found = [_follow(graph, n) for n in equals]
    return next((latent for latent in found if not latent.reason), found[0])


def _follow(graph, start):
    modules = dict(graph.named_modules())
    code = shape_of(start)
    channels, block = code[1], math.prod(code[2:])
    latent = Latent(start.target, channels, [start.target], {})
    calls = collections.Counter(n.target for n in graph.graph.nodes if n.op == "call_module")

    def refuse(why):
        latent.reason = latent.reason or why
        return latent

    producer = modules[start.target]
    if getattr(producer, "groups", 1) > 1:
        return refuse(f"the latent is made by a grouped convolution ({start.target})")
    todo = [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            name = user.target if user.op == "call_module" else getattr(user.target, "__name__", user.target)
            module = modules.get(user.target) if user.op == "call_module" else None
            if user.op == "output":
                result = user.args[0]
                if not isinstance(result, (tuple, list)) or result[0] is node:
                    return refuse("the latent is the model's reconstruction")
                latent.returned = True
            elif user.op == "call_module" and isinstance(module, PRODUCERS):
                shape = shape_of(node)
                if user.args[0] is not node or getattr(module, "groups", 1) > 1:
                    return refuse(f"{user.target} reads the latent in a way the fold does not follow")
                if isinstance(module, nn.Linear) and len(shape) == 2 and shape[1] == channels * block:
                    latent.consumers[user.target] = block
                elif not isinstance(module, nn.Linear) and shape[1] == channels and math.prod(shape[2:]) == block:
                    latent.consumers[user.target] = 1
                else:
                    return refuse(f"{user.target} reads the latent's {channels} units reshaped to {tuple(shape[1:])}")
            elif isinstance(module, nn.Tanh) or name in ("tanh", "Tanh"):
                return refuse(f"the latent passes through Tanh ({user.target if module else user.name}), {TANH}")
            elif isinstance(module, NORMS):
                return refuse(f"the latent is normalised by {user.target} ({type(module).__name__})")
            elif isinstance(module, PASS_MODULES) or (user.op == "call_method" and user.target in PASS_METHODS) or \
                    (user.op == "call_function" and user.target in RESHAPES and user.args[0] is node):
                todo.append(user)
            elif shape_of(user) is None and not isinstance(user.meta.get("tensor_meta"), (list, tuple)):
                continue  # x.size(0), x.shape: not a tensor
            else:
                kind = type(module).__name__ if module is not None else name
                return refuse(f"the latent passes through {kind} ({user.target if module else user.name}), "
                              "which the fold does not follow (not linear, or not per sample)")
    if not latent.consumers:
        return refuse("no layer reads the latent")
    for layer in [start.target, *latent.consumers]:
        if calls[layer] > 1 or any(n.op == "get_attr" and n.target.startswith(layer + ".") for n in graph.graph.nodes):
            return refuse(f"{layer} is used more than once")
    return latent


def fallback_line(latent):
    """The one line said where `latent` cannot take a map."""
    signed = latent.reason.endswith(TANH)
    return f"{latent.reason}: falling back to {'signed ' if signed else ''}permutations"


# ----------------------------------------------------------------------------- fitting


@torch.no_grad()
def code_sums(model_a, model_b, layer, batches):
    """Float64 sums over the codes (the output of `layer`; a feature map's every pixel is one code)
    of both models on `batches`, in evaluation mode: (Z_b^T Z_b, Z_b^T Z_a, ||Z_a||_F^2, count)."""
    codes = {}

    def hook(which):
        def record(module, args, output):  # (N, d) or (N, d, H, W) -> (N * H * W, d)
            codes[which] = output.detach().double().movedim(1, -1).reshape(-1, output.shape[1])
        return record
    handles = [m.get_submodule(layer).register_forward_hook(hook(w)) for w, m in (("a", model_a), ("b", model_b))]
    model_a.eval(), model_b.eval()
    gram = cross = None
    norm, count = 0.0, 0
    try:
        for x in batches or ():
            model_a(x), model_b(x)
            a, b = codes["a"], codes["b"]
            gram = b.T @ b if gram is None else gram + b.T @ b
            cross = b.T @ a if cross is None else cross + b.T @ a
            norm, count = norm + float((a * a).sum()), count + len(a)
    finally:
        for h in handles:
            h.remove()
    if gram is None:
        raise ValueError("the latent map is fitted on training batches: none were given")
    return gram.cpu().numpy(), cross.cpu().numpy(), norm, count


def solve(gram, cross, kind):
    """T (d x d) from the sums of `code_sums`: orthogonal (Procrustes) or linear (least squares)."""
    if kind == "orthogonal":  # Z_b R ~ Z_a with R = T^T
        return procrustes(torch.as_tensor(cross)).numpy().T
    if kind == "linear":
        eigenvalues = np.linalg.eigvalsh(gram)
        if eigenvalues[0] <= 1e-12 * eigenvalues[-1]:
            raise UserError(f"B's codes span {int((eigenvalues > 1e-12 * eigenvalues[-1]).sum())} of "
                            f"{len(gram)} dimensions on the fitting batches: no linear map is determined "
                            "(use the orthogonal map)")
        return np.linalg.solve(gram, cross).T
    raise ValueError(f"unknown latent map {kind!r}: one of {MAPS}")


def residual(gram, cross, norm, matrix):
    """||Z_b T^T - Z_a||_F / ||Z_a||_F from the sums."""
    r = matrix.T
    squared = np.trace(r.T @ gram @ r) - 2 * np.trace(r.T @ cross) + norm
    return float(np.sqrt(max(squared, 0.0) / norm))


def fit_map(model_a, model_b, latent, batches, kind):
    """T bringing B's codes onto A's, fitted on `batches`: the record's entry (plain types): map,
    layer, producers, consumers, matrix, condition number, the fit's relative residual and that of
    the identity (no map), the number of codes."""
    gram, cross, norm, count = code_sums(model_a, model_b, latent.layer, batches)
    matrix = solve(gram, cross, kind)
    return dict(map=kind, layer=latent.layer, producers=list(latent.producers), consumers=dict(latent.consumers),
                returned=latent.returned, matrix=matrix.tolist(), condition=float(np.linalg.cond(matrix)),
                residual=residual(gram, cross, norm, matrix), residual_identity=residual(gram, cross, norm,
                                                                                          np.eye(len(gram))),
                codes=count)


# ----------------------------------------------------------------------------- folding


def _mix(weight, matrix, axis, block):
    """`weight` with its units along `axis` (`block` consecutive entries each) replaced by
    matrix @ units, computed in float64."""
    w = weight.detach().double().movedim(axis, 0)
    mixed = torch.einsum("ij,jbk->ibk", matrix.to(w.device), w.reshape(matrix.shape[1], block, -1))
    return mixed.reshape(w.shape).movedim(0, axis).to(weight.dtype)


def fold(model, latent, matrix):
    """A copy of `model` whose code is T z (T = `matrix`, invertible) and whose function is
    unchanged: the producers' rows and bias multiplied by T, the consumers' columns by T^-1."""
    t = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
    inverse = torch.linalg.inv(t)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for layer in latent.producers:
            m = folded.get_submodule(layer)
            m.weight.copy_(_mix(m.weight, t, 1 if isinstance(m, nn.ConvTranspose2d) else 0, 1))
            if m.bias is not None:
                m.bias.copy_(_mix(m.bias, t, 0, 1))
        for layer, block in latent.consumers.items():
            m = folded.get_submodule(layer)  # W_c T^-1: unit j of the input becomes sum_i (T^-1)[i, j] W_c[:, i]
            m.weight.copy_(_mix(m.weight, inverse.T, 0 if isinstance(m, nn.ConvTranspose2d) else 1, block))
    return folded


def without(spec, layer):
    """`spec` with the permutation of `layer`'s units removed: held at the identity."""
    gone = {p for p, layers in spec.producers.items() if layer in layers}
    keep = lambda d: {p: v for p, v in d.items() if p not in gone}  # noqa: E731
    return dataclasses.replace(spec, sizes=keep(spec.sizes), axes=keep(spec.axes), groups=keep(spec.groups),
                               within=keep(spec.within), producers=keep(spec.producers),
                               consumed=keep(spec.consumed), signed=spec.signed - gone)


def fold_latent(model_a, model_b, spec, kind, batches):
    """(B with the fitted T folded in, `spec` with the latent's permutation held at the identity,
    the record's entry); where the code cannot take a map: (B, spec, the entry with the fallback)."""
    if kind not in MAPS:
        raise ValueError(f"unknown latent map {kind!r}: one of {MAPS}")
    latent = find_latent(model_b, spec)
    if latent.reason:
        return model_b, spec, dict(map=kind, layer=latent.layer, fallback=fallback_line(latent))
    entry = fit_map(model_a, model_b, latent, batches, kind)
    return fold(model_b, latent, entry["matrix"]), without(spec, latent.layer), entry


def replay(model, spec, entry):
    """(model, spec) as `fold_latent` left them, from its recorded entry (a fallback: unchanged)."""
    if "matrix" not in entry:
        return model, spec
    latent = find_latent(model, spec)
    if latent.reason or latent.layer != entry["layer"]:
        raise UserError(f"the recorded latent map was fitted at {entry['layer']}; this model's latent is "
                        f"{latent.layer}{' (' + latent.reason + ')' if latent.reason else ''}")
    return fold(model, latent, entry["matrix"]), without(spec, latent.layer)


def describe(entry):
    """One line on a record's latent entry."""
    if "fallback" in entry:
        return entry["fallback"]
    returned = "; the model returns the code too (a VAE's mean is now T mu)" if entry["returned"] else ""
    return (f"latent map ({entry['map']}) at {entry['layer']}, read by {', '.join(entry['consumers'])}: relative "
            f"residual {entry['residual_identity']:.4f} without the map, {entry['residual']:.4f} with it, "
            f"condition number {entry['condition']:.3g}, on {entry['codes']} codes{returned}")


# ----------------------------------------------------------------------------- a VAE's posterior


@torch.no_grad()
def posterior_effect(original, folded, batches, loss, seed):
    """What folding changes in a VAE-like model (forward returns (reconstruction, mean,
    log-variance), `decode(z)`): the mean KL per pixel value (aemc.losses.kl_divergence) and the
    mean `loss` of the reconstruction of one posterior sample z = mean + exp(logvar / 2) * noise,
    the noise drawn from `seed` (the same for both models), both in evaluation mode. The folded
    posterior is N(T mu, diag sigma^2), the exact push-forward N(T mu, T diag(sigma^2) T^T): only
    the reconstruction from the mean is exact, and for an orthogonal T the KL. Returns {kl_before,
    kl_after, sampled_before, sampled_after}."""
    out = {}
    for when, model in (("before", original), ("after", folded)):
        model.eval()
        generator, kl, sampled, count = None, 0.0, 0.0, 0
        for x in batches:
            generator = generator or torch.Generator(device=x.device).manual_seed(seed)
            _, mean, logvar = model(x)
            noise = torch.randn(mean.shape, generator=generator, device=x.device, dtype=mean.dtype)
            sampled += float(loss(model.decode(mean + torch.exp(0.5 * logvar) * noise), x)) * len(x)
            kl += float(kl_divergence(mean, logvar, x[0].numel()).sum())
            count += len(x)
        out[f"kl_{when}"], out[f"sampled_{when}"] = kl / count, sampled / count
    return out
