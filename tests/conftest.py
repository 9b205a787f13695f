import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pyproject puts it on sys.path

# A tiny configuration: every run below takes seconds on 2 CPU cores.
TINY = ["--dataset", "synthetic", "--max_images", "160", "--in_filters", "4", "--latent_dim", "8",
        "--batch_size", "32", "--device", "cpu", "--num_workers", "0"]


# Tests that train or run whole scripts are end-to-end: each is marked @pytest.mark.slow by hand
# (make test-fast, pytest -m "not slow", leaves them out); one that uses these fixtures unmarked is
# refused at collection, so none slips into the fast tier.
END_TO_END_FIXTURES = {"ends", "trained_curve", "straight_run", "tiny_args"}


def pytest_collection_modifyitems(items):
    unmarked = [item.nodeid for item in items if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("end-to-end tests not marked @pytest.mark.slow: " + ", ".join(unmarked))


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """The drawn synthetic faces are cached for the session (and the processes it starts), never in
    the user's own cache folder."""
    os.environ["AEMC_CACHE_DIR"] = str(tmp_path_factory.mktemp("aemc-cache"))
    # --amp auto is float32 on every CPU here (bf16 on one with AVX512-BF16 or AMX otherwise): the
    # tests compare against float32 references; bf16 is tested where a test asks for it
    os.environ["AEMC_NATIVE_BF16"] = "0"


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


def run_script(script, *argv, separate_process=False, timeout=300):
    """Run a project script's command line; returns an object with returncode, stdout, stderr.

    By default in this process, through the same `utils.run_cli` the script's `__main__` guard
    calls (a new interpreter costs seconds of imports per call); an exception that escapes it is
    reported as a traceback on stderr with return code 1, as the interpreter would.
    `separate_process=True` runs `python script.py ...` for real."""
    import subprocess
    argv = [str(a) for a in argv]
    if separate_process:
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    import contextlib
    import importlib
    import io
    import traceback

    from aemc.cli import run_cli
    module = importlib.import_module(script[:-len(".py")])
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(module.main, module.get_args_parser(), argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


# A small synthetic set shared by the curve tests: 320 train / 80 test images, batches of 32.
DATA = ["--dataset", "synthetic", "--max_images", "400", "--batch_size", "32", "--device", "cpu",
        "--num_workers", "0"]


class HookedLoss(torch.nn.Module):
    """The real loss with a hook called on every batch: hook(call_number, loss) -> loss."""

    def __init__(self, inner, hook):
        super().__init__()
        self.inner, self.hook, self.calls = inner, hook, 0

    def forward(self, out, x):
        self.calls += 1
        return self.hook(self.calls, self.inner(out, x))


def hook_loss(monkeypatch, hook):
    """Make train.py's loss call `hook` on every batch (to raise Ctrl-C or produce NaN at batch k):
    the reconstruction loss of its training objective, which it also evaluates with."""
    import aemc.objective
    real_build = aemc.objective.build_loss
    monkeypatch.setattr(aemc.objective, "build_loss", lambda *a, **k: HookedLoss(real_build(*a, **k), hook))


def train_main(*argv):
    """Run train.py's main in-process with these command-line words."""
    import train
    train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="session")
def ends(tmp_path_factory):
    """Two tiny endpoints: different seeds and init schemes, 4 epochs each."""
    root = tmp_path_factory.mktemp("ends")
    common = [*DATA, "--in_filters", "4", "--latent_dim", "8", "--lr", "1e-3", "--epochs", "4"]
    train_main("--dir", root / "a", *common, "--seed", "1", "--conv_init", "normal")
    train_main("--dir", root / "b", *common, "--seed", "2", "--conv_init", "kaiming_uniform")
    return str(root / "a" / "checkpoint-4.pt"), str(root / "b" / "checkpoint-4.pt")


def curve_argv(run_dir, ends, *extra):
    return ["--dir", run_dir, *DATA, "--lr", "1e-3", "--curve", "Bezier", "--num_bends", "3",
            "--init_start", ends[0], "--init_end", ends[1], "--fix_start", "--fix_end", *extra]


@pytest.fixture(scope="session")
def trained_curve(ends, tmp_path_factory):
    """A 3-bend Bezier curve between `ends`, 4 epochs, a checkpoint every epoch."""
    run_dir = tmp_path_factory.mktemp("curve")
    train_main(*curve_argv(run_dir, ends, "--epochs", "4", "--save_freq", "1"))
    return run_dir
