"""The same study across models (analyses/compare.py, `hooked-av compare`) on tiny random models of three families:
Qwen2.5-Omni, video-SALMONN 2+ and video-SALMONN-o1, each with its own inputs and the same study settings."""

import json

import pytest
import torch

from analyses import cli, compare
from analyses.study import ListSource, PreparedSample
from analyses.tracing import TraceSettings
from hooked_av import HookedAVModel, SinkConstants
from hooked_av.recipes import scoring
from model_zoo import tiny, tiny_video_salmonn, video_salmonn2, video_salmonn_o1

SINKS = SinkConstants(dims=(7, 11), tau=1.5, provenance="arbitrary (tiny random model)")
LETTERS = "ABCD"
CHOICES = {L: scoring.AnswerCandidates(L, (10 + i, 300 + i)) for i, L in enumerate(LETTERS)}


def _sample(sid, clean, audio_key, video_key):
    """Clean inputs and the two corruptions of the dominance protocol (zeroed audio / black frames)."""
    silent = {**clean, audio_key: torch.zeros_like(clean[audio_key])}
    if isinstance(clean[video_key], list):
        black = {**clean, video_key: [torch.zeros_like(x) for x in clean[video_key]]}
    else:
        black = {**clean, video_key: torch.zeros_like(clean[video_key])}
    return PreparedSample(id=sid, inputs={"av": clean, "a": black, "v": silent}, choices=CHOICES, label="A")


@pytest.fixture(scope="module")
def studies(hf_thinker):
    torch.manual_seed(0)
    qwen = HookedAVModel.from_hf_model(hf_thinker, sinks=SINKS)
    vs2 = video_salmonn2.build(tiny_video_salmonn.tiny_vs2_config(), sinks=SINKS).eval()
    o1 = video_salmonn_o1.build(tiny_video_salmonn.tiny_o1_config(), sinks=SINKS).eval()
    return {
        "qwen2.5-omni": (qwen, ListSource([_sample(f"c{s}", tiny.build_inputs("av", seed=s), "input_features",
                                                   "pixel_values_videos") for s in (1, 2)])),
        "vs2plus": (vs2, ListSource([_sample(f"c{s}", tiny_video_salmonn.vs2_inputs("av", seed=s), "audio_feature",
                                             "pixel_values_videos") for s in (1, 2)])),
        "o1": (o1, ListSource([_sample(f"c{s}", tiny_video_salmonn.o1_inputs("av", seed=s), "spectrogram", "images")
                               for s in (1, 2)])),
    }


def _dominance(source):
    """Both dominance kinds (tiny random models rarely have a dominant modality)."""
    return [{"id": sid, "dominant": d, "pred": {"av": "A", "a": "A" if d == "audio" else "B",
                                                 "v": "A" if d == "video" else "C"}}
            for sid, d in zip(source.ids(), ("audio", "video"))]


def test_run_comparison_table_and_figure(studies, tmp_path):
    settings = TraceSettings(n_divs=(2,), subsets=("all", "sink", "random_sink_num", "cross_modal_sink"))
    paths = compare.run_comparison(studies, tmp_path, settings,
                                   dominance={label: _dominance(src) for label, (_, src) in studies.items()})
    table = paths["table_md"].read_text()
    for label in studies:
        assert f"{label} IE_clean" in table
    assert "## Audio-dominant samples" in table and "Sink (N=2)" in table
    rows = paths["table_csv"].read_text().splitlines()
    assert rows[0].startswith("model,dominant,subset,label,n_div,ie_clean_mean")
    assert {r.split(",")[0] for r in rows[1:]} == set(studies)
    assert paths["figure"].stat().st_size > 0
    # sink counts per layer on a common relative-depth axis, per model
    records, _ = compare.load_run(tmp_path / "o1")
    depth, counts = compare.sinks_by_depth(records)["video"]
    assert depth[0] == 0.0 and depth[-1] == 1.0 and len(depth) == studies["o1"][0].cfg.n_layers
    assert all(c >= 0 for c in counts)
    # the CLI reads the same runs
    assert cli.main(["compare", "--runs", *(f"{label}={tmp_path / label}" for label in studies),
                     "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "compare.png").is_file()


def test_runs_of_different_studies_are_refused(studies, tmp_path):
    (model, source) = studies["vs2plus"]
    for label, n_divs in (("a", (2,)), ("b", (3,))):
        compare.run_comparison({label: (model, source)}, tmp_path / label,
                               TraceSettings(n_divs=n_divs, subsets=("all", "sink")),
                               dominance={label: _dominance(source)})
    runs = {"a": tmp_path / "a" / "a", "b": tmp_path / "b" / "b"}
    with pytest.raises(compare.CompareError, match=r"n_divs: a=\[2\], b=\[3\]"):
        compare.write_comparison(runs, tmp_path / "cmp")
    paths = compare.write_comparison(runs, tmp_path / "cmp", allow_mismatch=True)
    assert "Not the same study" in paths["table_md"].read_text()
    assert cli.main(["compare", "--runs", f"a={runs['a']}", f"b={runs['b']}", "--out", str(tmp_path / "c2")]) == 2
    with pytest.raises(compare.CompareError, match="no tracing run"):
        compare.load_run(tmp_path / "nowhere")
    settings = json.loads((runs["a"] / "tracing" / "settings.json").read_text())
    assert settings["model_family"] == "video_salmonn2"
