import numpy as np
import pytest
import torch

from aemc.losses import LaplacianPyramidLoss, build_loss, laplacian_pyramid, reconstruct

K1 = np.array([1, 4, 6, 4, 1], dtype=np.float64)
KERNEL = np.outer(K1, K1) / 256.0


def np_blur(img, kernel):
    """Direct 5x5 correlation with reflect padding, written with loops (independent of torch)."""
    h, w = img.shape
    padded = np.pad(img, 2, mode="reflect")
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            out[i, j] = (padded[i:i + 5, j:j + 5] * kernel).sum()
    return out


def np_pyramid(img, levels):
    bands, current = [], img
    for _ in range(levels):
        down = np_blur(current, KERNEL)[::2, ::2]
        up = np.zeros((2 * down.shape[0], 2 * down.shape[1]))
        up[::2, ::2] = down
        bands.append(current - np_blur(up, 4 * KERNEL))
        current = down
    return bands


def test_pyramid_matches_an_independent_loop_implementation():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 3, 16, 16))
    b = rng.uniform(-1, 1, (2, 3, 16, 16))
    expected = 0.0
    band_a = [[np_pyramid(a[n, c], 3) for c in range(3)] for n in range(2)]
    band_b = [[np_pyramid(b[n, c], 3) for c in range(3)] for n in range(2)]
    for level in range(3):
        diffs = [np.abs(band_a[n][c][level] - band_b[n][c][level]) for n in range(2) for c in range(3)]
        expected += np.mean(np.stack(diffs))
    got = LaplacianPyramidLoss(max_levels=3)(torch.tensor(a), torch.tensor(b)).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_hand_computed_case_constant_image_has_no_band_energy():
    # a constant image: blurring (reflect padding) keeps it constant, zero insertion + 4x kernel
    # restores it exactly (the even taps of [1,4,6,4,1]/16 sum to 1/2 in each direction),
    # so every band is 0 and the loss between two constant images of different values is 0
    x = torch.full((1, 3, 32, 32), 0.3, dtype=torch.float64)
    y = torch.full((1, 3, 32, 32), -0.7, dtype=torch.float64)
    bands, residual = laplacian_pyramid(x, 4)
    assert all(b.abs().max() < 1e-12 for b in bands)
    assert torch.allclose(residual, torch.full_like(residual, 0.3))
    assert LaplacianPyramidLoss(4)(x, y).item() == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_case_single_level_of_a_checkerboard():
    # a +-1 checkerboard: every row/column of the blur sees 1-4+6-4+1 = 0 (reflect padding keeps
    # the alternation at the borders), so the blurred and downsampled image is 0, band 0 equals the
    # image itself, and its loss against a zero image is mean |board| = 1
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    board = torch.tensor(np.where((i + j) % 2 == 0, 1.0, -1.0))[None, None].repeat(1, 3, 1, 1)
    assert LaplacianPyramidLoss(1)(board, torch.zeros_like(board)).item() == pytest.approx(1.0)


def test_reconstruction_from_bands_and_residual_is_exact():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 2 - 1
    bands, residual = laplacian_pyramid(x, 5)
    assert [b.shape[-1] for b in bands] == [64, 32, 16, 8, 4] and residual.shape[-1] == 2
    assert torch.allclose(reconstruct(bands, residual), x, atol=1e-12)


def test_zero_on_identical_images_and_positive_otherwise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss = LaplacianPyramidLoss()
    assert loss(x, x).item() == 0.0
    assert loss(x, x + 0.1 * torch.randn_like(x)).item() > 0


def test_residual_option_and_level_weights():
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    base = LaplacianPyramidLoss(3)(x, y)
    _, rx = laplacian_pyramid(x, 3)
    _, ry = laplacian_pyramid(y, 3)
    with_res = LaplacianPyramidLoss(3, residual=True)(x, y)
    assert with_res.item() == pytest.approx(base.item() + (rx - ry).abs().mean().item())
    assert LaplacianPyramidLoss(3, weights=[2, 2, 2])(x, y).item() == pytest.approx(2 * base.item())


def test_too_many_levels_for_the_image_is_an_error():
    with pytest.raises(ValueError, match="too many"):
        LaplacianPyramidLoss(6)(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))


def test_mae_is_mean_absolute_error():
    x = torch.tensor([[[[0.0, 1.0], [-1.0, 0.5]]]])
    y = torch.zeros_like(x)
    assert build_loss("mae")(x, y).item() == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        build_loss("mse")
