"""The CLI end to end on real (synthetic) media files in the official VGGSound list format, with the tiny random
thinker: dominance, tracing with resumption, report, calibration, official IE, and clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from analyses.cli import main
from analyses.datasets import official_prompt
from analyses.records import RecordStore
from test_media_corrupt import tone, write_mp4

SECONDS = 4.0
CHOICES = {"A": "playing tennis", "B": "skiing", "C": "parrot talking", "D": "slot machine"}
#: stored letters: audio-dominant, video-dominant, neither
STORED = {"clipA_000001": ("A", "A", "B"), "clipB_000002": ("C", "D", "C"), "clipC_000003": ("A", "B", "C")}


def _sample(sid, av, a, v):
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "video", "video": f"vggsound_with_mask/video/{sid}.mp4"},
                                     {"type": "text", "text": official_prompt(CHOICES, 1)}],
         "label": "A", "label_name": CHOICES["A"], "av": av, "v": v, "a": a, "choices": CHOICES},
    ]


def make_dataset(root):
    """Three synthetic clips in the official VGGSound layout, their MC list and object blocks."""
    (root / "vggsound_with_mask" / "video").mkdir(parents=True)
    (root / "vggsound_with_mask" / "audio").mkdir(parents=True)
    for sid in STORED:
        write_mp4(root / "vggsound_with_mask" / "video" / f"{sid}.mp4", seconds=SECONDS)
        sf.write(root / "vggsound_with_mask" / "audio" / f"{sid}.wav", tone(SECONDS, 16000), 16000)
    lst = root / "list.json"
    lst.write_text(json.dumps([_sample(sid, *letters) for sid, letters in STORED.items()], ensure_ascii=False))
    blocks = root / "blocks.json"
    blocks.write_text(json.dumps([{"audio": f"vggsound_with_mask/audio/{sid}.wav", "important_blocks": [1]}
                                  for sid in STORED]))
    return root, lst, blocks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("vggsound"))


def _common(root, lst, out):
    return ["--model", "tiny", "--data", str(lst), "--media-root", str(root), "--out", str(out)]


def test_trace_from_stored_letters_resumes_and_reports(data, tmp_path, capsys):
    root, lst, blocks = data
    args = ["trace", *_common(root, lst, tmp_path), "--dominance", "list", "--n-divs", "2,4",
            "--object-blocks", str(blocks), "--history"]
    assert main(args) == 0
    path = tmp_path / "tracing" / "tracing.jsonl"
    first = RecordStore(path).read()
    assert [(r["id"], r["dominant"]) for r in first] == [("clipA_000001", "audio"), ("clipB_000002", "video")]
    video_dominant = first[1]
    subsets = {(c["subset"], c["n_div"]) for c in video_dominant["cells"]}
    assert ("object", None) in subsets  # audio object tokens of block 1 for the video-dominant sample
    obj = next(c for c in video_dominant["cells"] if c["subset"] == "object")
    assert obj["size"] == 50  # one 2-second chunk of audio = 50 tokens
    assert (tmp_path / "tracing" / "ie_table.md").exists() and (tmp_path / "tracing" / "ie_bars.png").exists()
    assert (tmp_path / "history" / "k_divde_2" / "clipA_000001_history.json").exists()
    # killed midway through the second record: rerun completes it once, identically
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:100])
    assert main(args) == 0
    assert RecordStore(path).read() == first
    settings = json.loads((tmp_path / "tracing" / "settings.json").read_text())
    assert settings["seed"] == 0 and settings["model"] == "tiny" and settings["n_divs"] == [2, 4]
    # other settings in the same folder are refused, with the reason
    assert main([*args[:-1], "--seed", "5"]) == 2
    assert "settings" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "All non-dominant" in capsys.readouterr().out


def test_dominance_and_calibrate(data, tmp_path, capsys):
    root, lst, _ = data
    assert main(["dominance", *_common(root, lst, tmp_path)]) == 0
    recs = RecordStore(tmp_path / "dominance" / "dominance.jsonl").read()
    assert [r["id"] for r in recs] == list(STORED)
    assert all(set(r["probs"]["av"]) == set(CHOICES) for r in recs)
    assert main(["calibrate", *_common(root, lst, tmp_path / "cal"), "--limit", "2"]) == 0
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert len(cal["sinks"]["dims"]) == 2 and cal["tau_scaled"] == pytest.approx(25 * np.sqrt(64 / 3584))


def test_bad_inputs_give_one_line_errors(data, tmp_path, capsys):
    root, lst, _ = data
    broken = tmp_path / "broken.json"
    samples = json.loads(lst.read_text())
    samples[0][1]["content"][0]["video"] = "vggsound_with_mask/video/missing.mp4"
    broken.write_text(json.dumps(samples))
    assert main(["dominance", *_common(root, broken, tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing.mp4" in err and "Traceback" not in err
    assert main(["trace", *_common(root, lst, tmp_path / "y")]) == 2  # no dominance run yet
    assert "hooked-av dominance" in capsys.readouterr().err
    assert main(["official-ie", "--stage2", str(lst)]) == 2


def test_export_official_and_step2_lists(data, tmp_path, capsys):
    from analyses import official, tracing

    root, lst, _ = data
    assert main(["trace", *_common(root, lst, tmp_path), "--dominance", "list", "--n-divs", "2"]) == 0
    capsys.readouterr()
    stage2 = tmp_path / "cross.jsonl"
    assert main(["export-official", "--out", str(tmp_path), "--subset", "cross_modal_sink", "--n-div", "2",
                 "--file", str(stage2)]) == 0
    records = official.read_stage2(stage2)
    traced = RecordStore(tmp_path / "tracing" / "tracing.jsonl").read()
    assert len(records) == len(traced) == 2
    ie_clean, ie_corrupt = official.ie_from_records(records)
    cells = [c for r in traced for c in r["cells"] if c["subset"] == "cross_modal_sink"]
    assert ie_clean == pytest.approx(np.mean([c["ie_clean"] for c in cells]), abs=1e-9)
    assert ie_corrupt == pytest.approx(np.mean([c["ie_corrupt"] for c in cells]), abs=1e-9)
    assert records[0].layerlist_len == 3 * cells[0]["size"]  # tiny model: 3 layers
    assert main(["official-ie", "--stage2", str(stage2)]) == 0
    assert f"IE_clean {ie_clean:.2f}" in capsys.readouterr().out

    # a step-2 list (correct_pred / corrupt_pred) needs --dominant
    samples = json.loads(lst.read_text())
    for s in samples:
        user = s[1]
        for k in ("av", "a", "v"):
            user.pop(k)
        user.update(correct_pred="A", corrupt_pred="B", correct_correct_word_prob=0.5,
                    correct_corrupt_word_prob=0.1, corrupt_correct_word_prob=0.2, corrupt_corrupt_word_prob=0.3)
        user["content"][1]["text"] = official_prompt(CHOICES, 2)
    step2 = root / "step2.json"
    step2.write_text(json.dumps(samples))
    common = _common(root, step2, tmp_path / "s2") + ["--data-step", "2", "--dominance", "list", "--n-divs", "2"]
    assert main(["trace", *common]) == 2 and "--dominant" in capsys.readouterr().err
    assert main(["trace", *common, "--dominant", "video", "--min-audio-chunks", "3"]) == 0
    recs = RecordStore(tmp_path / "s2" / "tracing" / "tracing.jsonl").read()
    assert len(recs) == 3 and all("fewer" in r["skipped"] or "< min_audio_chunks" in r["skipped"] for r in recs)
    assert main(["trace", *common, "--dominant", "video"]) == 2  # other settings in the same folder: refused
    assert "settings" in capsys.readouterr().err
    assert main(["trace", *common, "--dominant", "video", "--no-resume"]) == 0  # start over
    recs = RecordStore(tmp_path / "s2" / "tracing" / "tracing.jsonl").read()
    assert [(r["o_clean"], r["o_corrupt"], r["base"]) for r in recs] == [("A", "B", "audio")] * 3
