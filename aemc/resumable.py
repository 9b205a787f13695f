"""Long evaluations of many points (the grid points of a plane, ...) that never lose work.

Every result is written to the sweep's NPZ file, atomically, as soon as it is computed, together
with a mask of the points done and the configuration that produced them. Rerunning the same command
continues with the points not yet done and ends with the same arrays as an uninterrupted run; a
Ctrl-C or a kill leaves the file valid; a file made with other settings is never mixed in.
"""
import json
import os

import numpy as np
from tqdm import tqdm

from aemc import distributed
from aemc.errors import Interrupted, UserError
from aemc.files import atomic_write

CONFIG = "sweep_config"
DONE = "done"


def load(path, config, shape):
    """The arrays of an earlier run of this sweep at `path` ({} if there is none): an error when
    that run had other settings."""
    if not os.path.exists(path):
        return {}
    try:
        with np.load(path) as saved:
            arrays = {k: saved[k] for k in saved.files}
        saved_config = json.loads(str(arrays[CONFIG]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} exists but is not a readable result of this tool ({type(e).__name__}); "
                        "move it away or choose another --dir")
    if saved_config != config or arrays[DONE].shape != shape:
        diffs = sorted(k for k in set(config) | set(saved_config) if config.get(k) != saved_config.get(k))
        details = "; ".join(f"{k}: {saved_config.get(k)} there, {config.get(k)} now" for k in diffs[:4])
        raise UserError(f"{path} holds results computed with other settings ({details or 'grid shape'}); "
                        "rerun with the same settings to continue it, or choose another --dir")
    return arrays


def save(path, config, done, metrics, extra):
    with atomic_write(path) as f:
        np.savez(f, **{CONFIG: np.asarray(json.dumps(config, sort_keys=True)), DONE: done},
                 **metrics, **extra)


def run(path, config, points, evaluate, shape=None, extra=None, desc="points", verbose=True):
    """Evaluate `evaluate(point) -> {metric: value}` at every point of `points`, resuming from `path`.

    `config`: a JSON-able dict of every setting that changes the results (checked on resume);
    `shape`: how the points are laid out (default: a flat list), the leading shape of every metric
    array (a value may itself be an array: a point's reconstructions); `extra`: fixed arrays written
    alongside (coordinates, ...). Non-finite values are kept as NaN. `path` None: nothing is written
    or resumed. Under torchrun the points are shared round-robin, one per process per round; every
    process ends with all the results, and rank 0 alone writes the file.
    Returns ({metric: array of `shape` (+ the value's shape)}, done mask of `shape`).
    """
    shape = tuple(shape or (len(points),))
    config = json.loads(json.dumps(config, sort_keys=True))  # the form it takes in the file
    saved = load(path, config, shape) if path is not None else {}
    done = saved.get(DONE, np.zeros(shape, dtype=bool)).copy()
    metrics = {k: v.copy() for k, v in saved.items() if k not in (CONFIG, DONE) and k not in (extra or {})}
    todo = [i for i in range(len(points)) if not done.flat[i]]
    main, world = distributed.is_main(), distributed.world()
    if verbose and len(todo) < len(points):
        print(f"continuing {path}: {len(points) - len(todo)} of {len(points)} points already done")
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=desc, disable=not (verbose and main))
    try:
        for start in range(0, len(todo), world):  # a round: one point per process (torchrun), round-robin
            batch = todo[start:start + world]
            mine = batch[distributed.rank()] if distributed.rank() < len(batch) else None
            result = (mine, evaluate(points[mine]) if mine is not None else None)
            for i, values in distributed.all_gather(result):
                if i is None:
                    continue
                index = np.unravel_index(i, shape)
                for name, value in values.items():
                    value = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
                    metrics.setdefault(name, np.full(shape + value.shape, np.nan, dtype=value.dtype if value.ndim
                                                     else np.float64))[index] = value
                done[index] = True
            if main and path is not None:
                save(path, config, done, metrics, extra or {})
            bar.update(len(batch))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {int(done.sum())} of {len(points)} points; {path} keeps "
                          "them: rerun the same command to continue")
    finally:
        bar.close()
    return metrics, done
