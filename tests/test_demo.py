"""`make demo`'s pipeline on the organism, on a handful of held-out clips."""

import json
import math

import pytest

from analyses import demo
from analyses.records import RecordStore


def test_demo_on_the_organism_writes_report_and_summary(tmp_path):
    if not (demo.ORGANISM_DIR / "config.json").exists():
        pytest.skip(f"no organism in {demo.ORGANISM_DIR}: run scripts/build_organism.py (make test does)")
    knobs = dict(seed=0, n_clips=4, max_traced=1, max_mitigation_probes=3, max_mitigation_captions=1,
                 caption_tokens=3)
    assert demo.run(out=str(tmp_path), **knobs) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dominance"]["total"] == 4
    assert set(summary["accuracy"]) == {"av", "a", "v", "n"}
    assert summary["sinks"]["calibrated"] and summary["sinks"]["dims"]
    assert set(summary["hallucination"]["overall"]) == {"0.0", "0.2", "0.5"}
    assert "organism_trained" in summary
    report = (tmp_path / "report.md").read_text()
    assert "## Accuracy" in report and "## Hallucination mitigation on clips where audio and video disagree" in report

    # every method, a row each with bootstrap CIs, on the clips whose audio and video disagree
    m = summary["mitigation"]
    families = {r["family"] for r in m["rows"]}
    assert families == {"plain", "amplify[cross_modal]", "amplify[sinks]", "amplify[unimodal]", "amplify[random]",
                        "amplify[cross_modal/heads]", "contrastive[video]", "contrastive[audio]", "guidance[adaptive]"}
    assert m["n_judgments"] == 3 and m["n_captions"] == 1 and m["clips"] >= 1
    table = (tmp_path / "mitigation" / "mitigation_table.md").read_text()
    for r in m["rows"]:
        assert f"| {r['method']} |" in table
        acc = r["judgment"]["accuracy"]
        assert acc["n"] == 3 and acc["level"] == 0.95 and acc["low"] <= acc["value"] <= acc["high"]
        assert r["chair"]["chair_s"]["n"] == 1
        assert math.isfinite(r["cost"]["seconds_per_token_vs_plain"])
    assert (tmp_path / "mitigation" / "mitigation_vs_strength.png").exists()

    # a rerun resumes: nothing is recomputed and no record is duplicated
    path = tmp_path / "mitigation" / "records.jsonl"
    before = RecordStore(path).read()
    assert demo.run(out=str(tmp_path), **knobs) == 0
    after = RecordStore(path).read()
    assert after == before and len({r["id"] for r in after}) == len(after) == 4


def test_demo_starts_over_when_the_weights_changed(tmp_path, capsys):
    """A demo folder of one checkpoint is cleared (clips kept) when the organism's weights change, instead of the
    run refusing to resume; with the same weights nothing is touched."""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "clip.mp4").write_bytes(b"clip")
    (out / "dominance").mkdir()
    (out / "dominance" / "settings.json").write_text("{}")
    (out / "report.md").write_text("old")
    demo.start_over_for(out, "aaaa")  # results without a stamp: of unknown weights, cleared
    assert sorted(p.name for p in out.iterdir()) == ["data", demo.WEIGHTS_STAMP]
    assert "unrecorded" in capsys.readouterr().out
    (out / "report.md").write_text("a's report")
    demo.start_over_for(out, "aaaa")  # same weights: resumes
    assert (out / "report.md").read_text() == "a's report"
    demo.start_over_for(out, "bbbb")
    assert not (out / "report.md").exists() and (out / "data" / "clip.mp4").read_bytes() == b"clip"
    assert "aaaa there, bbbb now" in capsys.readouterr().out
    demo.start_over_for(tmp_path / "fresh", "cccc")
    assert (tmp_path / "fresh" / demo.WEIGHTS_STAMP).read_text().strip() == "cccc"
