"""Fast Geometric Ensembling (Garipov et al. 2018, Sec. 4): continue training an endpoint with a
cyclic learning rate, take a snapshot at each cycle's low point, and score the growing ensemble.

    python fge.py --ckpt runs/ae1/checkpoint-100.pt --cycle 4 --epochs 8 --dir runs/fge
    python fge.py --dir runs/fge --resume runs/fge/checkpoint-last.pt --cycle 4 --epochs 8 --ckpt ...

Within each cycle of --cycle epochs (even) the rate falls linearly, step by step, from --lr_1 to
--lr_2 at mid-cycle and rises back (default: from the endpoint run's --lr to 1% of it). At every
mid-cycle the model is saved as an ordinary autoencoder checkpoint, snapshot-<epoch>.pt. At the
end the ensembles of the first k snapshots, k = 1, 2, ..., are scored as ensemble.py does (each
member's BatchNorm re-estimated, then one pass over the test split). The optimizer, loss, noise
and data are the endpoint run's unless given; the run resumes like train.py (--resume).
"""
import dataclasses
import os

import dataset
import trainer
from aemc import checkpoints, distributed, reports, speed, tracking
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.ensembles import Ensemble, member_state, score_ensembles
from aemc.errors import UserError
from aemc.evaluation import PointEvaluator, evaluate
from aemc.files import RunDir, file_digest
from aemc.losses import build_lpips, evaluation_losses
from aemc.objective import training_objective
from aemc.settings import Cycle, Run, Training
from utils import (
    add_evaluation_args,
    allow_architecture,
    evaluation_settings,
    resolve_device,
    speed_settings,
    tracking_settings,
)


def get_args_parser():
    p = ArgParser("fge.py", description=description(__doc__))
    p.add_argument("--ckpt", required=True, help="the endpoint checkpoint to continue from")
    p.add_argument("--dir", required=True, help="run directory: checkpoints, snapshots, log, the ensemble table")
    p.add_argument("--cycle", type=positive(int), default=Cycle.cycle, help="epochs per cycle, even (4)")
    p.add_argument("--lr_1", type=positive(float), default=None, help="the cycle's top rate (the run's --lr)")
    p.add_argument("--lr_2", type=positive(float), default=None, help="the mid-cycle rate (1%% of lr_1)")
    p.add_argument("--epochs", type=positive(int), default=8, help="epochs of FGE training (8)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue the FGE run saved in CKPT")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the FGE run's data order, noise and dropout ({Training.seed}; on --resume the run's)")
    add_evaluation_args(p, "also LPIPS (AlexNet) in the ensemble table",
                        "training batches for each snapshot's BatchNorm re-estimation in the table", loss=False)
    dataset.add_data_args(p, inherit=True)
    tracking.add_tracking_args(p)
    return p


def run_settings(args, source, resume=None):
    """The FGE run's settings: the endpoint run's optimizer, loss and noise; the data and the seed
    given, else on --resume the FGE run's, else the endpoint run's data and the default seed; the
    cycle from the flags. A resume that would change what the run computes is refused."""
    lr_1 = args.lr_1 or source.settings.optim.lr
    cycle = Cycle(cycle=args.cycle, lr_1=lr_1, lr_2=args.lr_2 or lr_1 / 100, source_sha256=file_digest(args.ckpt))
    base = resume.settings if resume else source.settings
    seed = args.seed if args.seed is not None else base.training.seed if resume else Training.seed
    training = Training(epochs=args.epochs, seed=seed, noise_std=source.settings.training.noise_std,
                        save_freq=args.cycle)
    run = Run(data=dataset.data_settings(args, base.data), loss=source.settings.loss,
              optim=source.settings.optim, training=training, speed=speed_settings(args), fge=cycle)
    if resume:  # the loss and optimizer are --ckpt's (whose SHA-256 the cycle holds); the data and seed may differ
        trainer.check_resumed_settings(args.resume, resume.settings,
                                       dataclasses.replace(run, loss=resume.settings.loss, optim=resume.settings.optim))
    return run


def main(args):
    """Train, snapshot, score; returns {"snapshots": [paths], "table": {...}, "files": {...}}."""
    if args.cycle % 2:
        raise UserError(f"--cycle must be even (the rate reaches lr_2 at mid-cycle), got {args.cycle}")
    snapshots_at = trainer.snapshot_epochs(args.cycle, args.epochs)
    if not snapshots_at:
        raise UserError(f"--epochs {args.epochs} ends before the first mid-cycle ({args.cycle // 2}): no snapshot")
    distributed.refuse_several("fge.py")
    tracking.check_wandb(tracking_settings(args))
    allow_architecture(args)
    device = resolve_device(args.device)
    resume = checkpoints.load(args.resume, kind="autoencoder", flag="--resume") if args.resume else None
    if resume and not resume.is_training_state:
        raise UserError(f"--resume {args.resume} is not a training state; give checkpoint-last.pt of an FGE run")
    trainer.check_fresh_run_dir(args.dir, args.resume, resume)
    source = checkpoints.load(args.ckpt, kind="autoencoder", flag="--ckpt")
    settings = run_settings(args, source, resume)
    dataset.report_inherited(args, settings.data, "--ckpt's run")
    cycle = settings.fge
    if resume:  # the schedule and the starting point must be the ones the run began with
        checkpoints.check_config(dataclasses.asdict(cycle), dataclasses.asdict(resume.settings.fge or Cycle()),
                                 "the checkpoint")
    speed.configure(device, settings.speed)
    evaluation = evaluation_settings(args)
    lpips = build_lpips(evaluation.lpips_weights, device) if evaluation.lpips else None
    run = RunDir(args.dir)
    trainer.seed_everything(settings.training.seed)
    train_loader, test_loader = dataset.build_loaders(settings.data, device, seed=settings.training.seed,
                                                      speed=settings.speed)
    objective = training_objective(settings, curve=False, device=device)
    loss_fn = objective.reconstruction  # the test loss is the reconstruction alone
    model = checkpoints.build_model(resume or source).to(device)
    runner = speed.prepare_model(model, settings.speed)
    scaler = speed.make_scaler(device, settings.speed.amp)
    optimizer = trainer.make_optimizer(settings.optim, model.parameters(), objective.optimizer_weight_decay, device)
    if source.optimizer is not None and resume is None:  # the endpoint's own moments, if it has them
        trainer.load_optimizer_state(optimizer, source.optimizer)
    state = trainer.TrainingState(kind="autoencoder", architecture=source.architecture, settings=settings,
                                  model=model, optimizer=optimizer, scaler=scaler, device=device)
    epoch, position = state.restore(resume) if resume else (0, None)
    run.save_args({**vars(args), "lr_1": cycle.lr_1, "lr_2": cycle.lr_2, "snapshot_epochs": snapshots_at,
                   "ckpt_sha256": cycle.source_sha256})
    print(f"FGE from {args.ckpt}: {args.epochs} epochs, cycle {args.cycle}, lr {cycle.lr_1:g} -> {cycle.lr_2:g} -> "
          f"{cycle.lr_1:g}; snapshots after epochs {snapshots_at}; loss {settings.loss.loss_function} on images "
          "in [-1, 1]")

    def snapshot(epoch, _):
        if epoch in snapshots_at:
            origin = {"fge": os.path.abspath(args.ckpt), "epoch": epoch}
            checkpoints.save(run.file(f"snapshot-{epoch}.pt"),
                             checkpoints.autoencoder(model, source.architecture, settings, epoch, source=origin))

    trackers = tracking.open_trackers(tracking_settings(args), args.dir, {**settings.to_dict(), "architecture":
                                                       source.architecture.to_dict()}, "fge")
    if epoch < args.epochs:
        trainer.fit(model=model, runner=runner, optimizer=optimizer, objective=objective, settings=settings,
                    train_loader=train_loader, test_loader=test_loader, run=run, checkpoint=state.checkpoint,
                    evaluate=lambda: (evaluate(runner, test_loader, {"loss": loss_fn}, amp=settings.speed.amp,
                                               beta=settings.loss.beta)["loss"], {}, runner),
                    lr_at=lambda e, fraction: trainer.cyclic_learning_rate(e, fraction, cycle.cycle, cycle.lr_1,
                                                                           cycle.lr_2),
                    start_epoch=epoch, position=position, scaler=scaler, on_epoch_end=snapshot, trackers=trackers)
    result = score_snapshots(run, snapshots_at, model, train_loader, test_loader, settings, evaluation, lpips, device)
    for tracker in trackers:
        tracker.table("ensembles", ["ensemble", "members", "member_mean_loss", "ensemble_loss", "gain_loss"],
                      [[name, len(row["keys"]), row["member_mean"]["loss"], row["ensemble"]["loss"],
                        row["gain"]["loss"]] for name, row in result["table"].items()])
        tracker.media({"ensembles_plot": result["files"]["plot"]})
    tracking.close(trackers)
    return result


def score_snapshots(run, snapshots_at, model, train_loader, test_loader, settings, evaluation, lpips, device):
    """The table of the ensembles of the first k snapshots, k = 1, 2, ..."""
    paths = [run.file(f"snapshot-{e}.pt") for e in snapshots_at]
    loss_fns = evaluation_losses(settings.loss, device)
    evaluator = PointEvaluator(model, train_loader.ordered(), test_loader, loss_fns, bn_batches=evaluation.bn_batches,
                               speed=settings.speed, beta=settings.loss.beta)
    states = {f"epoch {e}": member_state(evaluator, dict(checkpoints.load_endpoint(path, "snapshot")[0]
                                                         .named_parameters()))
              for e, path in zip(snapshots_at, paths)}
    keys = list(states)
    ensembles = [Ensemble("snapshots", keys[:k]) for k in range(1, len(keys) + 1)]
    table = score_ensembles(evaluator.module, states, ensembles, test_loader, loss_fns,
                            {"lpips": lpips} if lpips is not None else None, settings.speed.amp)
    for name, row in table.items():
        print(f"{name:14s} mean of members {row['member_mean']['loss']:.5f}  ensemble {row['ensemble']['loss']:.5f}  "
              f"gain {row['gain']['loss']:.5f}" + (f"  LPIPS {row['ensemble']['lpips']:.4f}" if lpips else ""))
    files = reports.write_ensembles(run.file("fge-ensembles"), table=table, loss_name=settings.loss.loss_function,
                                    sources={f"snapshot-{e}": p for e, p in zip(snapshots_at, paths)},
                                    config={"settings": settings.to_dict()},
                                    lpips_source=lpips.source if lpips is not None else None,
                                    extra={"snapshots": paths})
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"snapshots": paths, "table": table, "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
