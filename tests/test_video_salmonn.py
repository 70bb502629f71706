"""video-SALMONN 2+ and video-SALMONN-o1 against transformers' modules and the public code, tiny random configs.

No transformers class exists for either model, so each part is checked against the transformers module it is
built from, after going through the released-checkpoint conversion (`model_zoo.tiny_video_salmonn` writes the
reference modules' weights under the released key names; the models here are loaded from those files):

* decoder: logits, every block input, the final norm and the attention patterns against transformers'
  `Qwen2_5_VLTextModel` (3-D position ids given) / `Qwen2ForCausalLM` on the same input embeddings; greedy
  generation token-identical (transformers' `generate` on text, on input embeddings for o1's spliced sequences,
  and a cache-free reference loop for video-SALMONN 2+'s 3-D positions, which transformers 5 computes differently
  from the public code's transformers 4.51);
* towers: the Qwen2.5-VL ViT, SigLIP (minus its last layer, pooled, projected), and the audio path (Whisper
  encoder, windows sliced by hand, `Blip2QFormerModel`, projection, o1's extra norm, MLP and segment offsets);
* assembly: the interleaving order, position ids (both position modes of video-SALMONN 2+) and ModalityMap of
  constructed examples, written out by hand from a reading of the public code; the full forward against the
  reference parts assembled by a literal loop in this file;
* loading: released key layouts, separate SigLIP / Whisper releases for o1, checkpoints of other families.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hooked_av import HookedAVModel, hook_names
from hooked_av.checkpoint import CheckpointError
from hooked_av.inputs import LayoutError
from model_zoo import video_salmonn2, video_salmonn_o1
from model_zoo.families import FamilyMismatchError
from model_zoo.tiny_video_salmonn import (
    MEL, TOK, o1_inputs, o1_released_state, save_checkpoint, tiny_o1_reference, tiny_vs2_reference, vs2_inputs,
    vs2_released_state,
)

ATOL = 1e-5


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vs2_ref():
    return tiny_vs2_reference(seed=0)


@pytest.fixture(scope="module")
def vs2_ckpt(vs2_ref, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("vs2"), vs2_ref["config"], vs2_released_state(vs2_ref))


@pytest.fixture(scope="module")
def vs2(vs2_ckpt):
    return HookedAVModel.from_pretrained("video-salmonn2plus-tiny", checkpoint=vs2_ckpt)


@pytest.fixture(scope="module")
def o1_ref():
    return tiny_o1_reference(seed=0)


@pytest.fixture(scope="module")
def o1_ckpt(o1_ref, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("o1"), o1_ref["config"], o1_released_state(o1_ref))


@pytest.fixture(scope="module")
def o1(o1_ckpt):
    return HookedAVModel.from_pretrained("video-salmonn-o1-tiny", checkpoint=o1_ckpt)


# ---------------------------------------------------------------------------------------------------- references
def ref_window_qformer(ref, mel, kernel, stride, pre_norm=None, final_linear=None):
    """Whisper -> [LayerNorm] -> windows sliced one by one -> Blip2QFormerModel -> proj [-> MLP]; [seg, tok, d]."""
    frames = ref["whisper"](mel).last_hidden_state
    if pre_norm is not None:
        frames = pre_norm(frames)
    n_windows = (frames.shape[1] - kernel) // stride + 1
    out = []
    for s in range(frames.shape[0]):
        windows = torch.stack([frames[s, w * stride: w * stride + kernel] for w in range(n_windows)])
        q = ref["query_tokens"].expand(n_windows, -1, -1)
        h = ref["proj"](ref["qformer"](query_embeds=q, encoder_hidden_states=windows).last_hidden_state)
        if final_linear is not None:
            h = final_linear(h)
        out.append(h.reshape(-1, h.shape[-1]))
    return torch.stack(out)


def vs2_ref_embeds(ref, inp):
    """The public `sft_forward` embedding merge with the reference parts: token embeddings, then ViT features and
    Q-Former audio tokens masked-scattered into their placeholders in order."""
    qwen = ref["qwen"]
    ids = inp["input_ids"]
    embeds = qwen.model.language_model.embed_tokens(ids)
    if "pixel_values_videos" in inp:
        video = qwen.model.visual(inp["pixel_values_videos"], grid_thw=inp["video_grid_thw"]).pooler_output
        embeds = embeds.masked_scatter((ids == TOK["video"])[..., None], video)
    if "pixel_values" in inp:
        image = qwen.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"]).pooler_output
        embeds = embeds.masked_scatter((ids == TOK["image"])[..., None], image)
    if "audio_feature" in inp:
        audio = ref_window_qformer(ref, inp["audio_feature"], 25, 25).flatten(0, 1)
        embeds = embeds.masked_scatter((ids == TOK["audio"])[..., None], audio)
    return embeds


def vs2_ref_run(ref, embeds, positions, attention_mask=None, **kwargs):
    qwen = ref["qwen"]
    out = qwen.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask,
                                    **kwargs)
    return out, qwen.lm_head(out.last_hidden_state)


def o1_ref_embeds(ref, inp, front_rate=50.0):
    """The public `prepare_inputs_labels_for_multimodal` ('grid' newlines, pooling before the projector) with the
    reference parts, written as a loop over frames and rows."""
    lm = ref["lm"]
    ids = inp["input_ids"][0].tolist()
    text = lambda t: lm.model.embed_tokens(torch.tensor(t))  # noqa: E731
    if video_salmonn_o1.IMAGE_TOKEN_INDEX not in ids:
        return text(ids)[None]
    k = ids.index(video_salmonn_o1.IMAGE_TOKEN_INDEX)
    d = lm.config.hidden_size
    segments = ref_window_qformer(ref, inp["spectrogram"], 10, 10, ref["ln_speech"], ref["final_linear"])
    for j in range(segments.shape[0]):  # sinusoid of position j - 1 on segment j >= 1 (sin even, cos odd channels)
        if j:
            i = torch.arange(0, d, 2, dtype=torch.float64)
            angle = (j - 1) / 10000 ** (i / d)
            segments[j, :, 0::2] += torch.sin(angle).float()
            segments[j, :, 1::2] += torch.cos(angle).float()
    speech = segments.reshape(-1, d)
    if inp.get("images") is None:
        block = speech
    else:
        frames = inp["images"][0]
        hidden = ref["siglip"](frames, output_hidden_states=True).hidden_states[-2]  # last layer deleted
        side = int(math.isqrt(hidden.shape[1]))
        grid = hidden.view(frames.shape[0], side, side, -1).permute(0, 3, 1, 2)
        pooled = F.max_pool2d(grid, 2).permute(0, 2, 3, 1)  # [F, s', s', C]
        feats = ref["projector"](pooled)
        n_frames = frames.shape[0]
        front = speech[: round(inp["real_time"][0] * front_rate)]
        back = speech[len(front):]
        if len(front) % n_frames:
            size = len(front) + n_frames - len(front) % n_frames
            front = F.interpolate(front.T[None], size=size, mode="nearest")[0].T
        per = front.view(n_frames, -1, d)
        rows = []
        for f in range(n_frames):
            for r in range(feats.shape[1]):
                rows += [feats[f, r], ref["image_newline"][None]]
            rows.append(per[f])
        block = torch.cat(rows + [back])
    return torch.cat([text(ids[:k]), block, text(ids[k + 1:])])[None]


# ---------------------------------------------------------------------------------------------------- vS2+: decoder
VS2_CASES = ["text", "image", "video", "audio", "av"]


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("case", VS2_CASES)
def test_vs2_decoder_matches_qwen25vl_language_model(vs2, vs2_ref, case, mode):
    """Logits, block inputs, final norm and attention patterns vs transformers' Qwen2.5-VL LM on the same
    embeddings and 3-D position ids."""
    inputs = vs2.prepare_inputs(**vs2_inputs(case), position_mode=mode)
    with torch.no_grad():
        embeds = vs2.embed_inputs(inputs)
        out, ref_logits = vs2_ref_run(vs2_ref, embeds, inputs.position_ids, output_hidden_states=True,
                                      output_attentions=True)
        logits, cache = vs2.run_with_cache(inputs, names_filter=lambda n: n.endswith(("resid_pre", "hook_pattern"))
                                           or n.startswith("ln_final"))
    assert max_diff(logits, ref_logits) <= ATOL
    for layer in range(vs2.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], out.hidden_states[layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache["pattern", layer], out.attentions[layer], atol=ATOL, rtol=0)
    final = cache["ln_final.hook_normalized"] * vs2.ln_final.weight
    torch.testing.assert_close(final, out.last_hidden_state, atol=ATOL, rtol=0)


def test_vs2_greedy_generation_text_matches_transformers(vs2, vs2_ref):
    inp = vs2_inputs("text")
    with torch.no_grad():
        ref = vs2_ref["qwen"].generate(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                                       max_new_tokens=10, do_sample=False, eos_token_id=TOK["eos"],
                                       pad_token_id=TOK["pad"])
    out = vs2.generate(**inp, max_new_tokens=10)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("mode, grid", [("inference", (3, 4, 4)), ("training", (2, 4, 32))])
def test_vs2_greedy_generation_av_matches_cache_free_reference(vs2, vs2_ref, mode, grid):
    """Generated tokens continue from the largest prompt position + 1 (the public cached rope_deltas): a reference
    loop re-running transformers' LM on the growing sequence picks the same tokens. In the wide training case the
    largest position (a w index, 22) lies beyond the last token's (17), since text after the block restarts from
    the block's t-row maximum."""
    inp = vs2_inputs("av", grid=grid, segments=4 if grid[0] == 3 else 1)
    inputs = vs2.prepare_inputs(**inp, position_mode=mode)
    out = vs2.generate(inputs, max_new_tokens=8, eos_token_id=[])
    with torch.no_grad():
        embeds = vs2_ref_embeds(vs2_ref, inp)
        positions = inputs.position_ids
        nxt = int(positions.max()) + 1
        tokens = []
        for _ in range(8):
            _, logits = vs2_ref_run(vs2_ref, embeds, positions)
            token = logits[0, -1].argmax()
            tokens.append(int(token))
            embeds = torch.cat([embeds, vs2_ref["qwen"].model.language_model.embed_tokens(token.view(1, 1))], 1)
            positions = torch.cat([positions, torch.full((3, 1, 1), nxt)], -1)
            nxt += 1
    assert out.new_tokens[0].tolist() == tokens
    if mode == "training":
        assert int(inputs.position_ids.max()) == 22 and inputs.position_ids[0, 0, -1].item() == 17


# ---------------------------------------------------------------------------------------------------- vS2+: towers
@pytest.mark.parametrize("case", ["video", "image"])
def test_vs2_vision_tower_matches_transformers_vit(vs2, vs2_ref, case):
    inp = vs2_inputs(case)
    key, grid, tower = (("pixel_values_videos", "video_grid_thw", "video_tower") if case == "video"
                        else ("pixel_values", "image_grid_thw", "image_tower"))
    _, cache = vs2.run_with_cache(**inp, names_filter=lambda n: n.startswith(tower))
    with torch.no_grad():
        ref = vs2_ref["qwen"].model.visual(inp[key], grid_thw=inp[grid])
    assert max_diff(cache[f"{tower}.hook_out"], ref.pooler_output) <= ATOL
    last = vs2.hf_config.vision.depth - 1
    assert max_diff(cache[f"{tower}.blocks.{last}.hook_resid_post"], ref.last_hidden_state) <= ATOL  # window order


def test_vs2_audio_tower_matches_whisper_and_blip2_qformer(vs2, vs2_ref):
    inp = vs2_inputs("av")
    _, cache = vs2.run_with_cache(**inp, names_filter=lambda n: n.startswith("audio_tower"))
    with torch.no_grad():
        ref = ref_window_qformer(vs2_ref, inp["audio_feature"], 25, 25)
        frames = vs2_ref["whisper"](inp["audio_feature"]).last_hidden_state
    assert ref.shape == (4, 2, vs2.cfg.d_model)  # 4 one-second segments, two 0.5-s windows each
    assert max_diff(cache["audio_tower.hook_out"], ref.flatten(0, 1)) <= ATOL
    assert cache["audio_tower.hook_in"].shape == inp["audio_feature"].shape
    # the converted Q-Former is transformers' Blip2QFormerModel with the reference's weights, exactly
    ours, theirs = vs2.audio_encoder.qformer.state_dict(), vs2_ref["qformer"].state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    last = vs2.hf_config.whisper.encoder_layers - 1
    # the last Whisper layer's output, before the encoder's final LayerNorm
    torch.testing.assert_close(vs2_ref["whisper"].layer_norm(cache[f"audio_tower.blocks.{last}.hook_resid_post"]),
                               frames, atol=ATOL, rtol=0)


def test_window_qformer_with_two_queries_is_window_major():
    """Several queries per window: tokens ordered window by window, query by query (public `.view(B, -1, d)`)."""
    from model_zoo.salmonn_audio import WindowQFormerAudio, WindowSettings, qformer_config
    from model_zoo.tiny_video_salmonn import QFORMER, WHISPER
    from transformers import WhisperConfig

    torch.manual_seed(0)
    tower = WindowQFormerAudio(WhisperConfig(**WHISPER), qformer_config(QFORMER, 16), 24,
                               WindowSettings(0.3, 0.2, n_query=2)).eval()
    torch.nn.init.normal_(tower.query_tokens)
    mel = torch.randn(2, MEL, 100)
    with torch.no_grad():
        out = tower(mel)
        ref = ref_window_qformer(dict(whisper=tower.whisper, qformer=tower.qformer, query_tokens=tower.query_tokens,
                                      proj=tower.proj), mel, 15, 10)
    assert tower.windows_per_segment == 4 and out.shape == (2, 8, 24)  # (50 - 15) // 10 + 1 windows, 2 queries
    assert max_diff(out, ref) <= ATOL
    assert tower.token_times(10).tolist() == pytest.approx([0, 0, .2, .2, .4, .4, .6, .6, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------------- vS2+: assembly
def test_vs2_interleave_positions_and_modality_map_by_hand(vs2):
    """A constructed example: 6 text tokens, a video of 3 temporal grids (1 s each, 2x2 merged tokens per grid)
    with 4 s of audio (8 tokens at 2/s), 7 text tokens. Written out from the public dataset (split_into_groups)
    and get_rope_index (both branches)."""
    inp = vs2_inputs("av", grid=(3, 4, 4), spg=1.0, segments=4)
    V, A = TOK["video"], TOK["audio"]
    block = inp["input_ids"][0, 6:28].tolist()
    # audio after each frame pair: grids 0 and 1 take floor(2(g+1)) - floor(2g) = 2 tokens, the last the other 4
    assert block == [TOK["vision_start"]] + [V] * 4 + [A] * 2 + [V] * 4 + [A] * 2 + [V] * 4 + [A] * 4 \
        + [TOK["vision_end"]]
    inputs = vs2.prepare_inputs(**inp, position_mode="training")
    t, h, w = inputs.position_ids[:, 0].tolist()
    # training: video (floor(2g), h, w) + 7, audio k (k, 0, k) + 7; text after restarts at the t-row max + 1 = 15
    assert t == list(range(7)) + [7] * 4 + [7, 8] + [9] * 4 + [9, 10] + [11] * 4 + [11, 12, 13, 14] \
        + list(range(15, 23))
    assert h == list(range(7)) + [7, 7, 8, 8] + [7, 7] + [7, 7, 8, 8] + [7, 7] + [7, 7, 8, 8] + [7] * 4 \
        + list(range(15, 23))
    assert w == list(range(7)) + [7, 8, 7, 8] + [7, 8] + [7, 8, 7, 8] + [9, 10] + [7, 8, 7, 8] + [11, 12, 13, 14] \
        + list(range(15, 23))
    inputs = vs2.prepare_inputs(**inp, position_mode="inference")
    t, h, w = inputs.position_ids[:, 0].tolist()
    # inference (audio_lengths / second_per_grid_ts dropped): the 12 tokens after the first video token get the
    # grid positions in raster order (t = 2g + 7) whatever they are; everything after is text from 12
    grid_t = [7] * 4 + [9] * 4 + [11] * 4
    grid_hw = ([7, 7, 8, 8] * 3, [7, 8, 7, 8] * 3)
    assert t == list(range(7)) + grid_t + list(range(12, 28))
    assert h == list(range(7)) + grid_hw[0] + list(range(12, 28))
    assert w == list(range(7)) + grid_hw[1] + list(range(12, 28))
    assert inputs.next_position.item() == 28
    mm = inputs.modality_map
    assert mm.counts()["video"] == 12 and mm.counts()["audio"] == 8 and mm.counts()["special"] == 2
    audio = mm.positions("audio").tolist()
    assert audio == [11, 12, 17, 18, 23, 24, 25, 26]
    assert mm.time[0, audio].tolist() == pytest.approx([0, .5, 1, 1.5, 2, 2.5, 3, 3.5])
    video = mm.positions("video")
    assert mm.time[0, video].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert mm.grid[0, video[4:8]].tolist() == [[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    assert mm.chunk[0, audio].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (mm.item[0, audio] == 0).all() and (mm.item[0, video] == 0).all()


def test_vs2_audio_alone_positions_by_hand(vs2):
    """Audio alone: <|vision_start|> audio <|vision_end|>; training branch (k, k, 0), inference 1-D."""
    inp = vs2_inputs("audio", segments=2)
    inputs = vs2.prepare_inputs(**inp, position_mode="training")
    t, h, w = inputs.position_ids[:, 0].tolist()
    assert t == list(range(7)) + [7, 8, 9, 10] + list(range(11, 19))
    assert h == t and w == list(range(7)) + [7] * 4 + list(range(11, 19))
    inputs = vs2.prepare_inputs(**inp, position_mode="inference")
    assert inputs.position_ids[:, 0].tolist() == [list(range(19))] * 3


def test_vs2_uneven_grids(vs2):
    """0.75 s per grid: floor(1.5 (g+1)) - floor(1.5 g) = 1, 2, 1, ... audio tokens after grids 0, 1, 2."""
    assert video_salmonn2.audio_tokens_per_grid(4, 0.75, 8) == [1, 2, 1, 4]
    with pytest.raises(LayoutError, match="shorter than the video"):
        video_salmonn2.audio_tokens_per_grid(4, 1.5, 4)
    inp = vs2_inputs("av", grid=(4, 4, 4), spg=0.75, segments=4)
    mm = vs2.modality_map(**inp)
    assert mm.positions("audio").tolist() == [11, 16, 17, 22, 27, 28, 29, 30]


def test_vs2_full_forward_matches_reference_assembly(vs2, vs2_ref):
    """The whole model on an audio-visual prompt vs the reference parts merged as the public forward does, at the
    hand-derived training positions of the constructed example."""
    inp = vs2_inputs("av")
    inputs = vs2.prepare_inputs(**inp, position_mode="training")
    with torch.no_grad():
        _, ref = vs2_ref_run(vs2_ref, vs2_ref_embeds(vs2_ref, inp), inputs.position_ids)
        ours = vs2(inputs)
    assert max_diff(ours, ref) <= ATOL


def test_vs2_padded_batch(vs2):
    samples = [vs2_inputs("av", seed=1), vs2_inputs("text", seed=2), vs2_inputs("audio", seed=3, segments=2)]
    n = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.full((3, n), TOK["pad"])
    mask = torch.zeros(3, n, dtype=torch.long)
    for b, s in enumerate(samples):
        m = s["input_ids"].shape[1]
        ids[b, n - m:], mask[b, n - m:] = s["input_ids"][0], 1
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=samples[0]["pixel_values_videos"],
                 video_grid_thw=samples[0]["video_grid_thw"], second_per_grid_ts=samples[0]["second_per_grid_ts"],
                 audio_feature=torch.cat([samples[0]["audio_feature"], samples[2]["audio_feature"]]))
    for mode in ("inference", "training"):
        with torch.no_grad():
            out = vs2(**batch, position_mode=mode)
        for b in (0, 1):  # the audio-only row takes the audio-visual branch in a mixed batch, as upstream
            with torch.no_grad():
                single = vs2(**samples[b], position_mode=mode)[0]
            torch.testing.assert_close(out[b][mask[b].bool()], single, atol=ATOL, rtol=0)


def test_vs2_layout_errors(vs2):
    inp = vs2_inputs("av")
    ids = inp["input_ids"].clone()
    ids[0, 11], ids[0, 13] = ids[0, 13], ids[0, 11]  # an audio token before grid 1's video tokens
    with pytest.raises(LayoutError):
        vs2.prepare_inputs(**{**inp, "input_ids": ids})
    swapped = [TOK["bos"], TOK["vision_start"]] + [TOK["video"]] * 4 + [TOK["audio"]] * 3 + [TOK["video"]] * 8 \
        + [TOK["audio"]] * 5 + [TOK["vision_end"]]
    with pytest.raises(LayoutError, match=r"interleaves \[3, 0, 5\].*puts \[2, 2, 4\]"):
        vs2.prepare_inputs(**{**inp, "input_ids": torch.tensor([swapped]), "attention_mask": None})
    with pytest.raises(LayoutError, match="audio_lengths"):
        vs2.prepare_inputs(**{**inp, "audio_lengths": [6]})
    with pytest.raises(LayoutError, match="segments"):
        vs2.prepare_inputs(**{**inp, "audio_feature": inp["audio_feature"][:3]})
    with pytest.raises(ValueError, match="position_mode"):
        vs2.prepare_inputs(**inp, position_mode="train")
    with pytest.raises(TypeError, match="unexpected input"):
        vs2.prepare_inputs(**inp, input_features=inp["audio_feature"])


def test_vs2_hook_names(vs2):
    towers = {"audio_tower": 2, "video_tower": 2, "image_tower": 2}
    assert sorted(vs2.hook_dict) == sorted(hook_names.all_names(vs2.cfg.n_layers, towers))


# ---------------------------------------------------------------------------------------------------- o1: decoder
O1_CASES = ["text", "av", "audio"]


@pytest.mark.parametrize("case", O1_CASES)
def test_o1_decoder_matches_qwen2(o1, o1_ref, case):
    inputs = o1.prepare_inputs(**o1_inputs(case))
    with torch.no_grad():
        embeds = o1.embed_inputs(inputs)
        out = o1_ref["lm"].model(inputs_embeds=embeds, output_hidden_states=True, output_attentions=True)
        ref_logits = o1_ref["lm"].lm_head(out.last_hidden_state)
        logits, cache = o1.run_with_cache(inputs, names_filter=lambda n: n.endswith(("resid_pre", "hook_pattern"))
                                          or n.startswith("ln_final"))
    assert max_diff(logits, ref_logits) <= ATOL
    for layer in range(o1.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], out.hidden_states[layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache["pattern", layer], out.attentions[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"] * o1.ln_final.weight, out.last_hidden_state,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["text", "av"])
def test_o1_greedy_generation_matches_transformers(o1, o1_ref, case):
    """transformers' generate on the text ids / on the reference's spliced embeddings (as the public generate)."""
    inp = o1_inputs(case)
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=TOK["eos"], pad_token_id=TOK["pad"])
    with torch.no_grad():
        if case == "text":
            ref = o1_ref["lm"].generate(input_ids=inp["input_ids"], **kwargs)[:, inp["input_ids"].shape[1]:]
        else:
            embeds = o1_ref_embeds(o1_ref, inp)
            ref = o1_ref["lm"].generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                                                                      dtype=torch.long), **kwargs)
    out = o1.generate(**inp, max_new_tokens=10)
    assert out.new_tokens.shape == ref.shape and torch.equal(out.new_tokens, ref)


# ---------------------------------------------------------------------------------------------------- o1: towers
def test_o1_vision_tower_matches_siglip_minus_last_layer(o1, o1_ref):
    inp = o1_inputs("av")
    _, cache = o1.run_with_cache(**inp, names_filter=lambda n: n.startswith("video_tower"))
    frames = inp["images"][0]
    with torch.no_grad():
        hidden = o1_ref["siglip"](frames, output_hidden_states=True).hidden_states
        pooled = F.max_pool2d(hidden[-2].view(4, 5, 5, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        ref = o1_ref["projector"](pooled.reshape(4, 4, -1))
    kept = o1.hf_config.vision.num_hidden_layers
    assert kept == 2 and len(hidden) == 4  # embeddings + 3 released layers; the tower runs 2
    for layer in range(kept):
        assert max_diff(cache[f"video_tower.blocks.{layer}.hook_resid_post"], hidden[layer + 1]) <= ATOL
    assert max_diff(cache["video_tower.hook_out"], ref.flatten(0, 1)) <= ATOL


def test_o1_audio_tower_matches_whisper_blip2_qformer_and_offsets(o1, o1_ref):
    inp = o1_inputs("audio", segments=3)
    _, cache = o1.run_with_cache(**inp, names_filter=lambda n: n == "audio_tower.hook_out")
    with torch.no_grad():
        ref = o1_ref_embeds(o1_ref, inp)[0, 6:21]  # the spliced audio block of an audio-only prompt
    assert cache["audio_tower.hook_out"].shape == (15, o1.cfg.d_model)  # 3 segments x 5 windows of 0.2 s
    assert max_diff(cache["audio_tower.hook_out"], ref) <= ATOL
    table = video_salmonn_o1.segment_offsets(201, 8)
    assert table[0].abs().max() == 0 and table[1].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


# ---------------------------------------------------------------------------------------------------- o1: assembly
def test_o1_interleave_and_modality_map_by_hand(o1):
    """4 frames of 2x2 pooled tokens (70 px, 14-px patches: 5x5 max-pooled, floor) over 2.5 s, 3 one-second audio
    segments of 5 tokens: per frame 2 rows of (2 tokens + newline), then 4 audio tokens (15 interpolated to 16:
    token 0 twice); positions 0..n-1."""
    inputs = o1.prepare_inputs(**o1_inputs("av"))
    mm = inputs.modality_map
    kinds = [("t" if m == 0 else "v" if m == 2 else "a" if m == 1 else "n") for m in mm.modality[0].tolist()]
    frame = list("vvnvvn") + list("aaaa")
    assert "".join(kinds) == "t" * 6 + "".join(frame) * 4 + "t" * 7
    audio = mm.positions("audio")
    assert mm.meta["audio_source"][0, audio].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert mm.time[0, audio[:4]].tolist() == pytest.approx([0, 0, .2, .4])
    video = mm.positions("video")
    assert mm.grid[0, video[:4]].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert mm.time[0, video].unique().tolist() == pytest.approx([0, .625, 1.25, 1.875])
    assert mm.counts() == dict(text=13, audio=16, video=16, image=0, special=8, pad=0)
    assert inputs.position_ids.shape == (1, 1, 53) and inputs.position_ids[0, 0].tolist() == list(range(53))
    assert (inputs.input_ids[0, mm.mask("audio")[0]] == TOK["pad"]).all()  # no placeholder ids remain


def test_o1_audio_after_the_last_frame(o1, o1_ref):
    """When fewer than all audio tokens fall in round(real_time * rate), the rest follow the last frame; 10 front
    tokens over 4 frames interpolate to 12 (nearest: 0 0 1 2 3 4 5 5 6 7 8 9)."""
    settings = o1.settings
    o1.settings = video_salmonn_o1.O1Settings(**{**settings.__dict__, "audio_front_rate": 4.0})
    try:
        inputs = o1.prepare_inputs(**o1_inputs("av"))
    finally:
        o1.settings = settings
    source = inputs.modality_map.meta["audio_source"][0]
    audio = inputs.modality_map.positions("audio")
    assert source[audio].tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert audio[-5:].tolist() == list(range(audio[-5].item(), audio[-5].item() + 5))  # the back run is contiguous
    with torch.no_grad():
        ref = o1_ref_embeds(o1_ref, o1_inputs("av"), front_rate=4.0)
        o1.settings = video_salmonn_o1.O1Settings(**{**settings.__dict__, "audio_front_rate": 4.0})
        try:
            ours = o1.embed_inputs(o1.prepare_inputs(**o1_inputs("av")))
        finally:
            o1.settings = settings
    assert max_diff(ours, ref) <= ATOL


def test_o1_full_forward_matches_reference_assembly(o1, o1_ref):
    for case in ("av", "audio"):
        inp = o1_inputs(case)
        with torch.no_grad():
            ref = o1_ref["lm"](inputs_embeds=o1_ref_embeds(o1_ref, inp)).logits
            ours = o1(**inp)
        assert max_diff(ours, ref) <= ATOL, case


def test_o1_padded_batch(o1):
    samples = [o1_inputs("av", seed=1), o1_inputs("text", seed=2), o1_inputs("audio", seed=3, segments=2)]
    n = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.full((3, n), TOK["pad"])
    mask = torch.zeros(3, n, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : s["input_ids"].shape[1]], mask[b, : s["input_ids"].shape[1]] = s["input_ids"][0], 1  # right-padded
    batch = dict(input_ids=ids, attention_mask=mask, images=[samples[0]["images"][0], None, None],
                 spectrogram=torch.cat([samples[0]["spectrogram"], samples[2]["spectrogram"]]), org_groups=[3, 0, 2],
                 real_time=[2.5, None, None], modalities=["audio-video", "audio", "audio"])
    inputs = o1.prepare_inputs(**batch)
    with torch.no_grad():
        out = o1(inputs)
        for b, s in enumerate(samples):
            single = o1(**s)[0]
            torch.testing.assert_close(out[b][inputs.attention_mask[b].bool()], single, atol=ATOL, rtol=0)
    gen = o1.generate(inputs, max_new_tokens=4, eos_token_id=[])
    for b, s in enumerate(samples):
        assert gen.new_tokens[b].tolist() == o1.generate(**s, max_new_tokens=4, eos_token_id=[]).new_tokens[0].tolist()


def test_o1_layout_errors(o1):
    inp = o1_inputs("av")
    ids = torch.cat([inp["input_ids"], torch.tensor([[video_salmonn_o1.IMAGE_TOKEN_INDEX]])], 1)
    with pytest.raises(LayoutError, match="more than one <image>"):
        o1.prepare_inputs(**{**inp, "input_ids": ids, "attention_mask": None})
    with pytest.raises(LayoutError, match="at least 2 frames"):
        o1.prepare_inputs(**{**inp, "images": [inp["images"][0][:1]]})
    with pytest.raises(LayoutError, match="real_time"):
        o1.prepare_inputs(**{**inp, "real_time": None})
    with pytest.raises(LayoutError, match="org_groups"):
        o1(**{**inp, "org_groups": [2]})  # 2 segments claimed, 3 given
    with pytest.raises(ValueError, match=r"frames must be \[frames, 3, 70, 70\]"):
        o1(**{**inp, "images": [torch.randn(4, 3, 64, 64)]})
    with pytest.raises(ValueError, match="only 'grid'"):
        video_salmonn_o1.O1Settings(newline_position="frame")


def test_o1_hook_names(o1):
    assert sorted(o1.hook_dict) == sorted(hook_names.all_names(o1.cfg.n_layers, {"audio_tower": 2, "video_tower": 2}))


# ---------------------------------------------------------------------------------------------------- loading
def test_o1_encoders_from_their_own_releases(o1_ref, tmp_path):
    """A checkpoint whose config leaves the vision tower untrained (the public tower then loads google's SigLIP)
    and without the Whisper encoder: a clear error, then the encoders from their own releases' layouts."""
    config = dict(o1_ref["config"], unfreeze_mm_vision_tower=False)
    main = save_checkpoint(tmp_path / "main", config, o1_released_state(o1_ref, with_whisper=False))
    with pytest.raises(CheckpointError, match="vision_checkpoint=.*whisper_checkpoint="):
        HookedAVModel.from_pretrained("video-salmonn-o1-tiny", checkpoint=main)
    siglip = {f"vision_model.{k}": v for k, v in o1_ref["siglip"].state_dict().items()}  # all 3 layers + post-LN
    siglip["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 16)
    siglip["logit_scale"] = torch.zeros(1)
    save_checkpoint(tmp_path / "siglip", {"model_type": "siglip"}, siglip)
    whisper = {f"model.encoder.{k}": v for k, v in o1_ref["whisper"].state_dict().items()}
    whisper["model.decoder.embed_tokens.weight"] = torch.zeros(4, 16)
    whisper["proj_out.weight"] = torch.zeros(4, 16)
    save_checkpoint(tmp_path / "whisper", {"model_type": "whisper"}, whisper)
    model = HookedAVModel.from_pretrained("video-salmonn-o1-tiny", checkpoint=main,
                                          vision_checkpoint=tmp_path / "siglip", whisper_checkpoint=tmp_path / "whisper")
    inp = o1_inputs("av")
    with torch.no_grad():
        assert max_diff(model(**inp), o1_ref["lm"](inputs_embeds=o1_ref_embeds(o1_ref, inp)).logits) <= ATOL
    with pytest.raises(TypeError, match="unknown loading option"):
        HookedAVModel.from_pretrained("video-salmonn-o1-tiny", checkpoint=main, vision_ckpt=tmp_path)


@pytest.mark.parametrize("family", ["vs2", "o1"])
def test_save_pretrained_round_trips(family, vs2, o1, tmp_path):
    model = vs2 if family == "vs2" else o1
    model.save_pretrained(str(tmp_path))
    again = HookedAVModel.from_pretrained(str(tmp_path))
    ours, theirs = model.state_dict(), again.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    inp = vs2_inputs("av") if family == "vs2" else o1_inputs("av")
    with torch.no_grad():
        assert max_diff(model(**inp), again(**inp)) == 0


def test_from_in_memory_public_models(vs2_ref, o1_ref, vs2, o1):
    """An in-memory model of the public code (by class name, `config.to_dict()` and `state_dict()`)."""

    def fake(name, config, state):
        class Config:
            def to_dict(self):
                return dict(config)

        module = type(name, (torch.nn.Module,), {"state_dict": lambda self, *a, **k: state})()
        module.config = Config()
        module.register_parameter("anchor", torch.nn.Parameter(torch.zeros(1)))
        return module

    for ref_model, state, config, name in (
            (vs2, vs2_released_state(vs2_ref), vs2_ref["config"], "video_SALMONN2_plus"),
            (o1, o1_released_state(o1_ref), o1_ref["config"], "videoSALMONNo1ForCausalLM")):
        converted = HookedAVModel.from_hf_model(fake(name, config, state))
        inp = vs2_inputs("av") if name.startswith("video_") else o1_inputs("av")
        with torch.no_grad():
            assert max_diff(converted(**inp), ref_model(**inp)) <= ATOL
    with pytest.raises(FamilyMismatchError, match=r"video-SALMONN 2\+.*video-SALMONN-o1"):
        video_salmonn2.from_hf_model(fake("videoSALMONNo1ForCausalLM", o1_ref["config"], {}))


def test_other_family_checkpoints_are_refused_naming_both(vs2_ckpt, o1_ckpt, model, tmp_path):
    """`model` is the tiny Qwen2.5-Omni of conftest.py."""
    model.save_pretrained(str(tmp_path / "q25"))
    with pytest.raises(CheckpointError, match=r"video-SALMONN 2\+ model.*Qwen2\.5-Omni checkpoint"):
        HookedAVModel.from_pretrained("video-salmonn2plus-7b", checkpoint=tmp_path / "q25")
    with pytest.raises(CheckpointError, match=r"video-SALMONN-o1 model.*video-SALMONN 2\+ checkpoint"):
        HookedAVModel.from_pretrained("video-salmonn-o1-7b", checkpoint=vs2_ckpt)
    with pytest.raises(CheckpointError, match=r"video-SALMONN 2\+ model.*video-SALMONN-o1 checkpoint"):
        HookedAVModel.from_pretrained("video-salmonn2plus-3b", checkpoint=o1_ckpt)
    with pytest.raises(CheckpointError, match=r"Qwen2\.5-Omni model.*video-SALMONN 2\+ checkpoint"):
        HookedAVModel.from_pretrained("qwen2.5-omni-7b", checkpoint=vs2_ckpt)
    config = json.loads((vs2_ckpt / "config.json").read_text())
    plain = save_checkpoint(tmp_path / "qwen25vl", {k: v for k, v in config.items() if k != "audio_config"}, {})
    with pytest.raises(CheckpointError, match=r"video-SALMONN 2\+ model.*Qwen2\.5-VL checkpoint.*without the "
                                              r"audio_config"):
        HookedAVModel.from_pretrained("video-salmonn2plus-7b", checkpoint=plain)
    with pytest.raises(CheckpointError, match="does not match preset 'video-salmonn2plus-7b'"):
        HookedAVModel.from_pretrained("video-salmonn2plus-7b", checkpoint=vs2_ckpt)
    with pytest.raises(FamilyMismatchError, match=r"video-SALMONN-o1 config.*Qwen2\.5-VL config"):
        video_salmonn_o1.parse_config({"model_type": "qwen2_5_vl"})


def test_presets_match_the_released_shapes():
    """7B / 3B presets against the configs they are built from (Qwen2.5-VL-7B/3B text, public audio defaults),
    built on the meta device; sink constants are uncalibrated with provenance."""
    from accelerate import init_empty_weights

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)
    released = dict(model_type="qwen2_5_vl", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                    rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    tie_word_embeddings=False, vision_config=vision, audio_config={})
    cfg = video_salmonn2.config_from_hf(released)
    for key, value in video_salmonn2.PRESETS["video-salmonn2plus-7b"].items():
        if key != "sinks":
            assert getattr(cfg, key) == value, key
    with init_empty_weights(include_buffers=False):
        big = video_salmonn2.build(released)
    assert big.audio_encoder.tokens_per_segment == 60  # 2 tokens/s over 30 s
    assert big.audio_encoder.qformer.config.hidden_size == 3072  # the public code's BertConfig defaults
    o1_cfg = dict(model_type="videosalmonno1", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, mm_hidden_size=1152,
                  max_position_embeddings=32768, rope_theta=1e6)
    cfg = video_salmonn_o1.config_from_hf(o1_cfg)
    for key, value in video_salmonn_o1.PRESETS["video-salmonn-o1-7b"].items():
        if key != "sinks":
            assert getattr(cfg, key) == value, key
    with init_empty_weights(include_buffers=False):
        big = video_salmonn_o1.build(o1_cfg)
    assert big.audio_encoder.tokens_per_segment == 150 and big.pooled_side == 13  # 5/s; 27 -> 13 per side
    assert len(big.vision_encoder.encoder.layers) == 26
    for preset in (video_salmonn2.PRESETS, video_salmonn_o1.PRESETS):
        for p in preset.values():
            assert not p["sinks"].calibrated and p["sinks"].tau is None and p["sinks"].provenance
    assert video_salmonn2.PRESETS["video-salmonn2plus-7b"]["sinks"].dims == (458, 2570)
    assert video_salmonn2.PRESETS["video-salmonn2plus-3b"]["sinks"].dims == ()
