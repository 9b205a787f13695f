import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import study
from aemc import studies
from aemc.errors import UserError
from aemc.files import file_digest
from conftest import ROOT, run_script

TINY = ["--preset", "tiny", "--losses", "mae", "--inits", "normal,kaiming_normal", "--max_images", "128",
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
    segment = report["paths"]["segment"]
    with open(result["files"]["csv"]) as f:
        (table,) = list(csv.DictReader(f))
    expected = {"start_test_loss": curve["test_loss"][0], "end_test_loss": curve["test_loss"][-1],
                "segment_peak": max(segment["test_loss"]), "curve_peak": max(curve["test_loss"]),
                "segment_barrier_mean_ends": segment["barriers"]["test_loss"]["barrier_mean_ends"],
                "segment_barrier_line": segment["barriers"]["test_loss"]["barrier_line"],
                "curve_barrier_mean_ends": curve["barriers"]["test_loss"]["barrier_mean_ends"],
                "curve_barrier_line": curve["barriers"]["test_loss"]["barrier_line"],
                "length_ratio": report["length_ratio"]}
    for key, value in expected.items():
        assert float(table[key]) == pytest.approx(value, abs=1e-4), key
    assert (table["loss"], table["start"], table["end"]) == ("mae", "normal", "kaiming_normal")
    assert os.path.isfile(result["files"]["figure"]) and "| mae | normal | kaiming_normal |" in open(result["files"]["md"]).read()
    # the same command again changes nothing; a changed setting is refused
    stamps = {p: os.path.getmtime(p) for p in (row["report"], os.path.join(first, "checkpoint-2.pt"))}
    run_study("--dir", root, *TINY)
    assert {p: os.path.getmtime(p) for p in stamps} == stamps
    r = run_script("study.py", "--dir", root, *TINY, "--curve_epochs", "3")
    assert r.returncode == 2 and "--epochs 2 then, 3 now" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the same study with stages side by side (submitit's local executor) gives the same table
    other = run_study("--dir", tmp_path / "parallel", *TINY, "--executor", "local", "--max_parallel", "2")
    with open(other["files"]["csv"]) as f:
        (parallel,) = list(csv.DictReader(f))
    assert {k: v for k, v in parallel.items() if "report" not in k} == {k: v for k, v in table.items()
                                                                        if "report" not in k}
    assert os.path.isfile(tmp_path / "parallel" / "logs" / "endpoint_mae_normal.log")  # a log per stage


def test_an_evaluation_whose_report_lists_a_missing_file_runs_again(tmp_path):
    # a kill while an evaluation wrote its figures leaves a report whose files are not all there
    report = tmp_path / "eval" / "walk.json"
    report.parent.mkdir()
    (report.parent / "walk_loss.png").write_bytes(b"png")
    report.write_text(json.dumps({"files": {"loss_plot": "walk_loss.png", "segment_gif": "walk_segment.gif",
                                            "json": "walk.json"}}))
    stage = studies.Stage("eval_curve x", ["eval_curve.py", "--ckpt", "c.pt"], str(report), [])
    state = studies.StudyState(str(tmp_path))
    state.finished(stage)
    assert state.check(stage) == "todo" and "eval_curve x" not in state.stages  # its record is dropped
    (report.parent / "walk_segment.gif").write_bytes(b"gif")
    state.finished(stage)
    assert state.check(stage) == "done"


@pytest.mark.parametrize("preset", ["paper", "width", "instability", "symmetry"])
def test_the_plan_makes_every_input_before_it_is_used(tmp_path, preset):
    args = study.get_args_parser().parse_args(["--dir", str(tmp_path), "--preset", preset, "--plane", "--align"])
    stages = studies.plan(str(tmp_path), study.settings_from(args))
    made = set()
    for stage in stages:
        assert all(path in made or path.endswith(tuple(f"checkpoint-{k}.pt" for k in range(8))) and
                   any(path.startswith(os.path.dirname(m)) for m in made) for path in stage.inputs), stage.name
        made.add(stage.output)
    names = [s.name for s in stages]
    if preset == "width":  # per width and pair: two endpoints of one init scheme, their curve, one evaluation
        assert len(stages) == 4 * 3 * 4 and names[:8] == [
            "endpoint f=8 pair 1 seed 1", "endpoint f=8 pair 1 seed 2", "curve f=8 pair 1", "eval_curve f=8 pair 1",
            "endpoint f=8 pair 2 seed 3", "endpoint f=8 pair 2 seed 4", "curve f=8 pair 2", "eval_curve f=8 pair 2"]
        assert all(s.argv[s.argv.index("--conv_init") + 1] == "normal" for s in stages if s.name.startswith("endpoint"))
        seeds = [s.argv[s.argv.index("--seed") + 1] for s in stages if s.name.startswith("endpoint f=8 ")]
        assert seeds == ["1", "2", "3", "4", "5", "6"]  # no seed shared between pairs
        assert "--align" in stages[3].argv
    if preset == "instability":  # per parent run (seed p): it keeps every epoch and its init; a spawn per K
        ks = (0, 1, 2, 4, 6)
        assert names == [n for p in (1, 2, 3) for n in [f"parent run {p}"] + [f"spawn at epoch {k} from parent {p}"
                                                                              for k in ks]]
        assert "--save_init" in stages[0].argv and stages[1].inputs[0].endswith("checkpoint-0.pt")
        copies = [tuple(s.argv[s.argv.index("--seeds") + 1:s.argv.index("--seeds") + 3]) for s in stages
                  if s.name.startswith("spawn")]
        parents = [s.argv[s.argv.index("--seed") + 1] for s in stages if s.name.startswith("parent")]
        assert parents == ["1", "2", "3"] and len({c for c in copies}) == 3  # one pair of copy seeds per parent
        assert not {seed for c in copies for seed in c} & set(parents)
    if preset == "symmetry":  # per pair: two endpoints, the curve, four aligned segments, the curve, layers, stitching
        assert names[:10] == ["endpoint pair 1 seed 1", "endpoint pair 1 seed 2", "curve pair 1",
                              "segment weight pair 1", "segment activation pair 1", "segment ste pair 1",
                              "segment latent pair 1", "curve eval pair 1", "layerwise pair 1", "stitch pair 1"]
        assert len(stages) == 3 * 10
        method = {s.name.split()[1]: s.argv for s in stages[3:7]}
        assert "--repair" in method["weight"] and all("--align" in argv for argv in method.values())
        assert method["ste"][method["ste"].index("--align_method") + 1] == "ste"
        assert method["latent"][method["latent"].index("--align_latent") + 1] == "orthogonal"
        assert stages[9].argv[:1] == ["stitch.py"] and "all" in stages[9].argv
    if preset != "paper":
        return
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


@pytest.mark.slow
def test_ctrl_c_of_a_study_while_a_stage_trains_leaves_no_temporaries_and_the_rerun_completes(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the study and the training stage it runs.
    Both stop (non-zero exit), nothing half-written is left, and the same command again finishes."""
    root = str(tmp_path / "study")
    argv = ["--dir", root, "--preset", "tiny", "--losses", "mae", "--inits", "normal,kaiming_normal",
            "--max_images", "40", "--num_points", "2", "--curve_epochs", "1"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "study.py"), *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        last = os.path.join(root, "endpoints", "mae-normal", "checkpoint-last.pt")
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(last):  # epoch 1 done: epoch 2 is training
            time.sleep(0.05)
        assert os.path.exists(last), "the first stage never finished an epoch"
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    assert code != 0, open(tmp_path / "stderr.txt").read()
    left = [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names if ".tmp-" in name]
    assert not left
    assert (recorded(root, "curve mae normal/kaiming_normal") or {}).get("output_sha256") is None
    result = run_study(*argv)
    (row,) = result["rows"]
    assert os.path.isfile(row["report"]) and os.path.isfile(result["files"]["csv"])
    with open(os.path.join(root, "endpoints", "mae-normal", "log.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]  # resumed where it stopped, nothing twice


def test_an_mlp_study_gives_its_stages_only_flags_an_mlp_takes(tmp_path):
    settings = dataclasses.replace(studies.PRESETS["instability"], arch="mlp", spawn_epochs=(0, 2), pairs=2)
    stages = studies.plan(str(tmp_path), settings)
    trainings = [s for s in stages if s.argv[0] == "train.py"]
    assert len(trainings) == 2 and not any("--conv_init" in s.argv or "--in_filters" in s.argv for s in trainings)
    parser = __import__("train").get_args_parser()
    for stage in trainings:  # what train.py would be given parses, and names the MLP
        assert parser.parse_args(stage.argv[1:]).arch == "mlp"
    with pytest.raises(UserError, match="takes no conv_init"):
        studies.plan(str(tmp_path), dataclasses.replace(studies.PRESETS["tiny"], arch="mlp"))
