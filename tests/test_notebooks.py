"""The notebooks run end to end (tiny synthetic configuration) and are committed without outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

import eval_curve
from conftest import ROOT

NOTEBOOKS = os.path.join(ROOT, "notebooks")


@pytest.fixture(autouse=True)
def headless_matplotlib(monkeypatch):
    """The notebooks show their figures whatever backend the environment sets (CI machines often
    set Agg, under which a pyplot figure would never reach the notebook)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")


def execute(name, parameters):
    """Run a notebook with `parameters` injected after its parameters cell (as papermill does)."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    return nb


def outputs(nb, kind):
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.get("name") == "stdout":
                found.append(out["text"])
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.mark.parametrize("name", ["colab_training.ipynb", "check_outputs.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


@pytest.mark.slow
def test_colab_training_runs_the_pipeline_on_the_cpu(tmp_path):
    nb = execute("colab_training.ipynb", f"""
DATASET = "synthetic"
MAX_IMAGES = 200
EPOCHS = 1
CURVE_EPOCHS = 1
IN_FILTERS = 4
LATENT_DIM = 8
BATCH_SIZE = 32
NUM_POINTS = 3
DEVICE = "cpu"
RUN_DIR = {str(tmp_path)!r}
""")
    text = "".join(outputs(nb, "text"))
    assert "all checks passed" in text and "mean_ends" in text and "test_loss" in text  # the walk's barriers
    assert len(outputs(nb, "image/png")) == 1 and len(outputs(nb, "image/gif")) == 2
    assert os.path.isfile(tmp_path / "curve" / "checkpoint-1.pt")


@pytest.mark.slow
def test_check_outputs_inspects_endpoints_curve_sizes_and_an_evaluation(ends, trained_curve, tmp_path):
    curve = os.path.join(trained_curve, "checkpoint-last.pt")
    report = eval_curve.main(eval_curve.get_args_parser().parse_args(
        ["--ckpt", curve, "--dir", str(tmp_path), "--num_points", "3", "--device", "cpu"]))["files"]["json"]
    nb = execute("check_outputs.ipynb", f"""
ENDPOINT_1 = {ends[0]!r}
ENDPOINT_2 = {ends[1]!r}
CURVE = {curve!r}
EVAL_JSON = {report!r}
""")
    text = "".join(outputs(nb, "text"))
    assert text.count("vs its endpoint: max |difference| = 0.00e+00") == 2
    assert "||w_end - w_start||" in text and "endpoint 2 test mae loss" in text
    assert "17,944,512 parameters" in text and "curve, 5 bends (this run)" in text
    assert "test-loss barrier" in text
    assert len(outputs(nb, "image/png")) == 2  # reconstructions and the loss plot
