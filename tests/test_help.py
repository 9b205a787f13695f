"""--help: every script's description is its docstring's whole first paragraph (the first line alone
stopped mid-sentence), and the flags that change results say what they do (issue 28)."""
import importlib

import pytest

SCRIPTS = ["align", "bench", "check_ends", "ensemble", "eval_curve", "extract_point", "fge", "plane", "spawn",
           "stitch", "study", "train"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_description_is_the_docstrings_first_paragraph_whole(name):
    module = importlib.import_module(name)
    parser = module.get_args_parser()
    first = module.__doc__.strip().split("\n\n")[0]
    assert parser.description == " ".join(first.split())
    assert parser.description.rstrip().endswith((".", ":", ")")), parser.description  # a whole sentence


def test_train_py_explains_epochs_seed_and_optimizer():
    import train
    actions = {a.dest: a for a in train.get_args_parser()._actions}
    for dest in ("epochs", "seed", "optim_name", "lr", "beta_1", "beta_2", "momentum", "wd", "noise_std"):
        assert actions[dest].help, dest
    assert "(100)" in actions["epochs"].help and "(1)" in actions["seed"].help
    assert "Adam" in actions["optim_name"].help and "SGD" in actions["optim_name"].help
    # left out on --resume they take the checkpoint's values: the parser itself holds no value
    assert all(actions[d].default is None for d in ("seed", "optim_name", "lr", "wd", "noise_std", "batch_size"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_abbreviated_flag_is_refused_not_guessed(script, capsys):
    """argparse would take `--epoch 1` for `--epochs 1` silently."""
    parser = importlib.import_module(script).get_args_parser()
    assert parser.allow_abbrev is False
    if script == "train":
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--dir", "x", "--epoch", "1"])
        assert stop.value.code == 2 and "unrecognized arguments: --epoch 1" in capsys.readouterr().err
