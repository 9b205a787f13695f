"""REPAIR on every hidden layer (issue 27, part 5). For every built-in architecture and the example
model, the hidden layers that no BatchNorm follows are listed here from the order in which the
model's modules run (independently of aemc.repair.layers_to_repair); after REPAIR at t = 0.25 and
0.5 each one's per-channel mean and std over the BatchNorm batches equal (1 - t) * end A's + t *
end B's, the ends measured here with hooks of our own (Jordan et al. 2022, "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair": the statistics of every repaired unit at the point
are the interpolation of the ends')."""
import pytest
import torch
from torch import nn

from aemc import architectures, repair
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import synthetic_faces
from aemc.evaluation import PointEvaluator
from models.curves import connect

WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
# name: (factory, tiny arguments, the data's (channels, size))
CASES = {
    "conv-batch": ("conv", dict(in_filters=4, latent_dim=8, norm="batch"), (3, 16)),
    "conv-group": ("conv", dict(in_filters=4, latent_dim=8, norm="group"), (3, 16)),
    "conv-layer": ("conv", dict(in_filters=4, latent_dim=8, norm="layer"), (3, 16)),
    "conv-none": ("conv", dict(in_filters=4, latent_dim=8, norm="none"), (3, 16)),
    "resnet-batch": ("resnet", dict(in_filters=4, latent_dim=8, norm="batch"), (3, 16)),
    "resnet-group": ("resnet", dict(in_filters=4, latent_dim=8, norm="group"), (3, 16)),
    "resnet-layer": ("resnet", dict(in_filters=4, latent_dim=8, norm="layer"), (3, 16)),
    "resnet-none": ("resnet", dict(in_filters=4, latent_dim=8, norm="none"), (3, 16)),
    "vae": ("vae", dict(in_filters=4, latent_dim=8), (3, 16)),
    "mlp": ("mlp", dict(hidden=16, latent_dim=8), (1, 12)),
    "user": ("examples.my_autoencoder:build", dict(width=4, latent_dim=8, groups=2), (1, 12)),
}


def build(case, seed):
    name, kwargs, (channels, size) = CASES[case]
    architectures.allow(name)
    torch.manual_seed(seed)
    return architectures.build(architectures.resolve(name, kwargs, (channels, size, size)))


def images(case, n):
    channels, size = CASES[case][2]
    x = synthetic_faces(n, size=size)
    return x[:, :1] if channels == 1 else x


def hidden_layers_without_batchnorm(model, x):
    """Weighted layers in the order they run, but the last (it produces the reconstruction), and
    those whose output goes straight into a BatchNorm (the next module to run is one)."""
    order = []
    handles = [m.register_forward_hook(lambda m, i, o, name=name: order.append((name, m)))
               for name, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    weighted = [i for i, (_, m) in enumerate(order) if isinstance(m, WEIGHTED)][:-1]
    return [order[i][0] for i in weighted
            if not isinstance(order[i + 1][1], nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def statistics(module, layers, batches):
    """{layer: (mean, std)} per output channel of each layer (as the next layer sees it), over
    `batches`, in eval mode, float64."""
    sums = {name: [0, 0.0, 0.0] for name in layers}

    def record(name):
        def hook(m, inputs, output):
            values = output.transpose(0, 1).reshape(output.shape[1], -1).double()
            sums[name][0] += values.shape[1]
            sums[name][1] += values.sum(1)
            sums[name][2] += (values ** 2).sum(1)
        return hook
    # registered after REPAIR's own hooks: they see the corrected output
    handles = [module.get_submodule(name).register_forward_hook(record(name)) for name in layers]
    module.eval()
    for x in batches:
        module(x)
    for h in handles:
        h.remove()
    return {name: (s / n, (q / n - (s / n) ** 2).sqrt()) for name, (n, s, q) in sums.items()}


def test_the_repaired_layers_are_every_hidden_layer_no_batchnorm_follows():
    for case in CASES:
        model = build(case, 0)
        x = images(case, 4).float() / 127.5 - 1
        assert sorted(repair.layers_to_repair(model)) == sorted(hidden_layers_without_batchnorm(model, x)), case


FAST = ("resnet-batch", "vae", "mlp", "user")  # the others, seconds each on 2 cores, in the slow tier


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_after_repair_every_hidden_layer_has_the_interpolated_statistics(case):
    a, b = build(case, 0), build(case, 1)
    train = TensorLoader(images(case, 64), 32)
    batches = [x for x in train]
    layers = hidden_layers_without_batchnorm(a, batches[0])
    evaluator = PointEvaluator(a, train, train, {"loss": nn.L1Loss()}, bn_batches=2,
                               repair_layers=repair.layers_to_repair(a), beta=4.0)  # beta: only the VAE's loss uses it
    segment = connect(a, b)
    ends = []
    for t in (0.0, 1.0):
        evaluator(segment.weights(t))  # BatchNorm re-estimated at the end, REPAIR off
        ends.append(statistics(evaluator.module, layers, batches))
    for t in (0.25, 0.5):
        targets = repair.interpolate([evaluator.statistics(segment.weights(s)) for s in (0.0, 1.0)], (1 - t, t))
        evaluator(segment.weights(t), repair_targets=targets)
        measured = statistics(evaluator.module, layers, batches)
        for name in layers:
            mean = (1 - t) * ends[0][name][0] + t * ends[1][name][0]
            std = (1 - t) * ends[0][name][1] + t * ends[1][name][1]
            # 1e-4 of each channel's scale: an activation held in float32 is known to ~6e-8 of its
            # magnitude, which for a channel with |mean| >> std (conv-none's decoder.0: 1e3) is 6e-5 of its std
            scale = std + mean.abs()
            assert ((measured[name][0] - mean).abs() <= 1e-4 * scale).all(), (name, t)
            assert ((measured[name][1] - std).abs() <= 1e-4 * scale).all(), (name, t)
