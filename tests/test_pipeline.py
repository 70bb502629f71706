"""The demo's study pipeline end to end (tiny random thinker, synthetic clips): every stage writes its part."""

import json
import math

from analyses.pipeline import StudyInputs, StudySettings, run_study, study_methods
from analyses.records import RecordStore
from analyses.runtime import load_runtime
from test_cli import STORED, make_dataset

MATCH = "Are the contexts of audio and visual content matching?"
#: AV Matching answers: clipA's audio and video agree, clipB's and clipC's disagree
MATCHING = {"clipA_000001": "Yes", "clipB_000002": "No", "clipC_000003": "No"}


def _probes(root):
    media = {sid: {"video": f"vggsound_with_mask/video/{sid}.mp4", "audio": f"vggsound_with_mask/audio/{sid}.wav"}
             for sid in STORED}
    yesno = []
    for sid, match in MATCHING.items():
        for task, text, label in (("AV Hallucination (Video)", "Is the dog visible in the video?", "Yes"),
                                  ("AV Hallucination (Audio)", "Is the horse making sound in the audio?", "No"),
                                  ("AV Matching", MATCH, match)):
            yesno.append({"id": f"{sid}_q{len(yesno):02d}", "video_id": sid, "task": task, "text": text,
                          "label": label, **media[sid]})
    captions = [{"video_id": sid, **media[sid], "prompt": "Describe what you see and hear in a single sentence.",
                 "caption": "A dog is barking while a horse is visible.", "sound_objects": ["dog"],
                 "visual_objects": ["horse"]} for sid in STORED]
    (root / "yesno.json").write_text(json.dumps(yesno))
    (root / "captions.json").write_text(json.dumps(captions))
    return root / "yesno.json", root / "captions.json"


def test_run_study_writes_report_and_summary_and_the_mitigation_stage_resumes(tmp_path):
    root, lst, blocks = make_dataset(tmp_path / "data")
    yesno, captions = _probes(root)
    rt = load_runtime("tiny")
    data = StudyInputs(mc_list=str(lst), media_root=str(root), probes=str(yesno), object_blocks=str(blocks),
                       captions=str(captions))
    settings = StudySettings(n_divs=(2,), alphas=(0.0, 0.5), max_mitigation_probes=5, max_mitigation_captions=1,
                             caption_tokens=2, cost_tokens=2, cost_items=1, amplify_layers=(1, 2), n_boot=50)
    out = tmp_path / "out"
    summary = run_study(rt, data, out, settings)
    assert summary["dominance"]["total"] == 3
    assert set(summary["accuracy"]) == {"av", "a", "v", "n"}

    # the mitigation stage: every method on the clips whose audio and video disagree (clipB, clipC)
    m = summary["mitigation"]
    keys = [x.key for x in study_methods(settings)]
    assert keys == ["plain", *(f"amplify[{t}]@0.5" for t in ("cross_modal", "sinks", "unimodal", "random")),
                    "amplify[cross_modal/heads]@0.5", "contrastive[video]@1", "contrastive[audio]@1",
                    "guidance[adaptive]@0.5"]
    assert [r["method"] for r in m["rows"]] == keys
    assert m["clips"] == 2 and m["n_judgments"] == 5 and m["n_captions"] == 1 and m["skipped"] == []
    for r in m["rows"]:
        assert r["n_judgments"] == 5 and r["n_captions"] == 1
        for est in (*r["judgment"].values(), *r["chair"].values()):
            assert est["n"] in (5, 1) and est["n_boot"] == 50 and est["level"] == 0.95
            assert not math.isfinite(est["value"]) or est["low"] <= est["value"] <= est["high"]
        assert r["cost"]["n_timed_tokens"] == 2 and r["cost"]["passes_per_token_vs_plain"] >= 1.0
        assert ("vs_plain" in r) == (r["method"] != "plain")
    plain = m["rows"][0]
    assert plain["cost"]["seconds_per_token_vs_plain"] == 1.0
    assert m["rows"][-2]["cost"]["passes_per_token_vs_plain"] == 2.0  # contrastive: the full and one negative cache
    assert set(m["verdicts"]) == set(keys[1:])
    table = (out / "mitigation" / "mitigation_table.md").read_text()
    assert all(f"| {k} |" in table for k in keys) and "Difference from plain" in table
    assert (out / m["files"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    records = RecordStore(out / "mitigation" / "records.jsonl").read()
    assert [r["video_id"] for r in records] == ["clipB_000002"] * 3 + ["clipC_000003"] * 2 + ["clipB_000002"]
    assert records[-1]["id"] == "captions:00001_clipB_000002" and records[-1]["kind"] == "caption"

    # issue 4's hallucination metrics with and without amplification, from the same records
    h = summary["hallucination"]
    assert set(h["overall"]) == {"0.0", "0.5"} and h["methods"] == {"0.0": "plain", "0.5": "amplify[cross_modal]@0.5"}
    assert h["overall"]["0.0"]["accuracy"] == plain["judgment"]["accuracy"]["value"] and h["n"] == 5

    report = (out / "report.md").read_text()
    assert "## Hallucination mitigation on clips where audio and video disagree" in report
    assert "Dominance filter" in report and "with and without amplification" in report
    saved = json.loads((out / "summary.json").read_text())
    assert saved["run"]["study"]["seed"] == 0 and saved["sinks"]["tau"] == 1.5
    assert [r["method"] for r in saved["mitigation"]["rows"]] == keys

    # killed while writing the last record: the rerun completes it without duplicates and reuses the rest
    path = out / "mitigation" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:30])
    again = run_study(rt, data, out, settings)
    ids = [r["id"] for r in RecordStore(path).read()]
    assert ids == [r["id"] for r in records] and len(set(ids)) == len(ids)
    assert RecordStore(path).read()[:-1] == records[:-1]
    assert [r["judgment"] for r in again["mitigation"]["rows"]] == [r["judgment"] for r in m["rows"]]
