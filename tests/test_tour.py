"""The README's tour runs as written: every command parses with its script's own parser, the toy
tour differs from it in sizes only, and the toy tour runs end to end, in order, in an empty folder
holding only made-up data (so every file a command reads was written by an earlier command)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from aemc.data.torchvision_sets import write_idx_images, write_idx_labels
from conftest import ROOT
from tour import parser_of, same_but_sizes, script_of, tour_blocks, toy


def all_commands():
    return [words for block in tour_blocks() for words in block]


def test_the_tour_has_the_commands_it_shows():
    runnable, cluster = tour_blocks()
    scripts = [script_of(w)[0] for w in runnable]
    assert scripts[:3] == ["train.py"] * 3 and len(runnable) >= 18
    for script in ("check_ends.py", "eval_curve.py", "extract_point.py", "plane.py", "align.py", "spawn.py",
                   "ensemble.py", "fge.py", "study.py", "bench.py"):
        assert script in scripts, script
    assert [w[0] for w in cluster] == ["torchrun", "python"]


@pytest.mark.parametrize("words", all_commands(), ids=lambda w: " ".join(w)[:60])
def test_every_tour_command_parses_with_its_scripts_parser_as_written(words):
    script, argv = script_of(words)
    try:
        parser_of(script).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{' '.join(words)}: {script}'s parser refuses it (exit {e.code})")


@pytest.mark.parametrize("words", tour_blocks()[0], ids=lambda w: " ".join(w)[:60])
def test_the_toy_tour_differs_from_the_readmes_in_sizes_only(words):
    small = toy(words)
    assert same_but_sizes(words, small), (words, small)
    script, argv = script_of(small)
    parser_of(script).parse_args(argv)


def test_a_changed_flag_is_more_than_a_size():
    words = ["python", "train.py", "--dir", "runs/ae1", "--epochs", "100", "--seed", "1"]
    assert same_but_sizes(words, ["python", "train.py", "--dir", "runs/ae1", "--epochs", "6", "--seed", "1",
                                  "--in_filters", "4"])
    assert not same_but_sizes(words, ["python", "train.py", "--dir", "runs/ae1", "--epochs", "6", "--seed", "2"])
    assert not same_but_sizes(words, ["python", "train.py", "--dir", "runs/ae1", "--epochs", "6", "--seed", "1",
                                      "--dataset", "synthetic"])


def made_up_data(root):
    """What the tour's commands read without writing: a CelebA folder of 48 faces and MNIST's four
    idx files (48 train / 16 test grey 28x28 images), in the layouts the real ones have."""
    from PIL import Image

    from aemc.data import grey
    from aemc.data.synthetic import synthetic_faces
    faces = synthetic_faces(64, seed=3, size=64)
    celeba = os.path.join(root, "data", "img_align_celeba")
    os.makedirs(celeba)
    for i, face in enumerate(faces[:48]):
        Image.fromarray(face.permute(1, 2, 0).numpy()).save(os.path.join(celeba, f"{i + 1:06d}.jpg"))
    digits = torch.nn.functional.interpolate(grey(faces).float(), size=28, mode="area").round().to(torch.uint8)
    raw = os.path.join(root, "data", "MNIST", "raw")
    os.makedirs(raw)
    for prefix, images in (("train", digits[:48, 0]), ("t10k", digits[48:, 0])):
        write_idx_images(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images.numpy())
        write_idx_labels(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), [i % 10 for i in range(len(images))])


@pytest.mark.tour
def test_the_toy_tour_runs_end_to_end_in_the_order_written(tmp_path):
    made_up_data(tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    for words in tour_blocks()[0]:
        small = toy(words)
        script, argv = script_of(small)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(small)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        print(f"{time.perf_counter() - started:6.1f} s  {' '.join(small)}")
