"""bench.py's harness: it runs the sections it is asked for, writes what it returns, measures the
code users run, and refuses what it cannot measure. Whether the code is fast is what bench.py itself
measures (BENCHMARKS.md); timings are never asserted here."""
import json

import pytest

import bench
from aemc.errors import UserError


def test_the_sections_asked_for_run_and_are_written(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.main(bench.get_args_parser().parse_args(
        ["--quick", "--in_filters", "8", "--device", "cpu", "--sections", "alignment,curve_step", "--json", str(out)]))
    saved = json.loads(out.read_text())
    assert list(results) == ["alignment", "curve_step"] and saved["results"] == json.loads(json.dumps(results))
    assert saved["config"]["in_filters"] == 8 and saved["config"]["device"] == "cpu"
    # a curve step against an endpoint step for every built-in architecture
    import models
    assert {f"{name}_curve_over_endpoint" for name in models.ARCHITECTURES if name != "conv"} | {
        "curve_over_endpoint"} <= set(results["curve_step"])
    # the alignment section runs the real weight matching: a planted permutation is undone exactly
    # (at 8 filters and wider in one restart; at 4 it can stop in a local optimum), two independent
    # networks are only brought somewhat closer
    alignment = results["alignment"]
    assert alignment["planted_distance_after_over_before"] < 1e-6
    assert 0.5 < alignment["independent_distance_after_over_before"] < 1


def test_what_it_cannot_measure_is_one_clear_error():
    with pytest.raises(UserError, match="--device cuda"):
        bench.main(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--gpu_targets"]))
    with pytest.raises(UserError, match="unknown nothing"):
        bench.main(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--sections", "nothing"]))
