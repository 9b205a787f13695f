import os
import shutil

import pytest
import torch
from PIL import Image

import check_ends
import dataset
import eval_curve
import extract_point
from aemc import checkpoints
from aemc.data.loader import TensorLoader, to_float
from aemc.data.synthetic import synthetic_faces
from aemc.errors import UserError
from aemc.evaluation import evaluate, output_difference, update_bn, weight_distance
from aemc.files import file_digest
from aemc.losses import LaplacianPyramidLoss
from conftest import DATA, TINY, curve_argv, read_log, run_script
from conftest import train_main as _train
from models.autoencoder import Autoencoder
from models.curves import CurveNet


def initial_midpoint_test_loss(ends):
    """Midpoint of the untrained (linear) curve, BN re-estimated on the same 10 batches as train.py."""
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    net = CurveNet(a, "Bezier", 3)
    net.import_base(a, 0)
    net.import_base(b, 2)
    net.init_linear()
    train_images, test_images = dataset.split_images(synthetic_faces(400), 0.2)
    point = net.point_at(0.5)
    update_bn(TensorLoader(train_images, 32), point, num_batches=10)
    return evaluate(point, TensorLoader(test_images, 32), {"l1": torch.nn.L1Loss()})["l1"]


@pytest.mark.slow
def test_training_a_bezier_curve_lowers_the_midpoint_loss(ends, trained_curve):
    before = initial_midpoint_test_loss(ends)
    log = read_log(trained_curve)
    assert all(r["test_loss_at"] == "t=0.5" for r in log)
    assert log[-1]["test_loss"] < 0.97 * before
    assert log[-1]["train_loss"] < log[0]["train_loss"]


@pytest.mark.slow
def test_curve_checkpoint_is_self_describing(ends, trained_curve):
    ck = checkpoints.load(os.path.join(trained_curve, "checkpoint-last.pt"), kind="curve")
    cfg = ck.curve_config
    assert cfg["curve"] == "Bezier" and cfg["num_bends"] == 3 and cfg["fix_start"] and cfg["fix_end"]
    assert cfg["init_start"] == os.path.abspath(ends[0]) and cfg["init_start_sha256"] == file_digest(ends[0])
    assert cfg["init_end_sha256"] == file_digest(ends[1])
    assert ck.architecture.kwargs["in_filters"] == 4  # architecture taken from the endpoints
    # the optimizer has no weight decay of its own: the curve's is the explicit term
    assert all(g["weight_decay"] == 0 for g in ck.optimizer["param_groups"])
    curve = checkpoints.build_model(ck)
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    for name, p in a.named_parameters():  # fixed ends are exactly the endpoints after training
        assert torch.equal(curve.bends[0].get_parameter(name), p)
        assert torch.equal(curve.bends[2].get_parameter(name), dict(b.named_parameters())[name])


@pytest.mark.slow
def test_logged_regulariser_is_half_wd_times_the_squared_norm(trained_curve):
    ck = checkpoints.load(os.path.join(trained_curve, "checkpoint-last.pt"))
    curve = checkpoints.build_model(ck)
    norms = [sum((p ** 2).sum() for p in curve.point_at(t).parameters()).item() for t in (0.0, 0.5, 1.0)]
    reg = read_log(trained_curve)[-1]["reg"]
    # reg is the mean over batches of 0.5 * wd * ||theta(t)||^2 at random t: within the range along t
    assert 0.5 * 1e-6 * min(norms) * 0.9 <= reg <= 0.5 * 1e-6 * max(norms) * 1.1


@pytest.mark.slow
def test_curve_resume_equals_the_uninterrupted_run(ends, trained_curve, tmp_path):
    _train(*curve_argv(tmp_path, ends, "--epochs", "4", "--save_freq", "1",
                       "--resume", os.path.join(trained_curve, "checkpoint-2.pt")))
    a = checkpoints.load(os.path.join(trained_curve, "checkpoint-4.pt")).state_dict
    b = checkpoints.load(os.path.join(tmp_path, "checkpoint-4.pt")).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path)[-1] == {**read_log(trained_curve)[-1], "time": read_log(tmp_path)[-1]["time"]}


@pytest.mark.slow
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
    ck = checkpoints.load(os.path.join(tmp_path, "checkpoint-last.pt"), kind="curve")
    assert ck.curve_config["curve"] == "PolyChain" and ck.curve_config["init_start"] is None


# ----------------------------------------------------------------------------- check_ends.py

@pytest.mark.slow
def test_check_ends_passes_on_a_trained_curve_and_writes_grids(trained_curve, tmp_path):
    r = run_script("check_ends.py", "--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"),
                   "--device", "cpu", "--dir", tmp_path, separate_process=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("max |curve(t) - endpoint| = 0.000e+00") == 2
    assert "||w_end - w_start||" in r.stdout and "all checks passed" in r.stdout
    for t in (0, 1):
        with Image.open(tmp_path / f"check_ends-t{t}.png") as im:
            assert im.size == (8 * 66 + 2, 3 * 66 + 2)  # originals | endpoint | curve end


@pytest.mark.slow
def test_weight_distance_and_output_difference_by_hand(ends):
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    a.eval(), b.eval()
    x = [torch.rand(4, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1]
    with torch.no_grad():
        d = torch.cat([(a(xi) - b(xi)).abs().flatten() for xi in x])
    peak, mean = output_difference(a, b, x)
    assert peak == pytest.approx(d.max().item()) and mean == pytest.approx(d.mean().item(), rel=1e-6)
    assert output_difference(a, a, x) == (0.0, 0.0)
    distance, norm = weight_distance(a, b)
    by_hand = sum(((pa - pb) ** 2).sum() for pa, pb in zip(a.parameters(), b.parameters())).sqrt()
    assert distance == pytest.approx(by_hand.item(), rel=1e-5)
    assert norm == pytest.approx(sum((p ** 2).sum() for p in a.parameters()).sqrt().item(), rel=1e-5)


@pytest.mark.slow
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

@pytest.mark.slow
def test_extracted_point_is_an_autoencoder_checkpoint_with_bn_reestimated(ends, trained_curve, tmp_path):
    curve_path = os.path.join(trained_curve, "checkpoint-last.pt")
    out = tmp_path / "mid.pt"
    extract_point.main(extract_point.get_args_parser().parse_args(
        ["--ckpt", curve_path, "--t", "0.5", "--out", str(out), "--device", "cpu"]))
    model, ck = checkpoints.load_endpoint(str(out), "point")
    assert ck.source["t"] == 0.5 and ck.source["curve_sha256"] == file_digest(curve_path)
    curve = checkpoints.build_model(checkpoints.load(curve_path))
    expected = curve.point_at(0.5)
    assert all(torch.equal(p, dict(model.named_parameters())[k]) for k, p in expected.named_parameters())
    train_images, _ = dataset.split_images(synthetic_faces(400), 0.2)
    update_bn(TensorLoader(train_images, 32), expected)  # the whole training split
    assert all(torch.allclose(v, dict(model.named_buffers())[k]) for k, v in expected.named_buffers())
    # usable wherever an endpoint is: here as the end of a fresh curve in check_ends.py
    r = run_script("check_ends.py", "--curve", "PolyChain", "--init_start", ends[0], "--init_end", out,
                   "--device", "cpu", "--dir", tmp_path, *DATA)
    assert r.returncode == 0, r.stderr
    with pytest.raises(UserError, match="not a training state"):
        _train("--dir", tmp_path / "r", *DATA, "--resume", out)


def _bend(ck, k):
    """Bend k of a curve checkpoint as a flat parameter vector."""
    return torch.cat([v.flatten() for n, v in ck.state_dict.items() if n.startswith(f"bends.{k}.")])


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_free_ends_are_trained_and_check_ends_reports_it_as_expected(ends, tmp_path):
    _train("--dir", tmp_path, *DATA, "--lr", "1e-3", "--curve", "Bezier", "--num_bends", "3",
           "--init_start", ends[0], "--init_end", ends[1], "--epochs", "1")
    ck = checkpoints.load(os.path.join(tmp_path, "checkpoint-last.pt"))
    assert not ck.curve_config["fix_start"] and not ck.curve_config["fix_end"]
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    assert (_bend(ck, 0) - _params(a)).abs().max() > 1e-4 and (_bend(ck, 2) - _params(b)).abs().max() > 1e-4
    r = run_script("check_ends.py", "--ckpt", os.path.join(tmp_path, "checkpoint-last.pt"),
                   "--device", "cpu", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("moved, as expected: a free end is trained") == 2 and "all checks passed" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("linear", [True, False])
def test_interior_bends_start_on_the_segment_unless_init_linear_off(ends, tmp_path, linear):
    # a learning rate of 1e-9 leaves every bend where it started (Adam moves each weight ~lr per step)
    _train(*curve_argv(tmp_path, ends, "--epochs", "1", "--lr", "1e-9", "--seed", "7",
                       *([] if linear else ["--init_linear_off"])))
    ck = checkpoints.load(os.path.join(tmp_path, "checkpoint-last.pt"))
    assert ck.curve_config["init_linear"] is linear
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    midpoint = 0.5 * (_params(a) + _params(b))
    torch.manual_seed(7)  # train.py's first draw after seeding is the curve's template initialisation
    template = _params(Autoencoder(in_filters=4, latent_dim=8))
    start = midpoint if linear else template
    other = template if linear else midpoint
    assert (_bend(ck, 1) - start).abs().max() < 1e-6
    assert (_bend(ck, 1) - other).abs().max() > 1e-2


@pytest.mark.slow
def test_a_curve_trained_with_the_laplacian_loss_reports_that_loss_at_the_midpoint(ends, tmp_path):
    _train(*curve_argv(tmp_path, ends, "--epochs", "1", "--loss_function", "laplacian", "--num_filters", "3"))
    ck = checkpoints.load(os.path.join(tmp_path, "checkpoint-last.pt"))
    point = checkpoints.build_model(ck).point_at(0.5)
    train_images, test_images = dataset.split_images(synthetic_faces(400), 0.2)
    update_bn(TensorLoader(train_images, 32), point, num_batches=10)  # --midpoint_bn_batches 10
    point.eval()
    x = to_float(test_images)
    with torch.no_grad():
        pyramid = LaplacianPyramidLoss(3)(point(x), x).item()
    assert read_log(tmp_path)[-1]["test_loss"] == pytest.approx(pyramid, rel=1e-5)


@pytest.mark.slow
def test_a_changed_or_missing_endpoint_file_is_named(ends, tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    shutil.copy(ends[0], a)
    shutil.copy(ends[1], b)
    _train(*curve_argv(tmp_path / "curve", (str(a), str(b)), "--epochs", "1"))
    curve = str(tmp_path / "curve" / "checkpoint-1.pt")
    shutil.copy(ends[0], b)  # the end endpoint is overwritten (say, retrained into the same place)
    with pytest.raises(UserError, match=r"the --init_end endpoint .*b.pt has changed since the curve was trained"):
        check_ends.main(check_ends.get_args_parser().parse_args(["--ckpt", curve, "--device", "cpu"]))
    capsys.readouterr()
    eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", curve, "--num_points", "2", "--no_segment", "--device", "cpu", "--dir", str(tmp_path / "e")]))
    err = capsys.readouterr().err
    assert "warning: the --init_end endpoint" in err and "uses the curve's own copy of its ends" in err
    _train(*curve_argv(tmp_path / "curve", (str(a), str(b)), "--epochs", "2", "--resume", curve))
    assert "has changed since the curve was trained" in capsys.readouterr().err
    os.remove(a)
    with pytest.raises(UserError, match=r"the --init_start endpoint .*a.pt recorded in the curve is gone"):
        check_ends.main(check_ends.get_args_parser().parse_args(["--ckpt", curve, "--device", "cpu"]))


@pytest.mark.slow
def test_a_curve_without_data_flags_trains_on_its_endpoints_data(tmp_path, monkeypatch):
    """The v1 fixtures' endpoints were trained on 64 synthetic images in batches of 16: a curve given
    no data flag inherits them (it used to try to download CelebA) and says so in one line."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a download attempt fails at once
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    v1 = os.path.join(os.path.dirname(__file__), "fixtures", "v1")
    start, end = os.path.join(v1, "endpoint-a-2.pt"), os.path.join(v1, "endpoint-b-2.pt")
    common = ["--curve", "Bezier", "--init_start", start, "--init_end", end, "--fix_start", "--fix_end",
              "--epochs", "1", "--device", "cpu", "--num_workers", "0", "--midpoint_bn_batches", "1"]
    r = run_script("train.py", "--dir", tmp_path / "inherit", *common)
    assert r.returncode == 0, r.stderr
    endpoint = checkpoints.load(start).settings.data
    assert (endpoint.dataset, endpoint.max_images, endpoint.batch_size) == ("synthetic", 64, 16)
    (line,) = [s for s in r.stdout.splitlines() if s.startswith("data as in")]
    assert line.startswith("data as in --init_start's run: --dataset synthetic")
    assert "--max_images 64" in line and "--batch_size 16" in line and "--num_workers" not in line
    curve = checkpoints.load(str(tmp_path / "inherit" / "checkpoint-1.pt")).settings.data
    assert curve == endpoint.__class__(**{**vars(endpoint), "num_workers": 0})
    # a data flag given that differs from the endpoints': allowed, with one warning line
    r = run_script("train.py", "--dir", tmp_path / "other", *common, "--max_images", "48")
    assert r.returncode == 0, r.stderr
    (warning,) = [s for s in r.stderr.splitlines() if s.startswith("warning")]
    assert "--max_images 48" in warning and "endpoints" in warning and "--max_images 64" in warning
    assert checkpoints.load(str(tmp_path / "other" / "checkpoint-1.pt")).settings.data.max_images == 48
