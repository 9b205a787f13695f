"""bench.py's harness only: that it runs, writes what it prints, and derives each ratio from the
figures it measured. Whether the code is fast is what bench.py itself measures (BENCHMARKS.md);
timings are never asserted here."""
import json

import pytest

import bench
from aemc.errors import UserError


def test_harness_runs_and_derives_its_ratios_from_its_measurements(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.main(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--json", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["config"]["in_filters"] == 4 and saved["config"]["device"] == "cpu"
    assert saved["results"] == json.loads(json.dumps(results))
    data = results["data"]
    assert data["memory_over_pil"] == pytest.approx(data["memory_images_per_s"] / data["pil_images_per_s"])
    training = results["training"]
    assert training["fp32_speedup"] == 1.0
    for name in ("channels_last", "bf16", "bf16+channels_last"):
        assert training[f"{name}_speedup"] == pytest.approx(training[f"{name}_images_per_s"] / training["fp32_images_per_s"])
    assert training["peak_rss_MiB"] > 0
    step = results["curve_step"]
    assert step["curve_over_endpoint"] == pytest.approx(step["curve_step_s"] / step["endpoint_step_s"])
    point = results["eval_point"]
    assert point["point_over_bare"] == point["point_s"] / point["bare_passes_s"]
    assert point["plane_point_over_bare"] == point["plane_point_s"] / point["bare_passes_s"]
    spread = results["distributed_eval"]
    assert spread["two_over_one"] == pytest.approx(spread["two_processes_points_per_s"] / spread["one_process_points_per_s"])
    alignment = results["alignment"]
    assert all(0 <= alignment[f"{k}_distance_after_over_before"] <= 1 for k in ("planted", "independent"))
    assert point["lpips_point_over_point"] == point["point_lpips_s"] / point["point_s"]


def test_gpu_targets_need_cuda():
    with pytest.raises(UserError, match="--device cuda"):
        bench.main(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--gpu_targets"]))
