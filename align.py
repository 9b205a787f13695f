"""Permute the hidden units of one endpoint to match another, by weight or activation matching or
learned on the segment's loss, optionally after folding in a map of its latent code (is the barrier
only a symmetry?).

    python align.py --init_start A.pt --init_end B.pt --out B_aligned.pt
    python align.py --init_start A.pt --init_end B.pt --out B_aligned.pt --method activation
    python align.py --init_start A.pt --init_end B.pt --out B_aligned.pt --method ste --steps 200

Writes an ordinary autoencoder checkpoint that computes the same function as B (checked on test
images, to float round-off) with its units permuted (and, through the encoder's Tanh, its latent
units negated) to lie as close to A as the method can bring it, or (--method ste) to lower the
loss of the segment between A and it, learned by the straight-through estimator. The checkpoint
records the permutations, the signs, and A's and B's paths and SHA-256. With --latent
orthogonal|linear, a map of B's latent code onto A's is first fitted and folded into B's weights,
where the code is linear (aemc/latent.py); where it is not, one line says why. Use it wherever an
endpoint is:
`eval_curve.py --connect TRIVIAL --init_start A.pt --init_end B_aligned.pt`, `train.py --curve`.
"""
import os
import shlex
import sys

import dataset
from aemc import checkpoints, distributed, latent, learned_matching
from aemc.alignment import align_to
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.errors import UserError
from aemc.evaluation import output_difference
from aemc.files import check_output_file, file_digest, output_stem
from aemc.losses import build_loss
from aemc.objective import training_objective
from utils import add_align_args, add_arch_arg, add_device_arg, alignment_settings, allow_architecture, resolve_device

ROUND_OFF = 1e-4  # max |pi(B)(x) - B(x)| allowed: float32 round-off of a reordered sum, not a new function


def get_args_parser():
    p = ArgParser("align.py", description=description(__doc__))
    p.add_argument("--init_start", required=True, metavar="INIT_START", help="the endpoint to align to (A)")
    p.add_argument("--init_end", required=True, metavar="INIT_END", help="the endpoint whose units are permuted (B)")
    p.add_argument("--out", default=None, metavar="OUT",
                   help="where to write the aligned copy of B (default: beside B, <B>-aligned-to-<A's folder>_<A>.pt)")
    add_device_arg(p)
    add_arch_arg(p)
    p.add_argument("--check_batches", type=positive(int), default=4,
                   help="test batches on which pi(B) must compute what B computes (4)")
    add_align_args(p, prefix="")
    dataset.add_data_args(p, inherit=True)
    return p


def main(args):
    distributed.refuse_several("align.py")
    allow_architecture(args)
    device = resolve_device(args.device)
    (a, ack), (b, bck) = checkpoints.load_endpoints([args.init_start, args.init_end])
    out = args.out or default_out(args.init_start, args.init_end)
    check_output_file(out, "--out", force=True)  # --out must be writable: fail now, in one line, not after the work
    data = dataset.data_settings(args, bck.settings.data)
    dataset.report_inherited(args, data, "--init_end's run")
    train_loader, test_loader = dataset.build_loaders(data, device)
    a, b = a.to(device), b.to(device)
    aligned, record = align_to(a, b, alignment_settings(args), train_loader,
                               objective=training_objective(bck.settings, curve=False, device=device))
    batches = [x for _, x in zip(range(args.check_batches), test_loader)]
    if record["latent"]:  # first folded, then the permutations matched
        print(latent.describe(record["latent"]))
    for sweep, value in enumerate(record["objective"]):
        after = f"sweep {sweep}" if args.align_method == "weight" else f"after {args.align_method} matching"
        print(f"  {'before' if sweep == 0 else after}: <A, pi(B)> = {value:.6f}")
    if "ste" in record:
        print(learned_matching.summary(record["ste"]))
    if record["latent"]:
        if record["latent"].get("returned") and hasattr(b, "decode"):  # a VAE: what the fold changes
            loss = build_loss(bck.settings.loss.loss_function, bck.settings.loss.num_filters).to(device)
            record["latent"]["posterior"] = effect = latent.posterior_effect(b, aligned, batches, loss, seed=0)
            print(f"VAE: KL per pixel value {effect['kl_before']:.6g} -> {effect['kl_after']:.6g}, loss of a "
                  f"posterior sample (fixed noise) {effect['sampled_before']:.6g} -> {effect['sampled_after']:.6g}; "
                  "the reconstruction from the mean is unchanged")
    differs, _ = output_difference(aligned, b, batches)
    print(f"||A - B|| = {record['distance_before']:.4f} before, ||A - pi(B)|| = {record['distance_after']:.4f} "
          f"after {args.align_method} matching; max |pi(B)(x) - B(x)| = {differs:.2e} on "
          f"{sum(len(x) for x in batches)} test images")
    if not differs < ROUND_OFF:
        if (record["latent"] or {}).get("condition", 1) > 100:  # a fold's round-off grows with T's condition number
            raise UserError(f"the folded latent map (condition number {record['latent']['condition']:.3g}) changes the "
                            f"output by up to {differs:.2e}: nothing was written; use --latent orthogonal")
        raise UserError(f"the aligned model computes another function (max difference {differs:.2e}): "
                        "nothing was written; please report this")
    source = dict(aligned_to={"path": os.path.abspath(args.init_start), "sha256": file_digest(args.init_start)},
                  original={"path": os.path.abspath(args.init_end), "sha256": file_digest(args.init_end)},
                  alignment=record, command=shlex.join([sys.executable] + sys.argv))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        checkpoints.save(out, checkpoints.autoencoder(aligned.cpu(), bck.architecture, bck.settings, bck.epoch,
                                                      source))
    except OSError as e:
        raise UserError(f"cannot write --out {out}: {e.strerror or e}")
    print(f"aligned copy of {args.init_end} written to {out}")
    return out


def default_out(start, end):
    """<B's folder>/<B>-aligned-to-<A's folder>_<A>.pt: beside the checkpoint it is a copy of."""
    name = os.path.splitext(os.path.basename(end))[0]
    return os.path.join(os.path.dirname(os.path.abspath(end)), f"{name}-aligned-to-{output_stem(start)}.pt")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
