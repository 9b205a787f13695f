"""One code path for 1..N processes. Under `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous) the processes form a group: NCCL on CUDA, gloo on the CPU; without it everything
here is the single process of rank 0 in a world of 1, and no call communicates.

Example::
    >>> device = distributed.setup(resolve_device(args.device))   # cuda -> cuda:LOCAL_RANK
    >>> if distributed.is_main(): print(...)                      # rank 0 alone prints and writes
    >>> mine = distributed.share(points)                          # round-robin: this rank's points
    >>> everything = distributed.gather(results)                  # rank 0: all ranks' results
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

from aemc.errors import UserError


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def launched():
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def refuse_several(prog):
    """For the scripts that run as one process: a clear error when torchrun started several."""
    if launched():
        raise UserError(f"{prog} runs as one process: start it with python, not torchrun "
                        "(train.py, eval_curve.py, plane.py and ensemble.py spread over processes)")


def setup(device):
    """Join the process group when launched by torchrun; returns this process's device (on CUDA,
    the GPU of its LOCAL_RANK unless the device names one)."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("RANK", "0")) > 0:  # rank 0 alone prints (warnings and errors: utils.warn)
        sys.stdout = open(os.devnull, "w")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=int(os.environ.get("AEMC_DIST_TIMEOUT_MIN", "30"))),
                            device_id=device if device.type == "cuda" else None)
    return device


def shutdown():
    """The end of a run under torchrun: every process waits for the others, then the group is
    destroyed. Without the barrier a process that finished first tore its gloo connections down
    while another was still writing its files, and the other was sometimes aborted (SIGABRT,
    "terminate called without an active exception"); called at the normal end of a run only."""
    if dist.is_initialized():
        if world() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier():
    if world() > 1:
        dist.barrier()


def share(items):
    """This rank's share of `items`, round-robin: items[rank], items[rank + world], ..."""
    return items[rank()::world()]


def gather(obj):
    """Rank 0: [every rank's obj, by rank]; other ranks: None. A plain return of [obj] alone."""
    if world() == 1:
        return [obj]
    out = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj):
    """Every rank: [every rank's obj, by rank]."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor):
    """The sum over ranks of a tensor on this rank's device (in place; returned)."""
    if world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag, device):
    """Whether `flag` is true on any rank."""
    if world() == 1:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
