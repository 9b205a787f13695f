"""A study's results, read from each stage's own report (through aemc.reports, the code that wrote
it): one row per (loss, pair of inits), per width or per spawn epoch; results.csv, results.md and
the study's figure."""
import itertools
import os

from aemc import figures, reports
from aemc.files import atomic_write
from aemc.paths import PathKey

CAPTION = ("Test losses (each row's own loss) on images in [-1, 1]; peak = the highest point of the path; "
           "barrier_mean_ends = the peak minus the mean of the ends, barrier_line = the largest rise above the "
           "line between the ends (docs/results.md says which paper uses which); LPIPS: AlexNet, mean over the "
           "test images.")


def results(root, settings):
    """The study's rows, from its stages' reports."""
    return {"grid": _grid_rows, "width": _width_rows, "instability": _instability_rows}[settings.kind](root, settings)


def _path_barriers(walk, prefix):
    b = walk["barriers"]["test_loss"]
    return {f"{prefix}_barrier_mean_ends": b["barrier_mean_ends"], f"{prefix}_barrier_line": b["barrier_line"]}


def _width_rows(root, settings):
    rows = []
    for f in settings.widths:
        curve = os.path.join(root, f"f{f}", "curve", f"checkpoint-{settings.curve_epochs}.pt")
        report_path = reports.walk_report(os.path.join(root, f"f{f}", "eval"), {"ckpt": curve}, settings.num_points,
                                          aligned=True)
        paths = reports.read_walks(report_path).paths
        segment = paths[PathKey("segment")]
        row = {"width": f, "start_test_loss": segment["test_loss"][0], "end_test_loss": segment["test_loss"][-1]}
        for key, prefix in ((PathKey("segment"), "segment"), (PathKey("segment", aligned=True), "aligned_segment"),
                            (PathKey("segment", aligned=True, repaired=True), "aligned_repaired_segment")):
            row.update(_path_barriers(paths[key], prefix))
        row.update(_path_barriers(next(w for k, w in paths.items() if k.kind == "curve"), "curve"))
        row["walks"] = {key: {"ts": w["ts"], "test_loss": w["test_loss"]} for key, w in paths.items()}
        row["report"] = report_path
        rows.append(row)
    return rows


def _instability_rows(root, settings):
    rows = []
    for k in settings.spawn_epochs:
        report_path = os.path.join(root, f"spawn-{k}", "spawn.json")
        report = reports.read_walks(report_path)
        walk = report.paths[PathKey("segment")]
        b = walk["barriers"]["test_loss"]
        rows.append({"spawn_epoch": k, "start_test_loss": walk["test_loss"][0], "end_test_loss": walk["test_loss"][-1],
                     "segment_barrier_mean_ends": b["barrier_mean_ends"], "segment_barrier_line": b["barrier_line"],
                     "segment_barrier_midpoint": b["barrier_midpoint"], "distance": walk["length"],
                     "walks": {PathKey("segment"): {"ts": walk["ts"], "test_loss": walk["test_loss"]}},
                     "report": report_path})
    return rows


def _grid_rows(root, settings):
    rows = []
    for loss in settings.losses:
        for a, b in itertools.combinations(settings.inits, 2):
            curve = os.path.join(root, "curves", f"{loss}-{a}--{b}", f"checkpoint-{settings.curve_epochs}.pt")
            report_path = reports.walk_report(os.path.join(root, "eval", f"{loss}-{a}--{b}"), {"ckpt": curve},
                                              settings.num_points, settings.align)
            report = reports.read_walks(report_path)
            paths = report.paths
            curve_walk = next(walk for key, walk in paths.items() if key.kind == "curve")
            segment = paths[PathKey("segment")]
            row = {"loss": loss, "start": a, "end": b,
                   "start_test_loss": curve_walk["test_loss"][0], "end_test_loss": curve_walk["test_loss"][-1],
                   "segment_peak": max(segment["test_loss"]),
                   "segment_barrier_mean_ends": segment["barriers"]["test_loss"]["barrier_mean_ends"],
                   "segment_barrier_line": segment["barriers"]["test_loss"]["barrier_line"],
                   "curve_peak": max(curve_walk["test_loss"]),
                   "curve_barrier_mean_ends": curve_walk["barriers"]["test_loss"]["barrier_mean_ends"],
                   "curve_barrier_line": curve_walk["barriers"]["test_loss"]["barrier_line"],
                   "length_ratio": report.length_ratio}
            if "test_lpips" in segment:
                row.update(segment_lpips_peak=max(segment["test_lpips"]),
                           curve_lpips_peak=max(curve_walk["test_lpips"]))
            aligned = paths.get(PathKey("segment", aligned=True))
            if aligned is not None:
                row["aligned_segment_barrier_mean_ends"] = aligned["barriers"]["test_loss"]["barrier_mean_ends"]
                row["aligned_segment_barrier_line"] = aligned["barriers"]["test_loss"]["barrier_line"]
            row["walks"] = {key: {"ts": walk["ts"], "test_loss": walk["test_loss"]} for key, walk in paths.items()}
            row["report"] = report_path
            rows.append(row)
    return rows


COLUMNS = {"width": "width f", "spawn_epoch": "spawned at epoch", "loss": "loss", "start": "start init",
           "end": "end init", "start_test_loss": "start test",
           "end_test_loss": "end test", "segment_peak": "segment peak",
           "segment_barrier_mean_ends": "segment barrier_mean_ends", "segment_barrier_line": "segment barrier_line",
           "curve_peak": "curve peak", "curve_barrier_mean_ends": "curve barrier_mean_ends",
           "curve_barrier_line": "curve barrier_line", "segment_lpips_peak": "segment LPIPS peak",
           "curve_lpips_peak": "curve LPIPS peak", "length_ratio": "curve / segment length",
           "aligned_segment_barrier_mean_ends": "aligned segment barrier_mean_ends",
           "aligned_segment_barrier_line": "aligned segment barrier_line",
           "aligned_repaired_segment_barrier_mean_ends": "aligned + REPAIR segment barrier_mean_ends",
           "aligned_repaired_segment_barrier_line": "aligned + REPAIR segment barrier_line",
           "segment_barrier_midpoint": "segment barrier_midpoint", "distance": "distance between the copies"}


def write_tables(root, rows):
    """results.csv and results.md: the columns every row has, numbers to 4 decimals."""
    keys = [k for k in COLUMNS if all(k in row for row in rows)]

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    csv = [",".join(keys)] + [",".join(cell(row[k]) for k in keys) for row in rows]
    md = [CAPTION, "",
          "| " + " | ".join(COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    md += ["", "Each evaluation's files (JSON, NPZ, plots, GIFs of reconstructions along the paths):", ""]
    md += [f"* {_row_name(row)}: `{os.path.dirname(row['report'])}`" for row in rows]
    paths = {"csv": os.path.join(root, "results.csv"), "md": os.path.join(root, "results.md")}
    for kind, lines in (("csv", csv), ("md", md)):
        with atomic_write(paths[kind], "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def _row_name(row):
    if "width" in row:
        return f"width {row['width']}"
    if "spawn_epoch" in row:
        return f"spawned at epoch {row['spawn_epoch']}"
    return f"{row['loss']} {row['start']} / {row['end']}"


def write_figure(root, settings, rows):
    """The study's figure: the loss along every path of every row (grid), barrier_line against
    width (width), the barrier against the spawn epoch (instability). Returns its path."""
    name = {"grid": "loss_grid.png", "width": "barrier_width.png", "instability": "barrier_spawn_epoch.png"}
    path = os.path.join(root, name[settings.kind])
    {"grid": figures.plot_loss_grid, "width": figures.plot_width, "instability": figures.plot_instability}[
        settings.kind](rows, path)
    return path
