"""The files an evaluation writes, named and read back by the functions here, so that whoever
reads a script's outputs (a study, a notebook) does it through the code that wrote them.

A walk (eval_curve.py) writes `<base>.json` (every per-t array, the statistics, the configuration,
the checkpoints' SHA-256), `<base>.npz` (the arrays, named `<path name>_<metric>`), plots, and for
each path a GIF and a strip of reconstructions. The JSON is written last: it lists the other files,
and its presence means they are complete. A stitching (stitch.py) writes `stitch-<map>.npz`, `.md`,
`.png` and, last, `.json`.
"""
import os
import re
from typing import NamedTuple

import numpy as np

from aemc import barriers, figures
from aemc.ensembles import GAIN
from aemc.evaluation import VAE_OBJECTIVE
from aemc.files import atomic_write, file_digest, output_stem, write_json
from aemc.paths import IMAGES, PathKey
from aemc.stitching import BATCHNORM, DIRECTIONS, PENALTY

UNITS = "losses on images in [-1, 1]"


def walk_name(sources, num_points, aligned=False, layerwise=False):
    """The name of a walk's outputs: from the curve checkpoint (`sources["ckpt"]`), or from the two
    endpoints of a segment (`sources["init_start"]`, `sources["init_end"]`)."""
    if "ckpt" in sources:
        name = f"{output_stem(sources['ckpt'])}-curve"
    else:
        kind = "layerwise" if layerwise else "segment"
        name = f"{output_stem(sources['init_start'])}--{output_stem(sources['init_end'])}-{kind}"
    return f"{name}-{num_points}pts" + ("-aligned" if aligned else "")


def walk_report(out_dir, sources, num_points, aligned=False, layerwise=False):
    """The path of a walk's JSON report (the record file: written last, it lists the others)."""
    return os.path.join(out_dir, walk_name(sources, num_points, aligned, layerwise) + ".json")


def checkpoint_records(sources, folder):
    """{role: {"path", "sha256"}} of the source checkpoints ({role: path}); paths relative to the
    report's `folder`, so that a run directory can be moved or shared with its reports."""
    return {k: {"path": os.path.relpath(os.path.abspath(p), os.path.abspath(folder)), "sha256": file_digest(p)}
            for k, p in sources.items()}


def write_walks(base, *, walks, samples, loss_name, sources, config, lpips_source=None, length_ratio=None,
                alignment=None, extra=None, ensemble=False):
    """Every output of a walk: NPZ, plots, GIFs and strips, then the JSON that lists them.

    walks: {PathKey: walk result}; samples: the test images of the GIFs (K, C, H, W); a walk with
    prior_decodes (a VAE's) gets them as a third row of its GIF and a strip of their own;
    config: the run's settings and flags, for the record. Returns {role: file path}."""
    files = {"npz": base + ".npz", "loss_plot": base + "_loss.png"}
    arrays = {f"{key.name}_{k}": np.asarray(v) for key, res in walks.items() for k, v in res.items()
              if isinstance(v, list) and k not in IMAGES}
    if length_ratio is not None:
        arrays["length_ratio"] = np.asarray(length_ratio)
    with atomic_write(files["npz"]) as f:
        np.savez(f, **arrays)
    title = f"{os.path.basename(base)} ({loss_name}, images in [-1, 1])"
    figures.plot_metric({k: w for k, w in walks.items() if k.kind != "layerwise"}, "loss", f"{loss_name} loss",
                        files["loss_plot"], title)
    if lpips_source is not None:
        files["lpips_plot"] = base + "_lpips.png"
        figures.plot_metric(walks, "lpips", "LPIPS (AlexNet)", files["lpips_plot"], title)
    if ensemble:
        files["ensemble_plot"] = base + "_ensemble.png"
        figures.plot_ensemble(walks, loss_name, files["ensemble_plot"], title)
    if any(key.kind == "layerwise" for key in walks):
        files["layerwise_plot"] = base + "_layerwise.png"
        figures.plot_layerwise(walks, loss_name, files["layerwise_plot"], title)
    for key, res in walks.items():
        if key.kind == "layerwise":  # one GIF of the whole segment says enough
            continue
        files[f"{key.name}_gif"], files[f"{key.name}_strip"] = f"{base}_{key.name}.gif", f"{base}_{key.name}_strip.png"
        prior = res.get("prior_decodes")
        frames = figures.reconstruction_frames(samples, res["recons"], res["ts"], key.label, prior)
        figures.save_gif(frames, files[f"{key.name}_gif"])
        figures.save_strip(samples, res["recons"], res["ts"], key.label, files[f"{key.name}_strip"])
        if prior is not None:
            files[f"{key.name}_prior_strip"] = f"{base}_{key.name}_prior_strip.png"
            figures.save_strip(None, prior, res["ts"], f"{key.label}: decoded prior samples",
                               files[f"{key.name}_prior_strip"])
    files["json"] = base + ".json"
    report = {"config": config, "loss": loss_name, "units": UNITS, "gain": GAIN,
              "checkpoints": checkpoint_records(sources, os.path.dirname(base)),
              "lpips_weights": lpips_source, "length_ratio": length_ratio, "alignment": alignment, **(extra or {}),
              "paths": {key.name: {"path": key.to_dict(), "label": key.label,
                                   **{k: v for k, v in res.items() if k not in IMAGES}}
                        for key, res in walks.items()},
              "files": {role: os.path.basename(path) for role, path in files.items()}}
    write_json(files["json"], report)  # last: its presence means everything it lists is there
    return files


class WalkReport(NamedTuple):
    paths: dict          # {PathKey: {"ts": [...], "test_loss": [...], "barriers": {...}, ...}}
    length_ratio: float
    loss: str
    report: dict         # the whole JSON


def read_walks(path):
    """A walk's JSON report, its paths keyed by PathKey (also reports of format 1, keyed by label)."""
    import json
    with open(path) as f:
        report = json.load(f)
    paths = {}
    for name, entry in report["paths"].items():
        key = PathKey(**entry["path"]) if "path" in entry else _key_from_label(name)
        if any("above_mean_of_ends" in b for b in entry.get("barriers", {}).values()):  # before the names
            entry["barriers"] = {m: barriers.from_format_1(b) for m, b in entry["barriers"].items()}
        if any(OLD_VAE_OBJECTIVE in k for k in entry):
            report.setdefault("beta", 1.0)
        if "gain" not in report:  # written when every gain was members' mean - ensemble, PSNR's too
            entry = {k: [-g for g in v] if k.endswith("_gain") and barriers.higher_is_better(k[:-len("_gain")])
                     else v for k, v in entry.items()}
        paths[key] = _renamed(entry)
    return WalkReport(paths, report.get("length_ratio"), report.get("loss"), report)


# A VAE's loss + beta * KL was reported as "elbo_loss" and computed with beta = 1 whatever the run's
# beta: read back under its present name, with the beta it was computed with (the report's "beta").
OLD_VAE_OBJECTIVE = "elbo_loss"


def _renamed(entry):
    """A walk entry with the metrics of older reports under their present names."""
    def name(k):
        return k.replace(OLD_VAE_OBJECTIVE, VAE_OBJECTIVE) if isinstance(k, str) else k
    return {name(k): ({name(m): v for m, v in value.items()} if isinstance(value, dict) else value)
            for k, value in entry.items()}


def _key_from_label(label):
    """The PathKey of a format-1 label: 'curve (Bezier, 3 bends)', 'segment', 'aligned segment',
    'segment (end aligned by --align)'."""
    match = re.match(r"curve \((\w+), (\d+) bends\)", label)
    if match:
        return PathKey("curve", match.group(1), int(match.group(2)))
    return PathKey("segment", aligned=label != "segment")


def plane_base(out_dir, name, grid_points):
    """The common prefix of a plane's outputs (`<base>.npz`, `<base>.json`, `<base>_plane.png`)."""
    return os.path.join(out_dir, f"{name}-{grid_points}x{grid_points}")


def write_plane(base, *, geometry, metrics, loss_name, sources, config, has_curve, labels, lpips_source=None,
                extra=None):
    """A plane's figures (one per metric), then the JSON that lists them beside the NPZ the sweep
    wrote (diverged points: NaN in the NPZ, null in the JSON). Returns {role: file path}."""
    def plain(a):  # JSON has no NaN: diverged points become null
        return np.where(np.isfinite(a), a, None).tolist() if isinstance(a, np.ndarray) else a
    files = {"npz": base + ".npz"}
    for key in metrics:
        path = f"{base}_plane.png" if key == "test_loss" else f"{base}_{key}_plane.png"
        what = f"{key.replace('_', ' ')}" + (f" ({loss_name}, images in [-1, 1])" if key.endswith("loss") else "")
        figures.plot_plane(geometry, metrics[key], what, path, has_curve, labels)
        files[f"{key}_plane"] = path
    files["json"] = base + ".json"
    report = {"config": config, "loss": loss_name, "units": f"{UNITS}; coordinates in weight-space distance "
              "(and as fractions of dx, dy)", "checkpoints": checkpoint_records(sources, os.path.dirname(base)),
              "lpips_weights": lpips_source,
              **{k: plain(v) for k, v in geometry.items()}, "metrics": {k: plain(v) for k, v in metrics.items()},
              **(extra or {}),
              "files": {role: os.path.basename(path) for role, path in files.items()}}
    write_json(files["json"], report)  # last: its presence means everything it lists is there
    return files


def write_ensembles(base, *, table, loss_name, sources, config, lpips_source=None, extra=None):
    """An ensemble table (aemc.ensembles.score_ensembles) as CSV and a figure, then the JSON that
    lists them. Returns {role: file path}."""
    files = {"csv": base + ".csv", "plot": base + ".png"}
    metrics = list(next(iter(table.values()))["ensemble"])
    with atomic_write(files["csv"], "w") as f:
        header = ",".join(f"{m}_{w}" for m in metrics for w in ("mean", "ensemble", "gain"))
        f.write(f"ensemble,members,{header}\n")
        for name, row in table.items():
            f.write(f"\"{name}\",{len(row['keys'])}," + ",".join(
                f"{row[p][m]:.6f}" for m in metrics for p in ("member_mean", "ensemble", "gain")) + "\n")
    figures.plot_ensembles(table, loss_name, files["plot"], os.path.basename(base))
    files["json"] = base + ".json"
    report = {"config": config, "loss": loss_name, "units": "test metrics on images in [-1, 1]", "gain": GAIN,
              "checkpoints": checkpoint_records(sources, os.path.dirname(base)),
              "lpips_weights": lpips_source, **(extra or {}), "ensembles": table,
              "files": {role: os.path.basename(path) for role, path in files.items()}}
    write_json(files["json"], report)  # last: its presence means everything it lists is there
    return files


def stitch_base(out_dir, kind):
    """The common prefix of a stitching's outputs (stitch.py): `<out_dir>/stitch-<map>`."""
    return os.path.join(out_dir, f"stitch-{kind}")


def write_stitch(base, *, kind, layers, maps, ends, skipped, loss_name, sources, config, lpips_source=None):
    """A stitching's outputs (aemc.stitching.stitch_layers' records `layers` and fitted `maps`, one
    {direction: (W, b)} per layer; the ends' test metrics {"A", "B"}; the points skipped
    {layer: reason}): NPZ, a Markdown table, the penalty-against-depth figure, then the JSON that
    lists them. Returns {role: file path}."""
    files = {"npz": base + ".npz", "table": base + ".md", "plot": base + ".png"}
    arrays = {"layers": np.asarray([r["layer"] for r in layers]), "depth": np.asarray([r["depth"] for r in layers])}
    for d in DIRECTIONS:
        arrays[f"penalty_{d}"] = np.asarray([r["directions"][d]["penalty"]["loss"] for r in layers])
        for i, fitted in enumerate(maps):
            arrays[f"weight_{d}_{i}"], arrays[f"bias_{d}_{i}"] = fitted[d]
    with atomic_write(files["npz"]) as f:
        np.savez(f, **arrays)
    with atomic_write(files["table"], "w") as f:
        f.write(stitch_table(kind, layers, ends, loss_name))
    title = f"{os.path.basename(base)}: {kind} map ({loss_name}, images in [-1, 1])"
    figures.plot_stitching(layers, f"test {loss_name} stitching penalty", files["plot"], title)
    files["json"] = base + ".json"
    report = {"config": config, "map": kind, "loss": loss_name, "units": UNITS, "penalty": PENALTY,
              "batchnorm": BATCHNORM, "checkpoints": checkpoint_records(sources, os.path.dirname(base)),
              "lpips_weights": lpips_source, "ends": ends, "layers": layers, "skipped": skipped,
              "files": {role: os.path.basename(path) for role, path in files.items()}}
    write_json(files["json"], report)  # last: its presence means everything it lists is there
    return files


def stitch_table(kind, layers, ends, loss_name):
    """The Markdown table of a stitching: per layer, each direction's test loss, penalty and the
    map's relative residual ||H_a W + b - H_b||^2 / ||H_b||^2 on the fitting batches."""
    lines = [f"Stitching with the {kind} map: test {loss_name} loss (images in [-1, 1]); A {ends['A']['loss']:.5f}, "
             f"B {ends['B']['loss']:.5f}; penalty = stitched - mean of A's and B's.", "",
             "| depth | layer | shape | " + " | ".join(f"{label}: loss | penalty | residual"
                                                     for label in DIRECTIONS.values()) + " |",
             "|---" * (3 + 3 * len(DIRECTIONS)) + "|"]
    for r in layers:
        cells = [f"{d['metrics']['loss']:.5f} | {d['penalty']['loss']:+.5f} | {d['unexplained']:.3f}"
                 for d in r["directions"].values()]
        lines.append(f"| {r['depth']} | {r['layer']} | {'x'.join(map(str, r['shape']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_stitch(path):
    """A stitching's JSON report (write_stitch) as a dict: "layers" (in order of depth, each with its
    "directions"), "ends", "skipped", "map", "config", ..."""
    import json
    with open(path) as f:
        return json.load(f)


def missing_outputs(record_path):
    """The files a record (a JSON report with "files") lists that are not there; all of them when
    the record itself is missing or unreadable."""
    import json
    try:
        with open(record_path) as f:
            listed = json.load(f).get("files", {})
    except (OSError, ValueError):
        return [record_path]
    folder = os.path.dirname(record_path)
    return [name for name in listed.values() if not os.path.exists(os.path.join(folder, name))]
