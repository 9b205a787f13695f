import json
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

import dataset
import ensemble
import eval_curve
import fge
import trainer
from aemc import checkpoints
from aemc.barriers import barriers
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import synthetic_faces
from aemc.ensembles import Ensemble, member_state, score_ensembles
from aemc.errors import Interrupted, UserError
from aemc.evaluation import PointEvaluator
from aemc.losses import LaplacianPyramidLoss
from aemc.paths import PathKey
from conftest import DATA, HookedLoss, read_log, run_script, train_main


class Shift(nn.Module):
    """A 'model' whose output is its input plus a fixed image d: members with chosen outputs."""

    def __init__(self):
        super().__init__()
        self.d = nn.Parameter(torch.zeros(3, 64, 64))

    def forward(self, x):
        return x + self.d


@pytest.fixture(scope="module")
def images():
    return TensorLoader(synthetic_faces(40), 16)


LOSSES = {"loss": nn.L1Loss(), "pyramid": LaplacianPyramidLoss(3)}


def shifts(*ds):
    return {f"m{i}": {"d": d} for i, d in enumerate(ds)}


def test_identical_members_gain_exactly_nothing(images):
    d = 0.3 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    (row,) = score_ensembles(Shift(), shifts(d, d.clone()), [Ensemble("pair", ["m0", "m1"])], images, LOSSES).values()
    assert row["gain"] == {"loss": 0.0, "pyramid": 0.0}
    assert row["ensemble"] == row["members"][0]


def test_members_on_either_side_of_the_target_average_to_it(images):
    d = 0.2 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))
    (row,) = score_ensembles(Shift(), shifts(d, -d), [Ensemble("pair", ["m0", "m1"])], images, LOSSES).values()
    assert row["ensemble"]["loss"] < 1e-7 and row["ensemble"]["pyramid"] < 1e-7
    assert row["member_mean"]["loss"] == pytest.approx(d.abs().mean().item(), rel=1e-5)
    assert row["gain"]["loss"] == pytest.approx(row["member_mean"]["loss"], rel=1e-5)


def test_a_gain_is_positive_when_the_ensemble_is_better_for_losses_and_for_psnr(images):
    """Members x + d and x - d/2 average to x + d/4: better in L1 (lower) and in PSNR (higher), and
    both gains are positive. PSNR of x + s d is -10 log10(mean((s d / 2)^2)) for every image."""
    from aemc.losses import psnr
    d = 0.2 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3))
    (row,) = score_ensembles(Shift(), shifts(d, -0.5 * d), [Ensemble("pair", ["m0", "m1"])], images,
                             {"loss": nn.L1Loss()}, {"psnr": psnr}).values()
    by_hand = {s: -10 * np.log10(((s * d.double() / 2) ** 2).mean().item()) for s in (1, 0.5, 0.25)}
    assert row["member_mean"]["psnr"] == pytest.approx((by_hand[1] + by_hand[0.5]) / 2, abs=1e-3)
    assert row["ensemble"]["psnr"] == pytest.approx(by_hand[0.25], abs=1e-3)
    assert row["gain"]["psnr"] == pytest.approx(20 * np.log10(4) - 10 * np.log10(2), abs=1e-3)  # 9.03 dB
    assert row["gain"]["loss"] == pytest.approx(0.5 * d.abs().mean().item(), rel=1e-4)  # (1 + 0.5) / 2 - 1/4
    table = ensemble.format_table({"pair": row}, "mae")
    assert "gain > 0: the ensemble is better" in table and f"{row['gain']['psnr']:16.5f}" in table


def test_walk_reports_written_before_the_sign_convention_read_back_with_it(tmp_path):
    from aemc.reports import read_walks
    entry = {"path": PathKey("segment").to_dict(), "ts": [0.0, 1.0], "ensemble_start_psnr_gain": [0.0, -2.5],
             "ensemble_start_loss_gain": [0.0, 0.1], "ensemble_end_lpips_gain": [0.2, 0.0]}
    for name, extra, psnr_gain in (("old", {}, [0.0, 2.5]), ("new", {"gain": "gain > 0: ..."}, [0.0, -2.5])):
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump({"loss": "mae", "paths": {"segment": entry}, **extra}, f)
        (path,) = read_walks(str(tmp_path / f"{name}.json")).paths.values()
        assert path["ensemble_start_psnr_gain"] == psnr_gain  # old: ensemble - mean, like the losses' mean - ensemble
        assert path["ensemble_start_loss_gain"] == [0.0, 0.1] and path["ensemble_end_lpips_gain"] == [0.2, 0.0]


@pytest.mark.parametrize("seed", range(5))
def test_the_gain_is_never_negative_for_l1_and_the_pyramid_loss(images, seed):
    g = torch.Generator().manual_seed(seed)
    ds = [torch.randn(3, 64, 64, generator=g) * s for s in (0.1, 0.5, 1.0)]
    table = score_ensembles(Shift(), shifts(*ds), [Ensemble("all", ["m0", "m1", "m2"]), Ensemble("two", ["m0", "m2"])],
                            images, LOSSES)
    assert len(table) == 2
    for row in table.values():
        assert all(gain > -1e-7 for gain in row["gain"].values())
        assert all(gain > 1e-3 for gain in row["gain"].values())  # different members: a real gain


def evaluator_for(template):
    train, test = dataset.split_images(synthetic_faces(400), 0.2)
    return PointEvaluator(template, TensorLoader(train, 32), TensorLoader(test, 32), {"loss": nn.L1Loss()},
                          bn_batches=3)


@pytest.mark.slow
def test_a_one_member_ensemble_is_eval_curves_point(trained_curve, tmp_path):
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    walked = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", ckpt, "--num_points", "3", "--no_segment", "--bn_batches", "3", "--device", "cpu",
         "--dir", str(tmp_path)]))
    (path,) = walked["paths"].values()
    curve = checkpoints.build_model(checkpoints.load(ckpt))
    evaluator = evaluator_for(curve.point_at(0))
    state = member_state(evaluator, curve.weights(0.5))
    (row,) = score_ensembles(evaluator.module, {"mid": state}, [Ensemble("one", ["mid"])], evaluator.test_batches,
                             {"loss": nn.L1Loss()}).values()
    assert row["ensemble"]["loss"] == pytest.approx(path["test_loss"][1], abs=1e-6) and row["gain"]["loss"] == 0


@pytest.mark.slow
def test_eval_curve_ensemble_metrics_agree_with_scoring_the_members(trained_curve, tmp_path):
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    walked = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", ckpt, "--num_points", "3", "--ensemble", "--bn_batches", "3", "--device", "cpu",
         "--dir", str(tmp_path)]))
    curve = walked["paths"][PathKey("curve", "Bezier", 3)]
    assert curve["diversity_start"][0] == 0 and curve["ensemble_start_loss_gain"][0] == 0
    assert curve["diversity_end"][-1] == 0 and curve["ensemble_end_loss_gain"][-1] == 0
    assert curve["diversity_end"][0] == pytest.approx(curve["diversity_start"][-1], rel=1e-6)  # symmetric
    # an independent computation: the members' states, scored in one pass of score_ensembles
    net = checkpoints.build_model(checkpoints.load(ckpt))
    evaluator = evaluator_for(net.point_at(0))
    states = {t: member_state(evaluator, net.weights(t)) for t in (0.0, 0.5, 1.0)}
    with_start, with_end = score_ensembles(evaluator.module, states, [Ensemble("start", [0.0, 0.5]),
                                                                      Ensemble("end", [1.0, 0.5])],
                                           evaluator.test_batches, {"loss": nn.L1Loss()}).values()
    assert curve["ensemble_start_loss"][1] == pytest.approx(with_start["ensemble"]["loss"], abs=1e-6)
    assert curve["ensemble_end_loss_gain"][1] == pytest.approx(with_end["gain"]["loss"], abs=1e-6)
    assert all(g >= -1e-7 for key in ("ensemble_start_loss_gain", "ensemble_end_loss_gain") for g in curve[key])
    assert os.path.isfile(walked["files"]["ensemble_plot"])
    arrays = np.load(walked["files"]["npz"])
    assert arrays["segment_diversity_start"].shape == (3,)


@pytest.mark.slow
def test_ensemble_py_scores_curve_segment_and_endpoints(trained_curve, ends, tmp_path):
    ckpt = os.path.join(trained_curve, "checkpoint-last.pt")
    result = ensemble.main(ensemble.get_args_parser().parse_args(
        ["--ckpt", ckpt, "--num_members", "3", "--bn_batches", "3", "--lpips", "--device", "cpu",
         "--dir", str(tmp_path)]))
    table = result["table"]
    assert list(table) == ["endpoints", "curve, 2", "curve, 3", "segment, 2", "segment, 3"]
    assert [row["family"] for row in table.values()] == ["endpoints", "curve", "curve", "segment", "segment"]
    assert table["curve, 3"]["keys"] == ["start", "curve t=0.5", "end"]
    # the ensembles of the two ends are one ensemble, whatever path they are named after
    assert table["endpoints"]["ensemble"] == table["curve, 2"]["ensemble"] == table["segment, 2"]["ensemble"]
    for row in table.values():
        assert row["gain"]["loss"] >= -1e-7 and "lpips" in row["ensemble"]
    for name in ("json", "csv", "plot"):
        assert os.path.isfile(result["files"][name])
    # the barriers along each path, from its members at t = 0, 0.5, 1 (their own scores)
    report = json.load(open(result["files"]["json"]))
    for family in ("curve", "segment"):
        losses = [m["loss"] for m in table[f"{family}, 3"]["members"]]
        assert report["path_barriers"][family]["loss"] == pytest.approx(barriers([0, 0.5, 1], losses), abs=1e-12)
    listed = ensemble.main(ensemble.get_args_parser().parse_args(
        ["--ckpts", *ends, ends[0], "--bn_batches", "3", "--device", "cpu", "--dir", str(tmp_path / "c")]))["table"]
    assert list(listed) == ["checkpoints, 2", "checkpoints, 3"]
    # a repeated member weighs twice: {A, B, A} is not {A, B}
    assert listed["checkpoints, 3"]["ensemble"]["loss"] != listed["checkpoints, 2"]["ensemble"]["loss"]


def test_the_cyclic_schedule_and_the_snapshot_epochs():
    lr = trainer.cyclic_learning_rate
    assert lr(0, 0.0, 4, 0.1, 0.001) == pytest.approx(0.1)       # a cycle starts at lr_1
    assert lr(2, 0.0, 4, 0.1, 0.001) == pytest.approx(0.001)     # mid-cycle: lr_2
    assert lr(1, 0.0, 4, 0.1, 0.001) == pytest.approx(0.5 * (0.1 + 0.001))  # a quarter: half way down
    assert lr(1, 0.5, 4, 0.1, 0.001) == pytest.approx(0.25 * 0.1 + 0.75 * 0.001)  # 3/8: linear, by hand
    assert lr(3, 0.0, 4, 0.1, 0.001) == pytest.approx(0.5 * (0.1 + 0.001))  # three quarters: half way up
    assert lr(4, 0.0, 4, 0.1, 0.001) == pytest.approx(0.1)       # the next cycle
    assert trainer.snapshot_epochs(4, 8) == [2, 6]
    assert trainer.snapshot_epochs(2, 5) == [1, 3, 5]


FGE = [*DATA[:4], "--device", "cpu", "--num_workers", "0", "--batch_size", "32"]


@pytest.mark.slow
def test_fge_trains_snapshots_and_scores_the_growing_ensemble(ends, tmp_path, monkeypatch):
    common = ["--ckpt", ends[0], "--cycle", "2", "--epochs", "4", "--lr_1", "1e-3", "--lr_2", "1e-5",
              "--bn_batches", "3", *FGE]
    whole = fge.main(fge.get_args_parser().parse_args([*common, "--dir", str(tmp_path / "whole")]))
    assert [os.path.basename(p) for p in whole["snapshots"]] == ["snapshot-1.pt", "snapshot-3.pt"]
    assert [r["lr"] for r in read_log(tmp_path / "whole")] == pytest.approx([1e-3, 1e-5, 1e-3, 1e-5])
    snapshot, ck = checkpoints.load_endpoint(whole["snapshots"][0], "snapshot")
    assert ck.optimizer is None and ck.epoch == 1  # an ordinary autoencoder checkpoint
    table = whole["table"]
    assert list(table) == ["snapshots, 1", "snapshots, 2"] and table["snapshots, 1"]["gain"]["loss"] == 0
    assert table["snapshots, 2"]["gain"]["loss"] > 0
    # interrupted in epoch 3 and resumed: the same snapshots as the uninterrupted run
    def ctrl_c(call, loss):
        if call == 29:  # epoch 3, batch 3 (an epoch is 10 train batches, then 3 test batches)
            signal.raise_signal(signal.SIGINT)
        return loss
    import aemc.objective  # the run's loss, trained and evaluated with (fge.py builds it there)
    real_build = aemc.objective.build_loss
    monkeypatch.setattr(aemc.objective, "build_loss", lambda *a, **k: HookedLoss(real_build(*a, **k), ctrl_c))
    with pytest.raises(Interrupted):
        fge.main(fge.get_args_parser().parse_args([*common, "--dir", str(tmp_path / "split")]))
    monkeypatch.undo()
    resumed = fge.main(fge.get_args_parser().parse_args(
        [*common, "--dir", str(tmp_path / "split"), "--resume", str(tmp_path / "split" / "checkpoint-last.pt")]))
    for a, b in zip(whole["snapshots"], resumed["snapshots"]):
        sa, sb = checkpoints.load(a).state_dict, checkpoints.load(b).state_dict
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(UserError, match="cycle: 4 given, 2 in the checkpoint"):
        fge.main(fge.get_args_parser().parse_args(
            [*common[:2], "--cycle", "4", *common[4:], "--dir", str(tmp_path / "split"),
             "--resume", str(tmp_path / "split" / "checkpoint-last.pt")]))


@pytest.mark.slow
def test_bad_flags_are_one_clear_line(ends, trained_curve, tmp_path):
    curve = os.path.join(trained_curve, "checkpoint-last.pt")
    train_main("--dir", tmp_path / "wide", *DATA, "--in_filters", "8", "--epochs", "1")
    wide = str(tmp_path / "wide" / "checkpoint-1.pt")
    cases = [
        ("fge.py", ["--ckpt", ends[0], "--cycle", "3", "--dir", tmp_path / "f"], "--cycle must be even"),
        ("fge.py", ["--ckpt", ends[0], "--cycle", "8", "--epochs", "2", "--dir", tmp_path / "f"], "no snapshot"),
        ("fge.py", ["--ckpt", curve, "--dir", tmp_path / "f"], "holds a curve, expected an autoencoder"),
        ("ensemble.py", ["--ckpt", curve, "--num_members", "1"], "at least 2 members"),
        ("ensemble.py", ["--ckpt", curve, "--members", "0.5"], "at least 2 members"),
        ("ensemble.py", ["--ckpt", curve], "exactly one of --num_members"),
        ("ensemble.py", ["--ckpt", curve, "--members", "0,1.5"], "invalid member_list value"),
        ("ensemble.py", ["--ckpts", ends[0]], "at least 2 members"),
        ("ensemble.py", ["--ckpts", ends[0], wide], "different architectures"),
        ("ensemble.py", ["--ckpts", ends[0], curve], "holds a curve"),
    ]
    for script, argv, expected in cases:
        r = run_script(script, *argv, "--device", "cpu")
        assert r.returncode == 2 and expected in r.stderr, (script, argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
