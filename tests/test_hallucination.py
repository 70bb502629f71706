"""Yes/no probe metrics and amplification on probes (tiny random thinker); the AVHBench loader (real question
file), CHAIR scoring, bootstrap CIs, and the mitigation harness and CLI end to end on synthetic media."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from analyses import hallucination as h
from analyses.datasets import DatasetError
from hooked_av import HookedAVModel, SinkConstants
from hooked_av.recipes.scoring import AnswerCandidates
from conftest import SHARED
from model_zoo.tiny import build_inputs


def test_binary_metrics_by_hand():
    pred = ["Yes", "Yes", "No", "No", "Yes"]
    gold = ["Yes", "No", "No", "Yes", "Yes"]
    m = h.binary_metrics(pred, gold)  # tp 2, fp 1, fn 1, tn 1
    assert (m.n, m.accuracy, m.precision, m.recall, m.yes_ratio) == (5, 0.6, 2 / 3, 2 / 3, 0.6)
    assert m.f1 == pytest.approx(2 / 3)
    none_yes = h.binary_metrics(["No", "No"], ["No", "Yes"])
    assert math.isnan(none_yes.precision) and none_yes.recall == 0 and math.isnan(none_yes.f1)
    with pytest.raises(ValueError, match="'Yes' or 'No'"):
        h.binary_metrics(["yes"], ["Yes"])
    with pytest.raises(ValueError, match="1 predictions for 2"):
        h.binary_metrics(["Yes"], ["Yes", "No"])


def test_probe_evaluation_with_amplification(hf_thinker):
    model = HookedAVModel.from_hf_model(hf_thinker, sinks=SinkConstants(dims=(7, 11), tau=1.5))
    items = [{"video_id": str(i), "task": t, "text": "?", "label": lab}
             for i, (t, lab) in enumerate([("AV Matching", "Yes"), ("AV Matching", "No"),
                                           ("AV Hallucination (Video)", "No")])]
    yes, no = AnswerCandidates("Yes", (40, 41)), AnswerCandidates("No", (50, 51))
    out = h.evaluate_probes(model, items, lambda it: build_inputs("av", seed=int(it["video_id"])), yes, no,
                            alphas=(0.0, 0.5), layers=[1, 2])
    assert set(out["overall"]) == {"0.0", "0.5"} and out["n"] == 3
    assert set(out["by_task"]["0.0"]) == {"AV Matching", "AV Hallucination (Video)"}
    plain = [h.answer_yes_no(model, build_inputs("av", seed=i), yes, no) for i in range(3)]
    assert out["overall"]["0.0"]["yes_ratio"] == pytest.approx(plain.count("Yes") / 3)
    keys = h.cross_modal_sinks(model, build_inputs("av", seed=0))
    mm = model.modality_map(**build_inputs("av", seed=0))
    assert all(int(mm.modality[0, k]) in (1, 2) for k in keys)  # audio or video tokens only


# ================================================================== AVHBench loader
AVH_FILE = SHARED / "fixtures" / "avhbench" / "qa_final_single_filtered.json"
#: task counts of the fixture (DATA.md §1)
AVH_COUNTS = {"AV Hallucination (Audio)": 2290, "AV Hallucination (Audio_only)": 2290, "AV Matching": 1876,
              "AV Hallucination (Video)": 1136, "AV Hallucination (Video_only)": 1136, "AV Captioning": 1109}


@pytest.fixture(scope="module")
def avh_file():
    if not AVH_FILE.is_file():
        pytest.skip(f"{AVH_FILE} is absent (shared/fixtures not checked out)")
    return AVH_FILE


def test_avhbench_loader_reads_the_real_question_file(avh_file):
    probes = h.load_avhbench(avh_file)
    assert len(probes.items) == 9837 and not probes.skipped
    assert Counter(it.task for it in probes.items) == AVH_COUNTS
    assert len({it.id for it in probes.items}) == 9837 and len({it.video_id for it in probes.items}) == 2136
    first = probes.items[0]
    assert (first.id, first.video_id, first.task, first.label, first.kind, first.inputs) == (
        "00000_01162", "01162", "AV Matching", "No", "judgment", "av")
    assert {it.inputs for it in probes.items if it.task.endswith("_only)")} == {"audio", "video"}
    captions = probes.of_kind("caption")
    assert len(captions) == 1109 and all(len(c.label.split()) > 3 for c in captions)
    audio_only = h.load_avhbench(avh_file, tasks=["AV Hallucination (Audio_only)"], limit=5)
    assert len(audio_only.items) == 5 and {it.inputs for it in audio_only.items} == {"audio"}
    with pytest.raises(DatasetError, match="unknown task"):
        h.load_avhbench(avh_file, tasks=["AV Hallucination"])


def test_avhbench_loader_skips_items_without_media_and_goes_on(avh_file, tmp_path):
    first = h.load_avhbench(avh_file, limit=40).items
    present = sorted({it.video_id for it in first})[:2]
    (tmp_path / "videos").mkdir()
    (tmp_path / "audios").mkdir()
    for vid in present:
        (tmp_path / "videos" / f"{vid}.mp4").write_bytes(b"")  # the loader checks existence only
    (tmp_path / "audios" / f"{present[0]}.wav").write_bytes(b"")
    probes = h.load_avhbench(avh_file, tmp_path, limit=40)
    assert len(probes.items) + len(probes.skipped) == 40
    assert {it.video_id for it in probes.items} == set(present)
    assert probes.skipped and all("does not exist" in s.reason and "videos" in s.reason for s in probes.skipped)
    for it in probes.items:
        assert it.video == tmp_path / "videos" / f"{it.video_id}.mp4"
        assert it.audio == (tmp_path / "audios" / f"{it.video_id}.wav" if it.video_id == present[0] else None)


def test_loader_skips_unknown_tasks_and_malformed_entries_and_reads_avsynth_files(tmp_path):
    (tmp_path / "clips").mkdir()
    for name in ("a.mp4", "a.wav"):
        (tmp_path / "clips" / name).write_bytes(b"")
    entries = [
        {"video_id": "1", "task": "AV Hallucination (Video)", "text": "Is the dog visible in the video?",
         "label": "Yes", "id": "s1_q00", "video": "clips/a.mp4", "audio": "clips/a.wav"},
        {"video_id": "1", "task": "AV Weird", "text": "?", "label": "No"},
        {"video_id": "1", "task": "AV Matching", "text": "Match?", "label": "maybe"},
        {"video_id": "1", "task": "AV Matching", "text": "Match?", "label": "No", "video": "clips/b.mp4"},
        {"video_id": "1", "task": "AV Matching", "text": "Match?", "label": "No", "video": "clips/a.mp4",
         "audio": "clips/none.wav"},
        {"video_id": "1", "video": "clips/a.mp4", "audio": "clips/a.wav", "prompt": "Describe.",
         "caption": "A dog is barking while a cat is visible.", "sound_objects": ["dog"], "visual_objects": ["cat"]},
        {"video_id": "1", "task": "AV Hallucination (Video)", "text": "Again?", "label": "No", "id": "s1_q00",
         "video": "clips/a.mp4"},
        ["not", "an", "object"],
    ]
    path = tmp_path / "probes.json"
    path.write_text(json.dumps(entries))
    probes = h.load_avhbench(path, tmp_path)
    assert [it.id for it in probes.items] == ["s1_q00", "00005_1"]
    cap = probes.items[1]
    assert (cap.kind, cap.task, cap.text, cap.objects) == ("caption", "AV Captioning", "Describe.", ("dog", "cat"))
    reasons = [s.reason for s in probes.skipped]
    assert len(reasons) == 6
    assert "unknown task 'AV Weird'" in reasons[0] and "known: AV Hallucination (Video)" in reasons[0]
    assert "label must be" in reasons[1] and "b.mp4 does not exist" in reasons[2] and "none.wav" in reasons[3]
    assert "duplicate id" in reasons[4] and "expected an object" in reasons[5]
    assert [s.id for s in probes.skipped][:2] == ["00001_1", "00002_1"]
    assert h.load_avhbench(path).items[0].video is None  # no media root: nothing resolved or checked
    assert probes.prefixed("c:").items[0].id == "c:s1_q00"
    with pytest.raises(DatasetError, match="no such file"):
        h.load_avhbench(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError, match="JSON"):
        h.load_avhbench(tmp_path / "bad.json")


# ================================================================== CHAIR
def test_chair_scoring_by_hand():
    vocab = h.ObjectVocabulary.from_nouns(["dog", "cat", "drum kit", "church bell"], {"dog": ["puppy"]})
    assert vocab.mentions("Two Dogs, a PUPPY and drum kits; a church bell. The dog again.") == [
        "dog", "drum kit", "church bell"]
    assert vocab.mentions("a drum and a kit") == []  # phrases match whole
    one = h.caption_hallucination("A dog barks while a cat and a church bell are seen.", ["dog barking"], vocab)
    assert (one.mentioned, one.hallucinated, one.ground_truth) == (("dog", "cat", "church bell"),
                                                                   ("cat", "church bell"), ("dog",))
    two = h.caption_hallucination("Drum kits are playing.", ["drum kit", "cat"], vocab)
    three = h.caption_hallucination("Nothing to see.", ["cat"], vocab)
    m = h.chair_metrics([one, two, three])
    assert (m.n_captions, m.n_mentioned, m.n_hallucinated) == (3, 4, 2)
    assert m.chair_s == pytest.approx(1 / 3) and m.chair_i == pytest.approx(2 / 4)
    assert m.coverage == pytest.approx(2 / 4)  # dog and drum kit of {dog, drum kit, cat, cat}
    assert math.isnan(h.chair_metrics([three]).chair_i)
    assert h.ObjectVocabulary.avsynth().mentions("a chicken and cattle near a phone") == ["rooster", "cow", "telephone"]
    with pytest.raises(ValueError, match="lower-case"):
        h.ObjectVocabulary({"Dog": "dog"})


# ================================================================== bootstrap
def test_bootstrap_cis_are_deterministic_given_the_seed_and_match_a_direct_resampling():
    rng = np.random.default_rng(0)
    gold = [h.YES if x else h.NO for x in rng.random(40) < 0.5]
    pred = [g if rng.random() < 0.7 else (h.NO if g == h.YES else h.YES) for g in gold]
    a = h.judgment_cis(pred, gold, n_boot=300, seed=7)
    assert a == h.judgment_cis(pred, gold, n_boot=300, seed=7)
    assert a != h.judgment_cis(pred, gold, n_boot=300, seed=8)
    point = h.binary_metrics(pred, gold)
    assert a["f1"].value == point.f1 and a["accuracy"].seed == 7 and a["accuracy"].n_boot == 300
    idx = np.random.default_rng(7).integers(0, 40, size=(300, 40))
    assert np.array_equal(h.bootstrap_indices(40, 300, 7), idx)
    hits = np.array([p == g for p, g in zip(pred, gold)])[idx].mean(1)
    assert (a["accuracy"].low, a["accuracy"].high) == pytest.approx(tuple(np.quantile(hits, [0.025, 0.975])))
    for e in a.values():
        assert e.low <= e.value <= e.high
    acc = h.accuracy_ci([True, False, True, True], n_boot=100, seed=1)
    assert acc == h.accuracy_ci([True, False, True, True], n_boot=100, seed=1) and acc.value == 0.75
    empty = h.accuracy_ci([], n_boot=10)
    assert math.isnan(empty.value) and math.isnan(empty.low)
    c = h.chair_cis([h.CaptionHallucination(("dog",), (), ("dog",)),
                     h.CaptionHallucination(("cat",), ("cat",), ())], n_boot=50, seed=2)
    assert c["chair_s"].value == 0.5 and c == h.chair_cis([h.CaptionHallucination(("dog",), (), ("dog",)),
                                                           h.CaptionHallucination(("cat",), ("cat",), ())],
                                                          n_boot=50, seed=2)


# ================================================================== mitigation harness and CLI, end to end
CLIP_SECONDS = 2.0
TIMING_KEYS = {"seconds", "prep_seconds", "cost"}


def _without_timings(x):
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


@pytest.fixture(scope="module")
def avh_media(tmp_path_factory):
    """AVHBench layout with two synthetic clips (one with a separate wav), a corrupt clip, a probe file with every
    kind of item (and three to skip), and an official MC list for the 20-way check."""
    import soundfile as sf
    from test_cli import make_dataset
    from test_media_corrupt import tone, write_mp4

    root, mc_list, _ = make_dataset(tmp_path_factory.mktemp("avh"))
    (root / "videos").mkdir()
    (root / "audios").mkdir()
    for vid in ("00001", "00002"):
        write_mp4(root / "videos" / f"{vid}.mp4", seconds=CLIP_SECONDS)
    sf.write(root / "audios" / "00001.wav", tone(CLIP_SECONDS, 16000), 16000)
    (root / "videos" / "00003.mp4").write_bytes(b"not a video")
    q = "Are the contexts of audio and visual content matching?"
    items = [
        {"video_id": "00001", "task": "AV Hallucination (Video)", "text": "Is the dog visible in the video?",
         "label": "Yes"},
        {"video_id": "00002", "task": "AV Hallucination (Audio_only)", "text": "Is the car making sound in the audio?",
         "label": "No"},
        {"video_id": "00009", "task": "AV Matching", "text": q, "label": "No"},
        {"video_id": "00001", "task": "AV Sorting", "text": q, "label": "No"},
        {"video_id": "00003", "task": "AV Matching", "text": q, "label": "Yes"},
        {"video_id": "00002", "task": "AV Captioning", "text": "Describe what you see and hear in a single sentence.",
         "label": "A dog is barking while a cat is visible."},
    ]
    probes = root / "qa.json"
    probes.write_text(json.dumps(items))
    return root, probes, mc_list


def _mitigate_args(root, probes, mc_list, out, *extra):
    return ["mitigate", "--model", "tiny", "--probes", str(probes), "--media-root", str(root), "--out", str(out),
            "--mc-data", str(mc_list), "--mc-limit", "1", "--layers", "1-2", "--alphas", "0.5", "--betas", "1",
            "--strengths", "0.5", "--cost-tokens", "2", "--cost-items", "1", "--max-new-tokens", "3",
            "--n-boot", "50", *extra]


def test_mitigate_cli_end_to_end_skips_bad_items_and_resumes(avh_media, tmp_path, capsys):
    from analyses.cli import main
    from analyses.records import RecordStore

    root, probes, mc_list = avh_media
    args = _mitigate_args(root, probes, mc_list, tmp_path)
    assert main(args) == 0
    folder = tmp_path / "mitigation"
    records = RecordStore(folder / "records.jsonl").read()
    kinds = Counter(r["kind"] for r in records)
    assert kinds == {"skip": 3, "judgment": 2, "caption": 1, "mc": 1}
    reasons = {r["video_id"]: r["reason"] for r in records if r["kind"] == "skip"}
    assert "does not exist" in reasons["00009"] and "unknown task 'AV Sorting'" in reasons["00001"]
    assert "00003.mp4" in reasons["00003"]  # undecodable media: skipped at run time, the run went on
    keys = ["plain", "amplify[cross_modal]@0.5", "contrastive[video]@1", "guidance[adaptive]@0.5"]
    judged = [r for r in records if r["kind"] == "judgment"]
    assert all(list(r["methods"]) == keys for r in records if r["kind"] != "skip")
    assert "cost" in judged[0]["methods"]["guidance[adaptive]@0.5"] and "cost" not in judged[1]["methods"]["plain"]
    assert judged[0]["sinks"]["k_divide"] == 3 and judged[0]["seed"] == h.item_seed(0, judged[0]["id"])
    caption = next(r for r in records if r["kind"] == "caption")
    assert caption["objects"] == ["dog", "cat"] and isinstance(caption["methods"]["plain"]["text"], str)
    table = json.loads((folder / "mitigation_table.json").read_text())
    assert table["seed"] == 0 and table["n_boot"] == 50 and [r["method"] for r in table["rows"]] == keys
    assert len(table["skipped"]) == 3
    row = table["rows"][0]
    assert row["n_judgments"] == 2 and row["judgment"]["accuracy"]["n"] == 2 and "chair" in row
    assert row["mc_accuracy"]["n"] == 1 and row["cost"]["n_generated_tokens"] > 0
    assert (folder / "mitigation_vs_strength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (folder / "mitigation_table.md").read_text()
    assert all(f"| {k} |" in md for k in keys) and "seed 0" in md
    assert json.loads((folder / "settings.json").read_text())["seed"] == 0
    # killed while writing the last record: the rerun completes it, the rest is reused
    path = folder / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])
    assert main(args) == 0
    assert _without_timings(RecordStore(path).read()) == _without_timings(records)
    capsys.readouterr()
    assert main(_mitigate_args(root, probes, mc_list, tmp_path, "--seed", "1")) == 2
    assert "settings" in capsys.readouterr().err


def test_mitigate_cli_rejects_unknown_methods(avh_media, tmp_path, capsys):
    from analyses.cli import main

    root, probes, mc_list = avh_media
    assert main(_mitigate_args(root, probes, mc_list, tmp_path, "--methods", "plain,vcd")) == 2
    assert "unknown method 'vcd'" in capsys.readouterr().err


def test_mitigation_verdicts_read_the_paired_cis():
    """helps / hurts / mixed / no resolved difference from the directional metrics; a yes-ratio shift whose CI
    excludes 0 is named beside the verdict, never counted as better or worse."""
    from analyses.hallucination import mitigation_verdicts

    def ci(lo, hi):
        return {"value": (lo + hi) / 2, "low": lo, "high": hi}

    rows = [{"method": "plain"},
            {"method": "up", "vs_plain": {"accuracy": ci(0.01, 0.2), "f1": ci(-0.1, 0.1)}},
            {"method": "down", "vs_plain": {"chair_s": ci(0.05, 0.3)}},
            {"method": "both", "vs_plain": {"f1": ci(0.02, 0.1), "chair_i": ci(0.01, 0.2)}},
            {"method": "bias", "vs_plain": {"accuracy": ci(-0.2, 0.1), "yes_ratio": ci(-0.38, -0.04)}},
            {"method": "nan", "vs_plain": {"accuracy": ci(float("nan"), float("nan")), "yes_ratio": ci(-0.1, 0.1)}}]
    v = mitigation_verdicts({"rows": rows})
    assert "plain" not in v
    assert v["up"] == {"verdict": "helps", "better": ["accuracy"], "worse": [], "shifted": []}
    assert v["down"]["verdict"] == "hurts" and v["down"]["worse"] == ["chair_s"]
    assert v["both"]["verdict"] == "mixed"
    assert v["bias"] == {"verdict": "no resolved difference", "better": [], "worse": [], "shifted": ["yes_ratio down"]}
    assert v["nan"]["verdict"] == "no resolved difference" and v["nan"]["shifted"] == []
