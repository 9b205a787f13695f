"""Weights & Biases, offline (WANDB_MODE=offline: nothing contacts a server): the run folder holds
the logged settings, metrics, media and tables with the values the run's own files hold."""
import glob
import json
import os

import pytest

from conftest import DATA, TINY, read_log, run_script, train_main


def offline_run(folder):
    """The files/ folder of the one offline W&B run under `folder`/wandb."""
    (run,) = glob.glob(os.path.join(folder, "wandb", "offline-run-*"))
    return os.path.join(run, "files")


def records(files):
    """The records of an offline run's .wandb file (LevelDB's log format: 32 KiB blocks of chunks,
    each with a 7-byte header: CRC, length, type; the payloads are wandb's protobuf Records):
    {"history": [{key: value}], "summary": {key: value}, "config": {key: value}, "run": Record.run}."""
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = glob.glob(os.path.join(os.path.dirname(files), "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    out = {"history": [], "summary": {}, "config": {}, "run": None}
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and pending:  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")

            def key(item):
                return item.key or "/".join(item.nested_key)
            if which == "history":
                out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif which == "summary":
                out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
            elif which == "config":
                out["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
            elif which == "run":
                out["run"] = record.run
                out["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
    return out


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb")  # the optional extra; the test extra installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


@pytest.mark.slow
def test_training_and_a_walk_log_their_settings_metrics_media_and_barriers(tmp_path, offline):
    track = ["--wandb", "--wandb_project", "aemc-tests", "--wandb_group", "g1"]
    runs = {}
    for name, seed in (("a", 1), ("b", 2)):
        train_main("--dir", tmp_path / name, *TINY, "--epochs", "2", "--seed", str(seed), *track)
        runs[name] = offline_run(tmp_path / name)
    files, log = runs["a"], read_log(tmp_path / "a")
    logged = records(files)
    history = [h for h in logged["history"] if "test_loss" in h]
    assert [h["_step"] for h in history] == [1, 2]  # one row per epoch, at the epoch
    for row, line in zip(history, log):
        assert row["test_loss"] == pytest.approx(line["test_loss"], rel=1e-9)
        assert row["train_loss"] == pytest.approx(line["train_loss"], rel=1e-9) and row["lr"] == line["lr"]
    assert logged["summary"]["test_loss"] == pytest.approx(log[-1]["test_loss"], rel=1e-9)
    config = logged["config"]
    assert config["data"]["dataset"] == "synthetic" and config["training"]["seed"] == 1
    assert config["architecture"]["name"] == "conv" and config["speed"]["amp"] == "none"
    assert logged["run"].run_group == "g1" and logged["run"].job_type == "train" and logged["run"].display_name == "a"
    assert len(glob.glob(os.path.join(files, "media", "images", "reconstructions*.png"))) == 2

    ends = [str(tmp_path / n / "checkpoint-2.pt") for n in ("a", "b")]
    r = run_script("eval_curve.py", "--connect", "TRIVIAL", "--init_start", ends[0], "--init_end", ends[1],
                   "--num_points", "3", "--dir", tmp_path / "eval", *DATA[:4], *track)
    assert r.returncode == 0, r.stderr
    report_path, = glob.glob(str(tmp_path / "eval" / "*.json"))
    with open(report_path) as f:
        report = json.load(f)
    files = offline_run(tmp_path / "eval")
    summary = records(files)["summary"]
    barrier = report["paths"]["segment"]["barriers"]["test_loss"]["barrier_mean_ends"]
    assert summary["segment/test_loss/barrier_mean_ends"] == pytest.approx(barrier, rel=1e-9)
    assert glob.glob(os.path.join(files, "media", "images", "loss_plot*.png"))
    assert glob.glob(os.path.join(files, "media", "videos", "segment_gif*.gif"))
    (table,) = glob.glob(os.path.join(files, "media", "table", "barriers*.table.json"))
    with open(table) as f:
        rows = json.load(f)
    named = {(row[0], row[1]): row for row in rows["data"]}
    assert rows["columns"][:3] == ["path", "metric", "barrier_mean_ends"]
    assert named["segment", "test_loss"][2] == pytest.approx(barrier, rel=1e-9)


def test_without_the_package_the_flag_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    from aemc.errors import UserError
    with pytest.raises(UserError, match=r'pip install "\.\[wandb\]"'):
        train_main("--dir", tmp_path / "a", *TINY, "--epochs", "1", "--wandb")
    assert not os.path.exists(tmp_path / "a" / "checkpoint-1.pt")
