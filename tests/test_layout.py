"""The house's structure: three floors with arrows only downwards (DESIGN.md, Layout), thin scripts
that all answer --help, and a requirements.txt that says what pyproject.toml says."""
import ast
import contextlib
import glob
import importlib
import io
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ("train", "eval_curve", "check_ends", "extract_point", "plane", "align", "ensemble", "fge", "study",
           "bench", "spawn", "stitch")
MIDDLE = ("dataset", "trainer", "utils")  # the original's modules: they use the package, never a script


def imported(path):
    """The top-level names of the modules a file imports (absolute imports only)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module.split(".")[0])
    return names


def relative(path):
    return os.path.relpath(path, ROOT)


def test_the_top_level_holds_the_scripts_and_the_originals_modules_only():
    tops = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert tops == set(SCRIPTS) | set(MIDDLE)


def test_arrows_only_go_down():
    own = set(SCRIPTS) | set(MIDDLE) | {"aemc", "models"}
    problems = []
    for name in SCRIPTS:
        for m in imported(os.path.join(ROOT, f"{name}.py")) & own - set(MIDDLE) - {"aemc", "models"}:
            problems.append(f"script {name}.py imports the script {m}")
    for name in MIDDLE:
        for m in imported(os.path.join(ROOT, f"{name}.py")) & own - {"aemc", "models"}:
            problems.append(f"{name}.py imports {m} (it may import only the package and models)")
    for path in glob.glob(os.path.join(ROOT, "aemc", "**", "*.py"), recursive=True):
        for m in imported(path) & own - {"aemc", "models"}:
            problems.append(f"{relative(path)} (the package) imports the top-level {m}")
    for path in glob.glob(os.path.join(ROOT, "models", "**", "*.py"), recursive=True):
        for m in imported(path) & own - {"models"}:
            problems.append(f"{relative(path)} (models) imports {m}")
    assert problems == []


def test_the_layering_check_sees_an_arrow_going_up(tmp_path):
    # the check above must be able to fail: a library file importing a script is reported
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom train import main\nimport aemc.checkpoints\n")
    assert imported(str(bad)) == {"numpy", "train", "aemc"}


def test_no_library_file_is_named_or_acts_like_a_script():
    for path in glob.glob(os.path.join(ROOT, "aemc", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "models", "*.py")):
        name = os.path.basename(path)[:-3]
        text = open(path, encoding="utf-8").read()
        assert name not in SCRIPTS, relative(path)
        assert "__main__" not in text and "def get_args_parser" not in text, relative(path)


@pytest.mark.parametrize("name", SCRIPTS + ("dataset",))
def test_every_script_is_thin_and_answers_help(name):
    module = importlib.import_module(name)
    source = open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read()
    assert callable(module.get_args_parser) and callable(module.main)
    assert re.search(r'^if __name__ == "__main__":\n    run_cli\(main, get_args_parser\(\)\)\n\Z', source, re.M)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        module.get_args_parser().parse_args(["--help"])
    assert exit_.value.code == 0 and out.getvalue().startswith(f"usage: {name}.py")


def test_requirements_txt_is_pyprojects_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert listed == project["dependencies"]


def test_scripts_start_without_the_libraries_that_take_seconds_to_import():
    # torchvision (it pulls in torch._dynamo), matplotlib and scipy cost 5.8 s of the 8.3 s that
    # `python train.py --help` took on 2 CPU cores; every stage of a study and every process under
    # torchrun paid it. They are imported where they are used (measured after: 2.5 s).
    code = ("import sys; " + "; ".join(f"import {name}" for name in SCRIPTS)
            + "; print(sorted(m for m in ('torchvision', 'matplotlib', 'scipy', 'lpips') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
