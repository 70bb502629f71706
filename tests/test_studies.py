"""The dominance and tracing studies end to end on a tiny random thinker: records, resumption, seeds, settings."""

import json

import pytest
import torch

from analyses import dominance, tracing
from analyses.records import RecordStore, RunSettingsError
from analyses.study import ListSource, PreparedSample
from hooked_av import HookedAVModel, LayoutError, SinkConstants
from hooked_av.recipes import patching, scoring
from model_zoo.tiny import build_inputs

LETTERS = "ABCD"


@pytest.fixture(scope="module")
def smodel(hf_thinker):
    return HookedAVModel.from_hf_model(hf_thinker, sinks=SinkConstants(dims=(7, 11), tau=1.5))


def make_sample(seed: int) -> PreparedSample:
    clean = build_inputs("av", seed=seed)
    silent, black = dict(clean), dict(clean)
    silent["input_features"] = torch.zeros_like(clean["input_features"])
    black["pixel_values_videos"] = torch.zeros_like(clean["pixel_values_videos"])
    choices = {L: scoring.AnswerCandidates(L, (10 + i, 300 + i)) for i, L in enumerate(LETTERS)}
    return PreparedSample(id=f"clip{seed}", inputs={"av": clean, "a": black, "v": silent}, choices=choices,
                          label="A")


@pytest.fixture(scope="module")
def source():
    return ListSource([make_sample(s) for s in (1, 2, 3)])


def fake_dominance(source):
    """Dominance records with both kinds (the tiny random model rarely has a dominant modality)."""
    return [{"id": sid, "dominant": d, "pred": {"av": "A", "a": "A" if d == "audio" else "B",
                                                 "v": "A" if d == "video" else "C"}}
            for sid, d in zip(source.ids(), ("audio", "video", "audio"))]


def test_dominance_rule():
    assert dominance.dominance_of({"av": "A", "a": "A", "v": "B"}) == "audio"
    assert dominance.dominance_of({"av": "A", "a": "B", "v": "A"}) == "video"
    assert dominance.dominance_of({"av": "A", "a": "A", "v": "A"}) is None
    assert dominance.dominance_of({"av": "A", "a": "B", "v": "C"}) is None


def test_dominance_records_and_resume(smodel, source, tmp_path):
    path = dominance.run_dominance(smodel, source, tmp_path)
    recs = RecordStore(path).read()
    assert [r["id"] for r in recs] == source.ids()
    sample = source.prepare("clip1")
    with torch.no_grad():
        logits = smodel(**sample.inputs["v"])
    p = torch.softmax(logits[0, -1], -1)
    expected = {L: float(p[list(c.ids)].max()) for L, c in sample.choices.items()}
    assert recs[0]["probs"]["v"] == pytest.approx(expected, rel=1e-5)
    assert recs[0]["pred"]["v"] == max(expected, key=expected.get)
    # a killed run leaves a truncated line: it is dropped and the sample is redone, once
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:1]) + text[1][: len(text[1]) // 2])
    dominance.run_dominance(smodel, source, tmp_path)
    again = RecordStore(path).read()
    assert [r["id"] for r in again] == source.ids()
    assert again[1] == recs[1]
    with pytest.raises(RunSettingsError, match="seed"):
        dominance.run_dominance(smodel, source, tmp_path, dominance.DominanceSettings(seed=1))


def test_layout_mismatch_is_reported(smodel, source):
    s = source.prepare("clip1")
    bad = PreparedSample("bad", {**s.inputs, "v": build_inputs("av", seed=1, frames=400)}, s.choices)
    with pytest.raises(LayoutError, match="'v' inputs have another token layout"):
        bad.check_layouts(smodel)


def test_trace_sample_cells(smodel, source):
    settings = tracing.TraceSettings(n_divs=(2, 4), seed=3)
    sample = source.prepare("clip1")
    rec, st = tracing.trace_sample(smodel, sample, "audio", "A", "C", settings)
    names = [(c["subset"], c["n_div"]) for c in rec["cells"]]
    assert names == [("all", None)] + [(s, n) for n in (2, 4) for s in tracing.SUBSETS_WITH_N]
    cells = {(c["subset"], c["n_div"]): c for c in rec["cells"]}
    mm = smodel.modality_map(**sample.inputs["av"])
    video = set(mm.positions("video").tolist())
    assert set(cells["all", None]["positions"]) == video and rec["base"] == "video"
    for n in (2, 4):
        sink = cells["sink", n]["positions"]
        assert set(sink) <= video and len(sink) > 0
        assert sorted(cells["cross_modal_sink", n]["positions"] + cells["uni_modal_sink", n]["positions"]) == sink
        assert cells["uni_modal_sink", n]["size"] == len(sink) // 2
        rnd = cells["random_sink_num", n]["positions"]
        assert len(rnd) == len(sink) and set(rnd) <= video
        assert rnd == tracing.random_subset(sorted(video), len(sink), 3, "clip1", n)
    assert len(cells["sink", 4]["positions"]) <= len(cells["sink", 2]["positions"])
    # one cell recomputed by hand: restore the cross-modal sinks, score both answers
    pos = cells["cross_modal_sink", 2]["positions"]
    clean, corrupt = (smodel.prepare_inputs(**sample.inputs[c]) for c in ("av", "v"))
    acts = patching.capture(smodel, clean, pos)
    answers = {"clean": sample.choices["A"], "corrupt": sample.choices["C"]}
    with patching.restored(smodel, acts, [pos]):
        restored = scoring.score(smodel, corrupt, answers)
    base = scoring.score(smodel, corrupt, answers)
    c = cells["cross_modal_sink", 2]
    assert c["ie_clean"] == pytest.approx(100 * float(restored["clean"][0] - base["clean"][0]), abs=1e-4)
    assert c["ie_corrupt"] == pytest.approx(100 * float(base["corrupt"][0] - restored["corrupt"][0]), abs=1e-4)
    assert set(st.history) >= set(cells["sink", 2]["positions"])


def test_tracing_run_resumes_and_is_reproducible(smodel, source, tmp_path):
    settings = tracing.TraceSettings(n_divs=(2,), seed=0)
    dom = fake_dominance(source)
    path = tracing.run_tracing(smodel, source, dom, tmp_path / "a", settings, history_dir=tmp_path / "a" / "hist")
    first = RecordStore(path).read()
    assert [r["id"] for r in first] == source.ids()
    assert (tmp_path / "a" / "hist" / "k_divde_2" / "clip1_history.json").exists()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:40])  # killed while writing the second record
    tracing.run_tracing(smodel, source, dom, tmp_path / "a", settings)
    again = RecordStore(path).read()
    assert [r["id"] for r in again] == source.ids() and again == first
    settings_file = json.loads((tmp_path / "a" / "tracing" / "settings.json").read_text())
    assert settings_file["seed"] == 0 and settings_file["site"] == "before_attn"
    cells = tracing.ie_cells(again)
    audio_all = [c for c in cells if c.dominant == "audio" and c.subset == "all"][0]
    vals = [next(x["ie_clean"] for x in r["cells"] if x["subset"] == "all") for r in again if r["dominant"] == "audio"]
    assert audio_all.ie_clean.n == 2 and audio_all.ie_clean.mean == pytest.approx(sum(vals) / 2)


def test_tracing_report_writes_tables_and_plots(smodel, source, tmp_path):
    tracing.run_tracing(smodel, source, fake_dominance(source), tmp_path, tracing.TraceSettings(n_divs=(2, 3)))
    paths = tracing.write_report(tmp_path)
    table = paths["table_md"].read_text()
    assert "| Cross-modal sink | 3 |" in table and "seed 0" in table
    for key in ("ie_bars", "sinks_per_layer", "sink_frequency", "mds"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_video_dominant_trace_uses_black_frames_and_ascending_split(smodel, source):
    from hooked_av.recipes import roles, sinks

    sample = source.prepare("clip2")
    rec, st = tracing.trace_sample(smodel, sample, "video", "A", "B", tracing.TraceSettings(n_divs=(2,)))
    assert rec["base"] == "audio"
    clean = smodel.prepare_inputs(**sample.inputs["av"])
    mm = clean.modality_map
    phi = sinks.sink_values(smodel, clean)[:, 0]
    g = sinks.global_sinks(sinks.layer_sinks(phi, smodel.cfg.sinks.tau), mm, k_divide=2)
    r = roles.modality_attention(smodel, clean, g.audio)
    uni, cross = roles.split_sinks(g.audio, r.mean_mds, "video")  # ascending for video-dominant
    cells = {(c["subset"], c["n_div"]): c for c in rec["cells"]}
    assert cells["sink", 2]["positions"] == sorted(g.audio)
    assert cells["cross_modal_sink", 2]["positions"] == sorted(cross)
    assert cells["uni_modal_sink", 2]["positions"] == sorted(uni)
    mean = dict(zip(r.positions, r.mean_mds.tolist()))
    if uni and cross:
        assert max(mean[p] for p in uni) <= min(mean[p] for p in cross)
    # the corrupted run is the black-frames one: P_corrupt equals scoring sample.inputs["a"] directly
    p = scoring.score(smodel, sample.inputs["a"], {"B": sample.choices["B"]})["B"]
    assert cells["all", None]["p_corrupt_corrupt"] == pytest.approx(float(p[0]), rel=1e-5)


def test_checkpoint_fingerprint_tells_checkpoints_apart_and_guards_resumption(smodel, source, tmp_path):
    """Run settings carry a fingerprint of the checkpoint (config + weight file sizes): reassembling with other
    deltas changes it, and a folder of records from one checkpoint refuses to be resumed with another."""
    from analyses.runtime import checkpoint_fingerprint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"deltas_sha256": "aa"}')
    (ckpt / "model.safetensors").write_bytes(b"x" * 10)
    (ckpt / "tokenizer.json").write_text("{}")
    first = checkpoint_fingerprint(ckpt)
    assert first == checkpoint_fingerprint(ckpt)
    (ckpt / "tokenizer.json").write_text('{"other": 1}')  # not a weight file
    assert checkpoint_fingerprint(ckpt) == first
    (ckpt / "config.json").write_text('{"deltas_sha256": "bb"}')
    second = checkpoint_fingerprint(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"x" * 11)
    assert len({first, second, checkpoint_fingerprint(ckpt)}) == 3
    assert checkpoint_fingerprint(tmp_path / "absent") is None
    out = tmp_path / "run"
    dominance.run_dominance(smodel, source, out, run_info={"weights": first})
    with pytest.raises(RunSettingsError, match="weights"):
        dominance.run_dominance(smodel, source, out, run_info={"weights": second})
