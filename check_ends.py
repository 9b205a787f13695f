"""Sanity check of a curve's ends: the curve at t=0 and t=1 *is* the two endpoint models, and
those endpoints are genuinely different solutions.

    python check_ends.py --ckpt runs/curve/checkpoint-last.pt
    python check_ends.py --curve Bezier --num_bends 3 --init_start A.pt --init_end B.pt

On real test batches: each end of the curve, in eval mode with the corresponding endpoint's
BatchNorm buffers, must reproduce that endpoint's reconstructions (max |difference| < 1e-5 in
float32); the endpoints must differ in weights and in reconstructions. Writes one PNG grid per end
(originals | endpoint | curve end) into --dir and exits with status 1 when a check fails.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch

import dataset
from aemc import checkpoints, distributed, figures
from aemc.alignment import apply_record
from aemc.checkpoints import Checkpoint
from aemc.cli import ArgParser, description, positive, run_cli
from aemc.errors import UserError
from aemc.evaluation import evaluate, output_difference, weight_distance
from aemc.losses import build_loss, reconstruction
from models.curves import CurveNet, connect, curve_name
from utils import add_arch_arg, add_device_arg, allow_architecture, resolve_device

TOLERANCE = 1e-5          # float32 max |difference| between an end of the curve and its endpoint
MIN_RELATIVE_DISTANCE = 1e-4  # endpoints closer than this (relative weight distance) are "the same"


class CheckFailed(UserError):
    exit_code = 1


def get_args_parser():
    p = ArgParser("check_ends.py", description=description(__doc__))
    p.add_argument("--ckpt", default=None, help="curve checkpoint to check")
    p.add_argument("--curve", type=curve_name, default=None,
                   help="without --ckpt: Bezier or PolyChain, built fresh")
    p.add_argument("--num_bends", type=positive(int), default=3, help="without --ckpt (3)")
    p.add_argument("--init_start", default=None, help="endpoint at t = 0 (default: the curve's own)")
    p.add_argument("--init_end", default=None, help="endpoint at t = 1 (default: the curve's own)")
    p.add_argument("--dir", default=None, help="where the grids go (default: the checkpoint's folder)")
    add_device_arg(p)
    add_arch_arg(p)
    p.add_argument("--num_batches", type=positive(int), default=4, help="test batches compared (4)")
    dataset.add_data_args(p, inherit=True)
    return p


@torch.no_grad()
def curve_end(curve, t, endpoint):
    """The curve's point at t, in eval mode, with `endpoint`'s BatchNorm buffers."""
    point = curve.point_at(t)
    point.load_state_dict(dict(endpoint.named_buffers()), strict=False)
    return point.eval()


@torch.no_grad()
def save_grid(batch, endpoint, point, path):
    """Rows: originals | endpoint reconstructions | curve-end reconstructions."""
    x = batch[:8]
    figures.save_rows([x, reconstruction(endpoint(x)), reconstruction(point(x))], path)


@dataclass
class Checked:
    """What check_ends compares: the curve, its two endpoint models, the curve's checkpoint (None
    for a fresh curve) and the endpoints' checkpoint and paths."""
    curve: CurveNet
    start: torch.nn.Module
    end: torch.nn.Module
    checkpoint: Optional[Checkpoint]
    start_checkpoint: Checkpoint
    paths: list


def load_curve_and_ends(args, device):
    ck = None
    if args.ckpt:
        ck = checkpoints.load(args.ckpt, kind="curve", flag="--ckpt")
        cfg = ck.curve_config
        paths = [args.init_start or cfg["init_start"], args.init_end or cfg["init_end"]]
        if None in paths:
            raise UserError("the curve was trained without endpoint checkpoints; "
                            "give them with --init_start and --init_end")
        # the recorded files (those not replaced by a flag) must be the ones the curve was trained from
        recorded = [k for k, given in (("init_start", args.init_start), ("init_end", args.init_end)) if not given]
        checkpoints.verify_endpoints(cfg, strict=True, keys=recorded)
    else:
        if not (args.curve and args.init_start and args.init_end):
            raise UserError("give --ckpt CURVE, or --curve with --init_start and --init_end")
        paths = [args.init_start, args.init_end]
    (start, sck), (end, _) = checkpoints.load_endpoints(paths)
    if ck is not None and ck.curve_config.get("alignment") and not args.init_end:
        end = apply_record(end, ck.curve_config["alignment"])  # the curve ends at the aligned copy
        folded = "matrix" in (ck.curve_config["alignment"].get("latent") or {})
        paths[1] = f"{paths[1]} (its units permuted as the curve records: --align{' with its latent map' * folded})"
    if ck is None:  # the original's check: a fresh curve between the endpoints, as training builds it
        try:
            curve = connect(start, end, args.curve, args.num_bends)
        except ValueError as e:
            raise UserError(str(e))
    else:
        curve = checkpoints.build_model(ck)
        checkpoints.check_same_architecture([ck, sck], (args.ckpt, paths[0]))
    return Checked(curve.to(device), start.to(device), end.to(device), ck, sck, paths)


def main(args):
    distributed.refuse_several("check_ends.py")
    allow_architecture(args)
    device = resolve_device(args.device)
    checked = load_curve_and_ends(args, device)
    curve, start, end, ck, paths = checked.curve, checked.start, checked.end, checked.checkpoint, checked.paths
    run = (ck or checked.start_checkpoint).settings
    out_dir = args.dir or (os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt else ".")
    os.makedirs(out_dir, exist_ok=True)
    loss_name = run.loss.loss_function
    loss_fn = build_loss(loss_name, run.loss.num_filters).to(device)

    _, test_loader = dataset.build_loaders(dataset.data_settings(args, run.data), device)
    batches = [x for _, x in zip(range(args.num_batches), test_loader)]
    fixed = {0: ck.curve_config["fix_start"] if ck else True,
             1: ck.curve_config["fix_end"] if ck else True}
    failures = []
    print(f"curve: {curve.curve}, {curve.num_bends} bends; {sum(len(x) for x in batches)} test images")
    for t, endpoint, path in ((0, start, paths[0]), (1, end, paths[1])):
        point = curve_end(curve, t, endpoint)
        diff, _ = output_difference(point, endpoint, batches)
        ok = diff < TOLERANCE
        verdict = "ok" if ok else "FAIL" if fixed[t] else "moved, as expected: a free end is trained"
        print(f"t={t}: max |curve(t) - endpoint| = {diff:.3e}  [{verdict}; tolerance {TOLERANCE:g}]  "
              f"endpoint {path}")
        if fixed[t] and not ok:
            failures.append(f"the curve at t={t} differs from its endpoint by {diff:.3e}")
        grid = os.path.join(out_dir, f"check_ends-t{t}.png")
        save_grid(batches[0], endpoint.eval(), point, grid)

    distance, norm = weight_distance(start, end)
    _, recon = output_difference(start, end, batches)
    losses = [evaluate(m, test_loader, {"loss": loss_fn}, beta=run.loss.beta)["loss"] for m in (start, end)]
    print(f"endpoints: ||w_end - w_start|| = {distance:.4f} (||w_start|| = {norm:.4f}, "
          f"relative {distance / norm:.4f}); mean |recon_end - recon_start| = {recon:.5f}")
    print(f"endpoint test {loss_name} loss (images in [-1, 1]): start {losses[0]:.5f}, end {losses[1]:.5f}")
    if distance / norm < MIN_RELATIVE_DISTANCE or recon < TOLERANCE:
        failures.append("the two endpoints are the same solution (no weight or output difference)")
    print(f"grids: {os.path.join(out_dir, 'check_ends-t0.png')}, {os.path.join(out_dir, 'check_ends-t1.png')}")
    if failures:
        raise CheckFailed("check failed: " + "; ".join(failures))
    print("all checks passed")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
