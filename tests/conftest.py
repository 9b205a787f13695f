import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny configuration: every run below takes seconds on 2 CPU cores.
TINY = ["--dataset", "synthetic", "--max_images", "160", "--in_filters", "4", "--latent_dim", "8",
        "--batch_size", "32", "--device", "cpu", "--num_workers", "0"]


@pytest.fixture
def tiny_args():
    """Build train.py args for a tiny synthetic run: tiny_args(dir, "--epochs", "2", ...)."""
    import train

    def make(run_dir, *extra):
        return train.get_args_parser().parse_args(["--dir", str(run_dir), *TINY, *extra])
    return make


def read_log(run_dir):
    """The JSON lines of a run's log.jsonl."""
    import json
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(script, *argv, cwd=ROOT, timeout=300):
    """Run a project script as users do; returns the CompletedProcess (text output)."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
