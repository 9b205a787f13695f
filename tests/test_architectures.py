"""Every built-in architecture (and a model of the user's own) at tiny widths: the symmetry
derived from its graph is exact, alignment recovers a planted permutation, a curve's ends are its
endpoints, and a curve trains between two endpoints through train.py."""
import copy

import pytest
import torch
from torch import nn

from aemc import architectures, checkpoints
from aemc.alignment import align
from aemc.data.loader import to_float
from aemc.data.synthetic import synthetic_faces
from aemc.errors import UserError
from aemc.settings import Architecture
from conftest import train_main
from models.curves import Bezier, connect
from models.symmetry import apply_permutation, permutation_spec, random_permutation

USER = "examples.my_autoencoder:build"
# name: (factory, its arguments at a tiny width, the data's (channels, size))
CASES = {
    "conv": ("conv", dict(in_filters=4, latent_dim=8), (3, 64)),
    "conv-group": ("conv", dict(in_filters=4, latent_dim=8, norm="group"), (3, 32)),
    "conv-layer": ("conv", dict(in_filters=4, latent_dim=8, norm="layer"), (1, 32)),
    "conv-none": ("conv", dict(in_filters=4, latent_dim=8, norm="none"), (3, 16)),
    "resnet": ("resnet", dict(in_filters=4, latent_dim=8), (3, 32)),
    "vae": ("vae", dict(in_filters=4, latent_dim=8), (3, 32)),
    "mlp": ("mlp", dict(hidden=32, latent_dim=8), (1, 28)),
    "user": (USER, dict(width=4, latent_dim=8, groups=2), (1, 28)),
}


def build(case, seed=0):
    """A tiny model of `case` with every parameter and normalisation statistic made distinct (so a
    permutation that forgot one of them shows)."""
    name, kwargs, (channels, size) = CASES[case]
    architectures.allow(name)
    arch = architectures.resolve(name, kwargs, (channels, size, size))
    torch.manual_seed(seed)
    model = architectures.build(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval(), arch


def images(case, n=8, seed=0):
    channels, size = CASES[case][2]
    x = to_float(synthetic_faces(n, seed=seed, size=size))
    return x.mean(1, keepdim=True) if channels == 1 else x


def output(model, x):
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, tuple) else out


def permuted(model, arch, seed):
    spec = permutation_spec(model)
    perms, signs = random_permutation(spec, torch.Generator().manual_seed(seed))
    other = architectures.build(arch).eval()
    other.load_state_dict(apply_permutation(spec, model.state_dict(), perms, signs))
    return other


def largest_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("case", CASES)
def test_a_random_permutation_of_the_derived_symmetry_computes_the_same_function(case):
    model, arch = build(case)
    x = images(case)
    out = output(model, x)
    channels, size = CASES[case][2]
    assert out.shape == (8, channels, size, size) and out.abs().max() <= 1
    other = permuted(model, arch, seed=1)
    assert largest_difference(model, other) > 0.1  # the permutation moved the weights ...
    assert (output(other, x) - out).abs().max() < 1e-5  # ... and not the function


@pytest.mark.parametrize("case", CASES)
def test_the_symmetry_leaves_nothing_permutable_aside_and_ties_what_must_be_tied(case):
    model, _ = build(case)
    spec = permutation_spec(model)
    assert spec.fixed == []  # every hidden axis of these graphs is proven permutable
    axes = [a for members in spec.axes.values() for a in members]
    assert len(axes) == len(set(axes))
    if case == "resnet":  # a residual block's input and output are added: one permutation for both
        tied = [p for p, members in spec.axes.items()
                if sum(name.endswith("conv2.weight") and axis == 0 for name, axis in members) >= 1]
        assert tied and all(any(axis == 1 and "conv1.weight" in name for name, axis in spec.axes[p]) for p in tied)
    if case == "vae":  # the mean and log-variance heads share the latent units
        latent = [p for p, members in spec.axes.items() if ("mean.weight", 0) in members]
        assert latent and ("logvar.weight", 0) in spec.axes[latent[0]]
    if case in ("conv-group", "user"):
        assert spec.groups and all(spec.sizes[p] % g == 0 for p, g in spec.groups.items())


@pytest.mark.parametrize("case", CASES)
def test_weight_matching_recovers_a_planted_permutation(case):
    model, arch = build(case)
    other = permuted(model, arch, seed=2)
    aligned, record = align(model, other, "weight")
    assert largest_difference(model, aligned) < 1e-6
    assert record["distance_after"] < 1e-4 < record["distance_before"]


@pytest.mark.parametrize("case", ["resnet", "vae", "mlp", "user"])
def test_activation_matching_recovers_a_planted_permutation(case):
    model, arch = build(case)
    with torch.no_grad():  # units dead on every image are interchangeable for activations (weights tell them apart)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.add_(1.0)
    other = permuted(model, arch, seed=3)
    aligned, _ = align(model, other, "activation", batches=[images(case, 32, seed=s) for s in range(2)])
    assert largest_difference(model, aligned) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_a_curves_ends_are_its_endpoints(case):
    a, _ = build(case, seed=0)
    b, _ = build(case, seed=1)
    curve = connect(a, b, Bezier, 3)
    x = images(case)
    for t, end in ((0.0, a), (1.0, b)):
        point = curve.point_at(t)
        assert all(torch.equal(p, q) for p, q in zip(point.parameters(), end.parameters()))
        # a point carries no BatchNorm statistics of its own: compare on the batch's (train mode)
        outputs = []
        for m in (point, end):
            torch.manual_seed(0)  # a VAE samples its code in train mode
            outputs.append(output(m.train(), x))
        assert torch.equal(*outputs)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet", "vae", "mlp", "user"])
def test_a_one_epoch_curve_trains_between_two_tiny_endpoints(case, tmp_path):
    name, kwargs, (channels, size) = CASES[case]
    data = ["--dataset", "synthetic", "--max_images", "64", "--batch_size", "32", "--device", "cpu",
            "--num_workers", "0", "--image_size", str(size), "--channels", str(channels), "--lr", "1e-3"]
    import json
    model = ["--arch", name, "--arch_kwargs", json.dumps(kwargs)]
    for seed in (1, 2):
        train_main("--dir", tmp_path / f"e{seed}", *data, *model, "--seed", str(seed), "--epochs", "1")
    ends = [str(tmp_path / f"e{seed}" / "checkpoint-1.pt") for seed in (1, 2)]
    train_main("--dir", tmp_path / "curve", *data, "--arch", name, "--curve", "Bezier", "--num_bends", "3",
               "--init_start", ends[0], "--init_end", ends[1], "--fix_start", "--fix_end", "--epochs", "1")
    ck = checkpoints.load(str(tmp_path / "curve" / "checkpoint-1.pt"), kind="curve")
    assert ck.architecture == checkpoints.load(ends[0]).architecture
    curve = checkpoints.build_model(ck)
    (a, _), (b, _) = checkpoints.load_endpoints(ends)
    middle = curve.weights(0.5)
    linear = {k: (v + dict(b.named_parameters())[k]) / 2 for k, v in a.named_parameters()}
    assert max((middle[k] - linear[k]).abs().max().item() for k in linear) > 0  # the middle bend trained
    for t, end in ((0.0, a), (1.0, b)):  # the fixed ends did not
        assert all(torch.equal(p, q) for p, q in zip(curve.point_at(t).parameters(), end.parameters()))


def test_a_user_model_is_imported_only_when_the_command_line_names_it(monkeypatch):
    monkeypatch.setattr(architectures, "_ALLOWED", set())
    with pytest.raises(UserError, match=f"pass --arch {USER}"):
        architectures.build(Architecture(USER, {"width": 4}))
    with pytest.raises(UserError, match="cannot import"):
        architectures.allow("no_such_package.models:build")
        architectures.build(Architecture("no_such_package.models:build", {}))
    architectures.allow(USER)
    assert isinstance(architectures.build(Architecture(USER, {"width": 4})), nn.Module)


def test_sizes_an_architecture_cannot_take_are_one_line():
    with pytest.raises(UserError, match="power of two"):
        architectures.build(architectures.resolve("conv", {}, (1, 28, 28)))
    with pytest.raises(UserError, match="takes no hidden"):
        architectures.resolve("conv", {"hidden": 3}, (3, 64, 64))


def test_the_default_architecture_is_the_originals():
    arch = architectures.resolve("conv", {}, (3, 64, 64))
    assert sum(p.numel() for p in architectures.build(arch).parameters()) == 17_944_512
    assert copy.deepcopy(arch.kwargs) == dict(in_channels=3, in_filters=64, latent_dim=128, conv_init="normal",
                                              norm="batch", image_size=64)
