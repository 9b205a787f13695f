"""Latent alignment folded into the weights (aemc.latent; issue 30, part 2): the fitted maps against
scipy's and numpy's own solutions, the fold against its defining identities (the same function, the
code T z), the conv autoencoder's Tanh fallback, a planted latent rotation recovered, models drawn
from the grammar of user models, and align.py / eval_curve.py end to end."""
import copy
import functools

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symmetry_grammar import acts, norms, randomised, recipes
from symmetry_grammar import build as build_drawn

import eval_curve
from aemc import checkpoints
from aemc.alignment import align, apply_record
from aemc.errors import UserError
from aemc.latent import find_latent, fit_map, fold, posterior_effect, solve, without
from aemc.losses import build_loss, reconstruction
from conftest import run_script, train_main
from examples.my_autoencoder import build as build_mine
from models.autoencoder import Autoencoder
from models.mlp import MLPAutoencoder
from models.resnet import ResNetAutoencoder
from models.symmetry import apply_permutation, permutation_spec, random_permutation
from models.vae import VAE


def mine(**kwargs):
    model = build_mine(**kwargs)
    model.config = dict(kwargs)
    return model


# (factory, the code's layer and its encoder, written out by hand for each architecture)
CASES = {
    "mlp": (lambda: MLPAutoencoder(in_channels=1, image_size=8, hidden=16, latent_dim=5), "encoder.3",
            lambda m, x: m.encode(x)),
    "vae": (lambda: VAE(in_channels=3, in_filters=4, latent_dim=5, image_size=16), "mean", lambda m, x: m.encode(x)[0]),
    "resnet_batch": (lambda: ResNetAutoencoder(in_channels=3, in_filters=4, latent_dim=5, norm="batch", image_size=16),
                     "encoder.8", lambda m, x: m.encode(x)),
    "resnet_none": (lambda: ResNetAutoencoder(in_channels=3, in_filters=4, latent_dim=5, norm="none", image_size=16),
                    "encoder.8", lambda m, x: m.encode(x)),
    "mine": (lambda: mine(in_channels=3, image_size=8, width=4, latent_dim=5, groups=2), "0.7", lambda m, x: m[0](x)),
}


def images(model, n, seed, dtype=torch.float32):
    c, s = model.config["in_channels"], model.config["image_size"]
    return torch.rand((n, c, s, s), generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def random_map(d, kind, seed):
    """A random orthogonal matrix, or a linear one with singular values in [0.5, 2] (condition <= 4)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if kind == "orthogonal":
        return q1
    q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q1 @ np.diag(rng.uniform(0.5, 2, d)) @ q2


def built(name, seed, dtype):
    factory, layer, encode = CASES[name]
    torch.manual_seed(seed)
    return factory().to(dtype).eval(), layer, encode


@functools.cache
def latent_of(name):  # the derivation traces the model (a second for the larger ones): once per architecture
    model, _, _ = built(name, 0, torch.float32)
    return find_latent(model, permutation_spec(model))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("kind", ["orthogonal", "linear"])
@pytest.mark.parametrize("name", list(CASES))
def test_folding_a_map_keeps_the_function_and_maps_the_code(name, kind, dtype, tolerance):
    model, layer, encode = built(name, 0, dtype)
    latent = latent_of(name)
    assert latent.layer == layer and latent.reason is None and latent.channels == 5
    t = random_map(5, kind, seed=1)
    folded = fold(model, latent, t)
    x = images(model, 4, seed=2, dtype=dtype)
    with torch.no_grad():
        assert (reconstruction(folded(x)) - reconstruction(model(x))).abs().max() < tolerance
        code, new_code = encode(model, x), encode(folded, x)
        assert (new_code - code @ torch.as_tensor(t, dtype=dtype).T).abs().max() < tolerance * code.abs().max()
    assert not torch.allclose(folded.get_submodule(layer).weight, model.get_submodule(layer).weight)


def test_a_conv_latent_into_a_flattened_linear_folds_per_block_of_pixels():
    # the code a feature map (2 channels of 2x2 pixels), read by a Linear through Flatten: T acts on the channels
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 2, stride=2),
                                torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.Unflatten(1, (1, 4, 4))).double()
    model.config = dict(in_channels=1, image_size=4)
    latent = find_latent(model, permutation_spec(model))
    assert (latent.layer, latent.channels, latent.consumers) == ("2", 2, {"4": 4})
    t = random_map(2, "linear", seed=3)
    folded = fold(model, latent, t)
    x = images(model, 3, seed=4, dtype=torch.float64)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() < 1e-12
        code = model[:3](x)
        assert torch.allclose(folded[:3](x), torch.einsum("ij,njhw->nihw", torch.as_tensor(t), code), atol=1e-12)


def test_the_fitted_maps_are_scipys_procrustes_and_numpys_least_squares():
    torch.manual_seed(0)
    a, b = (MLPAutoencoder(in_channels=1, image_size=8, hidden=16, latent_dim=6).double() for _ in range(2))
    batches = [images(a, 16, seed=s, dtype=torch.float64) for s in range(3)]  # streamed: three batches
    latent = find_latent(b, permutation_spec(b))
    with torch.no_grad():  # the codes, concatenated
        z_a, z_b = (torch.cat([m.encode(x) for x in batches]).numpy() for m in (a, b))
    rotation, _ = scipy.linalg.orthogonal_procrustes(z_b, z_a)  # argmin ||Z_b R - Z_a||, R orthogonal
    solution, *_ = np.linalg.lstsq(z_b, z_a, rcond=None)        # argmin ||Z_b X - Z_a||
    for kind, expected in (("orthogonal", rotation.T), ("linear", solution.T)):
        fit = fit_map(a, b, latent, batches, kind)
        t = np.array(fit["matrix"])
        assert np.abs(t - expected).max() < 1e-9
        assert fit["residual"] == pytest.approx(np.linalg.norm(z_b @ t.T - z_a) / np.linalg.norm(z_a), rel=1e-9)
        assert fit["residual_identity"] == pytest.approx(np.linalg.norm(z_b - z_a) / np.linalg.norm(z_a), rel=1e-9)
        assert fit["condition"] == pytest.approx(np.linalg.cond(expected), rel=1e-6)
        assert fit["codes"] == 48
    assert fit["residual"] < np.linalg.norm(z_b @ rotation - z_a) / np.linalg.norm(z_a)  # least squares fits best


def test_a_linear_map_of_codes_that_span_fewer_dimensions_is_refused_in_one_line():
    z = np.random.default_rng(0).standard_normal((20, 3)) @ np.array([[1.0, 0, 1], [0, 1, 1], [0, 0, 0]])  # rank 2
    with pytest.raises(UserError, match="span 2 of 3 dimensions") as error:
        solve(z.T @ z, z.T @ z, "linear")
    assert "\n" not in str(error.value)
    t = solve(z.T @ z, z.T @ z, "orthogonal")  # still determined on the codes' span: Z onto itself
    assert np.abs(z @ t.T - z).max() < 1e-9 and np.abs(t @ t.T - np.eye(3)).max() < 1e-12


def test_the_conv_autoencoder_falls_back_to_signed_permutations_in_one_line():
    torch.manual_seed(0)
    a, b = (Autoencoder(in_filters=2, latent_dim=4, image_size=16) for _ in range(2))
    batches = [images(a, 8, seed=0)]
    plain, plain_record = align(a, b, "weight", batches=batches)
    aligned, record = align(a, b, "weight", batches=batches, latent="orthogonal")
    assert record["latent"]["fallback"] == ("the latent passes through Tanh (encoder.10), which commutes only with "
                                            "signed permutations: falling back to signed permutations")
    assert record["permutations"] == plain_record["permutations"] and record["signs"] == plain_record["signs"]
    assert all(torch.equal(p, q) for p, q in zip(aligned.state_dict().values(), plain.state_dict().values()))


def planted(seed):
    """A (float64 MLP) and B = A with a random rotation Q folded into its latent and the other
    layers' units permuted at random."""
    torch.manual_seed(seed)
    a = MLPAutoencoder(in_channels=1, image_size=8, hidden=16, latent_dim=5).double()
    spec = permutation_spec(a)
    latent = find_latent(a, spec)
    b = fold(a, latent, random_map(5, "orthogonal", seed))
    perms, signs = random_permutation(without(spec, latent.layer), torch.Generator().manual_seed(seed))
    b.load_state_dict(apply_permutation(without(spec, latent.layer), b.state_dict(), perms, signs))
    return a, b


@pytest.mark.parametrize("seed", [5, 6])
def test_a_planted_latent_rotation_is_recovered(seed, method="weight"):
    a, b = planted(seed)
    batches = [images(a, 32, seed=s, dtype=torch.float64) for s in range(2)]
    aligned, record = align(a, b, method, batches=batches, latent="orthogonal")
    for (name, p), q in zip(a.named_parameters(), aligned.parameters()):
        assert (p - q).abs().max() < 1e-5 * p.abs().max(), name
    assert record["latent"]["residual"] < 1e-6 < record["latent"]["residual_identity"]
    assert record["distance_after"] < 1e-5 < record["distance_before"]
    unaligned, _ = align(a, b, method, batches=batches)  # permutations alone cannot undo a rotation
    assert max((p - q).abs().max() for p, q in zip(a.parameters(), unaligned.parameters())) > 1e-2
    replayed = apply_record(b, record)  # the record replays to the same weights
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(replayed.parameters(), aligned.parameters()))


def test_of_layers_as_narrow_as_the_code_the_latent_is_the_linear_one():
    """An MLP as wide as its code: encoder.1 (ReLU after it), encoder.3 (the code) and decoder.0 all
    have 16 features; the latent is the code, the first of them that a map can be folded into."""
    model = MLPAutoencoder(in_channels=1, image_size=8, hidden=16, latent_dim=16)
    latent = find_latent(model, permutation_spec(model))
    assert latent.layer == "encoder.3" and not latent.reason


def test_learned_matching_after_a_latent_map_learns_on_the_folded_end_and_recovers_the_planted_case():
    """--align_method ste with --align_latent: the map is folded first, and the straight-through
    estimator gets B as folded and a spec without the latent's permutation; on the planted case
    (a rotation of the code, permutations elsewhere) the aligned B is A."""
    from aemc.learned_matching import straight_through
    from aemc.objective import training_objective
    from aemc.settings import Run
    a, b = planted(5)
    batches = [images(a, 32, seed=s, dtype=torch.float64) for s in range(3)]
    seen = {}

    def learner(model_a, folded, spec):
        seen["perms"], seen["folded"] = set(spec.sizes), folded
        return straight_through(copy.deepcopy(model_a).float(), copy.deepcopy(folded).float(), spec, training_objective(Run(), curve=False,
                                device="cpu"), batches=[x.float() for x in batches], bn_batches=[batches[0].float()],
                                loss_batches=[batches[1].float()], steps=2, seconds=None, lr=1e-2, t="midpoint",
                                seed=0, restarts=1, use_signs=True, verbose=False)
    aligned, record = align(a, b, "ste", batches=batches, latent="orthogonal", learner=learner)
    layer = find_latent(a, permutation_spec(a)).layer
    assert layer not in seen["perms"] and layer not in record["permutations"] and seen["folded"] is not b
    assert record["latent"]["residual"] < 1e-6 and record["ste"]["steps"] == 2
    for (name, p), q in zip(a.named_parameters(), aligned.parameters()):
        assert (p - q.double()).abs().max() < 1e-4 * p.abs().max(), name


def test_a_vaes_kl_is_kept_by_a_rotation_and_changed_by_a_linear_map():
    model, _, _ = built("vae", 0, torch.float64)
    latent = latent_of("vae")
    batches = [images(model, 8, seed=s, dtype=torch.float64) for s in range(2)]
    loss = build_loss("mae")
    with torch.no_grad():
        mean, logvar = (torch.cat(v) for v in zip(*[model.encode(x) for x in batches]))
    values = batches[0][0].numel()  # KL(N(m, diag e^lv) || N(0, I)) per pixel value, by its formula
    kl = lambda m: float((-0.5 * (1 + logvar - m ** 2 - logvar.exp())).sum(1).mean() / values)  # noqa: E731
    for kind in ("orthogonal", "linear"):
        t = random_map(5, kind, seed=7)
        effect = posterior_effect(model, fold(model, latent, t), batches, loss, seed=0)
        assert effect["kl_before"] == pytest.approx(kl(mean), rel=1e-9)
        assert effect["kl_after"] == pytest.approx(kl(mean @ torch.as_tensor(t).T), rel=1e-9)
        assert effect["sampled_after"] != pytest.approx(effect["sampled_before"], rel=1e-6)
    same = posterior_effect(model, copy.deepcopy(model), batches, loss, seed=0)  # the same noise for both
    assert same["sampled_after"] == same["sampled_before"] and same["kl_after"] == same["kl_before"]


@st.composite
def coded(draw):
    """A drawn model that starts with a Linear code of 2 features (the fewest of any layer: the
    latent), then nothing, a norm or an activation, then a Linear and an Unflatten back to the
    image, then a drawn recipe."""
    in_channels, size, seed, ops = draw(recipes(max_blocks=3))
    between = draw(st.sampled_from([[], [], draw(norms((2,))), draw(acts())]))
    return in_channels, size, seed, [("flatten",), ("linear", 2), *between, ("linear_to", in_channels, size, size), *ops]


DRAWN = settings(max_examples=10, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@DRAWN
@given(st.one_of(recipes(max_blocks=4), coded()))
def test_drawn_models_fold_a_linear_latent_and_fall_back_elsewhere(recipe):
    in_channels, size, seed, _ = recipe
    a = build_drawn(recipe)
    b = randomised(copy.deepcopy(a), seed + 1)
    spec = permutation_spec(b)
    x = torch.rand((6, in_channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        out = b(x)
        latent = find_latent(b, spec)
        if latent.reason is None:  # any orthogonal T folds in: the same function
            t = random_map(latent.channels, "orthogonal", seed)
            assert (fold(b, latent, t)(x) - out).abs().max() <= 1e-9 * out.abs().max()
        aligned, record = align(a, b, "weight", batches=[x], latent="orthogonal")
        assert ("matrix" in record["latent"]) == (latent.reason is None)
        assert "fallback" in record["latent"] or latent.reason is None
        assert (aligned(x) - out).abs().max() <= 1e-9 * out.abs().max()


@pytest.mark.slow
def test_align_latent_end_to_end_on_trained_mlps(tmp_path):
    data = ["--dataset", "synthetic", "--max_images", "160", "--batch_size", "32", "--device", "cpu", "--num_workers",
            "0", "--image_size", "16"]
    common = [*data, "--arch", "mlp", "--arch_kwargs", '{"hidden": 32, "latent_dim": 6}', "--lr", "1e-3",
              "--epochs", "2"]
    for seed in (1, 2):
        train_main("--dir", tmp_path / f"e{seed}", *common, "--seed", seed)
    a_path, b_path = (str(tmp_path / f"e{s}" / "checkpoint-2.pt") for s in (1, 2))
    out = tmp_path / "b_aligned.pt"
    r = run_script("align.py", "--init_start", a_path, "--init_end", b_path, "--out", out, "--latent", "orthogonal",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "latent map (orthogonal) at encoder.3" in r.stdout
    (a, _), (b, _) = checkpoints.load_endpoint(a_path, "a"), checkpoints.load_endpoint(b_path, "b")
    aligned, ck = checkpoints.load_endpoint(str(out), "--out")
    t = np.array(ck.source["alignment"]["latent"]["matrix"])
    assert np.abs(t @ t.T - np.eye(6)).max() < 1e-12
    x = images(a, 16, seed=0)
    with torch.no_grad():
        assert (aligned.eval()(x) - b.eval()(x)).abs().max() < 1e-5
        assert torch.allclose(aligned.encode(x), b.encode(x) @ torch.as_tensor(t, dtype=torch.float32).T, atol=1e-5)
    walk = ["--num_points", "3", "--device", "cpu", *data[:4]]
    result = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--connect", "TRIVIAL", "--init_start", a_path, "--init_end", str(out), *walk, "--dir", str(tmp_path / "w")]))
    both = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--connect", "TRIVIAL", "--init_start", a_path, "--init_end", b_path, "--align", "--align_latent", "orthogonal",
         *walk, "--dir", str(tmp_path / "w2")]))
    segment = next(v for k, v in result["paths"].items() if k.kind == "segment")
    aligned_segment = next(v for k, v in both["paths"].items() if k.aligned and not k.repaired)
    raw = next(v for k, v in both["paths"].items() if not k.aligned)
    # the aligned end computes B's function; the middles differ from the raw segment's
    assert segment["test_loss"][-1] == pytest.approx(raw["test_loss"][-1], abs=1e-5)
    assert aligned_segment["test_loss"][-1] == pytest.approx(raw["test_loss"][-1], abs=1e-5)
    assert aligned_segment["test_loss"][1] != pytest.approx(raw["test_loss"][1], abs=1e-4)
