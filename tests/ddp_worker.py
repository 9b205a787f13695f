"""Run by tests/test_distributed.py under torchrun: a few training steps of the library's own loop
(trainer.train_one_epoch on a DistributedDataParallel model and a sharded loader), then rank 0
saves what the test compares with a single-process reference.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py MODES OUT

MODES: a comma-separated list of endpoint | shared | per_rank | stratified (a 3-bend Bezier curve
with that t sampling), run one after the other in one launch; rank 0 saves OUT/<mode>.pt.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch import nn

import trainer
from aemc import distributed, speed
from aemc.data.loader import TensorLoader
from aemc.data.synthetic import synthetic_faces
from aemc.objective import training_objective
from aemc.settings import Optimizer, Run, Speed, Training
from models.curves import TSampler, connect

IMAGES, BATCH, WD = 64, 16, 1e-3


def build(mode):
    """The model every process (and the reference) starts from: seeded, dropout off."""
    from models.autoencoder import Autoencoder
    torch.manual_seed(0)
    ends = [Autoencoder(in_filters=4, latent_dim=8) for _ in range(2)]
    model = ends[0] if mode == "endpoint" else connect(ends[0], ends[1], "Bezier", 3)
    if mode != "endpoint":
        with torch.no_grad():  # the middle bend off the segment, so t matters
            for p in model.bends[1].parameters():
                p.add_(0.05 * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def main(modes, out):
    device = distributed.setup(torch.device("cpu"))
    for mode in modes.split(","):
        steps(mode, device, os.path.join(out, f"{mode}.pt"))
    distributed.shutdown()


def steps(mode, device, out):
    rank, world = distributed.rank(), distributed.world()
    model = build(mode)
    drawn = []
    if mode != "endpoint":
        sampler = TSampler(mode, seed=5, rank=rank, world=world, device=device)

        def recording(device):
            t = sampler(device)
            drawn.append(float(t))
            return t
        model.t_sampler = recording
    loader = TensorLoader(synthetic_faces(IMAGES), BATCH, shuffle=True, seed=3, shard=(rank, world))
    runner = speed.prepare_model(model, Speed(), data_parallel=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    # the L1 loss, no input noise; a curve's decay is the objective's explicit term (its optimizer has none,
    # and the endpoint's optimizer here has none either)
    settings = Run(optim=Optimizer(wd=WD), training=Training(noise_std=0.0))
    objective = training_objective(settings, curve=mode != "endpoint", device=device)
    trainer.train_one_epoch(runner, loader, optimizer, objective, settings, verbose=False)
    ts = distributed.gather(drawn)
    if distributed.is_main():
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "ts": ts}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
