"""REPAIR and the barriers of every definition, checked against independent computations."""
import pytest
import torch
from torch import nn

import dataset
from aemc import checkpoints, repair, speed
from aemc.alignment import align
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import synthetic_faces
from aemc.evaluation import PointEvaluator
from models.autoencoder import Autoencoder
from models.curves import Bezier, connect


def loaders():
    train, test = dataset.split_images(synthetic_faces(400), 0.2)
    return TensorLoader(train, 32), TensorLoader(test, 32)


def test_the_layers_no_batchnorm_follows_are_repaired():
    # the first and last encoder convolutions, the latent Linear before Tanh, the decoder's first Linear
    assert repair.layers_to_repair(Autoencoder(in_filters=4, latent_dim=8)) == \
        ["encoder.0", "encoder.15", "encoder.17", "decoder.0"]


@torch.no_grad()
def output_statistics(evaluator, layers):
    """Per-channel mean and std of each repaired layer's corrected output, over the evaluator's
    BatchNorm batches in eval mode: measured here with hooks of our own."""
    sums = {name: [0, 0.0, 0.0] for name in layers}

    def record(name):
        def hook(module, inputs, output):
            values = output.transpose(0, 1).reshape(output.shape[1], -1).double()
            sums[name][0] += values.shape[1]
            sums[name][1] += values.sum(1)
            sums[name][2] += (values ** 2).sum(1)
        return hook
    handles = [evaluator.module.get_submodule(f"{name}.repair").register_forward_hook(record(name)) for name in layers]
    evaluator.module.eval()
    for i, x in enumerate(evaluator.train_batches):
        if i >= evaluator.bn_batches:
            break
        evaluator.module(x)
    for h in handles:
        h.remove()
    return {name: (s / n, (q / n - (s / n) ** 2).sqrt()) for name, (n, s, q) in sums.items()}


@pytest.mark.slow
def test_at_an_aligned_midpoint_every_repaired_layer_has_the_interpolated_statistics(ends):
    (a, _), (b, _) = [checkpoints.load_endpoint(p, "end") for p in ends]
    aligned, _ = align(a, b, "weight")
    layers = repair.layers_to_repair(a)
    train, test = loaders()
    evaluator = PointEvaluator(a, train, test, {"loss": nn.L1Loss()}, bn_batches=4, repair_layers=layers)
    segment = connect(a, aligned)
    ends_stats = [evaluator.statistics(segment.weights(t)) for t in (0.0, 1.0)]
    targets = repair.interpolate(ends_stats, (0.5, 0.5))
    repaired = evaluator(segment.weights(0.5), repair_targets=targets)
    measured = output_statistics(evaluator, layers)
    for name in layers:
        mean, std = targets[name]
        scale = std.double().mean()
        assert torch.allclose(measured[name][0], mean.double(), atol=1e-3 * scale), name
        assert torch.allclose(measured[name][1], std.double(), rtol=1e-3, atol=1e-3 * scale), name
    # and the interpolation did collapse them: without REPAIR some layer's spread is well below its target
    plain = evaluator(segment.weights(0.5))
    collapsed = {name: s for name, (_, s) in evaluator.measure().items()}
    assert min((collapsed[n] / targets[n][1]).mean().item() for n in layers) < 0.9
    assert repaired["test_loss"] != plain["test_loss"]


@pytest.mark.slow
def test_a_repaired_point_between_a_model_and_itself_is_that_model(ends):
    a, _ = checkpoints.load_endpoint(ends[0], "end")
    layers = repair.layers_to_repair(a)
    train, test = loaders()
    evaluator = PointEvaluator(a, train, test, {"loss": nn.L1Loss()}, bn_batches=4, repair_layers=layers,
                               samples=next(iter(test))[:4])
    same = connect(a, a)
    targets = repair.interpolate([evaluator.statistics(same.weights(t)) for t in (0.0, 1.0)], (0.5, 0.5))
    repaired = evaluator(same.weights(0.5), repair_targets=targets)
    plain = evaluator(same.weights(0.5))
    assert repaired["test_loss"] == plain["test_loss"] or abs(repaired["test_loss"] - plain["test_loss"]) < 1e-6
    assert torch.allclose(repaired["recons"], plain["recons"], atol=1e-5)


def test_sync_batchnorm_converts_a_curve_and_computes_the_same():
    torch.manual_seed(0)
    a, b = Autoencoder(in_filters=4, latent_dim=8), Autoencoder(in_filters=4, latent_dim=8)
    curve = connect(a, b, Bezier, 3)
    keys = set(curve.state_dict())
    x, t = next(iter(loaders()[0])), torch.tensor(0.3)
    curve.eval()
    with torch.no_grad():
        reference = curve(x, t)
    synced = speed.sync_batchnorm(curve)  # torch's own conversion fails here: the bends have no running statistics
    assert set(synced.state_dict()) == keys  # the checkpoint's layout is unchanged
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.base.modules()) == n_bn
    synced.eval()
    with torch.no_grad():
        assert torch.allclose(synced(x, t), reference, atol=1e-6)
    # training without a process group: SyncBatchNorm falls back to BatchNorm, so the step runs on the CPU
    synced.train()
    loss = (synced(x, t) - x).abs().mean()
    loss.backward()
    assert all(p.grad is not None for p in synced.bends[1].parameters())


def test_spawned_copies_differ_only_by_their_seed(tmp_path):
    import spawn
    from conftest import train_main
    train_main("--dir", tmp_path / "run", "--dataset", "synthetic", "--max_images", "96", "--batch_size", "32",
               "--device", "cpu", "--num_workers", "0", "--in_filters", "2", "--latent_dim", "4", "--lr", "1e-3",
               "--epochs", "2", "--save_freq", "1", "--save_init")
    parent = checkpoints.load(str(tmp_path / "run" / "checkpoint-0.pt"))
    assert parent.epoch == 0 and parent.is_training_state
    common = ["--from", str(tmp_path / "run" / "checkpoint-1.pt"), "--num_points", "2", "--device", "cpu"]
    same = spawn.main(spawn.get_args_parser().parse_args([*common, "--seeds", "5", "5", "--dir", str(tmp_path / "same")]))
    a, b = (checkpoints.load(p).state_dict for p in same["copies"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed: the same copy, bit for bit
    assert same["walk"]["barriers"]["test_loss"]["barrier_line"] == 0.0
    other = spawn.main(spawn.get_args_parser().parse_args([*common, "--seeds", "5", "6", "--dir", str(tmp_path / "two")]))
    a2, b2 = (checkpoints.load(p).state_dict for p in other["copies"])
    assert all(torch.equal(a[k], a2[k]) for k in a)  # seed 5 again: the same copy as before
    assert not all(torch.equal(a2[k], b2[k]) for k in a2)  # another data order and noise: other weights
    log = [line for line in open(tmp_path / "two" / "copy2-seed6" / "log.jsonl")]
    assert len(log) == 1  # from epoch 1 to the run's last, 2
