"""ModalityMap contents and clear errors for inconsistent layouts."""

import math

import pytest
import torch

from hooked_av import LayoutError, Modality
from model_zoo.tiny import TOK, build_inputs, collate


def test_modality_map_av(model):
    inp = build_inputs(kind="av", grid=(5, 4, 4), frames=730)
    mm = model.modality_map(**inp)
    ids = inp["input_ids"][0]
    assert torch.equal(mm.mask("audio")[0], ids == TOK["audio"])
    assert torch.equal(mm.mask("video")[0], ids == TOK["video"])
    special = torch.isin(ids, torch.tensor([TOK["audio_start"], TOK["audio_end"], TOK["vision_start"], TOK["vision_end"]]))
    assert torch.equal(mm.mask(Modality.SPECIAL)[0], special)
    counts = mm.counts()
    assert counts["audio"] == 182 and counts["video"] == 20 and counts["pad"] == 0
    # ranges alternate video/audio per chunk; chunk 3 has no video, so the last two audio chunks are one run
    assert mm.ranges("video") == [(8, 16), (66, 74), (124, 128)]
    assert mm.ranges("audio") == [(16, 66), (74, 124), (128, 210)]
    a = mm.positions("audio")
    assert torch.allclose(mm.time[0, a], torch.arange(182) * 0.04)
    v = mm.positions("video")
    assert mm.grid[0, v].tolist()[:5] == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert mm.time[0, v].tolist()[:8] == [0.0] * 4 + [1.0] * 4
    assert math.isnan(float(mm.time[0, 0])) and int(mm.chunk[0, 0]) == -1
    assert "audio" in mm.describe() and "chunk 3" in mm.describe()


def test_modality_map_image_and_padding(model):
    inp = collate([build_inputs(kind="image", grid=(1, 6, 8)), build_inputs(kind="text", seed=4)])
    mm = model.modality_map(**inp)
    assert mm.counts(0)["image"] == 12 and mm.counts(1)["image"] == 0
    assert mm.counts(1)["pad"] == inp["attention_mask"].shape[1] - int(inp["attention_mask"][1].sum())
    img = mm.positions("image", batch=0)
    assert mm.grid[0, img].max(0).values.tolist() == [0, 2, 3]


def test_same_layout_detects_changes(model):
    a = model.modality_map(**build_inputs(kind="av", frames=730))
    b = model.modality_map(**build_inputs(kind="av", frames=730, seed=5))  # same layout, other content
    c = model.modality_map(**build_inputs(kind="av", frames=690))
    assert a.same_layout(b) and not a.same_layout(c)


def test_wrong_placeholder_count_is_a_clear_error(model):
    inp = build_inputs(kind="audio", frames=230)
    ids = inp["input_ids"][0].tolist()
    ids.remove(TOK["audio"])  # one audio token short
    bad = dict(inp, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    with pytest.raises(LayoutError, match="audio 0.*expects 57 placeholder tokens.*holds 56"):
        model(**bad)


def test_missing_media_is_a_clear_error(model):
    inp = build_inputs(kind="video")
    inp.pop("pixel_values_videos")
    inp.pop("video_grid_thw")
    with pytest.raises(LayoutError, match="more video blocks than the inputs provide"):
        model(**inp)


def test_unexpected_processor_key_is_named(model):
    with pytest.raises(TypeError, match="pixel_values_video'.*processor's keys"):
        model(**build_inputs(kind="text"), pixel_values_video=torch.zeros(1))
