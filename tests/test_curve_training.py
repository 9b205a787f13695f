import os

import pytest
import torch
from PIL import Image

import check_ends
import dataset
import extract_point
import trainer
from conftest import DATA, TINY, curve_argv, read_log, run_script, train_main as _train
from models.curves import CurveNet
from utils import UserError, file_digest, update_bn

def initial_midpoint_test_loss(ends):
    """Midpoint of the untrained (linear) curve, BN re-estimated on the same 10 batches as train.py."""
    (a, _), (b, _) = [trainer.load_endpoint(p, "end") for p in ends]
    net = CurveNet(a, "Bezier", 3)
    net.import_base(a, 0)
    net.import_base(b, 2)
    net.init_linear()
    train_images, test_images = dataset.split_images(dataset.synthetic_faces(400), 0.2)
    point = net.point_at(0.5)
    update_bn(dataset.TensorLoader(train_images, 32), point, num_batches=10)
    return trainer.evaluate(point, dataset.TensorLoader(test_images, 32), {"l1": torch.nn.L1Loss()})["l1"]


def test_training_a_bezier_curve_lowers_the_midpoint_loss(ends, trained_curve):
    before = initial_midpoint_test_loss(ends)
    log = read_log(trained_curve)
    assert all(r["test_loss_at"] == "t=0.5" for r in log)
    assert log[-1]["test_loss"] < 0.97 * before
    assert log[-1]["train_loss"] < log[0]["train_loss"]


def test_curve_checkpoint_is_self_describing(ends, trained_curve):
    ck = trainer.load_checkpoint(os.path.join(trained_curve, "checkpoint-last.pt"), kind="curve")
    cfg = ck["curve_config"]
    assert cfg["curve"] == "Bezier" and cfg["num_bends"] == 3 and cfg["fix_start"] and cfg["fix_end"]
    assert cfg["init_start"] == os.path.abspath(ends[0]) and cfg["init_start_sha256"] == file_digest(ends[0])
    assert cfg["init_end_sha256"] == file_digest(ends[1])
    assert ck["model_config"]["in_filters"] == 4  # architecture taken from the endpoints
    # the optimizer has no weight decay of its own: the curve's is the explicit term
    assert all(g["weight_decay"] == 0 for g in ck["optimizer"]["param_groups"])
    curve = trainer.model_from_checkpoint(ck)
    (a, _), (b, _) = [trainer.load_endpoint(p, "end") for p in ends]
    for name, p in a.named_parameters():  # fixed ends are exactly the endpoints after training
        assert torch.equal(curve.bends[0].get_parameter(name), p)
        assert torch.equal(curve.bends[2].get_parameter(name), dict(b.named_parameters())[name])


def test_logged_regulariser_is_half_wd_times_the_squared_norm(trained_curve):
    ck = trainer.load_checkpoint(os.path.join(trained_curve, "checkpoint-last.pt"))
    curve = trainer.model_from_checkpoint(ck)
    norms = [sum((p ** 2).sum() for p in curve.point_at(t).parameters()).item() for t in (0.0, 0.5, 1.0)]
    reg = read_log(trained_curve)[-1]["reg"]
    # reg is the mean over batches of 0.5 * wd * ||theta(t)||^2 at random t: within the range along t
    assert 0.5 * 1e-6 * min(norms) * 0.9 <= reg <= 0.5 * 1e-6 * max(norms) * 1.1


def test_curve_resume_equals_the_uninterrupted_run(ends, trained_curve, tmp_path):
    _train(*curve_argv(tmp_path, ends, "--epochs", "4", "--save_freq", "1",
                       "--resume", os.path.join(trained_curve, "checkpoint-2.pt")))
    a = trainer.load_checkpoint(os.path.join(trained_curve, "checkpoint-4.pt"))["state_dict"]
    b = trainer.load_checkpoint(os.path.join(tmp_path, "checkpoint-4.pt"))["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path)[-1] == {**read_log(trained_curve)[-1], "time": read_log(tmp_path)[-1]["time"]}


def test_bad_curve_inputs_are_clear_errors(ends, tmp_path):
    wide = tmp_path / "wide"
    _train("--dir", wide, *TINY, "--in_filters", "8", "--epochs", "1")
    cases = [
        (curve_argv(tmp_path / "1", (ends[0], str(wide / "checkpoint-1.pt"))), "different architectures: in_filters 4"),
        (curve_argv(tmp_path / "2", ends, "--in_filters", "8"), "in_filters: 8 given, 4 in the checkpoint"),
        (curve_argv(tmp_path / "3", ends, "--num_bends", "1"), "num_bends >= 2"),
        (curve_argv(tmp_path / "4", ends, "--resume", ends[0]), "holds an autoencoder, not a curve"),
        (curve_argv(tmp_path / "5", (ends[0], str(tmp_path / "missing.pt"))), "does not exist"),
    ]
    for argv, expected in cases:
        with pytest.raises(UserError, match=expected):
            _train(*argv)
    r = run_script("train.py", *curve_argv(tmp_path / "6", ends)[:-4], "--curve", "spline")
    assert r.returncode == 2 and "unknown curve 'spline'" in r.stderr and "Traceback" not in r.stderr


def test_without_endpoints_the_curve_starts_from_the_init_with_a_warning(tmp_path, capsys):
    _train("--dir", tmp_path, *TINY, "--curve", "PolyChain", "--epochs", "1")
    assert "without --init_start and --init_end" in capsys.readouterr().err
    ck = trainer.load_checkpoint(os.path.join(tmp_path, "checkpoint-last.pt"), kind="curve")
    assert ck["curve_config"]["curve"] == "PolyChain" and ck["curve_config"]["init_start"] is None


# ----------------------------------------------------------------------------- check_ends.py

def test_check_ends_passes_on_a_trained_curve_and_writes_grids(trained_curve, tmp_path):
    r = run_script("check_ends.py", "--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"),
                   "--device", "cpu", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("max |curve(t) - endpoint| = 0.000e+00") == 2
    assert "||w_end - w_start||" in r.stdout and "all checks passed" in r.stdout
    for t in (0, 1):
        with Image.open(tmp_path / f"check_ends-t{t}.png") as im:
            assert im.size == (8 * 66 + 2, 3 * 66 + 2)  # originals | endpoint | curve end


def test_check_ends_functions_measure_what_they_say(ends, trained_curve):
    curve = trainer.model_from_checkpoint(
        trainer.load_checkpoint(os.path.join(trained_curve, "checkpoint-last.pt")))
    (a, _), (b, _) = [trainer.load_endpoint(p, "end") for p in ends]
    x = [torch.rand(4, 3, 64, 64) * 2 - 1]
    assert check_ends.max_output_difference(check_ends.curve_end(curve, 0, a), a, x) == 0.0
    assert check_ends.max_output_difference(check_ends.curve_end(curve, 0.5, a), a, x) > 1e-3
    distance, norm = check_ends.weight_distance(a, b)
    by_hand = sum(((pa - pb) ** 2).sum() for pa, pb in zip(a.parameters(), b.parameters())).sqrt()
    assert distance == pytest.approx(by_hand.item(), rel=1e-5) and norm > 0


def test_check_ends_fails_when_an_end_does_not_match_or_endpoints_are_the_same(ends, trained_curve, tmp_path):
    r = run_script("check_ends.py", "--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"),
                   "--init_end", ends[0], "--device", "cpu", "--dir", tmp_path)
    assert r.returncode == 1 and "the curve at t=1 differs from its endpoint" in r.stderr
    r = run_script("check_ends.py", "--curve", "bezier", "--init_start", ends[0], "--init_end", ends[0],
                   "--device", "cpu", "--dir", tmp_path, *DATA)
    assert r.returncode == 1 and "same solution" in r.stderr and "Traceback" not in r.stderr
    r = run_script("check_ends.py", "--device", "cpu")
    assert r.returncode == 2 and "give --ckpt" in r.stderr


# ----------------------------------------------------------------------------- extract_point.py

def test_extracted_point_is_an_autoencoder_checkpoint_with_bn_reestimated(ends, trained_curve, tmp_path):
    curve_path = os.path.join(trained_curve, "checkpoint-last.pt")
    out = tmp_path / "mid.pt"
    extract_point.main(extract_point.get_args_parser().parse_args(
        ["--ckpt", curve_path, "--t", "0.5", "--out", str(out), "--device", "cpu"]))
    model, ck = trainer.load_endpoint(str(out), "point")
    assert ck["source"]["t"] == 0.5 and ck["source"]["curve_sha256"] == file_digest(curve_path)
    curve = trainer.model_from_checkpoint(trainer.load_checkpoint(curve_path))
    expected = curve.point_at(0.5)
    assert all(torch.equal(p, dict(model.named_parameters())[k]) for k, p in expected.named_parameters())
    train_images, _ = dataset.split_images(dataset.synthetic_faces(400), 0.2)
    update_bn(dataset.TensorLoader(train_images, 32), expected)  # the whole training split
    assert all(torch.allclose(v, dict(model.named_buffers())[k]) for k, v in expected.named_buffers())
    # usable wherever an endpoint is: here as the end of a fresh curve in check_ends.py
    r = run_script("check_ends.py", "--curve", "PolyChain", "--init_start", ends[0], "--init_end", out,
                   "--device", "cpu", "--dir", tmp_path, *DATA)
    assert r.returncode == 0, r.stderr
    with pytest.raises(UserError, match="not a training state"):
        _train("--dir", tmp_path / "r", *DATA, "--resume", out)
