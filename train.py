"""Train an endpoint autoencoder, or (with --curve) a Bezier / PolyChain curve between two of them.

    python train.py --dir runs/ae1 --dataset synthetic --epochs 10
    python train.py --dir runs/ae1 ... --resume runs/ae1/checkpoint-last.pt
    python train.py --dir runs/curve --curve Bezier --num_bends 3 --fix_start --fix_end \
        --init_start runs/ae1/checkpoint-10.pt --init_end runs/ae2/checkpoint-10.pt ...

A curve samples one t ~ U(0, 1) per batch and minimises the reconstruction loss at theta(t) plus
0.5 * wd * ||theta(t)||^2; each epoch it also reports the test loss at t = 0.5 with BatchNorm
re-estimated on a fixed subset of training batches.

Each epoch prints one line, appends one JSON line to <dir>/log.jsonl and writes a PNG of test
images above their reconstructions to <dir>/recon/. checkpoint-last.pt is rewritten after every
epoch (and on Ctrl-C, mid-epoch), checkpoint-<epoch>.pt every --save_freq epochs and at the end.
Losses are computed on images in [-1, 1].
"""
import argparse
from dataclasses import asdict

import dataset
import trainer
from aemc import architectures, checkpoints, distributed, speed, tracking
from aemc.alignment import align_to
from aemc.cli import ArgParser, description, json_object, positive, run_cli
from aemc.errors import UserError, warn
from aemc.evaluation import evaluate, update_bn
from aemc.files import RunDir
from aemc.latent import describe
from aemc.losses import LOSSES
from aemc.objective import training_objective
from aemc.settings import RESULT_SETTINGS, Architecture, Data, Loss, Optimizer, Run, Training
from models import ARCHITECTURES
from models.autoencoder import INITS, NORMS
from models.curves import T_SAMPLING, TSampler, connect, curve_name
from utils import (
    add_align_args,
    add_device_arg,
    add_speed_args,
    alignment_settings,
    check_align_flags,
    given,
    resolve_device,
    speed_settings,
    tracking_settings,
)

RESUMED = "; on --resume the checkpoint's"


def get_args_parser():
    p = ArgParser("train.py", description=description(__doc__))
    g = p.add_argument_group("run")
    g.add_argument("--dir", required=True, help="run directory for checkpoints and logs")
    add_device_arg(g)
    g.add_argument("--seed", type=int, default=None,
                   help=f"seed of the initialisation, data order, noise, dropout and t ({Training.seed}){RESUMED}")
    g.add_argument("--resume", default=None, metavar="CKPT", help="continue the run saved in CKPT")
    g.add_argument("--epochs", type=positive(int), default=Training.epochs,
                   help=f"epochs to train in all ({Training.epochs}); the schedule spans them; raise it on --resume "
                        "to extend a run")
    g.add_argument("--save_freq", type=positive(int), default=Training.save_freq,
                   help=f"checkpoint every N epochs ({Training.save_freq})")
    g.add_argument("--save_final", action=argparse.BooleanOptionalAction, default=Training.save_final,
                   help="write checkpoint-<epochs>.pt at the end (default: on)")
    g.add_argument("--save_init", action="store_true",
                   help="also write checkpoint-0.pt, the state before the first step (spawn.py starts from it)")
    g.add_argument("--verbose", action="store_true", help="print the model and the configuration")
    g = dataset.add_data_args(p, inherit=True, title="data (default: the checkpoint's on --resume, the endpoints' "
                                                     "for a curve, else the value shown)")
    g.add_argument("--noise_std", type=float, default=None,
                   help=f"denoising input noise std, 0: off ({Training.noise_std}){RESUMED}")
    g = p.add_argument_group("model and loss (default: from the checkpoint, else the original's)")
    g.add_argument("--loss_function", choices=LOSSES, default=None, help="mae (default) or laplacian")
    g.add_argument("--num_filters", type=positive(int), default=None, help="Laplacian pyramid levels (5)")
    g.add_argument("--arch", default=None, metavar="NAME",
                   help=f"the model: {', '.join(ARCHITECTURES)} (default: conv, the original's), or a factory of your "
                        "own, package.module:function (docs/architectures.md)")
    g.add_argument("--arch_kwargs", type=json_object, default=None, metavar="JSON",
                   help="more arguments of the model's factory, as a JSON object: '{\"width\": 32}'")
    g.add_argument("--in_channels", type=positive(int), default=None, help="image channels (from the data)")
    g.add_argument("--in_filters", type=positive(int), default=None, help="base width f (conv: 64)")
    g.add_argument("--latent_dim", type=positive(int), default=None, help="embedding size (conv: 128)")
    g.add_argument("--norm", choices=NORMS, default=None,
                   help="normalisation of the convolutional models: batch (default), group, layer or none")
    g.add_argument("--conv_init", choices=INITS, default=None, help="init of convolutions (conv: normal)")
    g.add_argument("--beta", type=float, default=None,
                   help="a VAE's loss is reconstruction + beta * KL (1); KL per pixel value, see docs")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optim_name", choices=("Adam", "SGD"), default=None,
                   help=f"the optimizer: Adam (lr, beta_1, beta_2) or SGD (lr, momentum) ({Optimizer.optim_name})"
                        f"{RESUMED}")
    g.add_argument("--lr", type=positive(float), default=None, help=f"initial learning rate ({Optimizer.lr}){RESUMED}")
    g.add_argument("--beta_1", type=float, default=None, help=f"Adam's beta_1 ({Optimizer.beta_1}){RESUMED}")
    g.add_argument("--beta_2", type=float, default=None, help=f"Adam's beta_2 ({Optimizer.beta_2}){RESUMED}")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum ({Optimizer.momentum}){RESUMED}")
    g.add_argument("--wd", type=float, default=None,
                   help=f"weight decay; for a curve 0.5 * wd * ||theta(t)||^2 added to the loss ({Optimizer.wd})"
                        f"{RESUMED}")
    add_speed_args(p).add_argument("--sync_bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over the whole batch (SyncBatchNorm); "
                        "for a curve only with --t_sampling shared")
    g = p.add_argument_group("curve (default: from the checkpoint when resuming)")
    g.add_argument("--curve", type=curve_name, default=None, help="Bezier or PolyChain: train a curve")
    g.add_argument("--num_bends", type=positive(int), default=None, help="bends including both ends (3)")
    g.add_argument("--init_start", default=None, metavar="CKPT", help="endpoint checkpoint for t = 0")
    g.add_argument("--init_end", default=None, metavar="CKPT", help="endpoint checkpoint for t = 1")
    g.add_argument("--fix_start", action="store_true", help="keep the t = 0 end fixed")
    g.add_argument("--fix_end", action="store_true", help="keep the t = 1 end fixed")
    g.add_argument("--init_linear_off", action="store_true",
                   help="do not place the interior bends on the segment between the ends")
    g.add_argument("--midpoint_bn_batches", type=positive(int), default=Training.midpoint_bn_batches,
                   help="training batches for BatchNorm at t = 0.5 in the per-epoch report (10)")
    g.add_argument("--t_sampling", choices=T_SAMPLING, default=None,
                   help="under torchrun, how the processes draw t: one shared t per step, one per process, "
                        "or stratified: process r of R in [r/R, (r+1)/R) (default: stratified)")
    g.add_argument("--align", action="store_true",
                   help="connect the start to the end with the end's units permuted to match the start's "
                        "(see align.py; the curve records the permutations)")
    add_align_args(p)
    tracking.add_tracking_args(p, tensorboard=True)
    return p


def run_settings(args, resume, endpoints_data=None):
    """The run's settings: the flags given, else the checkpoint's on --resume (else, for the data, the
    endpoints' `endpoints_data` of a fresh curve), else the defaults. A resume that changes a
    setting of RESULT_SETTINGS is refused."""
    saved = resume.settings if resume else None
    base = saved or Run(data=endpoints_data or Data())
    training = Training(epochs=args.epochs, seed=base.training.seed if args.seed is None else args.seed,
                        noise_std=base.training.noise_std if args.noise_std is None else args.noise_std,
                        save_freq=args.save_freq, save_final=args.save_final,
                        midpoint_bn_batches=args.midpoint_bn_batches,
                        t_sampling=args.t_sampling or base.training.t_sampling, sync_bn=args.sync_bn)
    run = Run(data=dataset.data_settings(args, base.data), loss=Loss(**{**vars(base.loss), **given(args, Loss)}),
              optim=Optimizer(**{**vars(base.optim), **given(args, Optimizer)}), training=training,
              speed=speed_settings(args))
    if saved is not None:
        trainer.check_resumed_settings(args.resume, saved, run)
    elif endpoints_data is not None:
        changed = dataset.data_flags(run.data, [k for k in RESULT_SETTINGS["data"]
                                                if getattr(run.data, k) != getattr(endpoints_data, k)])
        if changed:
            warn(f"warning: {changed}: the endpoints were trained on other data "
                 f"({dataset.data_flags(endpoints_data, RESULT_SETTINGS['data'])})")
    return run


ARCH_FLAGS = ("in_channels", "in_filters", "latent_dim", "norm", "conv_init")  # flags that are factory arguments


def architecture(args, saved, data_shape):
    """The model's architecture: `saved`'s (a resumed run's, the endpoints' of a curve), checked
    against the flags given; else --arch with its --arch_kwargs and the size flags given, the
    data's channels and image size, and the factory's defaults for the rest."""
    flags = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None}
    if saved is not None:
        if args.arch is not None and args.arch != saved.name:
            raise UserError(f"--arch {args.arch}: the checkpoint holds a {saved.name} model")
        checkpoints.check_config({k: v for k, v in flags.items() if k != "conv_init"}, saved.kwargs, "the checkpoint")
        return saved
    name = args.arch or "conv"
    kwargs = dict(args.arch_kwargs or {})
    takes = architectures.accepted(name)
    for key, value in flags.items():
        if key not in takes:
            raise UserError(f"--{key}: the {name} architecture takes no {key} (its arguments: {', '.join(takes)})")
        if key in kwargs and kwargs[key] != value:
            raise UserError(f"--{key} {value} and --arch_kwargs {key} {kwargs[key]} disagree: give it once")
        kwargs[key] = value
    return architectures.resolve(name, kwargs, data_shape)


def build_endpoint(args, resume, data_shape):
    arch = architecture(args, resume.architecture if resume else None, data_shape)
    return architectures.build(arch), arch, None


def load_ends(args):
    """{flag: Checkpoint} of the endpoints given (--init_start, --init_end)."""
    given = {flag: path for flag, path in (("--init_start", args.init_start), ("--init_end", args.init_end)) if path}
    return {flag: checkpoints.load(path, kind="autoencoder", flag=flag) for flag, path in given.items()}


def build_curve(args, resume, saved, train_loader, data_shape, endpoint_objective):
    """A CurveNet between the endpoint checkpoints (or, on --resume, as the checkpoint says); with
    --align, its end is the --init_end endpoint with its units matched to the start's (--align_method
    ste lowers `endpoint_objective`, the run's without a curve's weight decay, along the segment)."""
    if resume:
        cfg = resume.curve_config
        checkpoints.check_config({"curve": args.curve, "num_bends": args.num_bends}, cfg, "the checkpoint")
        if args.align and not cfg.get("alignment"):
            raise UserError(f"--resume {args.resume}: that curve was trained without --align; drop --align")
        checkpoints.verify_endpoints(cfg, strict=False)
        arch = architecture(args, resume.architecture, data_shape)
        base = architectures.build(arch)
        return connect(None, None, cfg["curve"], cfg["num_bends"], cfg["fix_start"], cfg["fix_end"],
                       init_linear=False, template=base), arch, cfg
    if len(saved) == 2:
        checkpoints.check_same_architecture(list(saved.values()), [args.init_start, args.init_end])
    else:
        fresh = " and ".join(flag for flag in ("--init_start", "--init_end") if flag not in saved)
        warn(f"warning: without {fresh} the curve's {'ends start' if len(saved) == 0 else 'other end starts'} "
             "from the architecture's initialisation")
    first = next(iter(saved.values())).architecture if saved else None
    arch = architecture(args, first, data_shape)
    if first is not None and "conv_init" in arch.kwargs:  # fresh interior bends: --conv_init, else the default
        init = args.conv_init or architectures.accepted(arch.name)["conv_init"]
        arch = Architecture(arch.name, {**arch.kwargs, "conv_init": init})
    base = architectures.build(arch)  # the first draw after seeding
    ends = {flag: checkpoints.build_model(ck) for flag, ck in saved.items()}
    alignment = None
    if args.align:
        if len(ends) < 2:
            raise UserError("--align needs both --init_start and --init_end")
        device = train_loader.device
        aligned, alignment = align_to(ends["--init_start"].to(device), ends["--init_end"].to(device),
                                      alignment_settings(args), train_loader, objective=endpoint_objective)
        ends["--init_end"] = aligned.cpu()
        print(f"--align: the end's units matched to the start's by {args.align_method} matching: "
              f"||start - end|| {alignment['distance_before']:.4f} -> {alignment['distance_after']:.4f}")
        if alignment["latent"]:
            print(describe(alignment["latent"]))
    num_bends = args.num_bends or 3
    try:
        net = connect(ends.get("--init_start"), ends.get("--init_end"), args.curve, num_bends,
                      args.fix_start, args.fix_end, init_linear=not args.init_linear_off, template=base)
    except ValueError as e:
        raise UserError(str(e))
    cfg = dict(curve=net.curve, num_bends=num_bends, fix_start=args.fix_start, fix_end=args.fix_end,
               init_linear=not args.init_linear_off, alignment=alignment,
               **checkpoints.endpoint_record((args.init_start, args.init_end)))
    return net, arch, cfg


def main(args):
    architectures.allow(args.arch)  # a factory of the user's own, named on this command line
    tracking.check_wandb(tracking_settings(args))
    check_align_flags(args)
    device = distributed.setup(resolve_device(args.device))
    several = distributed.world() > 1
    resume = checkpoints.load(args.resume, flag="--resume") if args.resume else None
    if resume and not resume.is_training_state:
        raise UserError(f"--resume {args.resume} is a point extracted from a curve, not a training "
                        "state; use it as --init_start / --init_end")
    if resume and args.curve and resume.kind != "curve":
        raise UserError(f"--resume {args.resume} holds an autoencoder, not a curve; drop --curve")
    is_curve = bool(args.curve) or (resume is not None and resume.kind == "curve")
    trainer.check_fresh_run_dir(args.dir, args.resume, resume)
    ends = load_ends(args) if is_curve and not resume else {}  # a fresh curve's data is its endpoints'
    settings = run_settings(args, resume, next(iter(ends.values())).settings.data if ends else None)
    if ends:
        dataset.report_inherited(args, settings.data, f"{next(iter(ends))}'s run")
    speed.configure(device, settings.speed)
    if args.sync_bn and not (several and device.type == "cuda"):
        raise UserError("--sync_bn needs several processes on CUDA (torchrun --nproc-per-node G ... --device cuda)")
    if args.sync_bn and is_curve and settings.training.t_sampling != "shared":
        raise UserError("--sync_bn averages BatchNorm statistics over processes, which only makes sense when "
                        "they all run the same point of the curve: add --t_sampling shared")
    run = RunDir(args.dir) if distributed.is_main() else None
    objective = training_objective(settings, curve=is_curve, device=device)
    loss_fn = objective.reconstruction  # the test loss is the reconstruction alone

    # noise and dropout differ between processes
    trainer.seed_everything(settings.training.seed + 1_000_003 * distributed.rank())
    train_loader, test_loader = dataset.build_loaders(settings.data, device, seed=settings.training.seed,
                                                      speed=settings.speed,
                                                      shard=True)
    data_shape = tuple(train_loader.images.shape[1:])
    endpoint_objective = training_objective(settings, curve=False, device=device)  # --align_method ste lowers it
    model, arch, curve_config = (build_curve(args, resume, ends, train_loader, data_shape, endpoint_objective)
                                 if is_curve else build_endpoint(args, resume, data_shape))
    t_sampler = None
    if is_curve and several:
        model.t_sampler = t_sampler = TSampler(settings.training.t_sampling, settings.training.seed, distributed.rank(),
                                               distributed.world(), device)
    if resume:
        model.load_state_dict(resume.state_dict)
    if args.sync_bn:
        model = speed.sync_batchnorm(model)
    model.to(device)
    architectures.check_output(model, next(iter(test_loader))[:2], arch.name)  # a wrong shape fails now, in one line
    runner = speed.prepare_model(model, settings.speed, data_parallel=several)  # channels_last / DDP / compile
    scaler = speed.make_scaler(device, settings.speed.amp)
    # a curve's weight decay is the objective's explicit 0.5 * wd * ||theta(t)||^2 term, not the optimizer's
    optimizer = trainer.make_optimizer(settings.optim, [p for p in model.parameters() if p.requires_grad],
                                       objective.optimizer_weight_decay, device)
    if run is not None:  # the flags, with what the checkpoints decided in place of those left out
        run.save_args({**vars(args), **arch.kwargs, **asdict(settings.data), **asdict(settings.loss),
                       **asdict(settings.optim), **(curve_config or {}), "seed": settings.training.seed,
                       "noise_std": settings.training.noise_std, "t_sampling": settings.training.t_sampling})
    if args.verbose:
        print(model)
        print(settings)

    state = trainer.TrainingState(kind="curve" if is_curve else "autoencoder", architecture=arch,
                                  curve_config=curve_config, settings=settings, model=model, optimizer=optimizer,
                                  scaler=scaler, device=device, t_sampler=t_sampler)
    epoch, position = 0, None
    if resume:
        epoch, position = state.restore(resume)
        print(f"resuming {args.resume} at epoch {epoch + 1}"
              + (f", batch {position['batches']}" if position else ""))
    if epoch >= settings.training.epochs:
        raise UserError(f"the checkpoint has already completed {epoch} epochs; raise --epochs")
    if args.save_init and not resume:
        init = state.checkpoint(0)  # every process gathers its random state
        if run is not None:
            checkpoints.save(run.file("checkpoint-0.pt"), init)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = (f"{curve_config['curve']} curve, {curve_config['num_bends']} bends: " if is_curve else "")
    print(f"{what}{n_params:,} trainable parameters; {train_loader.num_images} train / {test_loader.num_images} "
          f"test images; loss {settings.loss.loss_function} on [-1, 1] images; device {device}"
          + (f"; {distributed.world()} processes, batches of {settings.data.batch_size} shared"
             + (f", t {settings.training.t_sampling}" if is_curve else "") if several else ""))

    def evaluate_epoch():  # rank 0 alone: the plain model, not the data-parallel wrapper
        if not is_curve:
            module = model if several else runner
            return evaluate(module, test_loader, {"loss": loss_fn}, amp=settings.speed.amp,
                            beta=settings.loss.beta)["loss"], {}, module
        # the midpoint, BatchNorm re-estimated on a fixed subset of training batches
        midpoint = model.point_at(0.5)
        with speed.autocast(device, settings.speed.amp):
            update_bn(train_loader.ordered(), midpoint, num_batches=settings.training.midpoint_bn_batches)
        test_loss = evaluate(midpoint, test_loader, {"loss": loss_fn}, amp=settings.speed.amp,
                             beta=settings.loss.beta)["loss"]
        return test_loss, {"test_loss_at": "t=0.5"}, midpoint

    trackers = tracking.open_trackers(
        tracking_settings(args), args.dir, {**settings.to_dict(), "architecture": arch.to_dict(),
                         "curve": {k: curve_config[k] for k in ("curve", "num_bends", "fix_start", "fix_end")}
                         if is_curve else None},
        "curve" if is_curve else "train") if run is not None else []
    epochs = settings.training.epochs
    trainer.fit(model=model, runner=runner, optimizer=optimizer, objective=objective, settings=settings,
                train_loader=train_loader, test_loader=test_loader, run=run, checkpoint=state.checkpoint,
                evaluate=evaluate_epoch,
                lr_at=lambda epoch, fraction: trainer.learning_rate(settings.optim.lr, epoch, epochs),
                start_epoch=epoch, position=position, scaler=scaler, trackers=trackers)
    tracking.close(trackers)
    distributed.shutdown()
    print(f"done: checkpoints in {args.dir}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
