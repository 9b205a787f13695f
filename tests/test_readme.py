"""The README cannot drift from the figures: the demo's numbers it quotes are those of the results
file `make demo` writes into media/, and the links it gives lead somewhere."""
import os
import re

from aemc import reports
from aemc.paths import PathKey
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "media", "demo_results.json")


def demo_rows(report):
    """The README's demo table, written from the results file."""
    rows = []
    for key, name in ((PathKey("segment"), "straight segment"), (PathKey("curve", "Bezier", 3), "trained Bezier curve")):
        walk = report.paths[key]
        loss, ts = walk["test_loss"], walk["ts"]
        peak = max(range(len(loss)), key=loss.__getitem__)
        barriers = walk["barriers"]["test_loss"]
        rows.append(f"| {name} | {loss[0]:.3f} | {loss[-1]:.3f} | {loss[peak]:.3f} (t = {ts[peak]:.1f}) | "
                    f"{barriers['barrier_mean_ends']:.3f} | {barriers['barrier_line']:.3f} | "
                    f"{max(walk['test_lpips']):.3f} |")
    return rows


def test_the_demo_numbers_in_the_readme_are_those_of_the_committed_results():
    report = reports.read_walks(RESULTS)
    text = open(README, encoding="utf-8").read()
    for row in demo_rows(report):
        assert row in text, row
    assert f"the curve is {report.length_ratio:.3f} times as long as the segment" in text


def test_the_readme_fits_on_a_page_and_its_links_lead_somewhere():
    text = open(README, encoding="utf-8").read()
    assert len(text.encode()) <= 12_500
    for target in re.findall(r"\]\(([^)#:]+)\)", text):  # relative links and images
        assert os.path.exists(os.path.join(ROOT, target)), target
    for doc in os.listdir(os.path.join(ROOT, "docs")):
        body = open(os.path.join(ROOT, "docs", doc), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#:]+)\)", body):
            assert os.path.exists(os.path.join(ROOT, "docs", target)), (doc, target)
