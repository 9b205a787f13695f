import os

import pytest
import torch
from torch import nn

import eval_curve
from aemc import checkpoints
from aemc.alignment import align
from aemc.data.loader import to_float
from aemc.data.synthetic import synthetic_faces
from aemc.files import file_digest
from aemc.paths import PathKey
from conftest import DATA, curve_argv, run_script, train_main
from models.autoencoder import Autoencoder
from models.symmetry import apply_permutation, permutation_spec, random_permutation


def tiny(seed, f=8, latent=16):
    torch.manual_seed(seed)
    return Autoencoder(in_filters=f, latent_dim=latent)


def permuted_copy(model, seed, signs=True):
    spec = permutation_spec(model)
    perms, flips = random_permutation(spec, torch.Generator().manual_seed(seed), signs=signs)
    other = Autoencoder(**model.config)
    other.load_state_dict(apply_permutation(spec, model.state_dict(), perms, flips))
    return other


def relative_error(a, b):
    return max(((p - q).abs().max() / p.abs().max()).item() for p, q in zip(a.parameters(), b.parameters()))


def test_the_spec_is_derived_from_the_modules_and_covers_every_permutable_axis_once():
    f, z = 8, 16
    spec = permutation_spec(Autoencoder(in_filters=f, latent_dim=z))
    # written out by hand for this architecture: producer -> size, and every (tensor, axis) it moves
    conv_bn = lambda conv, bn, nxt: [(f"{conv}.weight", 0), *((f"{bn}.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var")), (f"{nxt}.weight", 1)]
    expected = {
        "encoder.0": (f, [("encoder.0.weight", 0), ("encoder.3.weight", 1)]),
        "encoder.3": (2 * f, conv_bn("encoder.3", "encoder.4", "encoder.7")),
        "encoder.7": (4 * f, conv_bn("encoder.7", "encoder.8", "encoder.11")),
        "encoder.11": (8 * f, conv_bn("encoder.11", "encoder.12", "encoder.15")),
        "encoder.15": (8 * f, [("encoder.15.weight", 0), ("encoder.17.weight", 1)]),   # through Flatten (1 x 1)
        "encoder.17": (z, [("encoder.17.weight", 0), ("encoder.17.bias", 0), ("decoder.0.weight", 1)]),
        "decoder.0": (8 * f, [("decoder.0.weight", 0), ("decoder.0.bias", 0), ("decoder.4.weight", 1)]),
        "decoder.4": (8 * f, conv_bn("decoder.4", "decoder.5", "decoder.9")),
        "decoder.9": (4 * f, conv_bn("decoder.9", "decoder.10", "decoder.14")),
        "decoder.14": (2 * f, conv_bn("decoder.14", "decoder.15", "decoder.19")),
        "decoder.19": (f, conv_bn("decoder.19", "decoder.20", "decoder.24")),
    }
    assert spec.sizes == {p: n for p, (n, _) in expected.items()}
    assert {p: sorted(a) for p, a in spec.axes.items()} == {p: sorted(a) for p, (_, a) in expected.items()}
    assert spec.signed == {"encoder.17"}  # only the latent: Tanh between producer and consumer
    axes = [a for p in spec.axes.values() for a in p]
    assert len(axes) == len(set(axes))  # no axis in two permutations
    state = Autoencoder(in_filters=f, latent_dim=z).state_dict()
    untouched = {(n, ax) for n, t in state.items() for ax in range(t.dim())} - set(axes)
    # what is left alone: the RGB input and output, kernels' spatial axes, BN counters
    assert ("encoder.0.weight", 1) in untouched and ("decoder.24.weight", 0) in untouched
    assert all(ax >= 2 or (n, ax) in {("encoder.0.weight", 1), ("decoder.24.weight", 0)}
               for n, ax in untouched)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_permutation_with_signs_computes_the_same_function(seed):
    a = tiny(seed)
    b = permuted_copy(a, seed)
    x = to_float(synthetic_faces(8, seed=seed))
    assert not torch.allclose(a.encoder[0].weight, b.encoder[0].weight)
    with torch.no_grad():
        a.eval(), b.eval()
        assert (a(x) - b(x)).abs().max() < 1e-5
        for m in (a, b):  # BatchNorm on batch statistics, dropout off
            m.train()
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.eval()
        assert (a(x) - b(x)).abs().max() < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_recovers_a_planted_permutation(seed):
    a = tiny(seed)
    b = permuted_copy(a, 100 + seed)
    aligned, record = align(a, b, "weight", seed=seed)
    assert relative_error(a, aligned) < 1e-6
    assert record["distance_before"] > 1 and record["distance_after"] < 1e-5


def test_activation_matching_recovers_a_planted_permutation():
    a = tiny(3)
    b = permuted_copy(a, 7)
    batches = [to_float(synthetic_faces(32, seed=s)) for s in range(2)]
    aligned, _ = align(a, b, "activation", batches=batches)
    assert relative_error(a, aligned) < 1e-6


def test_the_objective_never_decreases_and_the_distance_never_grows():
    for seed in range(3):
        a, b = tiny(seed), tiny(50 + seed)  # two unrelated networks: no exact match exists
        _, record = align(a, b, "weight", restarts=2, seed=seed)
        history = record["objective"]
        assert all(later >= earlier for earlier, later in zip(history, history[1:]))
        assert record["distance_after"] <= record["distance_before"]
        assert len(history) > 2  # it did take several sweeps


def test_without_latent_signs_a_negated_latent_unit_cannot_be_matched():
    a = tiny(4)
    spec = permutation_spec(a)
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    signs = {"encoder.17": torch.ones(16)}
    signs["encoder.17"][3] = -1
    b = Autoencoder(**a.config)
    b.load_state_dict(apply_permutation(spec, a.state_dict(), perms, signs))
    assert relative_error(a, align(a, b)[0]) < 1e-6
    assert relative_error(a, align(a, b, use_signs=False)[0]) > 1e-2


@pytest.fixture(scope="module")
def aligned_file(ends, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "b_aligned.pt"
    r = run_script("align.py", "--init_start", ends[0], "--init_end", ends[1], "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return str(out), r.stdout


@pytest.mark.slow
def test_align_writes_an_endpoint_that_computes_the_same_function_closer_to_the_start(ends, aligned_file):
    out, stdout = aligned_file
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    aligned, ck = checkpoints.load_endpoint(out, "--out")
    record = ck.source["alignment"]
    assert ck.source["original"]["sha256"] == file_digest(ends[1])
    assert ck.source["aligned_to"]["sha256"] == file_digest(ends[0])
    assert set(record["permutations"]) == set(permutation_spec(a).sizes)
    x = to_float(synthetic_faces(16, seed=9))
    with torch.no_grad():
        assert (aligned.eval()(x) - b.eval()(x)).abs().max() < 1e-5
    distance = lambda m: sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), m.parameters())).sqrt().item()
    assert distance(aligned) == pytest.approx(record["distance_after"], rel=1e-5)
    assert distance(b) == pytest.approx(record["distance_before"], rel=1e-5)
    assert distance(aligned) < distance(b)
    assert "||A - B||" in stdout and "sweep 1" in stdout


@pytest.mark.slow
def test_eval_curve_walks_the_raw_and_the_aligned_segment(ends, aligned_file, tmp_path):
    out, _ = aligned_file
    result = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--connect", "TRIVIAL", "--init_start", ends[0], "--init_end", ends[1], "--align", "--num_points", "3",
         "--bn_batches", "2", "--device", "cpu", "--dir", str(tmp_path), *DATA[:4]]))
    raw, aligned_key = PathKey("segment"), PathKey("segment", aligned=True)
    paths = result["paths"]
    assert set(paths) == {raw, aligned_key, PathKey("segment", aligned=True, repaired=True)}  # --align adds REPAIR
    # the same ends (pi(B) computes B's function), a different middle
    assert paths[aligned_key]["test_loss"][-1] == pytest.approx(paths[raw]["test_loss"][-1], abs=1e-5)
    assert paths[aligned_key]["test_loss"][1] != pytest.approx(paths[raw]["test_loss"][1], abs=1e-4)
    # ... and the middle of the aligned segment is the midpoint of A and the file align.py wrote
    (a, _), (aligned, _) = checkpoints.load_endpoint(ends[0], "a"), checkpoints.load_endpoint(out, "b")
    assert paths[aligned_key]["length"] == pytest.approx(
        sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), aligned.parameters())).sqrt().item(), rel=1e-5)
    assert os.path.isfile(result["files"]["aligned_segment_gif"])


@pytest.mark.slow
def test_a_curve_trained_with_align_ends_at_the_aligned_endpoint_and_check_ends_knows(ends, aligned_file, tmp_path):
    out, _ = aligned_file
    train_main(*curve_argv(tmp_path, ends, "--epochs", "1", "--align"))
    ck = checkpoints.load(str(tmp_path / "checkpoint-1.pt"))
    assert ck.curve_config["alignment"]["method"] == "weight"
    curve = checkpoints.build_model(ck)
    aligned, _ = checkpoints.load_endpoint(out, "aligned")
    assert all(torch.equal(curve.bends[2].get_parameter(n), p) for n, p in aligned.named_parameters())
    r = run_script("check_ends.py", "--ckpt", tmp_path / "checkpoint-1.pt", "--device", "cpu", "--dir", tmp_path)
    assert r.returncode == 0 and r.stdout.count("= 0.000e+00") == 2, r.stdout + r.stderr
    assert "permuted as the curve records" in r.stdout
    walked = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", str(tmp_path / "checkpoint-1.pt"), "--num_points", "2", "--bn_batches", "2",
         "--device", "cpu", "--dir", str(tmp_path / "eval")]))
    assert set(walked["paths"]) == {PathKey("curve", "Bezier", 3, aligned=True), PathKey("segment", aligned=True)}


@pytest.mark.slow
def test_bad_input_is_one_clear_line(ends, trained_curve, tmp_path):
    train_main("--dir", tmp_path / "wide", *DATA, "--in_filters", "8", "--latent_dim", "8", "--epochs", "1")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        ([ends[0], str(tmp_path / "wide" / "checkpoint-1.pt"), tmp_path / "o.pt"], "different architectures"),
        ([ends[0], os.path.join(trained_curve, "checkpoint-last.pt"), tmp_path / "o.pt"],
         "holds a curve, expected an autoencoder"),
        ([ends[0], ends[1], blocker / "sub" / "o.pt"], "cannot write"),
    ]
    for (a, b, out), expected in cases:
        r = run_script("align.py", "--init_start", a, "--init_end", b, "--out", out, "--device", "cpu")
        assert r.returncode == 2 and expected in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = run_script("align.py", "--init_start", ends[0], "--init_end", ends[1], "--out", tmp_path / "o.pt",
                   "--method", "magic")
    assert r.returncode == 2 and "invalid choice" in r.stderr
