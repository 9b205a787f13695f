"""Layer-wise interpolation (Adilova, Andriushchenko, Kamp, Fischer, Jaggi, ICLR 2024, "Layer-wise
linear mode connectivity"): the path that interpolates only one group of layers between two
networks and keeps every other layer at the start. Its barrier says how much of the whole
segment's barrier that group carries; Adilova et al. found it in the middle layers of classifiers.

Groups are the model's top-level parts that hold parameters (the encoder and the decoder, as
halves) and then each *layer*, as Adilova et al. define it: a convolution, transposed convolution
or linear layer with the normalisation that follows it in the model's order of modules. Layers
that share a permutation (a residual stream's stem and every block's second convolution) are
still separate layers here. Parameters of any other module are a group of their own.

Example::
    >>> groups = layer_groups(model)            # {"encoder": [...], "decoder": [...], "encoder.0": [...], ...}
    >>> path = LayerwisePath(start, end, groups["decoder"])
    >>> walk(path, ts, evaluator, "decoder only")
"""
from torch import nn

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def layer_groups(model):
    """{group name: [parameter names]}: the top-level parts, then the layers in the model's order,
    each with the parameters of the normalisation that follows it."""
    groups = {}
    names = [name for name, _ in model.named_parameters()]
    for part, _ in model.named_children():
        members = [n for n in names if n.startswith(part + ".")]
        if members:
            groups[part] = members
    layers, current = {}, None
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, LAYERS):
            current = name
            layers[name] = own
        elif isinstance(module, NORMS) and current is not None:
            layers[current] += own  # the normalisation of the layer before it
        elif own:
            layers.setdefault(name or "(model)", []).extend(own)
    for layer, members in layers.items():
        if members and layer not in groups:
            groups[layer] = members
    return groups


class LayerwisePath:
    """theta(t): `start` everywhere except the parameters named in `group`, which go linearly from
    `start` to `end` ({name: tensor} both)."""

    def __init__(self, start, end, group):
        self.start, self.end, self.group = start, end, set(group)
        unknown = self.group - set(start)
        if unknown:
            raise ValueError(f"the group names parameters the model does not have: {sorted(unknown)[:3]}")

    def weights(self, t):
        return {n: self.start[n] + t * (self.end[n] - self.start[n]) if n in self.group else self.start[n]
                for n in self.start}
