import json

import bench


def test_quick_benchmark_runs_and_reports_consistent_ratios(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.main(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", "--json", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["config"]["in_filters"] == 4 and saved["config"]["device"] == "cpu"
    step = results["curve_step"]
    assert step["curve_over_endpoint"] == step["curve_step_s"] / step["endpoint_step_s"]
    assert step["endpoint_images_per_s"] == 8 / step["endpoint_step_s"]
    assert saved["results"]["curve_step"] == step
    point = results["eval_point"]
    assert point["point_over_bare"] == point["point_s"] / point["bare_passes_s"]
    assert point["lpips_point_over_point"] == point["point_lpips_s"] / point["point_s"]
