"""Issue 27, bugs 1 and 2, through the command lines users run: a VAE curve trains with its KL term
(beta changes what it learns), and the copies spawn.py trains and the cycles fge.py runs train with
the run's beta, not 1.0. Each of these failed before the training objective was built in one place
(aemc.objective): the curves and copies were bit-for-bit the same whatever beta said."""
import json

import pytest
import torch

import fge
import spawn
import trainer
from aemc import checkpoints
from aemc.objective import Objective
from conftest import train_main

pytestmark = pytest.mark.slow

VAE = ["--dataset", "synthetic", "--max_images", "64", "--batch_size", "32", "--device", "cpu", "--num_workers", "0",
       "--image_size", "32", "--lr", "1e-3", "--arch", "vae", "--arch_kwargs",
       json.dumps(dict(in_filters=4, latent_dim=8))]


def differ(a, b):
    """The largest difference between two state dicts' tensors."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def relabelled(path, out, beta):
    """A copy of the checkpoint at `path` that says its run trained with `beta` (nothing else changed)."""
    from dataclasses import replace
    ck = checkpoints.load(path)
    ck.settings = replace(ck.settings, loss=replace(ck.settings.loss, beta=beta))
    checkpoints.save(str(out), ck)
    return str(out)


@pytest.fixture
def objectives(monkeypatch):
    """The objectives the training loop is handed (every script trains through trainer.train_one_epoch)."""
    seen = []
    real = trainer.train_one_epoch

    def spy(model, loader, optimizer, objective, settings, **kwargs):
        seen.append((objective, settings))
        return real(model, loader, optimizer, objective, settings, **kwargs)
    monkeypatch.setattr(trainer, "train_one_epoch", spy)
    return seen


def built_from_the_run(seen, beta, curve):
    """Every epoch trained with an objective of the run's own settings: its beta, its loss, its decay."""
    assert seen
    for objective, settings in seen:
        assert isinstance(objective, Objective) and objective.settings == settings
        assert (objective.beta, objective.curve, objective.weight_decay) == (beta, curve, settings.optim.wd)
        assert isinstance(objective.reconstruction, torch.nn.L1Loss) and settings.loss.loss_function == "mae"


@pytest.fixture(scope="module")
def vae_ends(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-ends")
    for seed in (1, 2):
        train_main("--dir", root / f"e{seed}", *VAE, "--seed", str(seed), "--epochs", "2", "--save_freq", "1",
                   "--beta", "4")
    return root


def test_a_vae_curve_trains_with_its_kl_term(vae_ends, tmp_path, objectives):
    """Bug 1: the curve's loss was reconstruction + weight decay, whatever --beta said."""
    ends = [str(vae_ends / f"e{seed}" / "checkpoint-2.pt") for seed in (1, 2)]
    states = {}
    for beta in ("0", "4"):
        train_main("--dir", tmp_path / beta, *VAE, "--curve", "Bezier", "--num_bends", "3", "--init_start", ends[0],
                   "--init_end", ends[1], "--fix_start", "--fix_end", "--epochs", "2", "--beta", beta)
        states[beta] = checkpoints.load(str(tmp_path / beta / "checkpoint-2.pt"), kind="curve").state_dict
        built_from_the_run(objectives, float(beta), curve=True)
        objectives.clear()
    # the same data, noise and t draws: only the KL term's weight differs, and the middle bend feels it
    # (Adam's steps in the first epoch are about 1e-3 each; everything else is bit-for-bit the same)
    assert differ(states["0"], states["4"]) > 1e-5


def test_spawned_vae_copies_train_with_the_parents_beta(vae_ends, tmp_path, objectives):
    """Bug 2: spawn.py trained every copy with beta 1 (fit's default), whatever the run's beta."""
    parent = str(vae_ends / "e1" / "checkpoint-1.pt")
    assert checkpoints.load(parent).settings.loss.beta == 4
    as_one = relabelled(parent, tmp_path / "beta1.pt", 1.0)
    copies = {}
    for name, source in (("beta4", parent), ("beta1", as_one)):
        result = spawn.main(spawn.get_args_parser().parse_args(
            ["--from", source, "--seeds", "5", "6", "--num_points", "2", "--device", "cpu",
             "--dir", str(tmp_path / name)]))
        copies[name] = checkpoints.load(result["copies"][0])
        built_from_the_run(objectives, 4.0 if name == "beta4" else 1.0, curve=False)
        objectives.clear()
    assert copies["beta4"].settings.loss.beta == 4
    # the same parent weights, moments and seed: only beta differs, and the copies must show it
    assert differ(copies["beta4"].state_dict, copies["beta1"].state_dict) > 1e-5


def test_fge_cycles_of_a_vae_train_with_its_beta(vae_ends, tmp_path, objectives):
    """Bug 2's twin: fge.py did not pass beta either (its cycles trained with beta 1)."""
    source = str(vae_ends / "e1" / "checkpoint-2.pt")
    as_one = relabelled(source, tmp_path / "beta1.pt", 1.0)
    snapshots = {}
    for name, ckpt in (("beta4", source), ("beta1", as_one)):
        result = fge.main(fge.get_args_parser().parse_args(
            ["--ckpt", ckpt, "--cycle", "2", "--epochs", "2", "--lr_1", "1e-3", "--lr_2", "1e-5", "--bn_batches", "1",
             "--device", "cpu", "--num_workers", "0", "--dir", str(tmp_path / name)]))
        snapshots[name] = checkpoints.load(result["snapshots"][0]).state_dict
        built_from_the_run(objectives, 4.0 if name == "beta4" else 1.0, curve=False)
        objectives.clear()
    assert differ(snapshots["beta4"], snapshots["beta1"]) > 1e-5
