"""The TransformerLens surface: hook names, run_with_cache, run_with_hooks, hooks(), patching, attention paths."""

import pytest
import torch
from transformer_lens import ActivationCache

from hooked_av import AVInputs, hook_names
from hooked_av.hook_names import UnknownHookNameError
from model_zoo.tiny import build_inputs

AV = dict(kind="av", grid=(5, 4, 4), frames=730)


@pytest.fixture(scope="module")
def inputs():
    return build_inputs(**AV)


def test_hook_names_are_generated_and_complete(model):
    towers = {"audio_tower": 2, "video_tower": 2, "image_tower": 2}
    assert sorted(model.hook_dict) == sorted(hook_names.all_names(model.cfg.n_layers, towers))
    assert hook_names.pattern(1) == "blocks.1.attn.hook_pattern"
    assert hook_names.act_name("resid_pre", 2) == "blocks.2.hook_resid_pre"
    assert hook_names.tower("audio_tower", "hook_resid_post", 1) == "audio_tower.blocks.1.hook_resid_post"


def test_unknown_hook_name_lists_closest(model, inputs):
    with pytest.raises(UnknownHookNameError, match=r"blocks\.1\.hook_resid_pre"):
        model.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.hook_resid_pree", lambda t, hook: None)])
    with pytest.raises(UnknownHookNameError, match=r"blocks\.0\.attn\.hook_pattern"):
        model.run_with_cache(**inputs, names_filter=["blocks.0.attn.hook_patern"])
    with pytest.raises(UnknownHookNameError, match="closest|Closest"):
        model.add_hook("blocks.0.hook_sinks", lambda t, hook: None)
    with pytest.raises(UnknownHookNameError):
        hook_names.block(0, "patern")
    assert not any(hp.has_hooks() for hp in model.hook_points())


def test_run_with_cache_returns_activation_cache(model, inputs):
    logits, cache = model.run_with_cache(**inputs)
    assert isinstance(cache, ActivationCache)
    b, t = inputs["input_ids"].shape
    cfg = model.cfg
    assert cache["resid_pre", 2].shape == (b, t, cfg.d_model)
    assert cache["pattern", 0].shape == (b, cfg.n_heads, t, t)
    assert cache["blocks.1.attn.hook_k"].shape == (b, t, cfg.n_key_value_heads, cfg.d_head)
    assert cache["hook_embed"].shape == (b, t, cfg.d_model)
    n_audio = int((inputs["input_ids"] == model.cfg.token_ids.audio).sum())
    assert cache["audio_tower.hook_out"].shape == (n_audio, cfg.d_model)
    assert cache["audio_tower.blocks.1.hook_resid_post"].ndim == 2
    assert cache["video_tower.hook_in"].shape == inputs["pixel_values_videos"].shape
    assert "image_tower.hook_out" not in cache  # no image in this input
    # the residual stream adds up
    torch.testing.assert_close(cache["resid_mid", 1], cache["resid_pre", 1] + cache["attn_out", 1])
    torch.testing.assert_close(cache["resid_post", 1], cache["resid_pre", 2])
    # pattern rows sum to one over valid keys, and nothing attends to the future
    p = cache["pattern", 1]
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    assert p.triu(diagonal=1).abs().max() == 0
    # audio embeddings from the tower sit at the audio placeholder positions
    mask = inputs["input_ids"] == model.cfg.token_ids.audio
    torch.testing.assert_close(cache["hook_embed"][mask], cache["audio_tower.hook_out"])


def test_names_filter_forms(model, inputs):
    _, c1 = model.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_pre")
    _, c2 = model.run_with_cache(**inputs, names_filter=["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"])
    _, c3 = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_sink"))
    assert list(c1.keys()) == ["blocks.0.hook_resid_pre"]
    assert sorted(c2.keys()) == ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    assert len(c3.keys()) == model.cfg.n_layers


def test_run_with_hooks_and_hooks_context(model, inputs):
    with torch.no_grad():
        clean = model(**inputs)
        zero = [(hook_names.attn_out(1), lambda t, hook: torch.zeros_like(t))]
        ablated = model.run_with_hooks(**inputs, fwd_hooks=zero)
        assert (clean - ablated).abs().max() > 1e-3
        with model.hooks(fwd_hooks=zero):
            assert sum(hp.has_hooks() for hp in model.hook_points()) == 1
            in_context = model(**inputs)
        assert sum(hp.has_hooks() for hp in model.hook_points()) == 0
        torch.testing.assert_close(in_context, ablated)
        torch.testing.assert_close(model(**inputs), clean)


def test_hooks_fire_during_generation(model, inputs):
    calls = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: calls.append(t.shape[1]))]):
        out = model.generate(**inputs, max_new_tokens=4, eos_token_id=[])
    assert calls == [inputs["input_ids"].shape[1], 1, 1, 1]
    assert out.new_tokens.shape == (1, 4)


def test_transformer_lens_patching_over_explicit_positions(model, inputs):
    """transformer_lens.patching runs on the hooked model with AVInputs standing in for tokens."""
    import pandas as pd
    from transformer_lens import patching

    corrupted = dict(inputs, input_features=torch.zeros_like(inputs["input_features"]))
    clean_inputs, corrupt_inputs = model.prepare_inputs(**inputs), model.prepare_inputs(**corrupted)
    assert isinstance(corrupt_inputs, AVInputs) and corrupt_inputs.shape == inputs["input_ids"].shape
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_inputs)
    target = int(clean_logits[0, -1].argmax())

    def metric(logits):
        return logits[0, -1, target]

    audio_pos = model.modality_map(**inputs).positions("audio")[:3].tolist()
    index_df = pd.DataFrame([(layer, p) for layer in range(model.cfg.n_layers) for p in audio_pos],
                            columns=["layer", "pos"])
    result = patching.generic_activation_patch(
        model, corrupt_inputs, clean_cache, metric, patching.layer_pos_patch_setter, "resid_pre", index_df=index_df
    )
    values = (result if isinstance(result, torch.Tensor) else result.values()).flatten()
    # the same patches by hand
    for i, (layer, p) in enumerate(index_df.itertuples(index=False)):
        def restore(t, hook, p=p, layer=layer):
            t[:, p] = clean_cache["resid_pre", layer][:, p]
            return t

        with torch.no_grad():
            manual = model.run_with_hooks(corrupt_inputs, fwd_hooks=[(hook_names.resid_pre(layer), restore)])
        assert abs(float(metric(manual)) - float(values[i])) < 1e-5
    with torch.no_grad():
        base = float(metric(model(corrupt_inputs)))
    assert max(abs(float(v) - base) for v in values) > 0  # the patches change something


def test_sdpa_and_blockwise_eager_agree(model, inputs):
    with torch.no_grad():
        sdpa = model(**inputs)
        old = model.cfg.eager_attn_block_rows
        model.cfg.eager_attn_block_rows = 7
        rows_seen = []
        try:
            with model.force_eager_attention():
                eager = model(**inputs)
            _, cache = model.run_with_cache(
                **inputs, names_filter=lambda n: n.endswith("hook_pattern"),
            )
            model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                       lambda t, hook: rows_seen.append((t.shape[2], hook.query_slice)))])
        finally:
            model.cfg.eager_attn_block_rows = old
        _, full = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)
    t = inputs["input_ids"].shape[1]
    assert max(r for r, _ in rows_seen) == 7 and sum(r for r, _ in rows_seen) == t  # O(block x T) per call
    assert rows_seen[1][1] == slice(7, 14)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["pattern", layer], full["pattern", layer])


def test_eager_block_rows_follow_memory_budget(model):
    attn = model.blocks[0].attn
    old = model.cfg.eager_attn_block_bytes, model.cfg.eager_attn_block_rows
    try:
        model.cfg.eager_attn_block_rows = None
        model.cfg.eager_attn_block_bytes = 4 * 2**20
        rows = attn.block_rows(batch=1, n_query=8192, n_keys=8192)
        assert rows * model.cfg.n_heads * 8192 * 4 * 3 <= 4 * 2**20 and rows >= 1
    finally:
        model.cfg.eager_attn_block_bytes, model.cfg.eager_attn_block_rows = old


def test_sink_hook_values(model, inputs):
    """hook_sink = |x / rms(x)| at the sink dims, computed like the official sink.py."""
    from dataclasses import replace

    from hooked_av import SinkConstants
    from model_zoo.qwen2_5_omni import Qwen25OmniHookedModel

    sink_model = Qwen25OmniHookedModel(replace(model.cfg, sinks=SinkConstants(dims=(3, 17), tau=5.0)),
                                       model.hf_config)
    sink_model.load_state_dict(model.state_dict())
    _, cache = sink_model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("hook_sink", "hook_resid_pre")))
    for layer in range(model.cfg.n_layers):
        x = cache["resid_pre", layer].float()
        expected = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()[..., [3, 17]]
        torch.testing.assert_close(cache["sink", layer], expected)


def test_model_pickles(model):
    """torch.save of the whole model works (no closures held by modules) and the copy computes the same logits."""
    import io

    inputs = build_inputs("av", seed=3)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    torch.testing.assert_close(copy(**inputs), model(**inputs), rtol=0, atol=0)


def test_last_logits_equal_the_last_valid_row_of_logits(model):
    from model_zoo.tiny import collate

    batch = collate([build_inputs("audio", seed=1), build_inputs("av", seed=2)], padding_side="right")
    logits = model(**batch)
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(model(**batch, return_type="last_logits"), logits[torch.arange(2), last])
    with pytest.raises(ValueError, match="last_logits"):
        model(**batch, return_type="probs")
