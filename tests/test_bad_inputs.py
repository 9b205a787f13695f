"""Every bad input a user can give ends in one line on stderr naming the input and what is wrong,
a non-zero exit, no traceback, and nothing already on disk changed (issue 28).

One parametrised test runs every case in this process (run_script: the same run_cli the command
line runs). The inputs are the committed format-1 fixtures (tests/fixtures/v1: 64 synthetic images,
2 filters) and small files written here: no case trains anything, so each takes well under a second.
"""
import hashlib
import os
import pickle
import shutil

import pytest
import torch

from conftest import ROOT, run_script

V1 = os.path.join(ROOT, "tests", "fixtures", "v1")
DATA = ["--device", "cpu", "--num_workers", "0"]
SYN_DATA = ["--dataset", "synthetic", "--max_images", "40", "--batch_size", "16", *DATA]
SYN = [*SYN_DATA, "--in_filters", "2", "--latent_dim", "4"]

FACTORIES = '''
import torch
from torch import nn

NOT_CALLABLE = 42


def forty_two():
    return 42


def halves():  # returns images of half the input's size
    return nn.Conv2d(3, 3, 3, stride=2, padding=1)


def raises(width=4):
    raise ZeroDivisionError("the user's own bug")
'''


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _write_inputs(tmp):
    """The bad files every case draws from, in `tmp`."""
    for name in ("endpoint-a-2.pt", "endpoint-b-2.pt", "curve-1.pt"):
        shutil.copy(os.path.join(V1, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "text.pt"), "w") as f:
        f.write("these are notes, not a checkpoint\n")
    torch.save({"format": "ae-mode-connectivity/2"}, os.path.join(tmp, "tag-only.pt"))
    raw = torch.load(os.path.join(V1, "endpoint-b-2.pt"), weights_only=True)
    raw["state_dict"]["encoder.0.weight"] = torch.zeros(5, 3, 4, 4)  # 5 filters where the model has 2
    torch.save(raw, os.path.join(tmp, "wrong-shape.pt"))
    with open(os.path.join(tmp, "garbage.ckpt"), "wb") as f:
        f.write(bytes(range(256)) * 8)
    with open(os.path.join(tmp, "random.pth"), "wb") as f:
        f.write(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
                .tobytes())
    with open(os.path.join(tmp, "evil.ckpt"), "wb") as f:
        f.write(pickle.dumps({"AlexNet_0": _Exploit()}))
    torch.save({"features.0.weight": _Exploit()}, os.path.join(tmp, "evil.pth"))
    os.makedirs(os.path.join(tmp, "mine"))
    with open(os.path.join(tmp, "mine", "factories.py"), "w") as f:
        f.write(FACTORIES)
    with open(os.path.join(tmp, "existing.pt"), "wb") as f:
        f.write(b"an earlier result")
    os.makedirs(os.path.join(tmp, "v1run"))  # a run stopped after epoch 2 of 2, as train.py left it
    for name, fixture in (("checkpoint-1.pt", "endpoint-a-1.pt"), ("checkpoint-2.pt", "endpoint-a-2.pt"),
                          ("checkpoint-last.pt", "endpoint-a-2.pt"), ("log.jsonl", "endpoint-a-log.jsonl")):
        shutil.copy(os.path.join(V1, fixture), os.path.join(tmp, "v1run", name))
    os.makedirs(os.path.join(tmp, "fgerun"))  # an FGE run stopped after epoch 2 of 4
    for name, fixture in (("checkpoint-last.pt", "fge-2.pt"), ("snapshot-1.pt", "fge-snapshot-1.pt")):
        shutil.copy(os.path.join(V1, fixture), os.path.join(tmp, "fgerun", name))
    os.makedirs(os.path.join(tmp, "tiny-study"))
    with open(os.path.join(tmp, "tiny-study", "study.json"), "w") as f:
        f.write('{"preset": "tiny", "stages": {}}')


def _cases(tmp):
    """{name: (script, argv, words the one line must hold)}."""
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    trivial = ["--connect", "TRIVIAL", "--init_start", p("endpoint-a-2.pt"), "--num_points", "2", "--dir", p("eval"),
               *DATA]
    return {
        "text as --resume": ("train.py", ["--dir", p("run"), *SYN, "--resume", p("text.pt")],
                             ["--resume", "text.pt", "not a PyTorch file"]),
        "resume an older checkpoint into its run": ("train.py", ["--dir", p("v1run"), "--resume",
                                                                 p("v1run/checkpoint-1.pt"), "--epochs", "3", *DATA],
                                                    ["checkpoint-1.pt", "after epoch 1", "up to epoch 2",
                                                     "--resume", "checkpoint-last.pt", "new --dir"]),
        "resume with another --seed and --lr": ("train.py", ["--dir", p("v1run"), "--resume",
                                                             p("v1run/checkpoint-last.pt"), "--epochs", "3",
                                                             "--seed", "5", "--lr", "0.01", *DATA],
                                                ["other settings", "--seed 5 (the checkpoint's: --seed 1)",
                                                 "--lr 0.01 (the checkpoint's: --lr 0.001)", "leave those flags out"]),
        "resume with other data settings": (
            "train.py", ["--dir", p("v1run"), "--resume", p("v1run/checkpoint-last.pt"), "--epochs", "3",
                         "--max_images", "48", "--random_split", *DATA],
            ["--max_images 48 (the checkpoint's: --max_images 64)",
             "--random_split (the checkpoint's: no --random_split)"]),
        "fge resume with another --seed": ("fge.py", ["--ckpt", p("endpoint-a-2.pt"), "--cycle", "2", "--epochs", "4",
                                                      "--dir", p("fgerun"), "--resume", p("fgerun/checkpoint-last.pt"),
                                                      "--seed", "7", *DATA],
                                           ["--resume", "other settings", "--seed 7 (the checkpoint's: --seed 1)"]),
        "text as check_ends --ckpt": ("check_ends.py", ["--ckpt", p("text.pt"), *DATA],
                                      ["--ckpt", "text.pt", "not a PyTorch file"]),
        "text as eval_curve --ckpt": ("eval_curve.py", ["--ckpt", p("text.pt"), *DATA],
                                      ["--ckpt", "text.pt", "not a PyTorch file"]),
        "format tag, no fields": ("eval_curve.py", ["--ckpt", p("tag-only.pt"), *DATA],
                                  ["tag-only.pt", "damaged", "architecture"]),
        "a tensor of the wrong shape": ("eval_curve.py", [*trivial, "--init_end", p("wrong-shape.pt")],
                                        ["--init_end", "wrong-shape.pt", "do not fit", "encoder.0.weight"]),
        "--arch NAME not callable": ("train.py", ["--dir", p("run"), *SYN_DATA, "--arch", "factories:NOT_CALLABLE"],
                                     ["factories:NOT_CALLABLE", "not a function or class"]),
        "a factory returning 42": ("train.py", ["--dir", p("run"), *SYN_DATA, "--arch", "factories:forty_two"],
                                   ["factories:forty_two", "returned a int", "not a torch.nn.Module"]),
        "a model of the wrong output shape": ("train.py", ["--dir", p("run"), *SYN_DATA, "--arch", "factories:halves"],
                                              ["factories:halves", "returns (2, 3, 32, 32)", "(2, 3, 64, 64)"]),
        "--latent_dim against --arch_kwargs": ("train.py", ["--dir", p("run"), *SYN_DATA, "--arch", "mlp",
                                                            "--arch_kwargs", '{"latent_dim": 8}', "--latent_dim", "64"],
                                               ["--latent_dim 64", "latent_dim 8", "disagree"]),
        "--arch_kwargs hidden -5": ("train.py", ["--dir", p("run"), *SYN_DATA, "--arch", "mlp",
                                                 "--arch_kwargs", '{"hidden": -5}'],
                                    ["mlp", "'hidden': -5", "negative dimension"]),
        "--data_path a file": ("train.py", ["--dir", p("run"), "--dataset", "celeba", "--data_path", p("text.pt"),
                                            *DATA], ["--data_path", "text.pt", "is a file"]),
        "extract_point --out under a file": ("extract_point.py", ["--ckpt", p("curve-1.pt"), "--t", "0.5", "--out",
                                                                  p("text.pt") + "/mid.pt", *DATA],
                                             ["--out", "is a file, not a folder"]),
        "extract_point --out exists": ("extract_point.py", ["--ckpt", p("curve-1.pt"), "--t", "0.5", "--out",
                                                            p("existing.pt"), *DATA], ["--out", "existing.pt", "exists",
                                                                                       "--force"]),
        "study --dir under a file": ("study.py", ["--dir", p("text.pt") + "/study", "--preset", "tiny"],
                                     ["--dir", "text.pt"]),
        "study --dir of another preset": ("study.py", ["--dir", p("tiny-study"), "--preset", "width"],
                                          ["--dir", "tiny-study", "another preset (tiny)", "--preset width"]),
        "garbage --lpips_weights": ("eval_curve.py", [*trivial, "--init_end", p("endpoint-b-2.pt"), "--lpips",
                                                      "--lpips_weights", p("garbage.ckpt")],
                                    ["--lpips_weights", "garbage.ckpt", "neither a zip archive nor a pickle"]),
        "random bytes --lpips_weights": ("eval_curve.py", [*trivial, "--init_end", p("endpoint-b-2.pt"), "--lpips",
                                                           "--lpips_weights", p("random.pth")],
                                         ["--lpips_weights", "random.pth", "not a PyTorch file"]),
        "malicious --lpips_weights (.ckpt)": ("eval_curve.py", [*trivial, "--init_end", p("endpoint-b-2.pt"),
                                                                "--lpips", "--lpips_weights", p("evil.ckpt")],
                                              ["evil.ckpt", "refused", "posix.system", "could run"]),
        "malicious --lpips_weights (.pth)": ("eval_curve.py", [*trivial, "--init_end", p("endpoint-b-2.pt"),
                                                               "--lpips", "--lpips_weights", p("evil.pth")],
                                             ["evil.pth", "refused", "posix.system", "could run"]),
        "stitch.py --layers an unknown layer": ("stitch.py", ["--init_start", p("endpoint-a-2.pt"), "--init_end",
                                                              p("endpoint-b-2.pt"), "--layers", "encoder.99", "--dir",
                                                              p("eval"), *DATA],
                                                 ["encoder.99", "no such hidden layer", "stitch points are encoder.0"]),
        "stitch.py --layers empty": ("stitch.py", ["--init_start", p("endpoint-a-2.pt"), "--init_end",
                                                    p("endpoint-b-2.pt"), "--layers", "", "--dir", p("eval"), *DATA],
                                       ["--layers", "latent, all, or layer names"]),
        "eval_curve --align_latent without --align": ("eval_curve.py", [*trivial, "--init_end", p("endpoint-b-2.pt"),
                                                                        "--align_latent", "orthogonal"],
                                                      ["--align_latent orthogonal", "with --align"]),
        "eval_curve --align_method ste without --align": ("eval_curve.py", [*trivial, "--init_end",
                                                                            p("endpoint-b-2.pt"), "--align_method",
                                                                            "ste"],
                                                          ["--align_method ste", "with --align"]),
        "study --ste_steps for another preset": ("study.py", ["--dir", p("study"), "--preset", "tiny",
                                                              "--ste_steps", "5"],
                                                 ["--ste_steps", "only the symmetry preset"]),
        "eval_curve --ckpt with --init_start": ("eval_curve.py", ["--ckpt", p("curve-1.pt"), "--init_start",
                                                                  p("endpoint-a-2.pt"), *DATA],
                                                ["--ckpt", "--init_start"]),
    }


def _digests(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.parametrize("case", list(_cases("tmp")))
def test_a_bad_input_gets_one_line_naming_it_and_changes_nothing(case, tmp_path, monkeypatch):
    tmp = str(tmp_path)
    _write_inputs(tmp)
    monkeypatch.syspath_prepend(os.path.join(tmp, "mine"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network, whatever the machine has
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    script, argv, words = _cases(tmp)[case]
    before = _digests(tmp)
    r = run_script(script, *argv)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert all(word in lines[0] for word in words), lines[0]
    after = _digests(tmp)
    assert {k: after.get(k) for k in before} == before  # every file present before is unchanged
    assert not os.path.exists(os.path.join(tmp, "run")) and not os.path.exists(os.path.join(tmp, "eval"))


def test_a_factory_that_raises_keeps_the_users_own_traceback(tmp_path, monkeypatch):
    """docs/architectures.md: the error is in the user's code, and its traceback points there."""
    _write_inputs(str(tmp_path))
    monkeypatch.syspath_prepend(os.path.join(str(tmp_path), "mine"))
    r = run_script("train.py", "--dir", tmp_path / "run", *SYN_DATA, "--arch", "factories:raises")
    assert r.returncode != 0 and "Traceback" in r.stderr and "the user's own bug" in r.stderr


@pytest.mark.slow
def test_align_and_a_layerwise_walk_without_an_output_write_beside_their_checkpoints(tmp_path, monkeypatch):
    """align.py without --out and eval_curve.py --connect LAYERWISE without --dir once wrote
    command.txt and eval/ into the folder they were run from (the repository root)."""
    _write_inputs(str(tmp_path))
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    a, b = tmp_path / "endpoint-a-2.pt", tmp_path / "endpoint-b-2.pt"
    r = run_script("align.py", "--init_start", a, "--init_end", b, *DATA)
    assert r.returncode == 0, r.stderr
    # beside B, named for A's folder and file
    assert os.path.isfile(tmp_path / f"endpoint-b-2-aligned-to-{tmp_path.name}_endpoint-a-2.pt"), os.listdir(tmp_path)
    r = run_script("eval_curve.py", "--connect", "LAYERWISE", "--init_start", a, "--init_end", b, "--num_points", "2",
                   "--bn_batches", "1", *DATA)
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(tmp_path / "eval") and os.listdir(here) == []  # beside A; nothing where it was run


def test_a_finished_walk_aligned_another_way_is_not_overwritten(tmp_path):
    """eval_curve.py --align names its report for the ends and the points, not the method: a report
    made with another method or latent map stays as it is, refused in one line before any work."""
    import json

    from aemc.reports import walk_report
    tmp = str(tmp_path)
    _write_inputs(tmp)
    ends = {"init_start": os.path.join(tmp, "endpoint-a-2.pt"), "init_end": os.path.join(tmp, "endpoint-b-2.pt")}
    report = walk_report(os.path.join(tmp, "eval"), ends, 2, aligned=True)
    os.makedirs(os.path.dirname(report))
    with open(report, "w") as f:
        json.dump({"alignment": {"method": "ste", "latent": None}}, f)
    before = _digests(tmp)
    r = run_script("eval_curve.py", "--connect", "TRIVIAL", "--init_start", ends["init_start"], "--init_end",
                   ends["init_end"], "--num_points", "2", "--dir", os.path.join(tmp, "eval"), "--align", *SYN_DATA)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "aligned by ste matching" in lines[0] and "another --dir" in lines[0]
    after = _digests(tmp)
    assert {k: after.get(k) for k in before} == before  # the report, and every file present before, unchanged
