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
import os
from types import SimpleNamespace

import checkpoints
import dataset as data
import distributed
import figures
import speed
import trainer
from ensembles import member_state, score_ensembles
from losses import add_lpips_args, build_loss, evaluation_losses, lpips_from_args
from paths import PointEvaluator
from utils import (ArgParser, RunDir, UserError, default_device, file_digest, positive, resolve_device,
                   run_cli, seed_everything, write_json)

OPTIMIZER = ("optim_name", "lr", "beta_1", "beta_2", "momentum", "wd", "noise_std", "loss_function", "num_filters")


def get_args_parser():
    p = ArgParser("fge.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="the endpoint checkpoint to continue from")
    p.add_argument("--dir", required=True, help="run directory: checkpoints, snapshots, log, the ensemble table")
    p.add_argument("--cycle", type=positive(int), default=4, help="epochs per cycle, even (4)")
    p.add_argument("--lr_1", type=positive(float), default=None, help="the cycle's top rate (the run's --lr)")
    p.add_argument("--lr_2", type=positive(float), default=None, help="the mid-cycle rate (1%% of lr_1)")
    p.add_argument("--epochs", type=positive(int), default=8, help="epochs of FGE training (8)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue the FGE run saved in CKPT")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=default_device())
    add_lpips_args(p, "also LPIPS (AlexNet) in the ensemble table")
    p.add_argument("--bn_batches", type=positive(int), default=None,
                   help="training batches for each snapshot's BatchNorm re-estimation in the table (all)")
    speed.add_speed_args(p)
    data.add_data_args(p, inherit=True)
    return p


def main(args):
    """Train, snapshot, score; returns {"snapshots": [paths], "table": {...}, "files": {...}}."""
    if args.cycle % 2:
        raise UserError(f"--cycle must be even (the rate reaches lr_2 at mid-cycle), got {args.cycle}")
    snapshots_at = trainer.snapshot_epochs(args.cycle, args.epochs)
    if not snapshots_at:
        raise UserError(f"--epochs {args.epochs} ends before the first mid-cycle ({args.cycle // 2}): no snapshot")
    distributed.refuse_several("fge.py")
    device = resolve_device(args.device)
    speed.check_amp(args.amp, device)
    speed.configure(device, args)
    resume = checkpoints.load(args.resume, kind="autoencoder", flag="--resume") if args.resume else None
    if resume and resume.get("optimizer") is None:
        raise UserError(f"--resume {args.resume} is not a training state; give checkpoint-last.pt of an FGE run")
    if resume is None and os.path.isfile(os.path.join(args.dir, "log.jsonl")):
        raise UserError(f"{args.dir} already holds a run; continue it with --resume "
                        f"{os.path.join(args.dir, 'checkpoint-last.pt')} or choose a new --dir")
    source = checkpoints.load(args.ckpt, kind="autoencoder", flag="--ckpt")
    lpips = lpips_from_args(args, device)
    run_args = source["args"] or {}
    settings = SimpleNamespace(**{k: run_args.get(k) for k in OPTIMIZER})
    lr_1 = args.lr_1 or settings.lr
    lr_2 = args.lr_2 or lr_1 / 100
    run = RunDir(args.dir)
    data.inherit_data_args(args, run_args)
    seed_everything(args.seed)
    train_loader, test_loader = data.build_loaders(args, device)
    loss_fn = build_loss(settings.loss_function or "mae", settings.num_filters or 5).to(device)
    model = checkpoints.build_model(source).to(device)
    runner = speed.prepare_model(model, args)
    scaler = speed.make_scaler(device, args.amp)
    optimizer = trainer.make_optimizer(settings, model.parameters(), settings.wd, device)
    if source.get("optimizer") is not None and resume is None:  # the endpoint's own moments, if it has them
        trainer.load_optimizer_state(optimizer, source["optimizer"])
    epoch, position = 0, None
    if resume:
        model.load_state_dict(resume["state_dict"])
        trainer.load_optimizer_state(optimizer, resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        epoch, position = resume["epoch"], resume["sums"] if resume.get("batch", 0) > 0 else None
        checkpoints.set_rng_state(resume["rng"], device)
    record = vars(args) | {"lr_1": lr_1, "lr_2": lr_2, "snapshot_epochs": snapshots_at,
                           "ckpt_sha256": file_digest(args.ckpt)}
    if resume:  # the schedule and the starting point must be the ones the run began with
        checkpoints.check_config({k: record[k] for k in ("cycle", "lr_1", "lr_2", "ckpt_sha256")},
                                 resume["args"], "the checkpoint")
    run.save_args(SimpleNamespace(**record))
    print(f"FGE from {args.ckpt}: {args.epochs} epochs, cycle {args.cycle}, lr {lr_1:g} -> {lr_2:g} -> {lr_1:g}; "
          f"snapshots after epochs {snapshots_at}; loss {settings.loss_function or 'mae'} on images in [-1, 1]")

    def checkpoint(epoch, sums=None):
        return dict(kind="autoencoder", model_config=source["model_config"], curve_config=None,
                    state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch,
                    batch=sums["batches"] if sums else 0, sums=sums, args=record, rng=checkpoints.rng_state(device))

    def snapshot(epoch, state):
        if epoch in snapshots_at:
            checkpoints.save(run.file(f"snapshot-{epoch}.pt"), checkpoints.autoencoder(
                model, record, epoch, source={"fge": os.path.abspath(args.ckpt), "epoch": epoch}))

    if epoch < args.epochs:
        trainer.fit(model=model, runner=runner, optimizer=optimizer, loss_fn=loss_fn, train_loader=train_loader,
                    test_loader=test_loader, run=run, epochs=args.epochs, checkpoint=checkpoint,
                    evaluate=lambda: (trainer.evaluate(runner, test_loader, {"loss": loss_fn}, amp=args.amp)["loss"],
                                      {}, runner),
                    lr_at=lambda e, fraction: trainer.cyclic_learning_rate(e, fraction, args.cycle, lr_1, lr_2),
                    start_epoch=epoch, position=position, noise_std=settings.noise_std or 0.0, amp=args.amp,
                    scaler=scaler, save_freq=args.cycle, save_final=True, on_epoch_end=snapshot)
    return score_snapshots(args, run, snapshots_at, model, train_loader, test_loader, run_args, lpips, device)


def score_snapshots(args, run, snapshots_at, model, train_loader, test_loader, run_args, lpips, device):
    """The table of the ensembles of the first k snapshots, k = 1, 2, ..."""
    paths = [run.file(f"snapshot-{e}.pt") for e in snapshots_at]
    loss_name, loss_fns = evaluation_losses(None, run_args, device)
    evaluator = PointEvaluator(model, train_loader.ordered(), test_loader, loss_fns, bn_batches=args.bn_batches,
                               speed=args)
    states = {f"epoch {e}": member_state(evaluator, dict(checkpoints.load_endpoint(path, "snapshot")[0]
                                                         .named_parameters()))
              for e, path in zip(snapshots_at, paths)}
    keys = list(states)
    table = score_ensembles(evaluator.module, states, {f"snapshots, {k}": keys[:k] for k in range(1, len(keys) + 1)},
                            test_loader, loss_fns, {"lpips": lpips} if lpips is not None else None, args.amp)
    for name, row in table.items():
        print(f"{name:14s} mean of members {row['member_mean']['loss']:.5f}  ensemble {row['ensemble']['loss']:.5f}  "
              f"gain {row['gain']['loss']:.5f}" + (f"  LPIPS {row['ensemble']['lpips']:.4f}" if lpips else ""))
    files = {"json": run.file("fge-ensembles.json"), "plot": run.file("fge-ensembles.png")}
    write_json(files["json"], {"loss": loss_name, "units": "test metrics on images in [-1, 1]",
                               "snapshots": paths, "ensembles": table})
    figures.plot_ensembles(table, loss_name, files["plot"], "FGE snapshots")
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"snapshots": paths, "table": table, "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
