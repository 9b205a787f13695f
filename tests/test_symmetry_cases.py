"""The symmetry derivation on the layers users write that our own architectures do not use: each
model below once got a permutation that changed its function (issue 27, bugs 4-6) or had no rule
(ConvTranspose2d). For each: a random permutation the derivation allows, applied to a copy whose
parameters and BatchNorm statistics are all distinct, computes the same output in float64."""
import copy

import pytest
import torch
from symmetry_grammar import randomised  # float64, eval mode, every parameter and BatchNorm statistic distinct
from torch import nn

from models.symmetry import apply_permutation, permutation_spec, random_permutation


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the models' initial weights


def change_under_permutations(model, shape, draws=5):
    """The largest change of the output, relative to its largest entry, over `draws` random
    permutations of the derived symmetry (with signs where it allows them)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spec = permutation_spec(copy.deepcopy(model).float(), example_shape=shape)
    with torch.no_grad():
        out = model(x)
        worst = 0.0
        for seed in range(draws):
            perms, signs = random_permutation(spec, torch.Generator().manual_seed(seed))
            other = copy.deepcopy(model)
            other.load_state_dict(apply_permutation(spec, model.state_dict(), perms, signs))
            worst = max(worst, ((other(x) - out).abs().max() / out.abs().max()).item())
    return spec, worst


def moved(spec, tensor, axis):
    return any((tensor, axis) in axes for axes in spec.axes.values())


class Scaled(nn.Module):
    """Per-channel parameters multiplied and divided into an activation (bug 4)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(1, 6, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, 6, 1, 1))
        self.conv2 = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x)) * self.gamma
        return self.conv2(h / (self.scale.abs() + 1))


def test_per_channel_parameters_multiplied_into_an_activation_move_with_its_channels():
    spec, change = change_under_permutations(randomised(Scaled(), 0), (3, 2, 5, 5))
    assert change < 1e-9
    assert moved(spec, "conv1.weight", 0) and moved(spec, "gamma", 1) and moved(spec, "scale", 1)


class TwoGroupCounts(nn.Module):
    """A residual stream normalised by GroupNorms with different group counts (bug 5)."""

    def __init__(self, stem_groups, block_groups, channels=16):
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.norm0 = nn.GroupNorm(stem_groups, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(block_groups, channels)
        self.head = nn.Conv2d(channels, 2, 1)

    def forward(self, x):
        h = torch.relu(self.norm0(self.stem(x)))
        h = h + self.norm1(self.conv(h))
        return self.head(torch.relu(h))


def test_two_group_norms_with_different_counts_on_one_stream():
    for stem_groups, block_groups in ((4, 8), (8, 4), (2, 8), (4, 1)):
        spec, change = change_under_permutations(randomised(TwoGroupCounts(stem_groups, block_groups), 0), (3, 2, 6, 6))
        assert change < 1e-9, (stem_groups, block_groups)
        assert moved(spec, "stem.weight", 0) and moved(spec, "conv.weight", 0)


class WidthNorm(nn.Module):
    """nn.LayerNorm((W,)) on an NCHW activation normalises over its width, not its channels (bug 6)."""

    def __init__(self, channels=8, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(2, channels, 3, padding=1)
        self.norm = nn.LayerNorm((width,))
        self.conv2 = nn.Conv2d(channels, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.tanh(self.norm(self.conv1(x))))


def test_a_layer_norm_over_the_width_is_not_a_channel_norm():
    spec, change = change_under_permutations(randomised(WidthNorm(), 0), (3, 2, 8, 8))
    assert change < 1e-9
    assert moved(spec, "conv1.weight", 0)  # the channels still move, the width's weight does not
    assert not moved(spec, "norm.weight", 0)


class TransposedDecoder(nn.Module):
    """A decoder of ConvTranspose2d layers (stride, output_padding, groups): weights (in, out / groups, kH, kW)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=2, padding=1)
        self.up1 = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=1, padding=1, groups=2)
        self.out = nn.ConvTranspose2d(4, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.norm(self.up1(h)))
        return self.out(torch.relu(self.up2(h)))


def test_transposed_convolutions_are_permuted_along_their_output_axis():
    spec, change = change_under_permutations(randomised(TransposedDecoder(), 0), (3, 3, 8, 8))
    assert change < 1e-9
    assert moved(spec, "up1.weight", 1) and moved(spec, "up1.bias", 0) and moved(spec, "up1.weight", 0)
    assert moved(spec, "norm.running_mean", 0) and moved(spec, "up2.weight", 0)
    # a grouped transposed convolution's outputs (axis 1 holds one group's) stay in place, and are named
    assert not moved(spec, "up2.weight", 1) and any("up2" in line for line in spec.fixed)


def test_the_derivation_runs_a_float64_model_in_float64():
    model = randomised(TransposedDecoder(), 0)
    assert permutation_spec(model, example_shape=(2, 3, 8, 8)).axes == \
        permutation_spec(copy.deepcopy(model).float(), example_shape=(2, 3, 8, 8)).axes
