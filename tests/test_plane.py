import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval_curve
import plane
from aemc import checkpoints, resumable
from aemc.barriers import barriers, higher_is_better
from aemc.errors import Interrupted, UserError
from aemc.evaluation import PointEvaluator
from aemc.geometry import DegeneratePlane, Plane, names_and_shapes, vector
from conftest import DATA, run_script, train_main
from models.autoencoder import Autoencoder
from models.curves import Bezier, connect


def plane_cli(*argv):
    return plane.main(plane.get_args_parser().parse_args([str(a) for a in argv]))


def random_points(seed, n=50):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n) for _ in range(3)]


# ----------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_basis_is_orthonormal_and_the_three_points_land_where_they_should(seed):
    w0, w1, w2 = random_points(seed)
    p = Plane(w0, w1, w2)
    assert abs(p.u @ p.v) < 1e-10 and np.linalg.norm(p.u) == pytest.approx(1, abs=1e-12)
    assert np.linalg.norm(p.v) == pytest.approx(1, abs=1e-12)
    assert p.dx == pytest.approx(np.linalg.norm(w2 - w0))
    assert p.coordinates(w0) == pytest.approx((0, 0, 0), abs=1e-10)
    assert p.coordinates(w2) == pytest.approx((p.dx, 0, 0), abs=1e-10)
    x_b, y_b, off = p.coordinates(w1)
    assert x_b == pytest.approx((w1 - w0) @ (w2 - w0) / p.dx) and y_b == pytest.approx(p.dy) and off < 1e-10
    assert np.allclose(p.point(x_b, y_b), w1)
    xs, ys = p.grid(5, (0.2, 0.3, 0.1, 0.4))
    assert xs[0] == pytest.approx(-0.2 * p.dx) and xs[-1] == pytest.approx(1.3 * p.dx)
    assert ys[0] == pytest.approx(-0.1 * p.dy) and ys[-1] == pytest.approx(1.4 * p.dy)


def test_degenerate_points_are_errors():
    w0, w1, w2 = random_points(3)
    with pytest.raises(DegeneratePlane, match="same point"):
        Plane(w0, w1, w0.copy())
    with pytest.raises(DegeneratePlane, match="lies on the line"):
        Plane(w0, 0.3 * w0 + 0.7 * w2, w2)
    with pytest.raises(DegeneratePlane, match="lies on the line"):
        Plane(w0, w0.copy(), w2)


def test_a_three_bend_bezier_projects_to_its_quadratic_in_plane_coordinates():
    torch.manual_seed(0)
    models = [Autoencoder(in_filters=4, latent_dim=8) for _ in range(3)]
    curve = connect(models[0], models[2], Bezier, 3, init_linear=False, template=models[1])
    bends = [vector({n: curve.bend_parameters(n)[k] for n in curve.names}) for k in range(3)]
    p = Plane(*bends)
    b = [np.array(p.coordinates(w)[:2]) for w in bends]
    for t in np.linspace(0, 1, 11):
        with torch.no_grad():
            x, y, off = p.coordinates(vector(curve.weights(t)))
        expected = (1 - t) ** 2 * b[0] + 2 * t * (1 - t) * b[1] + t ** 2 * b[2]
        assert np.allclose((x, y), expected, atol=1e-6 * p.dx) and off < 1e-6 * p.dx
    # a 5-bend curve leaves the plane of its ends and its middle bend
    five = connect(models[0], models[2], Bezier, 5)
    with torch.no_grad():  # interior bends 1 and 3 pushed off in independent directions
        for k in (1, 3):
            for p in five.bends[k].parameters():
                p.add_(0.05 * torch.randn_like(p))
    five_bends = [vector({n: five.bend_parameters(n)[k] for n in five.names}) for k in range(5)]
    p5 = Plane(five_bends[0], five_bends[2], five_bends[4])
    with torch.no_grad():
        assert p5.coordinates(vector(five.weights(0.3)))[2] > 1e-3 * p5.dx


def test_the_grid_machinery_reproduces_an_analytic_metric_on_the_whole_grid(tmp_path):
    torch.manual_seed(0)
    template = Autoencoder(in_filters=4, latent_dim=8)
    layout = names_and_shapes(template)
    size = sum(int(np.prod(s)) for _, s in layout)
    rng = np.random.default_rng(0)
    w0, w1, w2, c = (rng.normal(size=size) for _ in range(4))
    p = Plane(w0, w1, w2)
    xs, ys = p.grid(7, (0.2, 0.2, 0.2, 0.2))
    assert [t.shape for t in p.weights(0, 0, layout).values()] == [torch.Size(s) for _, s in layout]
    c_theta = torch.from_numpy(c)

    def squared_distance(xy):  # ||theta(x, y) - c||^2, through the float32 weights the evaluator gets
        theta = p.weights(*xy, layout)
        return {"sq": float(((torch.cat([t.flatten() for t in theta.values()]).double() - c_theta) ** 2).sum())}
    metrics, done = resumable.run(str(tmp_path / "s.npz"), {"what": "analytic"}, [(x, y) for x in xs for y in ys],
                              squared_distance, shape=(7, 7), verbose=False)
    d = w0 - c  # closed form: u, v orthonormal
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    closed = d @ d + 2 * X * (p.u @ d) + 2 * Y * (p.v @ d) + X ** 2 + Y ** 2
    assert done.all() and np.allclose(metrics["sq"], closed, rtol=1e-5)


# ----------------------------------------------------------------------------- the tool

@pytest.fixture(scope="module")
def small_plane(trained_curve, tmp_path_factory):
    out = tmp_path_factory.mktemp("plane")
    result = plane_cli("--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--grid_points", 3,
                       "--margin_left", 0, "--margin_right", 0, "--margin_bottom", 0, "--margin_top", 0,
                       "--bn_batches", 4, "--lpips", "--device", "cpu", "--dir", out)
    return out, result


@pytest.mark.slow
def test_grid_corners_at_the_ends_equal_eval_curve_at_t_0_and_1(small_plane, trained_curve, tmp_path):
    _, result = small_plane
    walked = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--num_points", "2", "--no_segment",
         "--bn_batches", "4", "--lpips", "--device", "cpu", "--dir", str(tmp_path)]))
    (curve,) = walked["paths"].values()
    # margins 0: grid point [0, 0] is the start, [2, 0] the end
    for key in ("train_loss", "test_loss", "test_lpips"):
        assert result["metrics"][key][0, 0] == pytest.approx(curve[key][0], abs=1e-5)
        assert result["metrics"][key][2, 0] == pytest.approx(curve[key][1], abs=1e-5)


@pytest.mark.slow
def test_outputs_hold_the_grid_the_geometry_and_figures(small_plane, trained_curve):
    out, result = small_plane
    files = result["files"]
    arrays = np.load(files["npz"])
    report = json.load(open(files["json"]))
    g = result["geometry"]
    assert arrays["test_loss"].shape == (3, 3) and arrays["done"].all()
    assert np.allclose(arrays["xs"], [0, g["dx"] / 2, g["dx"]]) and np.allclose(arrays["ys_fraction"], [0, 0.5, 1])
    assert np.allclose(arrays["bend_coordinates"][[0, 2]], [[0, 0], [g["dx"], 0]], atol=1e-6)
    assert arrays["bend_coordinates"][1][1] == pytest.approx(g["dy"])
    assert np.allclose(arrays["curve_distance_from_plane"], 0, atol=1e-6 * g["dx"])  # 3 bends: in the plane
    ck = checkpoints.load(os.path.join(trained_curve, "checkpoint-last.pt"))
    assert report["checkpoints"]["ckpt"]["sha256"] and report["dx"] == pytest.approx(g["dx"])
    # the middle of the bottom row is the segment's midpoint: above the curve's middle (the barrier)
    assert result["metrics"]["test_loss"][1, 0] > result["metrics"]["test_loss"][0, 0]
    assert ck.curve_config["num_bends"] == 3
    for key in ("test_loss_plane", "train_loss_plane", "test_lpips_plane", "test_psnr_plane"):
        with Image.open(files[key]) as im:
            assert im.width > 500
    # along the segment (the grid's bottom row, margins 0) the grid is piecewise linear between its
    # nodes, so its barriers are those of the three nodes
    for key in ("test_loss", "test_psnr"):
        expected = barriers([0, 0.5, 1], result["metrics"][key][:, 0], higher_is_better(key))
        assert report["path_barriers"]["segment"][key] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_an_interrupted_plane_continues_to_the_same_arrays(trained_curve, tmp_path, monkeypatch):
    common = ["--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--grid_points", 2,
              "--bn_batches", 2, "--device", "cpu"]
    whole = plane_cli(*common, "--dir", tmp_path / "whole")["metrics"]
    real = PointEvaluator.__call__
    calls = {"n": 0}

    def interrupt_at_the_third(self, theta, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, theta, **kwargs)
    monkeypatch.setattr(PointEvaluator, "__call__", interrupt_at_the_third)
    with pytest.raises(Interrupted, match="after 2 of 4 points"):
        plane_cli(*common, "--dir", tmp_path / "split")
    (partial,) = [f for f in os.listdir(tmp_path / "split") if f.endswith(".npz")]
    saved = np.load(tmp_path / "split" / partial)
    assert saved["done"].sum() == 2 and np.isnan(saved["test_loss"]).sum() == 2  # a valid partial file
    monkeypatch.undo()
    evaluated = []
    monkeypatch.setattr(PointEvaluator, "__call__",
                        lambda self, theta, **kwargs: (evaluated.append(1), real(self, theta, **kwargs))[1])
    resumed = plane_cli(*common, "--dir", tmp_path / "split")["metrics"]
    assert len(evaluated) == 2  # only the points not done
    assert all(np.array_equal(resumed[k], whole[k]) for k in whole)
    with pytest.raises(UserError, match="other settings.*bn_batches: 2 there, 3 now"):
        plane_cli(*common[:-4], "--bn_batches", 3, "--device", "cpu", "--dir", tmp_path / "split")


@pytest.mark.slow
def test_three_endpoints_span_a_plane_and_nan_points_are_kept(ends, tmp_path, monkeypatch):
    train_main("--dir", tmp_path / "c", *DATA, "--in_filters", "4", "--latent_dim", "8", "--epochs", "1",
               "--seed", "3", "--lr", "1e-3")
    third = str(tmp_path / "c" / "checkpoint-1.pt")
    real = PointEvaluator.__call__
    calls = {"n": 0}

    def diverge_once(self, theta, **kwargs):  # the second point's weights blow up
        calls["n"] += 1
        if calls["n"] == 2:
            theta = {k: v * float("inf") for k, v in theta.items()}
        return real(self, theta, **kwargs)
    monkeypatch.setattr(PointEvaluator, "__call__", diverge_once)
    result = plane_cli("--init_start", ends[0], "--init_middle", third, "--init_end", ends[1],
                       "--grid_points", 2, "--bn_batches", 2, "--device", "cpu", "--dir", tmp_path / "p")
    loss = result["metrics"]["test_loss"]
    assert np.isnan(loss[0, 1]) and np.isfinite(loss).sum() == 3
    assert "curve_coordinates" not in result["geometry"]
    report = json.load(open(result["files"]["json"]))
    assert report["metrics"]["test_loss"][0][1] is None  # NaN kept, as JSON null
    assert os.path.isfile(result["files"]["test_loss_plane"])


@pytest.mark.slow
def test_bad_input_is_one_clear_line(ends, trained_curve, tmp_path):
    curve = os.path.join(trained_curve, "checkpoint-last.pt")
    cases = [
        (["--ckpt", curve, "--init_start", ends[0]], "either --ckpt"),
        (["--init_start", ends[0], "--init_end", ends[1]], "all three"),
        (["--init_start", ends[0], "--init_middle", ends[0], "--init_end", ends[1]], "lies on the line"),
        (["--init_start", ends[0], "--init_middle", ends[1], "--init_end", ends[0]], "same point"),
        (["--init_start", curve, "--init_middle", ends[1], "--init_end", ends[0]], "holds a curve, expected an autoencoder"),
        (["--ckpt", ends[0]], "holds an autoencoder, expected a curve"),
        (["--ckpt", curve, "--grid_points", "1"], "at least 2"),
        (["--ckpt", curve, "--margin_left", "-1"], "invalid margin value"),
    ]
    for argv, expected in cases:
        r = run_script("plane.py", *argv, "--device", "cpu", "--dir", tmp_path)
        assert r.returncode == 2 and expected in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
