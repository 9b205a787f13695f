"""torchrun on the CPU (gloo), 2 processes of one thread each: training equals its single-process
reference, evaluations equal single-process runs, and exactly one set of files is written."""
import json
import os
import subprocess
import sys

import ddp_worker
import numpy as np
import pytest
import torch
from torch import nn

from aemc import checkpoints
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import synthetic_faces
from conftest import ROOT, TINY, read_log, run_script, train_main

pytestmark = pytest.mark.slow


def torchrun(*argv, timeout=300):
    """`torchrun --standalone --nproc-per-node 2 ...` with one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def reference_steps(mode, ts=None):
    """One process, the same global batches: each process's half of a batch is forwarded on its own
    (BatchNorm normalises over each process's share, as DistributedDataParallel without
    SyncBatchNorm does), at that process's t, and the halves' losses are averaged."""
    model = ddp_worker.build(mode)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    loader = TensorLoader(synthetic_faces(ddp_worker.IMAGES), ddp_worker.BATCH, shuffle=True, seed=3)
    model.train()
    for step, x in enumerate(loader):
        halves = (x[:len(x) // 2], x[len(x) // 2:])
        total = 0
        for rank, half in enumerate(halves):
            if mode == "endpoint":
                total = total + nn.L1Loss()(model(half), half) * len(half) / len(x)
            else:
                t = torch.tensor(ts[rank][step])
                loss = nn.L1Loss()(model(half, t), half) + 0.5 * ddp_worker.WD * model.sq_norm
                total = total + loss * len(half) / len(x)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


MODES = ("endpoint", "shared", "stratified")


@pytest.fixture(scope="module")
def data_parallel_steps(tmp_path_factory):
    """One torchrun launch (2 processes) running the steps of every mode: {mode: rank 0's file}."""
    out = tmp_path_factory.mktemp("ddp")
    r = torchrun(os.path.join("tests", "ddp_worker.py"), ",".join(MODES), out)
    assert r.returncode == 0, r.stderr[-3000:]
    return {mode: out / f"{mode}.pt" for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_steps_equal_the_single_process_reference(mode, data_parallel_steps):
    result = torch.load(data_parallel_steps[mode], weights_only=True)
    ts = result["ts"]
    steps = ddp_worker.IMAGES // ddp_worker.BATCH
    if mode == "shared":
        assert ts[0] == ts[1] and len(ts[0]) == steps
    if mode == "stratified":
        assert all(t < 0.5 for t in ts[0]) and all(t >= 0.5 for t in ts[1]) and len(ts[0]) == steps
    expected = reference_steps(mode, ts)
    moved = max((result["params"][n] - ddp_worker.build(mode).get_parameter(n)).abs().max().item()
                for n in expected)
    assert moved > 1e-3  # the steps did change the weights
    for name, value in expected.items():
        assert torch.allclose(result["params"][name], value, atol=1e-5), name


def test_train_py_under_torchrun_writes_one_set_of_files_and_resumes(tmp_path):
    argv = ["train.py", "--dir", tmp_path / "run", *TINY, "--epochs", "2", "--save_freq", "1"]
    r = torchrun(*argv)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "run"))
    assert files == ["args.json", "checkpoint-1.pt", "checkpoint-2.pt", "checkpoint-last.pt", "command.txt",
                     "log.jsonl", "recon"]
    assert [rec["epoch"] for rec in read_log(tmp_path / "run")] == [1, 2]  # one writer
    assert r.stdout.count("epoch    2/2") == 1 and "2 processes, batches of 32 shared" in r.stdout
    ck = checkpoints.load(str(tmp_path / "run" / "checkpoint-1.pt"))
    assert len(ck.rng["ranks"]) == 2  # every process's random state
    # resumed from epoch 1 by two processes: the same epoch 2 as the uninterrupted run
    r = torchrun(*argv[:2], tmp_path / "again", *argv[3:], "--resume", tmp_path / "run" / "checkpoint-1.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    a = checkpoints.load(str(tmp_path / "run" / "checkpoint-2.pt")).state_dict
    b = checkpoints.load(str(tmp_path / "again" / "checkpoint-2.pt")).state_dict
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # ... and by one process, which says that the random streams differ
    train_main("--dir", tmp_path / "single", *TINY, "--epochs", "2", "--resume", tmp_path / "run" / "checkpoint-1.pt")
    assert len(read_log(tmp_path / "single")) == 1


def test_distributed_evaluations_equal_single_process_runs(trained_curve, tmp_path):
    curve = os.path.join(trained_curve, "checkpoint-last.pt")
    common = ["--ckpt", curve, "--bn_batches", "3", "--device", "cpu"]
    # (plane.py shares its grid points between processes through the same aemc.resumable.run as a walk)
    for script, extra in (("eval_curve.py", ["--num_points", "3"]),):
        r = torchrun(script, *common, *extra, "--dir", tmp_path / script / "two")
        assert r.returncode == 0, r.stderr[-3000:]
        r1 = run_script(script, *common, *extra, "--dir", tmp_path / script / "one")  # one process
        assert r1.returncode == 0, r1.stderr[-3000:]
        one, two = (sorted(f for f in os.listdir(tmp_path / script / d) if f != "command.txt") for d in ("one", "two"))
        assert one == two and not [f for f in two if ".tmp" in f]  # the same files, written once
        (npz,) = [f for f in one if f.endswith(".npz")]
        a, b = np.load(tmp_path / script / "one" / npz), np.load(tmp_path / script / "two" / npz)
        for key in a.files:
            if a[key].dtype.kind == "f" and not key.endswith("seconds"):
                assert np.allclose(a[key], b[key], atol=1e-6, equal_nan=True), (script, key)
        if script == "eval_curve.py":
            (report,) = [f for f in one if f.endswith(".json")]
            assert json.load(open(tmp_path / script / "two" / report))["processes"] == 2


def test_sync_batchnorm_needs_several_cuda_processes(tmp_path):
    from aemc.errors import UserError
    with pytest.raises(UserError, match="--sync_bn needs several processes on CUDA"):
        train_main("--dir", tmp_path, *TINY, "--sync_bn")


@pytest.mark.parametrize("script", ["align.py", "check_ends.py", "extract_point.py", "fge.py", "study.py"])
def test_scripts_that_run_as_one_process_say_so(script, ends, trained_curve, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each of its processes
    argv = {"align.py": ["--init_start", ends[0], "--init_end", ends[1], "--out", tmp_path / "x.pt"],
            "check_ends.py": ["--ckpt", os.path.join(trained_curve, "checkpoint-last.pt")],
            "extract_point.py": ["--ckpt", os.path.join(trained_curve, "checkpoint-last.pt"), "--t", "0.5",
                                 "--out", tmp_path / "p.pt"],
            "fge.py": ["--ckpt", ends[0], "--dir", tmp_path / "f"],
            "study.py": ["--dir", tmp_path / "s", "--preset", "tiny"]}[script]
    r = run_script(script, *argv, *([] if script == "study.py" else ["--device", "cpu"]))
    assert r.returncode == 2 and f"{script} runs as one process" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)
    monkeypatch.setenv("RANK", "1")  # ... and only rank 0 says it
    r = run_script(script, *argv, *([] if script == "study.py" else ["--device", "cpu"]))
    assert r.returncode == 2 and r.stderr == ""


def test_a_failing_process_stops_the_others_with_one_message(tmp_path):
    r = torchrun("train.py", "--dir", tmp_path / "run", "--dataset", "folder", "--data_path", tmp_path / "missing",
                 "--device", "cpu", "--epochs", "1", timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("does not exist; check --data_path") == 1
    assert not (tmp_path / "run" / "checkpoint-last.pt").exists()
