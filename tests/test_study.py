import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import study
from aemc import studies
from aemc.files import file_digest
from conftest import ROOT, run_script

TINY = ["--preset", "tiny", "--losses", "mae", "--inits", "normal,kaiming_normal", "--align", "--max_images", "128",
        "--num_points", "3"]


def run_study(*argv):
    return study.main(study.get_args_parser().parse_args([str(a) for a in argv]))


def recorded(root, name):
    path = os.path.join(root, "study.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["stages"].get(name)
    except ValueError:  # being rewritten this instant
        return None


@pytest.mark.slow
def test_a_killed_study_finishes_without_redoing_stages_and_its_table_is_its_stages(tmp_path):
    root = str(tmp_path / "study")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "study.py"), "--dir", root, *TINY],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (recorded(root, "endpoint mae normal") or {}).get("output_sha256"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and the stage it is running, at once
    proc.wait()
    first = os.path.join(root, "endpoints", "mae-normal")
    digest = file_digest(os.path.join(first, "checkpoint-2.pt"))
    assert (recorded(root, "curve mae normal/kaiming_normal") or {}).get("output_sha256") is None

    result = run_study("--dir", root, *TINY)
    with open(os.path.join(first, "log.jsonl")) as f:
        assert len(f.readlines()) == 2  # the finished endpoint was not trained again
    assert file_digest(os.path.join(first, "checkpoint-2.pt")) == digest
    (row,) = result["rows"]
    report = json.load(open(row["report"]))
    curve = report["paths"]["curve"]
    segment, aligned = report["paths"]["segment"], report["paths"]["aligned_segment"]
    with open(result["files"]["csv"]) as f:
        (table,) = list(csv.DictReader(f))
    expected = {"start_test_loss": curve["test_loss"][0], "end_test_loss": curve["test_loss"][-1],
                "segment_peak": max(segment["test_loss"]), "curve_peak": max(curve["test_loss"]),
                "segment_barrier": segment["barriers"]["test_loss"]["above_mean_of_ends"],
                "curve_barrier": curve["barriers"]["test_loss"]["above_mean_of_ends"],
                "aligned_segment_barrier": aligned["barriers"]["test_loss"]["above_mean_of_ends"],
                "length_ratio": report["length_ratio"]}
    for key, value in expected.items():
        assert float(table[key]) == pytest.approx(value, abs=1e-4), key
    assert (table["loss"], table["start"], table["end"]) == ("mae", "normal", "kaiming_normal")
    assert os.path.isfile(result["files"]["grid"]) and "| mae | normal | kaiming_normal |" in open(result["files"]["md"]).read()
    # the same command again changes nothing; a changed setting is refused
    stamps = {p: os.path.getmtime(p) for p in (row["report"], os.path.join(first, "checkpoint-2.pt"))}
    run_study("--dir", root, *TINY)
    assert {p: os.path.getmtime(p) for p in stamps} == stamps
    r = run_script("study.py", "--dir", root, *TINY, "--curve_epochs", "3")
    assert r.returncode == 2 and "--epochs 2 then, 3 now" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_plan_makes_every_input_before_it_is_used(tmp_path):
    args = study.get_args_parser().parse_args(["--dir", str(tmp_path), "--preset", "paper", "--plane", "--align"])
    stages = studies.plan(str(tmp_path), study.settings_from(args))
    made = set()
    for stage in stages:
        assert all(path in made for path in stage.inputs), stage.name
        made.add(stage.output)
    kinds = [s.name.split()[0] for s in stages]
    assert kinds.count("endpoint") == 6 and kinds.count("curve") == 6 and kinds.count("plane") == 6
    r = run_script("study.py", "--dir", tmp_path, "--preset", "paper", "--print_commands")
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 24 and all(line.startswith("python ") for line in lines)
    assert lines[0].split()[1].endswith("train.py") and "--dataset celeba" in lines[0]
    assert not os.path.exists(tmp_path / "study.json")  # printing runs nothing


def test_bad_presets_and_names_are_one_clear_line(tmp_path):
    for argv, expected in ((["--preset", "huge"], "invalid choice: 'huge'"),
                           (["--preset", "tiny", "--inits", "normal,xavier"], "unknown init xavier"),
                           (["--preset", "tiny", "--losses", "mse"], "unknown loss mse"),
                           (["--preset", "tiny", "--inits", "normal"], "at least two init schemes")):
        r = run_script("study.py", "--dir", tmp_path, *argv)
        assert r.returncode == 2 and expected in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
