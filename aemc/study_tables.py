"""A study's results, read from each stage's own report (through aemc.reports, the code that wrote
it): one row per (loss, pair of inits), per (width, pair) or per (spawn epoch, parent run);
results.csv (every row), results.md (for width and instability: the mean and standard deviation
over the pairs, and the paired differences with t intervals, aemc.intervals) and the study's
figure."""
import itertools
import os

from aemc import figures, intervals, reports, studies
from aemc.files import atomic_write
from aemc.paths import PathKey

CAPTION = ("Test losses (each row's own loss) on images in [-1, 1]; peak = the highest point of the path; "
           "barrier_mean_ends = the peak minus the mean of the ends, barrier_line = the largest rise above the "
           "line between the ends (docs/results.md says which paper uses which); LPIPS: AlexNet, mean over the "
           "test images.")


def results(root, settings):
    """The study's rows, from its stages' reports."""
    if settings.kind == "symmetry":
        from aemc import symmetry_study
        return symmetry_study.rows(root, settings)
    return {"grid": _grid_rows, "width": _width_rows, "instability": _instability_rows}[settings.kind](root, settings)


def _path_barriers(walk, prefix):
    b = walk["barriers"]["test_loss"]
    return {f"{prefix}_barrier_mean_ends": b["barrier_mean_ends"], f"{prefix}_barrier_line": b["barrier_line"]}


def _width_rows(root, settings):
    rows = []
    for f, pair in itertools.product(settings.widths, range(1, settings.pairs + 1)):
        folder = studies.width_folder(root, f, pair)
        curve = os.path.join(folder, "curve", f"checkpoint-{settings.curve_epochs}.pt")
        report_path = reports.walk_report(os.path.join(folder, "eval"), {"ckpt": curve}, settings.num_points,
                                          aligned=True)
        paths = reports.read_walks(report_path).paths
        segment = paths[PathKey("segment")]
        row = {"width": f, "pair": pair, "start_test_loss": segment["test_loss"][0],
               "end_test_loss": segment["test_loss"][-1]}
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
    for pair, k in itertools.product(range(1, settings.pairs + 1), settings.spawn_epochs):
        report_path = os.path.join(studies.instability_folder(root, pair), f"spawn-{k}", "spawn.json")
        report = reports.read_walks(report_path)
        walk = report.paths[PathKey("segment")]
        b = walk["barriers"]["test_loss"]
        rows.append({"spawn_epoch": k, "pair": pair, "start_test_loss": walk["test_loss"][0],
                     "end_test_loss": walk["test_loss"][-1],
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


COLUMNS = {"width": "width f", "spawn_epoch": "spawned at epoch", "pair": "pair", "loss": "loss", "start": "start init",
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


def write_tables(root, settings, rows):
    """results.csv (every row, numbers to 7 significant digits: what the intervals are computed from)
    and results.md (numbers to 4 decimals): for a grid the same rows; for width and instability the
    summary over pairs and the paired differences (`summary_tables`)."""
    if settings.kind == "symmetry":
        return _write_symmetry_tables(root, settings, rows)
    keys = [k for k in COLUMNS if all(k in row for row in rows)]

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    csv = csv_lines(rows, keys)
    md = [CAPTION, ""]
    if settings.kind == "grid":
        md += ["| " + " | ".join(COLUMNS[k] for k in keys) + " |", "|" + "---|" * len(keys)]
        md += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    else:
        md += summary_tables(settings, rows)
    md += ["", "Each evaluation's files (JSON, NPZ, plots, GIFs of reconstructions along the paths):", ""]
    md += [f"* {_row_name(row)}: `{os.path.dirname(row['report'])}`" for row in rows]
    paths = {"csv": os.path.join(root, "results.csv"), "md": os.path.join(root, "results.md")}
    for kind, lines in (("csv", csv), ("md", md)):
        with atomic_write(paths[kind], "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def csv_lines(rows, columns):
    """A CSV's lines: the header, then each row's `columns`, floats to 7 significant digits."""
    def cell(value):
        return f"{value:.7g}" if isinstance(value, float) else str(value)
    return [",".join(columns)] + [",".join(cell(row[c]) for c in columns) for row in rows]


def _write_symmetry_tables(root, settings, rows):
    from aemc import symmetry_study as sym
    layers = [layer for row in rows for layer in row["layers"]]
    md = [CAPTION, "", *sym.summary_tables(rows, layers, settings.confidence), "",
          "Each pair's files (JSON, NPZ, plots, GIFs of reconstructions along the paths):", ""]
    md += [f"* pair {row['pair']}: `{os.path.dirname(row['report'])}`" for row in rows]
    paths = {"csv": os.path.join(root, "results.csv"), "layers_csv": os.path.join(root, "layers.csv"),
             "md": os.path.join(root, "results.md")}
    for kind, lines in (("csv", csv_lines(rows, sym.RESULT_COLUMNS)),
                        ("layers_csv", csv_lines(layers, sym.LAYER_COLUMNS)), ("md", md)):
        with atomic_write(paths[kind], "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def read_rows(path):
    """The rows of a study's results.csv (what `write_tables` wrote): the width, spawn epoch and
    pair as ints, the rest as floats, the grid's names as they are."""
    import csv
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def value(key, text):
        if key in ("width", "spawn_epoch", "pair", "depth"):
            return int(text)
        try:
            return float(text)
        except ValueError:
            return text
    return [{k: value(k, v) for k, v in row.items()} for row in rows]


def _row_name(row):
    if "width" in row:
        return f"width {row['width']}, pair {row['pair']}"
    if "spawn_epoch" in row:
        return f"parent {row['pair']}, spawned at epoch {row['spawn_epoch']}"
    return f"{row['loss']} {row['start']} / {row['end']}"


def write_figure(root, settings, rows):
    """The study's figure: the loss along every path of every row (grid), barrier_line against
    width (width), the barrier against the spawn epoch (instability). Returns its path."""
    name = {"grid": "loss_grid.png", "width": "barrier_width.png", "instability": "barrier_spawn_epoch.png",
            "symmetry": "symmetry.png"}
    path = os.path.join(root, name[settings.kind])
    if settings.kind == "symmetry":
        from aemc import symmetry_study
        symmetry_study.plot(rows, [layer for row in rows for layer in row["layers"]], path)
        return path
    {"grid": figures.plot_loss_grid, "width": figures.plot_width, "instability": figures.plot_instability}[
        settings.kind](rows, path)
    return path


# width: (path, the path it is compared with, what the difference measures), on barrier_line
WIDTH_COMPARISONS = (("aligned_segment", "segment", "alignment"),
                     ("aligned_repaired_segment", "aligned_segment", "REPAIR after alignment"),
                     ("curve", "segment", "the trained curve"))
WIDTH_SUMMARY = ("start_test_loss", "end_test_loss", "segment_barrier_line", "aligned_segment_barrier_line",
                 "aligned_repaired_segment_barrier_line", "curve_barrier_line")
INSTABILITY_SUMMARY = ("start_test_loss", "end_test_loss", "segment_barrier_mean_ends", "segment_barrier_line",
                       "segment_barrier_midpoint", "distance")


def _groups(rows, key):
    """{value of key: {pair: row}}, in the rows' order."""
    out = {}
    for row in rows:
        out.setdefault(row[key], {})[row["pair"]] = row
    return out


def paired_differences(settings, rows):
    """[(group label, what, Interval)]: for width, each path against the one it improves on
    (WIDTH_COMPARISONS, barrier_line) at every width; for instability, the barrier_mean_ends of the
    copies spawned at each K minus at the K before it, paired by parent run."""
    out = []
    if settings.kind == "width":
        for width, pairs in _groups(rows, "width").items():
            for a, b, what in WIDTH_COMPARISONS:
                ids = sorted(pairs)
                interval = intervals.paired_difference([pairs[i][f"{a}_barrier_line"] for i in ids],
                                                       [pairs[i][f"{b}_barrier_line"] for i in ids],
                                                       settings.confidence)
                out.append((f"f = {width}", f"{COLUMNS[a + '_barrier_line'].replace(' barrier_line', '')} - "
                            f"{COLUMNS[b + '_barrier_line'].replace(' barrier_line', '')} ({what})", interval))
    else:
        groups = _groups(rows, "spawn_epoch")
        ks = list(groups)
        for before, after in zip(ks, ks[1:]):
            ids = sorted(set(groups[before]) & set(groups[after]))
            interval = intervals.paired_difference([groups[after][i]["segment_barrier_mean_ends"] for i in ids],
                                                   [groups[before][i]["segment_barrier_mean_ends"] for i in ids],
                                                   settings.confidence)
            out.append((f"K = {after} vs {before}", f"barrier_mean_ends at K = {after} - at K = {before}", interval))
    return out


def summary_tables(settings, rows):
    """results.md's lines for a width or instability study: the mean +- standard deviation of every
    row's numbers over its pairs, then the paired differences with their intervals and the words
    they allow (aemc.intervals.verdict)."""
    key, columns = (("width", WIDTH_SUMMARY) if settings.kind == "width" else ("spawn_epoch", INSTABILITY_SUMMARY))
    groups = _groups(rows, key)
    lines = ["Mean ± standard deviation over the pairs (every pair's value: results.csv).", "",
             "| " + " | ".join([COLUMNS[key], "pairs", *(COLUMNS[c] for c in columns)]) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for value, pairs in groups.items():
        cells = [intervals.summary([row[c] for row in pairs.values()]).cell(3 if c == "distance" else 4)
                 for c in columns]
        lines.append("| " + " | ".join([str(value), str(len(pairs)), *cells]) + " |")
    confidence = f"{settings.confidence:.0%}"
    lines += ["", f"Paired differences over the pairs: mean [{confidence} Student-t interval]; a negative "
              "difference is a lower barrier.", "",
              "| | difference | mean [interval] | pairs | what the pairs show |", "|---|---|---|---|---|"]
    for group, what, interval in paired_differences(settings, rows):
        words = intervals.verdict(interval, "lower", "higher")
        lines.append(f"| {group} | {what} | {interval.cell(4)} | {interval.n} | {words} |")
    return lines
