"""Model stitching (issue 30, part 1; Bansal et al., NeurIPS 2021): the maps' fits against numpy's and
scipy's own solutions of the same problems, the stitched model against the model it is cut from,
on every built-in architecture, the example model and models drawn from the grammar of the layers
users write, and stitch.py / eval_curve.py --stitch end to end.

Identities checked exactly (to float round-off): a model stitched into itself with the identity map
computes what it computes (the parts run the same operations in the same order); stitched into a
copy of itself with its units permuted, with the permutation map fitted on activations, too."""
import copy
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from symmetry_grammar import build as build_drawn
from symmetry_grammar import recipes
from test_repair_layers import CASES, build, images

from aemc import reports
from aemc.channel_maps import ChannelMap, Moments, fit, unexplained
from aemc.files import file_digest
from aemc.stitching import Stitched, measure, stitch_points
from conftest import run_script
from models.symmetry import apply_permutation, permutation_spec, random_permutation


def streamed(a, b, pieces):
    """Moments of the pairs (a, b) added in `pieces` batches."""
    moments = Moments()
    for x, y in zip(torch.tensor_split(a, pieces), torch.tensor_split(b, pieces)):
        moments.add(x, y)
    return moments


def rows(h):
    """(N * positions, C) as numpy, written out here: channel axis 1 last, then flattened."""
    h = h.numpy()
    return np.moveaxis(h, 1, -1).reshape(-1, h.shape[1])


def pairs(shape, seed):
    """Bottom activations and a top that is a noisy affine function of them, float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, shape[1]).view(
        1, -1, *[1] * (len(shape) - 2)) + 0.3
    c = shape[1]
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    b = (a.movedim(1, -1) @ mix + torch.randn(c, generator=g, dtype=torch.float64)).movedim(-1, 1)
    return a, b + 0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(60, 5), (7, 4, 3, 5)], ids=["features", "feature map"])
def test_procrustes_and_least_squares_are_scipys_and_numpys_solutions_streamed_over_batches(shape):
    a, b = pairs(shape, 0)
    ha, hb = rows(a), rows(b)
    for pieces in (1, 3):
        moments = streamed(a, b, pieces)
        rotation, shift = fit("orthogonal", moments)
        np.testing.assert_allclose(rotation.numpy(), scipy.linalg.orthogonal_procrustes(ha, hb)[0], atol=1e-10)
        assert not shift.any()
        weight, bias = fit("affine", moments)
        design = np.hstack([ha, np.ones((len(ha), 1))])
        solution = np.linalg.lstsq(design, hb, rcond=None)[0]
        np.testing.assert_allclose(weight.numpy(), solution[:-1], atol=1e-9)
        np.testing.assert_allclose(bias.numpy(), solution[-1], atol=1e-9)
        for w, v in ((rotation, shift), (weight, bias)):  # the residual, from the moments alone
            direct = ((ha @ w.numpy() + v.numpy() - hb) ** 2).sum() / (hb ** 2).sum()
            assert unexplained(moments, w, v) == pytest.approx(direct, rel=1e-8)
        # and the module applies h W + b on the channel axis, at every position
        mapped = ChannelMap("affine", weight, bias).double()(a)
        np.testing.assert_allclose(rows(mapped), ha @ weight.numpy() + bias.numpy(), atol=1e-5)


def test_the_permutation_map_recovers_a_planted_channel_permutation():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 6, 4, 4, generator=g, dtype=torch.float64) * 3 + 1
    perm = torch.randperm(6, generator=g)  # the top's channel j is the bottom's channel perm[j]
    b = a[:, perm] * 2 - 0.5 + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)  # correlation, not equality
    weight, bias = fit("permutation", streamed(a, b, 2))
    expected = np.zeros((6, 6))
    expected[perm.numpy(), np.arange(6)] = 1
    np.testing.assert_array_equal(weight.numpy(), expected)
    assert torch.equal(ChannelMap("permutation", weight, bias)(a), a[:, perm])


def outputs(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out if isinstance(out, tuple) else (out,)


def largest_difference(model, x, expected):
    return max((p - q).abs().max().item() for p, q in zip(outputs(model, x), expected))


FAST = ("conv-batch", "conv-group", "conv-none", "resnet-batch", "vae", "mlp", "user")  # the others: slow tier


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_a_model_stitched_into_itself_is_the_model_with_the_identity_and_with_a_fitted_affine_map(case):
    model = build(case, 0)
    x = images(case, 72).float() / 127.5 - 1
    fitting, held_out = x[:64], x[64:]  # more samples than the widest point's 32 units, even at 1x1
    points, _ = stitch_points(model)
    assert len(points) >= 3
    moments = measure(model, model, points, [fitting[:32], fitting[32:]], amp="none")
    expected = outputs(model, held_out)
    for p in points:
        identity = Stitched(model, model, p.layer, ChannelMap("identity", *fit("identity", moments[p.layer])))
        assert largest_difference(identity, held_out, expected) <= 1e-6, p  # in fact 0: the same operations
        weight, bias = fit("affine", moments[p.layer])
        affine = Stitched(model, model, p.layer, ChannelMap("affine", weight, bias))
        # the affine fit of A onto A is the identity (on the units that vary; a unit constant on the
        # fitting images is its mean): float32 activations through a float32 map, 1e-4 of outputs in [-1, 1]
        assert largest_difference(affine, held_out, expected) <= 1e-4, p


def test_points_inside_a_residual_block_and_a_vaes_log_variance_are_skipped_with_their_reasons():
    resnet, vae = build("resnet-batch", 0), build("vae", 0)
    points, skipped = stitch_points(resnet)
    inner = [name for name in permutation_spec(resnet).hidden if name.endswith("conv1")]
    assert inner and set(inner) == set(skipped), skipped  # a block's first layer: the skip goes around it
    assert all("skip connection" in skipped[name] for name in inner)
    assert {p.layer for p in points} >= {"encoder.3.conv2", "encoder.8", "decoder.0"}  # after a block: a cut
    points, skipped = stitch_points(vae)
    assert list(skipped) == ["logvar"] and "reconstruction" in skipped["logvar"]
    assert "mean" in [p.layer for p in points]


def test_a_vae_stitched_at_its_mean_keeps_the_bottoms_log_variance_and_maps_its_mean():
    a, b = build("vae", 0), build("vae", 1)
    x = images("vae", 4).float() / 127.5 - 1
    weight = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]
    rotation = ChannelMap("orthogonal", weight, torch.zeros(8))
    reconstruction, mean, logvar = outputs(Stitched(a, b, "mean", rotation), x)
    _, mean_a, logvar_a = outputs(a, x)
    torch.testing.assert_close(mean, mean_a @ weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logvar, logvar_a, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reconstruction, b.decode(mean_a @ weight), rtol=0, atol=1e-6)


DRAWN = settings(max_examples=15, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def identifiable(moments):
    """Whether the fitting activations single out one pairing of channels by correlation: each of the
    bottom's channels varies, and no two are perfectly correlated (one an affine function of the
    other: a one-channel input through a 1x1 convolution, a GroupNorm of two units, ...)."""
    n = moments.count
    total, _, squares, _, _ = (t.numpy() for t in moments.terms)
    mean = total / n
    cov = squares / n - np.outer(mean, mean)
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    if (std <= 1e-6 * std.max()).any():
        return False
    correlation = cov / np.outer(std, std)
    return bool((np.abs(correlation - np.eye(len(std))) < 1 - 1e-6).all())


@DRAWN
@given(recipes())
def test_a_drawn_model_stitched_into_itself_or_a_permuted_copy_reproduces_its_output(recipe):
    """Into itself with the identity map; into a copy of itself whose units are permuted (models.symmetry,
    no signs) with the orthogonal map (Procrustes reproduces the copy's activations exactly where an
    orthogonal map can: on the fitting images, whatever their rank) and with the permutation map
    where correlations identify it (on held-out images; 96% of the points of 200 drawn models, and
    it was right at all of them). Float64: round-off ~1e-15 of the output, a wrong pairing of units
    ~1e-1."""
    model = build_drawn(recipe)
    in_channels, size, _, _ = recipe
    g = torch.Generator().manual_seed(0)
    x = torch.randn((18, in_channels, size, size), generator=g, dtype=torch.float64)
    points, _ = stitch_points(model)
    spec = permutation_spec(copy.deepcopy(model).float(), example_shape=(2, in_channels, size, size))
    permuted = copy.deepcopy(model)
    perms, _ = random_permutation(spec, torch.Generator().manual_seed(1), signs=False)
    permuted.load_state_dict(apply_permutation(spec, model.state_dict(), perms))
    fitting, held_out = x[:12], x[12:]
    moments = measure(model, permuted, points, [fitting[:6], fitting[6:]], amp="none")
    expected, expected_fitting = outputs(model, held_out), outputs(model, fitting)
    scale = expected[0].abs().max().item()
    for p in points:
        identity = Stitched(model, model, p.layer, ChannelMap("identity", *fit("identity", moments[p.layer])))
        assert largest_difference(identity, held_out, expected) <= 1e-12 * scale, p
        rotated = Stitched(model, permuted, p.layer, ChannelMap("orthogonal", *fit("orthogonal", moments[p.layer])))
        # where the fitting activations are rank-deficient the SVD pairs directions of round-off size
        # arbitrarily: sqrt(1e-16) of the output (4e-7 seen in 324 points of 200 drawn models), not 1e-15
        assert largest_difference(rotated, fitting, expected_fitting) <= 1e-5 * scale, p
        if identifiable(moments[p.layer]):
            matched = Stitched(model, permuted, p.layer,
                               ChannelMap("permutation", *fit("permutation", moments[p.layer])))
            assert largest_difference(matched, held_out, expected) <= 1e-9 * scale, p


# the tiny ends' run, on its first 60 images only (48 train, 12 test): each stitched model scored in a blink
FEW = ["--max_images", "60", "--batch_size", "16", "--device", "cpu", "--num_workers", "0"]


def check_penalties(layers, ends):
    """Every penalty is the stitched metric minus the mean of the ends' (PSNR's negated)."""
    for record in layers:
        for d in record["directions"].values():
            for metric, value in d["metrics"].items():
                sign = -1 if metric == "psnr" else 1
                assert d["penalty"][metric] == pytest.approx(sign * (value - (ends["A"][metric] + ends["B"][metric]) / 2),
                                                             abs=1e-12), (record["layer"], metric)


@pytest.mark.slow
def test_stitch_py_writes_its_outputs_and_a_model_stitched_into_itself_has_no_penalty(ends, tmp_path):
    r = run_script("stitch.py", "--init_start", ends[0], "--init_end", ends[1], "--layers", "all", "--map", "affine",
                   "--fit_batches", "2", "--dir", tmp_path / "ab", *FEW)
    assert r.returncode == 0, r.stderr
    report = reports.read_stitch(tmp_path / "ab" / "stitch-affine.json")
    assert all(os.path.isfile(tmp_path / "ab" / name) for name in report["files"].values())
    assert set(report["files"]) == {"npz", "table", "plot", "json"}
    layers = report["layers"]
    assert len(layers) >= 8 and [r["depth"] for r in layers] == sorted(r["depth"] for r in layers)
    assert len(r.stdout.splitlines()) >= 2 * len(layers)  # one line per layer and direction
    check_penalties(layers, report["ends"])
    arrays = np.load(tmp_path / "ab" / "stitch-affine.npz")
    np.testing.assert_array_equal(arrays["depth"], [r["depth"] for r in layers])
    np.testing.assert_allclose(arrays["penalty_b_into_a"], [r["directions"]["b_into_a"]["penalty"]["loss"] for r in layers])
    channels = layers[0]["shape"][0]
    assert arrays["weight_a_into_b_0"].shape == (channels, channels) and arrays["bias_b_into_a_0"].shape == (channels,)
    assert report["checkpoints"]["init_start"]["sha256"] == file_digest(ends[0])
    table = open(tmp_path / "ab" / "stitch-affine.md").read()
    assert all(f"| {r['layer']} |" in table for r in layers)

    r = run_script("stitch.py", "--init_start", ends[0], "--init_end", ends[0], "--layers", "all", "--map", "identity",
                   "--fit_batches", "1", "--dir", tmp_path / "aa", *FEW, "--max_images", "20")
    assert r.returncode == 0, r.stderr
    report = reports.read_stitch(tmp_path / "aa" / "stitch-identity.json")
    assert len(report["layers"]) == len(layers)
    for record in report["layers"]:
        for d in record["directions"].values():
            assert d["metrics"]["loss"] == pytest.approx(report["ends"]["A"]["loss"], abs=1e-6)
            assert d["penalty"]["loss"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_eval_curve_stitch_records_the_ends_stitched_at_the_bottleneck_both_ways(ends, tmp_path):
    r = run_script("eval_curve.py", "--connect", "TRIVIAL", "--init_start", ends[0], "--init_end", ends[1],
                   "--num_points", "2", "--stitch", "affine", "--stitch_batches", "2", "--bn_batches", "1",
                   "--train_batches", "1", "--dir", tmp_path, *FEW)
    assert r.returncode == 0, r.stderr
    report = json.load(open(tmp_path / (reports.walk_name({"init_start": ends[0], "init_end": ends[1]}, 2) + ".json")))
    stitched = report["stitch"]
    assert stitched["map"] == "affine" and stitched["shape"] == [8]  # the tiny ends' latent code: 8 units
    assert set(stitched["directions"]) == {"a_into_b", "b_into_a"}
    check_penalties([stitched], stitched["ends"])
    assert "encoder A, affine map fitted on" in r.stdout and "decoder B" in r.stdout
