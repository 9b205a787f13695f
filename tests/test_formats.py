"""Everything an earlier version wrote still works: the checkpoints, the study state file and the
evaluation report of format 1 (tests/fixtures/v1, made by the code of 23338be) load, evaluate and
resume with today's code.

Numbers are compared with what the old code logged on the machine that made the fixtures. The same
computation from the same state and random stream on another CPU differs only by float32 round-off
(relative 1e-6 at most here: a few hundred accumulated operations); the tolerances below (relative
1e-4) are 100x that, and far below what a wrong resume changes (a lost random state, optimizer or
schedule moves these losses by 1e-3 to 1e-2 relative, measured on the fixtures)."""
import json
import os
import shutil

import pytest
import torch

import dataset
import fge
from aemc import checkpoints, reports, studies
from aemc.evaluation import evaluate, update_bn
from aemc.losses import build_loss
from aemc.paths import PathKey
from aemc.settings import FORMAT, Architecture
from conftest import ROOT, read_log, train_main

V1 = os.path.join(ROOT, "tests", "fixtures", "v1")
DATA = ["--dataset", "synthetic", "--max_images", "64", "--batch_size", "16", "--device", "cpu", "--num_workers", "0"]


def fixture(name):
    return os.path.join(V1, name)


def logged(name):
    """The log the old code wrote for a fixture's run."""
    with open(fixture(name)) as f:
        return [json.loads(line) for line in f]


def test_every_checkpoint_of_format_1_loads_with_its_settings():
    a = checkpoints.load(fixture("endpoint-a-2.pt"), kind="autoencoder")
    assert a.format == "ae-mode-connectivity/1" and a.is_training_state and a.epoch == 2
    assert a.architecture == Architecture("conv", dict(in_channels=3, in_filters=2, latent_dim=4, conv_init="normal"))
    s = a.settings
    assert (s.data.dataset, s.data.max_images, s.data.batch_size, s.data.num_workers) == ("synthetic", 64, 16, 0)
    assert (s.loss.loss_function, s.optim.optim_name, s.optim.lr, s.training.epochs, s.training.seed) == \
        ("mae", "Adam", 1e-3, 2, 1)
    curve = checkpoints.load(fixture("curve-1.pt"), kind="curve")
    assert curve.curve_config["curve"] == "Bezier" and curve.curve_config["num_bends"] == 3
    assert curve.epoch == 1 and curve.settings.training.seed == 3
    for name in ("point.pt", "aligned.pt"):  # autoencoders that are not training states
        ck = checkpoints.load(fixture(name), kind="autoencoder")
        assert not ck.is_training_state and ck.settings.data.max_images == 64
    assert checkpoints.load(fixture("aligned.pt")).source["alignment"]["method"] == "weight"
    f = checkpoints.load(fixture("fge-2.pt")).settings.fge
    assert (f.cycle, f.lr_1, f.lr_2) == (2, 1e-3, 1e-5) and len(f.source_sha256) == 64


def test_a_format_1_endpoint_evaluates_to_the_loss_its_run_logged():
    ck = checkpoints.load(fixture("endpoint-a-2.pt"))
    model = checkpoints.build_model(ck)
    _, test = dataset.build_loaders(ck.settings.data, torch.device("cpu"))
    loss = evaluate(model, test, {"loss": build_loss("mae")})["loss"]
    assert loss == pytest.approx(logged("endpoint-a-log.jsonl")[-1]["test_loss"], rel=1e-4)


def test_a_format_1_endpoint_resumes_to_the_run_it_was_part_of(tmp_path):
    train_main("--dir", tmp_path, *DATA, "--lr", "1e-3", "--epochs", "2", "--save_freq", "1",
               "--resume", fixture("endpoint-a-1.pt"))
    (resumed,) = read_log(tmp_path)
    old = logged("endpoint-a-log.jsonl")[-1]
    assert resumed["epoch"] == 2 and resumed["lr"] == pytest.approx(old["lr"], rel=1e-12)
    assert resumed["train_loss"] == pytest.approx(old["train_loss"], rel=1e-4)
    assert resumed["test_loss"] == pytest.approx(old["test_loss"], rel=1e-4)
    new = checkpoints.load(str(tmp_path / "checkpoint-2.pt"))
    reference = checkpoints.load(fixture("endpoint-a-2.pt"))
    assert new.format == FORMAT and new.architecture == reference.architecture
    for name, value in reference.state_dict.items():
        assert torch.allclose(new.state_dict[name].float(), value.float(), rtol=1e-4, atol=1e-6), name


def test_a_format_1_curve_resumes_and_evaluates(tmp_path):
    train_main("--dir", tmp_path / "curve", *DATA, "--lr", "1e-3", "--epochs", "2", "--save_freq", "1", "--seed", "3",
               "--resume", fixture("curve-1.pt"))
    (resumed,) = read_log(tmp_path / "curve")
    old = logged("curve-log.jsonl")[-1]
    for key in ("train_loss", "test_loss", "reg"):
        assert resumed[key] == pytest.approx(old[key], rel=1e-4), key
    import eval_curve
    walked = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", fixture("curve-1.pt"), "--num_points", "3", "--device", "cpu", "--dir", str(tmp_path / "eval")]))
    curve, segment = walked["paths"][PathKey("curve", "Bezier", 3)], walked["paths"][PathKey("segment")]
    assert curve["test_loss"][0] == pytest.approx(segment["test_loss"][0], abs=1e-6)  # one start


def test_format_1_points_are_endpoints_of_a_segment(tmp_path):
    import eval_curve
    walked = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--connect", "TRIVIAL", "--init_start", fixture("point.pt"), "--init_end", fixture("aligned.pt"),
         "--num_points", "2", "--device", "cpu", "--dir", str(tmp_path)]))
    (segment,) = walked["paths"].values()
    ck = checkpoints.load(fixture("aligned.pt"))
    model = checkpoints.build_model(ck)
    train, test = dataset.build_loaders(ck.settings.data, torch.device("cpu"))
    update_bn(train.ordered(), model)  # the walk re-estimates BatchNorm at every point: so must we
    assert segment["test_loss"][1] == pytest.approx(evaluate(model, test, {"loss": build_loss("mae")})["loss"], rel=1e-5)


def test_a_format_1_fge_run_resumes(tmp_path):
    run = tmp_path / "fge"  # the old run's folder, stopped after epoch 2 of 4: its snapshot and state
    run.mkdir()
    shutil.copy(fixture("fge-snapshot-1.pt"), run / "snapshot-1.pt")
    shutil.copy(fixture("fge-2.pt"), run / "checkpoint-last.pt")
    result = fge.main(fge.get_args_parser().parse_args(
        ["--ckpt", fixture("endpoint-a-2.pt"), "--cycle", "2", "--epochs", "4", "--dir", str(run),
         "--resume", str(run / "checkpoint-last.pt"), *DATA]))
    old = logged("fge-log.jsonl")
    new = read_log(run)
    assert [r["epoch"] for r in new] == [3, 4]
    for a, b in zip(new, old[2:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    # the table joins the old run's snapshot (format 1) and the new one
    assert list(result["table"]) == ["snapshots, 1", "snapshots, 2"] and result["table"]["snapshots, 2"]["gain"]["loss"] > 0


def test_a_study_begun_by_format_1_continues_with_the_same_stages(tmp_path, monkeypatch):
    with open(fixture("study.json")) as f:
        recorded = json.load(f)["stages"]
    monkeypatch.chdir(tmp_path)  # the fixture's study ran in a folder holding fx/study
    settings = studies.StudySettings(**{**vars(studies.PRESETS["tiny"]), "losses": ("mae",),
                                        "inits": ("normal", "kaiming_normal"), "max_images": 64, "in_filters": 2,
                                        "latent_dim": 4, "num_points": 3})
    stages = studies.plan("fx/study", settings)
    assert [s.name for s in stages] == list(recorded)
    for stage in stages:
        assert stage.argv == recorded[stage.name]["argv"], stage.name
        if recorded[stage.name].get("output"):
            assert stage.output == recorded[stage.name]["output"]


def test_a_format_1_report_reads_keyed_by_path():
    report = reports.read_walks(fixture("eval-report.json"))
    assert set(report.paths) == {PathKey("curve", "Bezier", 3), PathKey("segment")}
    assert len(report.paths[PathKey("segment")]["test_loss"]) == 3 and report.loss == "mae"
