"""Layer-wise groups (Adilova et al., ICLR 2024): one group per layer (a convolution or linear layer
with its normalisation), the encoder and the decoder as halves; a residual stream's shared
permutation does not merge layers."""
import torch
from torch import nn

from aemc import architectures
from aemc.layerwise import layer_groups


def test_a_residual_networks_layers_are_groups_of_their_own():
    model = architectures.build(architectures.resolve("resnet", dict(in_filters=4, latent_dim=8, norm="batch"),
                                                      (3, 32, 32)))
    groups = layer_groups(model)
    # the stem and the second convolution of the first block share one permutation; they are two layers
    assert groups["encoder.0"] == ["encoder.0.weight", "encoder.1.weight", "encoder.1.bias"]
    assert groups["encoder.3.conv2"] == ["encoder.3.conv2.weight", "encoder.3.norm2.weight", "encoder.3.norm2.bias"]
    names = {n for n, _ in model.named_parameters()}
    assert set(groups["encoder"]) | set(groups["decoder"]) == names
    layers = [g for k, g in groups.items() if k not in ("encoder", "decoder")]
    assert sorted(n for g in layers for n in g) == sorted(names)  # every parameter in exactly one layer
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == len(weighted)  # one group per convolution or linear layer


def test_a_norm_joins_the_layer_before_it_and_a_loose_parameter_is_its_own_group():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Conv2d(2, 2, 1))
            self.scale = nn.Parameter(torch.ones(1, 2, 1, 1))
            self.decoder = nn.Sequential(nn.ConvTranspose2d(2, 1, 3), nn.LayerNorm(3))

    groups = layer_groups(Model())
    assert groups["encoder.0"] == ["encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias"]
    assert groups["encoder.3"] == ["encoder.3.weight", "encoder.3.bias"]
    assert groups["decoder.0"] == ["decoder.0.weight", "decoder.0.bias", "decoder.1.weight", "decoder.1.bias"]
    assert groups["(model)"] == ["scale"]
