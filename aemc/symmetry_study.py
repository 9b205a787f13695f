"""The symmetry study (`study.py --preset symmetry`): is the segment's ridge only a symmetry?

For each of `pairs` pairs of endpoints (seeds 2p - 1 and 2p), the straight segment between them is
walked raw, after each way of undoing the permutation symmetry (weight matching, activation
matching, learned matching by the straight-through estimator, weight matching after folding a map
of the latent space into the end), each also with REPAIR, next to the trained curve; and per layer,
the stitching penalty of the two ends at that layer (both directions, stitch.py) and the barrier of
the path that interpolates that layer alone (eval_curve.py --connect LAYERWISE).

results.csv: one row per pair, every path's barrier_line of the test loss. layers.csv: one row per
(pair, layer). results.md: the mean and standard deviation over pairs, and the paired differences
with Student-t intervals (aemc.intervals): each method against the raw segment, learned and latent
matching against weight matching, REPAIR against none, the curve against every aligned segment with
REPAIR.
"""
import os

from aemc import intervals, reports
from aemc.paths import PathKey

# the ways of undoing the symmetry: (name: also the eval-<name> folder and the CSV's column prefix, label)
METHODS = (("weight", "weight matching"), ("activation", "activation matching"), ("ste", "STE matching"),
           ("latent", "latent map + weight matching"))
PATHS = (("segment", "segment"), ("segment_repaired", "segment + REPAIR"),
         *(path for m, label in METHODS for path in ((m, label), (f"{m}_repaired", f"{label} + REPAIR"))),
         ("curve", "trained curve"))
COMPARISONS = (*((m, "segment", "alignment") for m, _ in METHODS),
               ("ste", "weight", "learned against weight matching"),
               ("latent", "weight", "the latent map on top of weight matching"),
               *((f"{m}_repaired", m, "REPAIR") for m in ("segment", *(m for m, _ in METHODS))),
               *(("curve", f"{m}_repaired", "the curve against an aligned, REPAIRed segment") for m, _ in METHODS))
FAILS = 0.1  # stitching "fails" at a layer where its penalty exceeds this share of the ends' mean test loss


def folder(root, pair):
    return os.path.join(root, f"pair{pair}")


def plan(root, settings, endpoint, curve, stage, flags):
    """The stages of the study. `endpoint`, `curve`, `stage` build a training stage, a curve stage
    and a Stage (aemc.studies); `flags` are the evaluation stages' shared flags."""
    stages = []
    for pair in range(1, settings.pairs + 1):
        base, ends = folder(root, pair), []
        for seed in (2 * pair - 1, 2 * pair):
            stages.append(endpoint(f"endpoint pair {pair} seed {seed}", os.path.join(base, f"seed{seed}"), seed))
            ends.append(stages[-1].output)
        stages.append(curve(f"curve pair {pair}", os.path.join(base, "curve"), ends))
        curve_ckpt = stages[-1].output
        sources = {"init_start": ends[0], "init_end": ends[1]}
        segment = ["--connect", "TRIVIAL", "--init_start", ends[0], "--init_end", ends[1]]
        points = ["--num_points", str(settings.num_points)]
        for method, _ in METHODS:
            out = os.path.join(base, f"eval-{method}")
            how = {"weight": ["--repair"], "activation": ["--align_method", "activation"],
                   "ste": ["--align_method", "ste", "--align_steps", str(settings.ste_steps)],
                   "latent": ["--align_latent", settings.latent_map]}[method]
            stages.append(stage(f"segment {method} pair {pair}",
                                ["eval_curve.py", *segment, "--dir", out, *points, "--align", *how, *flags],
                                reports.walk_report(out, sources, settings.num_points, aligned=True), ends))
        out = os.path.join(base, "eval-curve")
        stages.append(stage(f"curve eval pair {pair}", ["eval_curve.py", "--ckpt", curve_ckpt, "--no_segment", "--dir",
                                                        out, *points, *flags],
                            reports.walk_report(out, {"ckpt": curve_ckpt}, settings.num_points), [curve_ckpt]))
        out = os.path.join(base, "layerwise")
        stages.append(stage(f"layerwise pair {pair}", ["eval_curve.py", *segment[:1], "LAYERWISE", *segment[2:],
                                                       "--dir", out, *points, *flags],
                            reports.walk_report(out, sources, settings.num_points, layerwise=True), ends))
        out = os.path.join(base, "stitch")
        stages.append(stage(f"stitch pair {pair}", ["stitch.py", "--init_start", ends[0], "--init_end", ends[1],
                                                    "--layers", "all", "--map", settings.stitch_map, "--dir", out,
                                                    *flags],
                            stitch_report(out, settings.stitch_map), ends))
    return stages


def stitch_report(out, stitch_map):
    return reports.stitch_base(out, stitch_map) + ".json"


def _barrier(walk):
    return walk["barriers"]["test_loss"]["barrier_line"]


def _midpoint_rise(walk):
    """A layer-wise path's test loss at t = 0.5 minus at t = 0 (A's): what interpolating that layer
    alone halfway costs. Not its barrier_line: the path's end is A with B's layer in place of its own,
    a hybrid whose own loss is high, and a loss that rises towards it never rises above the line
    between the path's ends."""
    ts, losses = walk["ts"], walk["test_loss"]
    middle = min(range(len(ts)), key=lambda i: abs(ts[i] - 0.5))
    return losses[middle] - losses[0]


def rows(root, settings):
    """The study's rows, one per pair, from its stages' reports; each holds its layers' rows under
    "layers"."""
    results = []
    for pair in range(1, settings.pairs + 1):
        base = folder(root, pair)
        ends = [os.path.join(base, f"seed{seed}", f"checkpoint-{settings.epochs}.pt")
                for seed in (2 * pair - 1, 2 * pair)]
        sources = {"init_start": ends[0], "init_end": ends[1]}
        row, walks = {"pair": pair}, {}
        for method, _ in METHODS:
            report = reports.read_walks(reports.walk_report(os.path.join(base, f"eval-{method}"), sources,
                                                            settings.num_points, aligned=True))
            paths = report.paths
            if method == "weight":
                segment = paths[PathKey("segment")]
                row.update(start_test_loss=segment["test_loss"][0], end_test_loss=segment["test_loss"][-1],
                           segment_barrier_line=_barrier(segment),
                           segment_repaired_barrier_line=_barrier(paths[PathKey("segment", repaired=True)]))
                walks["segment"] = segment
            row[f"{method}_barrier_line"] = _barrier(paths[PathKey("segment", aligned=True)])
            row[f"{method}_repaired_barrier_line"] = _barrier(paths[PathKey("segment", aligned=True, repaired=True)])
            walks[method] = paths[PathKey("segment", aligned=True)]
            if method == "latent":
                latent = (report.report.get("alignment") or {}).get("latent") or {}
                row["latent_folded"] = float(bool(latent.get("matrix")))
        curve = os.path.join(base, "curve", f"checkpoint-{settings.curve_epochs}.pt")
        paths = reports.read_walks(reports.walk_report(os.path.join(base, "eval-curve"), {"ckpt": curve},
                                                       settings.num_points)).paths
        walks["curve"] = next(w for k, w in paths.items() if k.kind == "curve")
        row["curve_barrier_line"] = _barrier(walks["curve"])
        row["walks"], row["report"] = walks, os.path.join(base, "eval-weight")
        results.append(row)
        layerwise = reports.read_walks(reports.walk_report(os.path.join(base, "layerwise"), sources,
                                                           settings.num_points, layerwise=True)).paths
        by_group = {k.group: _midpoint_rise(w) for k, w in layerwise.items() if k.kind == "layerwise"}
        stitched = reports.read_stitch(stitch_report(os.path.join(base, "stitch"), settings.stitch_map))
        ends_loss = (row["start_test_loss"] + row["end_test_loss"]) / 2
        row["layers"] = []
        for layer in stitched["layers"]:
            penalty = {d: layer["directions"][d]["penalty"]["loss"] for d in ("a_into_b", "b_into_a")}
            row["layers"].append({"pair": pair, "depth": layer["depth"], "layer": layer["layer"],
                                  "stitch_a_into_b": penalty["a_into_b"], "stitch_b_into_a": penalty["b_into_a"],
                                  "layerwise_midpoint_rise": by_group.get(layer["layer"], float("nan")),
                                  "ends_test_loss": ends_loss})
    return results


RESULT_COLUMNS = ("pair", "start_test_loss", "end_test_loss", *(f"{p}_barrier_line" for p, _ in PATHS),
                  "latent_folded")
LAYER_COLUMNS = ("pair", "depth", "layer", "stitch_a_into_b", "stitch_b_into_a", "layerwise_midpoint_rise",
                 "ends_test_loss")


def layers_path(results_csv):
    """The layers.csv beside a results.csv (media/<name>_results.csv: media/<name>_layers.csv)."""
    return results_csv[:-len("results.csv")] + "layers.csv"


def _label(name):
    return dict(PATHS)[name]


def summary_tables(results, layers, confidence):
    """results.md's lines: every path's barrier_line over the pairs, the paired differences with
    their intervals and words, then per layer the stitching penalties and the layer-wise barrier,
    and per pair where stitching first fails and where each is largest."""
    n = len(results)
    lines = [f"Barrier_line of the test loss, mean ± standard deviation over {n} pairs (every pair's value: "
             "results.csv).", "", "| path | pairs | barrier_line |", "|---|---|---|"]
    for name, label in PATHS:
        values = [row[f"{name}_barrier_line"] for row in results]
        lines.append(f"| {label} | {len(values)} | {intervals.summary(values).cell(4)} |")
    folded = sum(int(row["latent_folded"]) for row in results)
    if folded < n:  # where the code passes through a nonlinearity, no map is folded: weight matching alone
        lines += ["", f"The latent map was folded in {folded} of {n} pairs; in the others the code passes through a "
                  "nonlinearity (the conv autoencoder's Tanh), so that segment is weight matching's own, signed."]
    lines += ["", f"Paired differences over the pairs: mean [{confidence:.0%} Student-t interval]; a negative "
              "difference is a lower barrier.", "", "| difference | mean [interval] | pairs | what the pairs show |",
              "|---|---|---|---|"]
    for a, b, what in COMPARISONS:
        interval = intervals.paired_difference([row[f"{a}_barrier_line"] for row in results],
                                               [row[f"{b}_barrier_line"] for row in results], confidence)
        lines.append(f"| {_label(a)} - {_label(b)} ({what}) | {interval.cell(4)} | {interval.n} | "
                     f"{intervals.verdict(interval, 'lower', 'higher')} |")
    by_layer = {}
    for row in layers:
        by_layer.setdefault((row["depth"], row["layer"]), []).append(row)
    lines += ["", "Per layer, mean ± standard deviation over the pairs: the stitching penalty (the stitched model's "
              "test loss minus the mean of the ends') in both directions, and the layer-wise midpoint rise: the test "
              "loss of A with that layer alone interpolated halfway to B's, minus A's.", "",
              "| depth | layer | pairs | stitching penalty, A into B | B into A | layer-wise midpoint rise |",
              "|---|---|---|---|---|---|"]
    for (depth, layer), group in sorted(by_layer.items()):
        cells = [intervals.summary([r[c] for r in group]).cell(4)
                 for c in ("stitch_a_into_b", "stitch_b_into_a", "layerwise_midpoint_rise")]
        lines.append(f"| {int(depth)} | {layer} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", f"Per pair: the first layer where stitching fails (its penalty, the mean of both directions, above "
              f"{FAILS:.0%} of the ends' mean test loss), the layer of the largest stitching penalty and that of the "
              "largest layer-wise midpoint rise.", "",
              "| pair | stitching first fails at | largest stitching penalty at | largest layer-wise rise at |",
              "|---|---|---|---|"]
    for pair in sorted({r["pair"] for r in layers}):
        own = sorted((r for r in layers if r["pair"] == pair), key=lambda r: r["depth"])
        penalty = {r["layer"]: (r["stitch_a_into_b"] + r["stitch_b_into_a"]) / 2 for r in own}
        failing = [r["layer"] for r in own if penalty[r["layer"]] > FAILS * r["ends_test_loss"]]
        widest = _largest(own, lambda r: penalty[r["layer"]])
        highest = _largest([r for r in own if r["layerwise_midpoint_rise"] == r["layerwise_midpoint_rise"]],
                           lambda r: r["layerwise_midpoint_rise"])
        lines.append(f"| {pair} | {failing[0] if failing else 'none'} | {widest} | {highest} |")
    return lines


def _largest(rows, value):
    """The layer of the row with the largest value; "-" when there is none or no single largest."""
    values = sorted((value(r) for r in rows), reverse=True)
    if not values or (len(values) > 1 and values[0] == values[1]):
        return "-"
    return max(rows, key=value)["layer"]


def plot(results, layers, path):
    """Two panels: every path's barrier_line (mean ± sd, every pair as a dot); and against depth the
    stitching penalty in both directions and the layer-wise midpoint rise (mean ± sd over pairs)."""
    import numpy as np
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2), dpi=120)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    names = [name for name, _ in PATHS]
    for i, name in enumerate(names):
        values = np.array([row[f"{name}_barrier_line"] for row in results])
        left.plot(np.full(len(values), i), values, ".", color="grey", alpha=0.6)
        left.errorbar([i], [values.mean()], yerr=[values.std(ddof=1) if len(values) > 1 else 0], fmt="o",
                      color="tab:blue" if name == "curve" else "tab:red", capsize=3)
    left.set_xticks(range(len(names)), [_label(n) for n in names], rotation=60, ha="right", fontsize=7)
    left.set_ylabel("test loss barrier_line")
    left.axhline(0, color="black", linewidth=0.6)
    left.grid(alpha=0.3)
    left.set_title(f"segments and the curve ({len(results)} pairs; images in [-1, 1])", fontsize=9)
    order = sorted({(r["depth"], r["layer"]) for r in layers})
    for column, label, colour in (("stitch_a_into_b", "stitching penalty, A into B", "tab:orange"),
                                  ("stitch_b_into_a", "stitching penalty, B into A", "tab:green"),
                                  ("layerwise_midpoint_rise", "layer-wise midpoint rise", "tab:purple")):
        values = [[r[column] for r in layers if (r["depth"], r["layer"]) == key] for key in order]
        means = [float(np.nanmean(v)) for v in values]
        spread = [float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
        right.errorbar(range(len(order)), means, yerr=spread, fmt="-o", color=colour, capsize=3, markersize=3,
                       label=label)
    right.set_xticks(range(len(order)), [layer for _, layer in order], rotation=60, ha="right", fontsize=7)
    right.set_ylabel("test loss difference")
    right.axhline(0, color="black", linewidth=0.6)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    right.set_title("per layer, by depth (mean ± sd over pairs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
