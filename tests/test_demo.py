"""`make demo`'s pipeline on the organism, on a handful of held-out clips."""

import json

import pytest

from analyses import demo


def test_demo_on_the_organism_writes_report_and_summary(tmp_path):
    if not (demo.ORGANISM_DIR / "config.json").exists():
        pytest.skip(f"no organism in {demo.ORGANISM_DIR}: run scripts/build_organism.py (make test does)")
    assert demo.run(out=str(tmp_path), seed=0, n_clips=4, max_traced=1, max_probes=2) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dominance"]["total"] == 4
    assert set(summary["accuracy"]) == {"av", "a", "v", "n"}
    assert summary["sinks"]["calibrated"] and summary["sinks"]["dims"]
    assert set(summary["hallucination"]["overall"]) == {"0.0", "0.2", "0.5"}
    assert "organism_trained" in summary
    assert "## Accuracy" in (tmp_path / "report.md").read_text()
