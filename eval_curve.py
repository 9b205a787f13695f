"""Walk a path in weight space (a trained curve, and the straight segment between its ends) and
report losses, LPIPS, path statistics, barrier heights, plots and GIFs of reconstructions.

    python eval_curve.py --ckpt runs/curve/checkpoint-100.pt --num_points 21 --lpips
    python eval_curve.py --connect TRIVIAL --init_start A.pt --init_end B.pt

At each of --num_points evenly spaced t in [0, 1], BatchNorm statistics are re-estimated on the
training split (--bn_batches caps it to the same first batches at every t), then the loss is
measured on the train and test splits (and LPIPS on the test split). Losses are on images in [-1, 1].
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import dataset
from aemc import checkpoints, distributed, latent, learned_matching, reports, tracking
from aemc.alignment import align_to
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.ensembles import EndEnsembles
from aemc.errors import UserError
from aemc.evaluation import evaluate, prior_samples, update_bn
from aemc.layerwise import LayerwisePath, layer_groups
from aemc.objective import training_objective
from aemc.paths import PathKey, summary, walk
from aemc.repair import layers_to_repair
from aemc.settings import Run
from aemc.stitching import BATCHNORM, describe, scorer, select, stitch_layers, stitch_points
from models.curves import connect, curve_name
from utils import (
    add_align_args,
    add_evaluation_args,
    add_stitch_args,
    alignment_settings,
    check_align_flags,
    loss_settings,
    open_session,
    output_dir,
    stitching_settings,
    tracking_settings,
)


def get_args_parser():
    p = ArgParser("eval_curve.py", description=description(__doc__))
    p.add_argument("--dir", default=None, help="output folder (default: <checkpoint folder>/eval)")
    p.add_argument("--ckpt", default=None, help="curve checkpoint (for --connect CURVE)")
    p.add_argument("--connect", type=str.upper, choices=("CURVE", "TRIVIAL", "LAYERWISE"), default="CURVE",
                   help="CURVE: the trained curve (and its segment); TRIVIAL: the segment between "
                        "--init_start and --init_end; LAYERWISE: that segment, and for each group of layers "
                        "the path that interpolates only that group (the rest stays at the start)")
    p.add_argument("--curve", type=curve_name, default=None, help="checked against the checkpoint")
    p.add_argument("--num_bends", type=positive(int), default=None, help="checked against the checkpoint")
    p.add_argument("--init_start", default=None, help="endpoint checkpoint at t = 0 (TRIVIAL)")
    p.add_argument("--init_end", default=None, help="endpoint checkpoint at t = 1 (TRIVIAL)")
    p.add_argument("--num_points", type=int, default=10, help="evenly spaced t in [0, 1] (10)")
    p.add_argument("--no_segment", action="store_true", help="do not also walk the curve's segment")
    p.add_argument("--ensemble", action="store_true",
                   help="also, at every t: the diversity mean |f_t(x) - f_end(x)| from each end and the loss "
                        "and gain of the ensembles {theta(0), theta(t)} and {theta(1), theta(t)}. Keeps the "
                        "two ends' test reconstructions in memory: 2 x 49,152 bytes per test image "
                        "(4.0 GB for CelebA's 40,520), on the data's device")
    p.add_argument("--align", action="store_true",
                   help="also walk the segment from the start to the end with its units permuted to "
                        "match the start's, and that segment with REPAIR (see align.py and the alignment flags)")
    p.add_argument("--repair", action="store_true",
                   help="also walk every segment with REPAIR: at each t, the layers no BatchNorm follows get "
                        "the interpolation of the ends' per-channel statistics (Jordan et al. 2023)")
    add_evaluation_args(p, "also mean LPIPS (AlexNet) over the test split",
                        "training batches for BatchNorm re-estimation at each t")
    p.add_argument("--num_images", type=positive(int), default=4,
                   help="test images in the GIFs (4); for a VAE also as many decoded prior samples")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the evaluation's random draws (a VAE's prior samples) (1)")
    add_align_args(p)
    add_stitch_args(p, prefix="stitch")
    dataset.add_data_args(p, inherit=True)
    tracking.add_tracking_args(p)
    return p


@dataclass
class Paths:
    """What a walk evaluates: the paths, the two ends (autoencoders), the source checkpoints
    ({role: path}), the settings of the run that made them, and whether the curve ends aligned."""
    paths: dict            # {PathKey: CurveNet}
    ends: tuple
    sources: dict
    run: Run
    aligned_curve: bool = False
    own_ends: tuple = None  # the endpoints with their own BatchNorm statistics, when known


def load_paths(args):
    if args.connect in ("TRIVIAL", "LAYERWISE"):
        if not (args.init_start and args.init_end):
            raise UserError(f"--connect {args.connect} needs both --init_start and --init_end")
        (a, ack), (b, _) = checkpoints.load_endpoints([args.init_start, args.init_end])
        sources = {"init_start": args.init_start, "init_end": args.init_end}
        return Paths({PathKey("segment"): connect(a, b)}, (a, b), sources, ack.settings, own_ends=(a, b))
    if not args.ckpt:
        raise UserError("--connect CURVE needs --ckpt (a curve checkpoint)")
    ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
    cfg = ck.curve_config
    checkpoints.check_config({"curve": args.curve, "num_bends": args.num_bends}, cfg, "the checkpoint")
    checkpoints.verify_endpoints(cfg, strict=False)
    aligned = bool(cfg.get("alignment"))  # a curve trained with --align ends at the aligned copy of its endpoint
    if aligned and args.align:
        raise UserError("the curve was trained with --align: its segment already ends at the aligned endpoint; "
                        "drop --align")
    curve = checkpoints.build_model(ck)
    paths = {PathKey("curve", cfg["curve"], cfg["num_bends"], aligned): curve}
    ends = (curve.point_at(0.0), curve.point_at(1.0))
    recorded = [cfg.get(k) for k in ("init_start", "init_end")]
    own = None  # the endpoint checkpoints with their own BatchNorm statistics, when still there and unchanged
    if not aligned and all(p and os.path.isfile(p) for p in recorded) and not checkpoints.endpoint_changes(cfg):
        own = tuple(end for end, _ in checkpoints.load_endpoints(recorded))
    if not args.no_segment:
        paths[PathKey("segment", aligned=aligned)] = connect(*ends)
    return Paths(paths, ends, {"ckpt": args.ckpt}, ck.settings, aligned, own_ends=own)


def add_derived_paths(args, loaded, session):
    """The aligned segment (--align), the layer-wise paths (LAYERWISE) and the REPAIRed segments
    (--repair; with --align, the aligned one always): {PathKey: path}, the alignment record."""
    paths, alignment = dict(loaded.paths), None
    a, b = (m.to(session.device) for m in loaded.ends)
    if args.align:  # the end with its units matched to the start's
        if args.connect == "CURVE":  # points of a curve carry no BatchNorm statistics of their own
            for m in (a, b):
                update_bn(session.train_loader.ordered(), m, num_batches=args.bn_batches)
        objective = training_objective(dataclasses.replace(loaded.run, loss=session.loss), curve=False,
                                       device=session.device)  # the walk's loss, the run's beta
        b, alignment = align_to(a, b, alignment_settings(args), session.train_loader, objective=objective)
        paths[PathKey("segment", aligned=True)] = connect(a, b)
        print(f"{args.align_method} matching: ||start - end|| = {alignment['distance_before']:.4f}, "
              f"||start - aligned end|| = {alignment['distance_after']:.4f}")
        if "ste" in alignment:
            print(learned_matching.summary(alignment["ste"]))
        if alignment["latent"]:
            print(latent.describe(alignment["latent"]))
    if args.connect == "LAYERWISE":
        start, end = dict(a.named_parameters()), dict(b.named_parameters())
        paths = {PathKey("segment", aligned=args.align): connect(a, b)}
        paths.update({PathKey("layerwise", aligned=args.align, group=group): LayerwisePath(start, end, members)
                      for group, members in layer_groups(a).items()})
        return paths, alignment
    for key in [k for k in paths if k.kind == "segment" and (args.repair or (args.align and k.aligned))]:
        paths[dataclasses.replace(key, repaired=True)] = paths[key]
    return paths, alignment


END_LOSS_TOLERANCE = 0.01  # relative: re-estimated against stored BatchNorm statistics


def compare_ends(loaded, results, session):
    """BatchNorm is re-estimated at every t, the ends included, so the ends' losses differ from their
    own (stored statistics, as check_ends.py evaluates them): say so when the model has BatchNorm; where
    they differ by more than END_LOSS_TOLERANCE, print both. Returns {"start"/"end": {"own", "re-estimated"}}
    of those that differ."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in loaded.ends[0].modules()):
        return {}
    print("note: BatchNorm is re-estimated at every t, the ends included, so the ends' losses here differ "
          "from check_ends.py's (the checkpoints' own statistics)")
    if loaded.own_ends is None:
        return {}
    differ = {}
    for i, side in ((0, "start"), (-1, "end")):
        model = loaded.own_ends[i].to(session.device)
        own = evaluate(model, session.test_loader, {"loss": session.loss_fns["loss"]}, beta=session.loss.beta)["loss"]
        walked = next(iter(results.values()))["test_loss"][i]
        if abs(walked - own) > END_LOSS_TOLERANCE * abs(own):
            differ[side] = {"own_bn": own, "re_estimated_bn": walked}
            print(f"the {side}'s test loss: {walked:.5f} with BatchNorm re-estimated, {own:.5f} with its own "
                  "statistics")
    return differ


def stitch_ends(args, loaded, session):
    """--stitch: the path's two ends (a curve's with BatchNorm re-estimated, a segment's endpoints with
    their own statistics) stitched at the bottleneck both ways, printed; the record for the report."""
    a, b = (m.to(session.device) for m in (loaded.ends if args.connect == "CURVE" else loaded.own_ends))
    if args.connect == "CURVE":  # points of a curve carry no BatchNorm statistics of their own
        for m in (a, b):
            update_bn(session.train_loader.ordered(), m, num_batches=args.bn_batches)
    settings = stitching_settings(args)
    points, skipped = stitch_points(a)
    score = scorer(session)
    ends = (score(a), score(b))
    batches = [x for _, x in zip(range(settings.fit_batches), session.train_loader.ordered())]
    record, _ = next(stitch_layers(a, b, select(points, skipped, "latent"), settings.map, batches, session.speed.amp,
                                   score, ends))
    batchnorm = ("the curve's ends with BatchNorm re-estimated once, each part keeping its end's statistics"
                 if args.connect == "CURVE" else BATCHNORM)
    print(f"stitched at the bottleneck (encoder A, {settings.map} map fitted on {len(batches)} training batches, "
          f"decoder B; A: the start, B: the end), {batchnorm}; the penalty is against the ends' test "
          f"{session.loss.loss_function} with these statistics, A {ends[0]['loss']:.5f}, B {ends[1]['loss']:.5f}:\n  "
          + "\n  ".join(describe(record, session.loss.loss_function)))
    return {"map": settings.map, "fit_batches": len(batches), "batchnorm": batchnorm,
            "ends": {"A": ends[0], "B": ends[1]}, **record}


def keep_other_alignments(report, args):
    """The aligned walk's report is named for its ends and points, not for how they were aligned: a
    finished one made with another method or latent map is not overwritten (one line, before any work)."""
    if not args.align or not os.path.exists(report):
        return
    try:
        with open(report) as f:
            recorded = json.load(f).get("alignment") or {}
    except (OSError, ValueError):
        return  # not a report this can read: the walk writes its own over it, as before
    then = (recorded.get("method"), (recorded.get("latent") or {}).get("map"))
    if then != (args.align_method, args.align_latent):
        raise UserError(f"{report} holds the walk aligned by {then[0]} matching"
                        + (f" with a {then[1]} latent map" if then[1] else "")
                        + ": walk this alignment into another --dir, or move that report away")


def main(args):
    """Walk the paths; returns {"paths": {PathKey: walk result}, "files": {role: path}} (under
    torchrun: on rank 0; the other ranks return None)."""
    if args.num_points < 2:
        raise UserError(f"--num_points must be at least 2 (both ends), got {args.num_points}")
    tracking.check_wandb(tracking_settings(args))
    check_align_flags(args)
    if args.connect == "LAYERWISE" and (args.ensemble or args.repair or args.stitch_map):
        raise UserError("--connect LAYERWISE takes no --ensemble, --repair or --stitch")
    ends = [flag for flag in ("--init_start", "--init_end") if getattr(args, flag[2:])]
    if args.connect == "CURVE" and ends:
        raise UserError(f"--ckpt walks a trained curve, which holds its own ends: drop {' and '.join(ends)} "
                        "(or walk the segment between two endpoints with --connect TRIVIAL and no --ckpt)")
    if args.connect != "CURVE" and args.ckpt:
        raise UserError(f"--connect {args.connect} walks the segment between --init_start and --init_end: drop --ckpt")
    session = open_session(args)
    device = session.device
    torch.manual_seed(args.seed)
    loaded = load_paths(args)
    session.prepare(dataset.data_settings(args, loaded.run.data), loss_settings(args, loaded.run.loss),
                    output_dir(args.dir, loaded.sources, "eval"))
    base = os.path.join(session.out_dir, reports.walk_name(loaded.sources, args.num_points, args.align,
                                                           layerwise=args.connect == "LAYERWISE"))
    keep_other_alignments(base + ".json", args)
    paths, alignment = add_derived_paths(args, loaded, session)
    samples = next(iter(session.test_loader))[:args.num_images]
    template = loaded.ends[0]
    repaired = [key for key in paths if key.repaired]
    evaluator = session.evaluator(template, samples=samples,
                                  repair_layers=layers_to_repair(template) if repaired else None,
                                  prior=prior_samples(template, samples, args.num_images, args.seed))
    repairs = {key: tuple(evaluator.statistics(paths[key].weights(t)) for t in (0.0, 1.0)) for key in repaired}
    ts = np.linspace(0.0, 1.0, args.num_points)
    loss_name = session.loss.loss_function
    print(f"walking {', '.join(key.label for key in paths)} at {args.num_points} points; loss {loss_name} on "
          f"images in [-1, 1]; BatchNorm re-estimated on {args.bn_batches or len(session.train_loader)} training "
          "batches per t")
    settings = dict(checkpoints=reports.checkpoint_records(loaded.sources, session.out_dir),
                    data=dataclasses.asdict(session.data), loss=dataclasses.asdict(session.loss),
                    speed=dataclasses.asdict(session.speed), evaluation=dataclasses.asdict(session.evaluation),
                    lpips=session.lpips.source if session.lpips is not None else None, num_images=args.num_images,
                    ensemble=args.ensemble,
                    alignment=alignment and {**{k: alignment[k] for k in ("method", "seed")},
                                             "latent": (alignment["latent"] or {}).get("map"),
                                             **learned_matching.identity(alignment)})
    started = time.time()
    results = {}
    for key, net in paths.items():  # each path's points are kept as they are computed: a rerun continues
        sweep = (f"{base}-{key.name}.partial.npz", {**settings, "path": key.to_dict()})
        results[key] = walk(net.to(device) if hasattr(net, "to") else net, ts, evaluator, key.label, sweep=sweep,
                            repair=repairs.get(key),
                            ensemble=EndEnsembles(session.loss_fns, evaluator.image_metrics) if args.ensemble else None)
    walk_seconds, processes, main = time.time() - started, distributed.world(), distributed.is_main()
    distributed.shutdown()
    if not main:
        return None

    curve = next((key for key in results if key.kind == "curve"), None)
    segment = PathKey("segment", aligned=loaded.aligned_curve)
    ratio = None
    if curve and segment in results and results[segment]["length"] > 0:
        ratio = results[curve]["length"] / results[segment]["length"]
    for key, res in results.items():
        print(summary(key.label, res, ratio if key == curve else None))
    ends_own_loss = compare_ends(loaded, results, session)
    stitched = stitch_ends(args, loaded, session) if args.stitch_map else None

    config = {"flags": vars(args), **settings}
    files = reports.write_walks(
        base, walks=results, samples=samples.cpu(), loss_name=loss_name, sources=loaded.sources, config=config,
        lpips_source=settings["lpips"], length_ratio=ratio, alignment=alignment,
        extra=dict(processes=processes, walk_seconds=walk_seconds, beta=session.loss.beta,
                   **({"ends_own_bn_test_loss": ends_own_loss} if ends_own_loss else {}),
                   **({"stitch": stitched} if stitched else {})), ensemble=args.ensemble)
    for key in results:  # the report holds everything now
        os.remove(f"{base}-{key.name}.partial.npz")
    trackers = tracking.open_trackers(tracking_settings(args), session.out_dir, settings, "eval_curve",
                                      name=os.path.basename(base))
    tracking.log_walks(trackers, results, files, ratio)
    tracking.close(trackers)
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"paths": results, "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
