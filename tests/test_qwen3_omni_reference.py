"""Qwen3-Omni thinker against transformers' Qwen3OmniMoeThinkerForConditionalGeneration, tiny random configs, float32.

Covers logits, per-layer residual streams (block inputs, including the DeepStack additions, and block outputs),
attention patterns, router logits, DeepStack writes, 3-D position ids, greedy generation, padded batches, weight
conversion from the released checkpoint layout, and errors for checkpoints of another family.
"""

import json

import pytest
import torch

from hooked_av import HookedAVModel, hook_names
from hooked_av.checkpoint import CheckpointError
from hooked_av.inputs import LayoutError
from model_zoo import qwen3_omni
from model_zoo.families import FamilyMismatchError
from model_zoo.tiny_qwen3_omni import TOK, build_inputs, collate, tiny_hf_thinker

ATOL = 1e-5
CASES = {
    "text": dict(kind="text"),
    "audio": dict(kind="audio", frames=230),  # 2.3 s: two full 1-s chunks and a tail, two attention windows
    "image": dict(kind="image", grid=(1, 6, 8)),
    "video": dict(kind="video", grid=(3, 4, 6)),
    # 4 fps: video temporal positions 0, 6.5, 13, ... (fractional)
    "video_quarter_second": dict(kind="video", grid=(3, 4, 6), spg=0.5),
    # 7.3 s of audio against 5 s of video, merged token by token by time
    "av_audio_longer": dict(kind="av", grid=(5, 4, 4), frames=730),
    # video longer than audio, half-second grids
    "av_video_longer": dict(kind="av", grid=(8, 4, 4), spg=0.5, frames=190),
    # one wide grid and 4 audio tokens: the block's largest position (w = 15) lies beyond the audio leftover that
    # sets the next start, so the text after it and the generated tokens sit below the maximum position
    "av_wide_video_short_audio": dict(kind="av", grid=(1, 32, 32), frames=30),
    # an image and a video in one prompt: DeepStack's joint image/video features
    "image_video": dict(kind="image_video", grid=(1, 4, 6), video_grid=(2, 4, 4)),
}


@pytest.fixture(scope="module")
def hf3():
    return tiny_hf_thinker(seed=0, attn="eager")


@pytest.fixture(scope="module")
def model3(hf3):
    return HookedAVModel.from_hf_model(hf3)


def hf_positions(hf, inp):
    fam = inp.get("feature_attention_mask")
    return hf.model.get_rope_index(
        inp["input_ids"], inp.get("image_grid_thw"), inp.get("video_grid_thw"), inp["attention_mask"],
        inp.get("use_audio_in_video", False), None if fam is None else fam.sum(-1), inp.get("video_second_per_grid"),
    )[0]


def hf_run(hf, inp, **kwargs):
    """transformers' forward, with the input of every decoder layer captured (hidden_states holds the outputs)."""
    layer_inputs = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, i=i: layer_inputs.__setitem__(i, args[0].clone()))
               for i, layer in enumerate(hf.model.language_model.layers)]
    try:
        with torch.no_grad():
            out = hf(**inp, output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, layer_inputs


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_residual_stream_and_positions_match(hf3, model3, case):
    inp = build_inputs(**CASES[case])
    ref, ref_inputs = hf_run(hf3, inp)
    logits, cache = model3.run_with_cache(
        **inp, names_filter=lambda n: n.endswith(("resid_pre", "resid_post", "deepstack")) or n.startswith("ln_final"))
    assert logits.shape == ref.logits.shape
    assert max_diff(logits, ref.logits) <= ATOL
    n_layers = model3.cfg.n_layers
    for layer in range(n_layers):
        # block inputs: transformers' layer inputs (after the DeepStack addition of the layer before)
        torch.testing.assert_close(cache["resid_pre", layer], ref_inputs[layer], atol=ATOL, rtol=0)
    for layer in range(n_layers - 1):
        # transformers' hidden_states[l + 1] is block l's output before the DeepStack addition: our resid_post
        torch.testing.assert_close(cache["resid_post", layer], ref.hidden_states[layer + 1], atol=ATOL, rtol=0)
    final = cache["ln_final.hook_normalized"] * model3.ln_final.weight
    torch.testing.assert_close(final, ref.hidden_states[-1], atol=ATOL, rtol=0)
    positions = model3.prepare_inputs(**inp).position_ids
    assert positions.dtype == torch.float32
    assert torch.equal(positions, hf_positions(hf3, inp))
    has_vision = any(k in inp for k in ("pixel_values", "pixel_values_videos"))
    for layer in model3.cfg.deepstack_layers:
        assert (hook_names.deepstack(layer) in cache) == has_vision
        if has_vision:
            torch.testing.assert_close(cache["resid_pre", layer + 1],
                                       cache["resid_post", layer] + cache[hook_names.deepstack(layer)])


def test_fractional_positions_and_last_piece_rule(model3):
    pos = model3.prepare_inputs(**build_inputs(**CASES["video_quarter_second"])).position_ids
    assert (pos.frac() != 0).any()  # 6.5 positions per half-second grid
    inp = model3.prepare_inputs(**build_inputs(**CASES["av_wide_video_short_audio"]))
    assert inp.next_position.item() < inp.position_ids.max().item() + 1


def test_router_logits_equal_transformers(hf3, model3):
    inp = build_inputs(**CASES["av_audio_longer"])
    with torch.no_grad():
        ref = hf3(**inp, output_router_logits=True)
    _, cache = model3.run_with_cache(**inp, names_filter=lambda n: n.endswith("hook_router_logits"))
    moe_layers = model3.cfg.moe_layers
    assert moe_layers == (0, 2) and len(ref.router_logits) == len(moe_layers)
    for ref_logits, layer in zip(ref.router_logits, moe_layers):
        ours = cache[hook_names.router_logits(layer)]
        assert ours.shape == (*inp["input_ids"].shape, model3.cfg.n_experts)
        torch.testing.assert_close(ours.reshape(-1, model3.cfg.n_experts), ref_logits, atol=ATOL, rtol=0)


def test_deepstack_writes_equal_transformers_features(hf3, model3):
    inp = build_inputs(**CASES["image"])
    with torch.no_grad():
        feats = hf3.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).deepstack_features
    _, cache = model3.run_with_cache(**inp, names_filter=lambda n: n.endswith("hook_deepstack"))
    mask = inp["input_ids"][0] == TOK["image"]
    for k, layer in enumerate(model3.cfg.deepstack_layers):
        write = cache[hook_names.deepstack(layer)][0]
        torch.testing.assert_close(write[mask], torch.cat(feats[k]), atol=ATOL, rtol=0)
        assert write[~mask].abs().max() == 0


@pytest.mark.parametrize("case", ["av_audio_longer", "image_video"])
def test_patterns_equal_eager_attentions(hf3, model3, case):
    inp = build_inputs(**CASES[case])
    with torch.no_grad():
        ref = hf3(**inp, output_attentions=True)
    _, cache = model3.run_with_cache(**inp, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model3.cfg.n_layers):
        assert cache["pattern", layer].shape == ref.attentions[layer].shape
        torch.testing.assert_close(cache["pattern", layer], ref.attentions[layer], atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_of_two(hf3, model3, padding_side):
    samples = [build_inputs(**CASES["av_audio_longer"], seed=1), build_inputs(kind="image", seed=2)]
    inp = collate(samples, padding_side=padding_side)
    with torch.no_grad():
        ref = hf3(**inp)
        ours = model3(**inp)
    valid = inp["attention_mask"].bool()
    assert max_diff(ours[valid], ref.logits[valid]) <= ATOL
    assert torch.equal(model3.prepare_inputs(**inp).position_ids, hf_positions(hf3, inp))
    for b, sample in enumerate(samples):
        with torch.no_grad():
            single = model3(**sample)[0]
        torch.testing.assert_close(ours[b][valid[b]], single, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["text", "image", "av_audio_longer", "av_wide_video_short_audio"])
def test_greedy_generation_is_token_identical(hf3, model3, case):
    inp = build_inputs(**CASES[case])
    with torch.no_grad():
        ref = hf3.generate(**inp, max_new_tokens=10, do_sample=False, eos_token_id=TOK["eos"],
                           pad_token_id=TOK["pad"])
    out = model3.generate(**inp, max_new_tokens=10)
    assert out.sequences.shape == ref.shape
    assert torch.equal(out.sequences, ref)


def test_generation_padded_batch(hf3, model3):
    inp = collate([build_inputs(**CASES["av_video_longer"], seed=1), build_inputs(kind="text", seed=3)])
    with torch.no_grad():
        ref = hf3.generate(**inp, max_new_tokens=8, do_sample=False, eos_token_id=TOK["eos"],
                           pad_token_id=TOK["pad"])
    out = model3.generate(**inp, max_new_tokens=8)
    assert torch.equal(out.sequences, ref)


def test_generation_logits_match_forward(model3):
    """KV-cached steps (no DeepStack writes: they belong to the prompt) equal a full forward over the sequence."""
    inp = build_inputs(**CASES["image_video"])
    out = model3.generate(**inp, max_new_tokens=5, eos_token_id=[])
    full = dict(inp, input_ids=out.sequences[:, :-1], attention_mask=torch.ones_like(out.sequences[:, :-1]))
    with torch.no_grad():
        logits = model3(**full)
    steps = logits[0, inp["input_ids"].shape[1] - 1:]
    torch.testing.assert_close(out.logits[:, 0], steps, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- hooks
def test_hook_names(model3):
    cfg = model3.cfg
    towers = {"audio_tower": 2, "video_tower": 3, "image_tower": 3}
    expected = hook_names.all_names(cfg.n_layers, towers, qk_norm=True, moe_layers=cfg.moe_layers,
                                    deepstack_layers=cfg.deepstack_layers)
    assert sorted(model3.hook_dict) == sorted(expected)
    names = set(model3.hook_dict)
    assert "blocks.0.mlp.hook_router_logits" in names and "blocks.0.mlp.hook_pre" not in names
    assert "blocks.1.mlp.hook_pre" in names and "blocks.1.mlp.hook_router_logits" not in names  # dense layer
    assert "blocks.1.hook_deepstack" in names and "blocks.2.hook_deepstack" not in names
    assert "blocks.0.attn.q_norm.hook_normalized" in names
    assert hook_names.block(2, "expert_out") == "blocks.2.mlp.hook_expert_out"


def test_expert_hooks_compose_the_mlp_output(model3):
    inp = build_inputs(**CASES["audio"])
    layer = 2
    site = lambda s: f"blocks.{layer}.mlp.{s}"  # noqa: E731
    logits_plain = model3(**inp)
    logits, cache = model3.run_with_cache(**inp, names_filter=lambda n: n.startswith(f"blocks.{layer}.")
                                          and not n.endswith(("pattern", "attn_scores")))
    torch.testing.assert_close(logits, logits_plain, atol=1e-6, rtol=0)  # computing hook_expert_out changes nothing
    out, w = cache[site("hook_expert_out")], cache[site("hook_expert_weights")]
    assert out.shape == (*inp["input_ids"].shape, model3.cfg.n_experts_per_tok, model3.cfg.d_model)
    torch.testing.assert_close((out * w[..., None]).sum(-2), cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-6, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))  # norm_topk_prob

    def keep_first_slot(weights, hook):
        return torch.stack([weights[..., 0], torch.zeros_like(weights[..., 1])], dim=-1)

    with model3.hooks(fwd_hooks=[(site("hook_expert_weights"), keep_first_slot)]):
        _, ablated = model3.run_with_cache(**inp, names_filter=[f"blocks.{layer}.hook_mlp_out"])
    torch.testing.assert_close(ablated[f"blocks.{layer}.hook_mlp_out"], out[..., 0, :] * w[..., :1], atol=1e-6,
                               rtol=0)


def test_towers_once_then_decode_matches_forward(model3):
    """The patching recipes' pattern: towers once, decoder on repeated copies (DeepStack writes travel along)."""
    inp = model3.as_inputs(build_inputs(**CASES["image_video"]))
    with torch.no_grad():
        full = model3(inp, return_type="last_logits")
        embeds = model3.embed_inputs(inp)
        rep = model3.decode(inp.repeat(2), embeds.expand(2, -1, -1), return_type="last_logits")
    torch.testing.assert_close(rep, full.expand(2, -1), atol=ATOL, rtol=0)
    bare = model3.as_inputs(build_inputs(**CASES["image_video"]))
    with pytest.raises(LayoutError, match="DeepStack"):
        model3.decode(bare, embeds)


def test_layout_errors(model3):
    inp = build_inputs(**CASES["av_audio_longer"])
    with pytest.raises(LayoutError, match="use_audio_in_video is False"):
        model3.prepare_inputs(**{**inp, "use_audio_in_video": False})
    short = dict(inp, feature_attention_mask=inp["feature_attention_mask"].clone())
    short["feature_attention_mask"][0, -100:] = 0  # 100 fewer mel frames -> 13 fewer audio tokens
    with pytest.raises(LayoutError, match=r"audio-in-video block 0.*expects 82 audio \+ 20 video.*holds 95 audio"):
        model3.prepare_inputs(**short)
    with pytest.raises(LayoutError, match="num_audio_tokens"):
        model3.prepare_inputs(**inp, num_audio_tokens=torch.tensor([3]))


def test_modality_map(model3):
    mm = model3.modality_map(**build_inputs(**CASES["av_audio_longer"]))
    counts = mm.counts()
    assert counts["audio"] == 95 and counts["video"] == 20 and counts["special"] == 4
    audio_time = mm.time[0, mm.positions("audio")]
    assert audio_time[:3].tolist() == pytest.approx([0.0, 0.08, 0.16]) and audio_time[13].item() == pytest.approx(1.0)
    assert mm.time[0, mm.positions("video")].unique().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert mm.n_chunks() == 4  # 2-s time bins over 7.3 s
    # video grid 1 (t = 13 positions) comes right after audio token 12 (the per-token interleave)
    video = mm.positions("video")
    assert int((mm.modality[0, : video[4]] == 1).sum()) == 13


# ---------------------------------------------------------------------------------------------------- checkpoints
def _logits_equal(model, hf, case="image_video"):
    inp = build_inputs(**CASES[case])
    with torch.no_grad():
        return max_diff(model(**inp), hf(**inp).logits)


def test_load_transformers_saved_checkpoint(hf3, tmp_path):
    hf3.save_pretrained(tmp_path)  # thinker-only keys, per-expert weights
    model = HookedAVModel.from_pretrained("qwen3-omni-tiny", checkpoint=tmp_path)
    assert model.cfg.model_family == "qwen3_omni" and not model.cfg.sinks.calibrated
    assert _logits_equal(model, hf3) <= ATOL


def test_load_released_layout_with_talker(hf3, tmp_path):
    """The released repo layout: full Qwen3OmniMoeConfig, `thinker.`-prefixed keys, talker/code2wav weights."""
    from safetensors.torch import save_file
    from transformers import Qwen3OmniMoeConfig

    hf3.save_pretrained(tmp_path / "thinker")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "thinker" / "model.safetensors"), "pt") as f:
        state = {f"thinker.{k}": f.get_tensor(k) for k in f.keys()}
    state["talker.model.norm.weight"] = torch.ones(4)
    state["code2wav.pre_transformer.norm.weight"] = torch.ones(4)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    root = tmp_path / "full"
    root.mkdir()
    for fname, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(root / fname))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    full = Qwen3OmniMoeConfig(thinker_config=hf3.config.to_dict())
    (root / "config.json").write_text(full.to_json_string())
    model = HookedAVModel.from_pretrained(str(root))
    assert _logits_equal(model, hf3) <= ATOL


def test_save_pretrained_round_trips_through_transformers(hf3, model3, tmp_path):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    model3.save_pretrained(str(tmp_path))
    reloaded = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ref_state, state = hf3.state_dict(), reloaded.state_dict()
    assert sorted(state) == sorted(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)  # weights round-trip exactly
    ours = HookedAVModel.from_pretrained(str(tmp_path))
    assert _logits_equal(ours, hf3) <= ATOL


def test_other_family_checkpoints_are_refused_naming_both(hf_thinker, model, hf3, model3, tmp_path):
    """`hf_thinker` / `model` are the tiny Qwen2.5-Omni pair of conftest.py."""
    model.save_pretrained(str(tmp_path / "q25"))
    hf3.save_pretrained(tmp_path / "q3")
    with pytest.raises(CheckpointError, match=r"Qwen3-Omni model.*Qwen2\.5-Omni checkpoint"):
        HookedAVModel.from_pretrained("qwen3-omni-30b-a3b", checkpoint=tmp_path / "q25")
    with pytest.raises(CheckpointError, match=r"Qwen2\.5-Omni model.*Qwen3-Omni checkpoint"):
        HookedAVModel.from_pretrained("qwen2.5-omni-7b", checkpoint=tmp_path / "q3")
    with pytest.raises(CheckpointError, match="does not match preset 'qwen3-omni-30b-a3b'"):
        HookedAVModel.from_pretrained("qwen3-omni-30b-a3b", checkpoint=tmp_path / "q3")
    with pytest.raises(FamilyMismatchError, match=r"Qwen3-Omni.*Qwen2\.5-Omni"):
        qwen3_omni.from_hf_model(hf_thinker)
    with pytest.raises(FamilyMismatchError, match=r"Qwen3-Omni config.*Qwen2\.5-Omni config"):
        qwen3_omni.config_from_hf(hf_thinker.config)
    with pytest.raises(TypeError, match=r"Qwen2_5OmniThinkerForConditionalGeneration.*Qwen3OmniMoe"):
        from model_zoo import qwen2_5_omni

        qwen2_5_omni.from_hf_model(hf3)


def test_30b_preset_matches_the_released_config():
    """The preset equals the conversion of the released thinker config (MODELS.md 2.2); shapes on the meta device."""
    from accelerate import init_empty_weights
    from transformers import Qwen3OmniMoeThinkerConfig

    released = Qwen3OmniMoeThinkerConfig(
        text_config=dict(num_hidden_layers=48, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                         head_dim=128, vocab_size=152064, max_position_embeddings=65536, num_experts=128,
                         num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, intermediate_size=768,
                         decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, attention_bias=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[24, 20, 20],
                                              interleaved=True)),
        vision_config=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, patch_size=16,
                           out_hidden_size=2048, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        audio_config=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          output_dim=2048, n_window=50, n_window_infer=800, downsample_hidden_size=480),
        audio_token_id=151675, image_token_id=151655, video_token_id=151656, audio_start_token_id=151669,
        audio_end_token_id=151670, vision_start_token_id=151652, vision_end_token_id=151653,
        position_id_per_seconds=13,
    )
    cfg = qwen3_omni.config_from_hf(released)
    preset = qwen3_omni.PRESETS["qwen3-omni-30b-a3b"]
    for key, value in preset.items():
        if key != "sinks":
            assert getattr(cfg, key) == value, key
    assert cfg.token_ids.audio == 151675 and cfg.moe_layers == tuple(range(48))
    with init_empty_weights(include_buffers=False):
        big = qwen3_omni.build(released)
    assert big.blocks[0].mlp.experts.gate_up_proj.shape == (128, 1536, 2048)
    assert big.blocks[47].attn.q_proj.weight.shape == (4096, 2048)
    decoder = sum(p.numel() for n, p in big.named_parameters() if not n.startswith(("audio_", "vision_")))
    assert 29e9 < decoder < 31.5e9  # "30B-A3B"
    sinks = preset["sinks"]
    assert not sinks.calibrated and sinks.dims == () and "not calibrated" in sinks.provenance
