"""Results over seed pairs (aemc.intervals, aemc.study_tables): the interval arithmetic against a hand
computation, and a width and an instability study's tables against stand-in stages whose reports
hold known barriers."""
import csv
import dataclasses
import json
import math
import os

import pytest

from aemc import intervals, studies, study_tables
from aemc.paths import PathKey
from aemc.reports import walk_report

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t, 97.5% quantile, by degrees of freedom


def test_a_paired_difference_is_the_t_interval_of_the_differences_by_hand():
    # d = (0.03, 0.00, -0.04): mean -0.01 / 3; sum of squared deviations 0.0024667; sd = sqrt(0.0024667 / 2)
    d = intervals.paired_difference([0.20, 0.18, 0.15], [0.17, 0.18, 0.19], 0.95)
    mean = -0.01 / 3
    sd = math.sqrt(((0.03 - mean) ** 2 + (0.0 - mean) ** 2 + (-0.04 - mean) ** 2) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    assert (d.n, d.confidence) == (3, 0.95)
    assert d.mean == pytest.approx(mean, abs=1e-12)
    assert (d.low, d.high) == (pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))
    assert half == pytest.approx(0.087241, abs=1e-6)  # 4.3027 * 0.0351188 / 1.7321
    assert not d.excludes_zero and intervals.verdict(d, "lower", "higher") == "3 pairs cannot tell them apart"
    # four pairs, all lower: d = (-0.02, -0.03, -0.025, -0.035), mean -0.0275, sd 0.0064550
    d = intervals.paired_difference([0.10, 0.10, 0.10, 0.10], [0.12, 0.13, 0.125, 0.135], 0.95)
    half = T_975[3] * 0.006454972243679 / 2
    assert (d.low, d.high) == (pytest.approx(-0.0275 - half, abs=1e-9), pytest.approx(-0.0275 + half, abs=1e-9))
    assert d.excludes_zero and intervals.verdict(d, "lower", "higher") == "lower"
    assert d.cell().endswith(" [-0.038, -0.017]")  # -0.0275 -+ 3.1824 * 0.0064550 / 2
    # one pair: a difference, no interval, no words about it
    d = intervals.paired_difference([0.2], [0.1], 0.95)
    assert d.mean == pytest.approx(0.1) and math.isnan(d.low) and not d.excludes_zero
    assert intervals.verdict(d, "lower", "higher").startswith("one pair")


def test_a_summary_is_the_mean_and_the_sample_standard_deviation():
    s = intervals.summary([1.0, 2.0, 4.0])
    assert (s.mean, s.n) == (pytest.approx(7 / 3), 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert s.cell(2) == "2.33 ± 1.53"
    with pytest.raises(ValueError):
        intervals.paired_difference([1.0, 2.0], [1.0], 0.95)


def _walk(key, barrier_line, barrier_mean_ends, midpoint=None, length=1.0):
    return {"path": dataclasses.asdict(key), "ts": [0.0, 0.5, 1.0], "test_loss": [0.1, 0.1 + barrier_mean_ends, 0.1],
            "length": length, "barriers": {"test_loss": {"barrier_line": barrier_line,
                                                         "barrier_mean_ends": barrier_mean_ends,
                                                         "barrier_midpoint": midpoint}}}


def _write(path, walks):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"paths": {key.name: walk for key, walk in walks}, "length_ratio": 1.0, "gain": "stand-in"}, f)


# barrier_line of (segment, aligned segment, aligned + REPAIR, curve) for each pair, at two widths
KNOWN = {4: [(0.20, 0.17, 0.16, 0.03), (0.18, 0.18, 0.17, 0.02), (0.15, 0.19, 0.15, 0.04)],
         8: [(0.12, 0.10, 0.09, 0.01), (0.13, 0.10, 0.08, 0.02), (0.125, 0.10, 0.094, 0.01), (0.135, 0.10, 0.09, 0.02)]}
KEYS = (PathKey("segment"), PathKey("segment", aligned=True), PathKey("segment", aligned=True, repaired=True),
        PathKey("curve", "Bezier", 3))


def test_the_width_tables_are_the_pairs_values_their_summaries_and_paired_intervals(tmp_path):
    root = str(tmp_path)
    for width, pairs in KNOWN.items():
        settings = dataclasses.replace(studies.PRESETS["width"], widths=(width,), pairs=len(pairs), num_points=3)
        for pair, values in enumerate(pairs, start=1):
            curve = os.path.join(studies.width_folder(root, width, pair), "curve", f"checkpoint-{settings.curve_epochs}.pt")
            report = walk_report(os.path.join(studies.width_folder(root, width, pair), "eval"), {"ckpt": curve}, 3,
                                 aligned=True)
            _write(report, [(key, _walk(key, v, v + 0.001)) for key, v in zip(KEYS, values)])
    rows = []
    for width, pairs in KNOWN.items():  # a study of 3 pairs at f = 4 and 4 at f = 8: two tables' rows
        settings = dataclasses.replace(studies.PRESETS["width"], widths=(width,), pairs=len(pairs), num_points=3)
        rows += study_tables.results(root, settings)
    files = study_tables.write_tables(root, settings, rows)
    with open(files["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(int(r["width"]), int(r["pair"])) for r in table] == [(w, p) for w in KNOWN for p in range(1, len(KNOWN[w]) + 1)]
    assert [float(r["aligned_segment_barrier_line"]) for r in table] == [v[1] for w in KNOWN for v in KNOWN[w]]
    md = open(files["md"]).read()
    # f = 4, aligned - segment: d = (-0.03, 0.00, +0.04) -> mean +0.0033, the interval of the hand test
    d = (-0.03, 0.0, 0.04)
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = T_975[2] * sd / 3 ** 0.5
    assert (f"| f = 4 | aligned segment - segment (alignment) | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] "
            "| 3 | 3 pairs cannot tell them apart |") in md
    # f = 8, REPAIR - aligned: d = (-0.01, -0.02, -0.006, -0.01): all lower, the interval excludes zero
    d = (-0.01, -0.02, -0.006, -0.01)
    mean, sd = sum(d) / 4, math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    half = T_975[3] * sd / 2
    assert (f"| f = 8 | aligned + REPAIR segment - aligned segment (REPAIR after alignment) | "
            f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] | 4 | lower |") in md
    # the summary: the segment's barrier_line at f = 8, mean +- sd of (0.12, 0.13, 0.125, 0.135)
    s = intervals.summary([0.12, 0.13, 0.125, 0.135])
    assert f"| 8 | 4 | 0.1000 ± 0.0000 | 0.1000 ± 0.0000 | {s.mean:.4f} ± {s.std:.4f} |" in md


def test_the_instability_table_compares_each_k_with_the_one_before_by_parent(tmp_path):
    root = str(tmp_path)
    known = {0: (0.30, 0.25, 0.28), 1: (0.10, 0.12, 0.09), 2: (0.10, 0.11, 0.09)}  # barrier_mean_ends by parent
    settings = dataclasses.replace(studies.PRESETS["instability"], spawn_epochs=tuple(known), pairs=3)
    for k, values in known.items():
        for pair, v in enumerate(values, start=1):
            path = os.path.join(studies.instability_folder(root, pair), f"spawn-{k}", "spawn.json")
            _write(path, [(PathKey("segment"), _walk(PathKey("segment"), v - 0.01, v, v - 0.02, length=5.0 + k))])
    rows = study_tables.results(root, settings)
    (first, second) = study_tables.paired_differences(settings, rows)
    hand = intervals.paired_difference([0.10, 0.12, 0.09], [0.30, 0.25, 0.28], 0.95)
    assert first[0] == "K = 1 vs 0" and first[2] == hand and hand.excludes_zero and hand.high < 0
    assert second[2].mean == pytest.approx((0.0 - 0.01 + 0.0) / 3)
    md = open(study_tables.write_tables(root, settings, rows)["md"]).read()
    assert "| K = 1 vs 0 | barrier_mean_ends at K = 1 - at K = 0 |" in md and "| lower |" in md


def test_the_symmetry_tables_are_the_pairs_values_their_intervals_and_the_layer_verdicts():
    """aemc.symmetry_study's tables from stand-in rows of known values: each path's mean +- sd, a
    paired difference by hand, and per pair where stitching first fails (penalty above 10% of the
    ends' loss) and where each per-layer measure is largest."""
    from aemc import symmetry_study as sym
    names = [name for name, _ in sym.PATHS]
    results = []
    for pair, shift in ((1, 0.0), (2, 0.01), (3, -0.004)):
        row = {"pair": pair, "start_test_loss": 0.2, "end_test_loss": 0.2, "latent_folded": 1.0}
        row.update({f"{n}_barrier_line": 0.1 - 0.005 * i + shift * (i % 3) for i, n in enumerate(names)})
        results.append(row)
    layers = [{"pair": p, "depth": d, "layer": f"l{d}", "stitch_a_into_b": a, "stitch_b_into_a": b,
               "layerwise_midpoint_rise": w, "ends_test_loss": 0.2}
              for p, rows in ((1, [(0.001, 0.003, 0.01), (0.03, 0.01, 0.02), (0.05, 0.07, 0.005)]),
                              (2, [(0.03, 0.02, 0.04), (0.01, 0.0, 0.01), (0.001, 0.002, 0.003)]),
                              (3, [(0.0, 0.0, 0.0), (0.001, 0.0, 0.001), (0.002, 0.001, 0.0005)]))
              for d, (a, b, w) in enumerate(rows)]
    lines = sym.summary_tables(results, layers, 0.95)
    text = "\n".join(lines)
    for i, (name, label) in enumerate(sym.PATHS):
        v = [0.1 - 0.005 * i + s * (i % 3) for s in (0.0, 0.01, -0.004)]
        mean = sum(v) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / 2)
        assert f"| {label} | 3 | {mean:.4f} ± {sd:.4f} |" in text
    # STE - weight: paths i and j of PATHS; d_p = (0.1 - 0.005 i + s (i % 3)) - (0.1 - 0.005 j + s (j % 3))
    i, j = names.index("ste"), names.index("weight")
    d = [-0.005 * (i - j) + s * (i % 3 - j % 3) for s in (0.0, 0.01, -0.004)]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = T_975[2] * sd / 3 ** 0.5
    assert (f"| STE matching - weight matching (learned against weight matching) | {mean:+.4f} "
            f"[{mean - half:+.4f}, {mean + half:+.4f}] | 3 |") in text
    # pair 1: penalties (0.002, 0.02, 0.06): 10% of 0.2 = 0.02 is not exceeded at l1, so first fails at l2;
    # pair 2: (0.025, 0.005, 0.0015): fails at l0, largest at l0, layer-wise largest at l0;
    # pair 3: nowhere above 0.02
    assert "| 1 | l2 | l2 | l1 |" in lines and "| 2 | l0 | l0 | l0 |" in lines and "| 3 | none | l2 | l1 |" in lines
    # no single largest (a tie, as all-zero values give): "-"
    tied = [dict(r, layerwise_midpoint_rise=0.0) for r in layers]
    assert "| 1 | l2 | l2 | - |" in sym.summary_tables(results, tied, 0.95)
    a = intervals.summary([0.001, 0.03, 0.0])
    assert any(line.startswith(f"| 0 | l0 | 3 | {a.mean:.4f} ± {a.std:.4f} |") for line in lines)
    assert not any("latent map was folded" in line for line in lines)  # folded in every pair: no note
    unfolded = sym.summary_tables([dict(r, latent_folded=float(r["pair"] == 1)) for r in results], layers, 0.95)
    assert any(line.startswith("The latent map was folded in 1 of 3 pairs") for line in unfolded)


def test_the_layer_wise_midpoint_rise_is_the_loss_halfway_minus_the_start():
    """A layer-wise path's loss at t = 0.5 minus at t = 0 (its barrier_line is 0 when the loss only
    rises towards the hybrid end, as here: convex, ending highest)."""
    from aemc import barriers
    from aemc.symmetry_study import _midpoint_rise
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [0.08, 0.09, 0.12, 0.2, 0.33]
    assert _midpoint_rise({"ts": ts, "test_loss": losses}) == pytest.approx(0.12 - 0.08)
    assert barriers.barriers(ts, losses)["barrier_line"] == 0.0  # why the study does not use it
