import math

import pytest
import torch
from torch import nn

from models.autoencoder import Autoencoder, count_parameters


def test_default_architecture_has_the_original_parameter_count():
    assert count_parameters(Autoencoder()) == 17_944_512


def test_parameter_count_formula_for_other_widths():
    # by hand: encoder convs 16*(3f + 2f^2 + 8f^2 + 32f^2 + 64f^2), BN 2*(2f+4f+8f), linears,
    # decoder convs 25*(64f^2 + 32f^2 + 8f^2 + 2f^2 + 3f), BN 2*(8f+4f+2f+f)
    for f, z in [(4, 8), (16, 32)]:
        enc = 16 * (3 * f + 2 * f * f + 8 * f * f + 32 * f * f + 64 * f * f) + 2 * 14 * f + 8 * f * z + z
        dec = z * 8 * f + 8 * f + 25 * (64 * f * f + 32 * f * f + 8 * f * f + 2 * f * f + 3 * f) + 2 * 15 * f
        assert count_parameters(Autoencoder(in_filters=f, latent_dim=z)) == enc + dec


def test_output_shape_range_and_latent():
    torch.manual_seed(0)
    model = Autoencoder(in_filters=8, latent_dim=16).eval()
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    z = model.encode(x)
    y = model(x)
    assert z.shape == (5, 16) and z.abs().max() <= 1
    assert y.shape == x.shape and y.abs().max() <= 1
    assert torch.allclose(model.decode(z), y)


def test_convolutions_have_no_bias_and_layers_are_as_specified():
    model = Autoencoder(in_filters=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5 + [(5, 5)] * 5
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 7
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert all(a.negative_slope == 0.2 for a in acts)
    assert all(d.p == 0.05 for d in model.modules() if isinstance(d, nn.Dropout))


def _conv_weights(model):
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("scheme", ["normal", "kaiming_normal", "kaiming_uniform"])
def test_init_schemes_statistics(scheme):
    torch.manual_seed(0)
    model = Autoencoder(in_filters=32, conv_init=scheme)
    gain = math.sqrt(2.0 / (1 + 0.2 ** 2))
    for w in _conv_weights(model):
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        if w.numel() < 20_000:
            continue  # too few samples for a tight statistical check
        if scheme == "normal":
            expected_std = 0.02
        elif scheme == "kaiming_normal":
            expected_std = gain / math.sqrt(fan_in)
        else:  # uniform on [-b, b] with b = gain * sqrt(3 / fan_in): std = b / sqrt(3)
            bound = gain * math.sqrt(3.0 / fan_in)
            expected_std = bound / math.sqrt(3)
            assert w.abs().max() <= bound
        assert abs(w.std().item() / expected_std - 1) < 0.05
        assert abs(w.mean().item()) < 0.05 * expected_std * 10
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.bias == 0)
        assert abs(bn.weight.mean().item() - 1) < 0.01 and bn.weight.std().item() < 0.03


def test_init_schemes_differ_and_unknown_is_rejected():
    torch.manual_seed(0)
    a = _conv_weights(Autoencoder(in_filters=8, conv_init="normal"))[2]
    torch.manual_seed(0)
    b = _conv_weights(Autoencoder(in_filters=8, conv_init="kaiming_normal"))[2]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        Autoencoder(conv_init="xavier")
