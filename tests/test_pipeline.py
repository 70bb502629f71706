"""The demo's study pipeline end to end (tiny random thinker, synthetic clips): every stage writes its part."""

import json

from analyses.pipeline import StudyInputs, StudySettings, run_study
from analyses.runtime import load_runtime
from test_cli import STORED, make_dataset


def test_run_study_writes_report_and_summary(tmp_path):
    root, lst, blocks = make_dataset(tmp_path / "data")
    probes = root / "probes.json"
    probes.write_text(json.dumps([
        {"video_id": sid, "video": f"vggsound_with_mask/video/{sid}.mp4", "audio": f"vggsound_with_mask/audio/{sid}.wav",
         "task": "AV Matching", "text": "Are the contexts of audio and visual content matching?", "label": lab}
        for sid, lab in zip(STORED, ("Yes", "No", "Yes"))]))
    rt = load_runtime("tiny")
    data = StudyInputs(mc_list=str(lst), media_root=str(root), probes=str(probes), object_blocks=str(blocks))
    summary = run_study(rt, data, tmp_path / "out", StudySettings(n_divs=(2,), alphas=(0.0, 0.5)))
    assert summary["dominance"]["total"] == 3
    assert set(summary["accuracy"]) == {"av", "a", "v", "n"}
    assert set(summary["hallucination"]["overall"]) == {"0.0", "0.5"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Yes/no probes" in report and "Dominance filter" in report
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["run"]["study"]["seed"] == 0 and saved["sinks"]["tau"] == 1.5
