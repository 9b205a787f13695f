"""Layer-wise interpolation (Adilova, Andriushchenko, Kamp, Fischer, Jaggi, ICLR 2024, "Layer-wise
linear mode connectivity"): the path that interpolates only one group of layers between two
networks and keeps every other layer at the start. Its barrier says how much of the whole
segment's barrier that group carries; Adilova et al. found it in the middle layers of classifiers.

Groups come from the model's modules: each top-level part that holds parameters (the encoder, the
decoder), and each block: a layer that produces hidden units with the normalisation that follows
it (from the permutation symmetry derived by models.symmetry), or any other layer with parameters.

Example::
    >>> groups = layer_groups(model)            # {"encoder": [...], "decoder": [...], "encoder.0": [...], ...}
    >>> path = LayerwisePath(start, end, groups["decoder"])
    >>> walk(path, ts, evaluator, "decoder only")
"""
from aemc.architectures import permutation_spec


def layer_groups(model):
    """{group name: [parameter names]}: the top-level parts, then the blocks in the model's order."""
    names = [name for name, _ in model.named_parameters()]
    groups = {}
    for part, _ in model.named_children():
        members = [n for n in names if n.startswith(part + ".")]
        if members:
            groups[part] = members
    try:
        spec = permutation_spec(model)
        blocks = {p: [n for n, axis in spec.axes[p] if (n, axis) not in spec.consumed[p] and n in names]
                  for p in spec.sizes}
    except NotImplementedError:  # a graph the derivation does not know: one block per layer
        blocks = {}
    covered = {n for members in blocks.values() for n in members}
    for name in names:  # layers outside every block (the output layer, ...) are blocks of their own
        if name not in covered:
            blocks.setdefault(name.rpartition(".")[0], []).append(name)
    order = {n: i for i, n in enumerate(names)}
    for block, members in sorted(blocks.items(), key=lambda item: min(order[n] for n in item[1])):
        if block not in groups:
            groups[block] = sorted(members, key=order.get)
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
