"""Instability analysis (Frankle, Dziugaite, Roy, Carbin, ICML 2020): spawn copies of a run at epoch K
that differ only in their data order and noise, train each to the run's last epoch, and measure the
barrier of the segment between them.

    python spawn.py --from runs/ae1/checkpoint-2.pt --seeds 1 2 --dir runs/spawn-2
    python train.py --dir runs/ae1 ... --save_init        # checkpoint-0.pt: spawn from the initialisation

Each copy starts from everything the checkpoint holds (weights, optimizer moments, the schedule's
position, the run's settings) and draws its data order, denoising noise and dropout from its own
seed; the same seed twice gives the same copy. The copies are written to <dir>/copy<i>-seed<s>/ like any
training run (and resume like one); then the segment between the first two is walked as
eval_curve.py walks it: <dir>/spawn.json (with each barrier), the plots, the GIFs.
"""
import os
import time
from dataclasses import asdict, replace

import numpy as np

import dataset
import trainer
from aemc import checkpoints, distributed, reports, speed
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.errors import UserError
from aemc.evaluation import Session, evaluate
from aemc.files import RunDir, file_digest
from aemc.objective import training_objective
from aemc.paths import PathKey, summary, walk
from models.curves import connect
from utils import add_evaluation_args, allow_architecture, evaluation_settings, resolve_device, speed_settings


def get_args_parser():
    p = ArgParser("spawn.py", description=description(__doc__))
    p.add_argument("--from", dest="source", required=True, metavar="CKPT",
                   help="a training state of an endpoint run (checkpoint-K.pt, K = 0 with train.py --save_init)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="one copy per seed (1 2)")
    p.add_argument("--dir", required=True, help="where the copies (copy<i>-seed<s>/) and the segment's outputs go")
    p.add_argument("--num_points", type=positive(int), default=11, help="points of the segment's walk (11)")
    add_evaluation_args(p, "also LPIPS along the segment", loss=False)
    return p


def train_copy(source, source_path, seed, run_dir, device, speed_settings_):
    """Continue `source` (the Checkpoint at `source_path`) to its run's last epoch with `seed` for
    the data order and noise: the copy's last checkpoint."""
    # a copy keeps the checkpoint of its last epoch only (and checkpoint-last.pt to resume)
    settings = replace(source.settings, training=replace(source.settings.training, seed=seed,
                                                         save_freq=source.settings.training.epochs, save_final=True),
                       speed=speed_settings_)
    objective = training_objective(settings, curve=False, device=device)
    epochs = settings.training.epochs
    last = os.path.join(run_dir, f"checkpoint-{epochs}.pt")
    if os.path.isfile(last):
        return last
    resume = os.path.join(run_dir, "checkpoint-last.pt")
    start = checkpoints.load(resume, flag="the copy's checkpoint") if os.path.isfile(resume) else source
    run = RunDir(run_dir)
    trainer.seed_everything(seed)
    train_loader, test_loader = dataset.build_loaders(settings.data, device, seed=seed, speed=settings.speed)
    model = checkpoints.build_model(start).to(device)
    runner = speed.prepare_model(model, settings.speed)
    optimizer = trainer.make_optimizer(settings.optim, model.parameters(), objective.optimizer_weight_decay, device)
    scaler = speed.make_scaler(device, settings.speed.amp)
    state = trainer.TrainingState(kind="autoencoder", architecture=start.architecture, settings=settings, model=model,
                                  optimizer=optimizer, scaler=scaler, device=device)
    if start is source:  # the spawn: everything of epoch K but the random state, which is the seed's
        trainer.load_optimizer_state(optimizer, source.optimizer)
        epoch, position = source.epoch, None
    else:
        epoch, position = state.restore(start)
    run.save_args({"from": os.path.abspath(source_path), "seed": seed, "settings": settings.to_dict()})
    loss_fn = objective.reconstruction  # the test loss is the reconstruction alone
    trainer.fit(model=model, runner=runner, optimizer=optimizer, objective=objective, settings=settings,
                train_loader=train_loader, test_loader=test_loader, run=run, checkpoint=state.checkpoint,
                evaluate=lambda: (evaluate(runner, test_loader, {"loss": loss_fn}, amp=settings.speed.amp,
                                           beta=settings.loss.beta)["loss"], {}, runner),
                lr_at=lambda e, fraction: trainer.learning_rate(settings.optim.lr, e, epochs), start_epoch=epoch,
                position=position, scaler=scaler)
    return last


def main(args):
    """Spawn, train, walk; returns {"copies": [paths], "walk": the segment's walk, "files": {...}}."""
    distributed.refuse_several("spawn.py")
    if len(args.seeds) < 2:
        raise UserError("--seeds needs at least two seeds: the barrier is between two copies")
    if args.num_points < 2:
        raise UserError(f"--num_points must be at least 2, got {args.num_points}")
    source = checkpoints.load(args.source, kind="autoencoder", flag="--from")
    if not source.is_training_state or source.batch:
        raise UserError(f"--from {args.source} is not the end of an epoch of a training run; give a "
                        "checkpoint-<K>.pt of train.py")
    if source.epoch >= source.settings.training.epochs:
        raise UserError(f"--from {args.source} is the run's last epoch ({source.epoch}): nothing is left to train")
    allow_architecture(args)
    session = Session(resolve_device(args.device), speed_settings(args), evaluation_settings(args))
    print(f"spawning {len(args.seeds)} copies of {args.source} at epoch {source.epoch}, each trained to epoch "
          f"{source.settings.training.epochs} with its own data order and noise (seeds {args.seeds})")
    dataset.report_inherited(args, source.settings.data, "--from's run")  # spawn.py has no data flags
    started = time.time()
    copies = [train_copy(source, args.source, seed, os.path.join(args.dir, f"copy{i + 1}-seed{seed}"), session.device,
                         session.speed) for i, seed in enumerate(args.seeds)]
    session.prepare(source.settings.data, source.settings.loss, args.dir)
    a, b = (checkpoints.load_endpoint(path, "copy")[0] for path in copies[:2])
    samples = next(iter(session.test_loader))[:4]
    evaluator = session.evaluator(a, samples=samples)
    key = PathKey("segment")
    result = walk(connect(a, b).to(session.device), np.linspace(0, 1, args.num_points), evaluator, key.label)
    print(summary(f"segment between the copies of seeds {args.seeds[0]} and {args.seeds[1]}", result))
    sources = {f"seed {s}": p for s, p in zip(args.seeds, copies)}
    files = reports.write_walks(
        os.path.join(args.dir, "spawn"), walks={key: result}, samples=samples.cpu(),
        loss_name=source.settings.loss.loss_function, sources=sources,
        config={"flags": vars(args), "settings": source.settings.to_dict(), "evaluation": asdict(session.evaluation)},
        lpips_source=session.lpips.source if session.lpips is not None else None,
        extra={"spawned_at_epoch": source.epoch, "epochs": source.settings.training.epochs, "seeds": args.seeds,
               "from": {"path": os.path.relpath(args.source, args.dir), "sha256": file_digest(args.source)},
               "seconds": time.time() - started, "beta": source.settings.loss.beta})
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"copies": copies, "walk": result, "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
