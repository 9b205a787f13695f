"""Stitch two autoencoders: A's layers up to a hidden layer, a map fitted on training batches, B's
layers after it, scored on the test split like any model; the stitching penalty (the stitched test
loss minus the mean of A's and B's) at each layer asked for, both ways: A into B and B into A
(Bansal, Nakkiran & Barak, NeurIPS 2021, "Revisiting model stitching").

    python stitch.py --init_start A.pt --init_end B.pt --map affine --layers all
    python stitch.py --init_start A.pt --init_end B.pt --map orthogonal        # at the bottleneck only

The map acts on the channels of the value the next layer reads (after the layer's normalisation and
activation), at every position of a feature map. Each part keeps its endpoint's own BatchNorm
statistics (nothing is re-estimated). Layers inside a residual block, and a VAE's log-variance, are
no cut through the network: they are skipped, and named with the reason. Writes stitch-<map>.json,
.npz, .md (a table) and .png (penalty against depth) in --dir (default: <A's folder>/stitch).
"""
import dataclasses

import dataset
from aemc import checkpoints, distributed, reports
from aemc.cli import ArgParser, description, run_cli
from aemc.stitching import BATCHNORM, describe, scorer, select, stitch_layers, stitch_points
from utils import add_evaluation_args, add_stitch_args, loss_settings, open_session, output_dir, stitching_settings


def get_args_parser():
    p = ArgParser("stitch.py", description=description(__doc__))
    p.add_argument("--init_start", required=True, metavar="A", help="endpoint A (its bottom stitched into B's top)")
    p.add_argument("--init_end", required=True, metavar="B", help="endpoint B (its bottom stitched into A's top)")
    p.add_argument("--layers", default="latent",
                   help="where to stitch: latent (the bottleneck: the stitch point with the fewest features), all "
                        "(every hidden layer that is a cut through the network), or layer names, comma-separated, "
                        "as printed (latent)")
    p.add_argument("--dir", default=None, help="output folder (default: <A's folder>/stitch)")
    add_stitch_args(p)
    add_evaluation_args(p, "also mean LPIPS (AlexNet) of every model over the test split", points=False)
    dataset.add_data_args(p, inherit=True)
    return p


def main(args):
    """Stitch and score; returns {"report": the JSON report's dict, "files": {role: path}}."""
    distributed.refuse_several("stitch.py")
    session = open_session(args)
    settings = stitching_settings(args)
    (a, ack), (b, _) = checkpoints.load_endpoints([args.init_start, args.init_end])
    points, skipped = stitch_points(a)
    chosen = select(points, skipped, args.layers)  # a bad --layers fails here, before any work
    sources = {"init_start": args.init_start, "init_end": args.init_end}
    data = dataset.data_settings(args, ack.settings.data)
    dataset.report_inherited(args, data, "--init_start's run")
    session.prepare(data, loss_settings(args, ack.settings.loss), output_dir(args.dir, sources, "stitch"))
    a, b = a.to(session.device), b.to(session.device)
    for layer, reason in skipped.items():
        print(f"no stitch point at {layer}: {reason}")
    score, loss_name = scorer(session), session.loss.loss_function
    ends = {"A": score(a), "B": score(b)}
    batches = [x for _, x in zip(range(settings.fit_batches), session.train_loader.ordered())]
    print(f"test {loss_name} loss (images in [-1, 1]): A {ends['A']['loss']:.5f}, B {ends['B']['loss']:.5f}; "
          f"{settings.map} maps fitted on {len(batches)} training batches ({sum(len(x) for x in batches)} images); "
          f"{BATCHNORM}")
    layers, maps = [], []
    for record, fitted in stitch_layers(a, b, chosen, settings.map, batches, session.speed.amp, score,
                                           (ends["A"], ends["B"])):
        print("\n".join(describe(record, loss_name)))
        layers.append(record)
        maps.append(fitted)
    config = dict(flags=vars(args), stitching=dataclasses.asdict(settings), data=dataclasses.asdict(session.data),
                  loss=dataclasses.asdict(session.loss), speed=dataclasses.asdict(session.speed),
                  evaluation=dataclasses.asdict(session.evaluation))
    files = reports.write_stitch(
        reports.stitch_base(session.out_dir, settings.map), kind=settings.map, layers=layers, maps=maps, ends=ends,
        skipped=skipped, loss_name=loss_name, sources=sources, config=config,
        lpips_source=session.lpips.source if session.lpips is not None else None)
    print("outputs:\n  " + "\n  ".join(files.values()))
    return {"report": reports.read_stitch(files["json"]), "files": files}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
