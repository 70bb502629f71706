"""Qwen2.5-Omni thinker against transformers' reference implementation, on tiny random configs (float32)."""

import pytest
import torch

from model_zoo.tiny import TOK, build_inputs, collate

ATOL = 1e-4
CASES = {
    "text": dict(kind="text"),
    "audio": dict(kind="audio", frames=230),
    "image": dict(kind="image", grid=(1, 6, 8)),
    "video": dict(kind="video", grid=(3, 4, 6)),
    # 7.3 s of audio against 5 s of video, 2 s chunks: 4 chunks, the last ones audio only, lengths uneven
    "av_audio_longer": dict(kind="av", grid=(5, 4, 4), frames=730),
    # video longer than audio, half-second grids (4 fps sampling)
    "av_video_longer": dict(kind="av", grid=(8, 4, 4), spg=0.5, frames=190),
    # large enough ViT grid for windowed attention to matter
    "av_wide": dict(kind="av", grid=(3, 12, 16), frames=333),
}


def hf_positions(hf, inp):
    fam = inp.get("feature_attention_mask")
    return hf.model.get_rope_index(
        inp["input_ids"], inp.get("image_grid_thw"), inp.get("video_grid_thw"), inp["attention_mask"],
        inp.get("use_audio_in_video", False), None if fam is None else fam.sum(-1), inp.get("video_second_per_grid"),
    )[0]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_hidden_states_and_positions_match(hf_thinker, model, case):
    inp = build_inputs(**CASES[case])
    with torch.no_grad():
        ref = hf_thinker(**inp, output_hidden_states=True)
        logits, cache = model.run_with_cache(**inp, names_filter=lambda n: "resid_pre" in n or n.startswith("ln_final"))
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max().item() <= ATOL
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], ref.hidden_states[layer], atol=ATOL, rtol=0)
    final = cache["ln_final.hook_normalized"] * model.ln_final.weight
    torch.testing.assert_close(final, ref.hidden_states[-1], atol=ATOL, rtol=0)
    positions = model.prepare_inputs(**inp).position_ids
    assert torch.equal(positions, hf_positions(hf_thinker, inp))


def test_av_case_has_several_chunks(model):
    mm = model.modality_map(**build_inputs(**CASES["av_audio_longer"]))
    assert mm.n_chunks() == 4
    audio_per_chunk = [len(mm.positions("audio", chunk=c)) for c in range(4)]
    assert audio_per_chunk == [50, 50, 50, 32]  # 182 audio tokens for 730 mel frames
    video_per_chunk = [len(mm.positions("video", chunk=c)) for c in range(4)]
    assert video_per_chunk == [8, 8, 4, 0]  # 4 merged tokens per grid, 1 s per grid


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_of_two(hf_thinker, model, padding_side):
    samples = [build_inputs(**CASES["av_audio_longer"], seed=1), build_inputs(kind="audio", frames=150, seed=2)]
    inp = collate(samples, padding_side=padding_side)
    with torch.no_grad():
        ref = hf_thinker(**inp, output_hidden_states=True)
        ours = model(**inp)
    valid = inp["attention_mask"].bool()
    assert (ours[valid] - ref.logits[valid]).abs().max().item() <= ATOL
    assert torch.equal(model.prepare_inputs(**inp).position_ids, hf_positions(hf_thinker, inp))
    # each row equals the unpadded single-sample run
    for b, sample in enumerate(samples):
        with torch.no_grad():
            single = model(**sample)[0]
        torch.testing.assert_close(ours[b][valid[b]], single, atol=ATOL, rtol=0)


def test_patterns_equal_eager_attentions(hf_thinker, model):
    inp = build_inputs(**CASES["av_audio_longer"])
    with torch.no_grad():
        ref = hf_thinker(**inp, output_attentions=True)
        _, cache = model.run_with_cache(**inp, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        assert cache["pattern", layer].shape == ref.attentions[layer].shape
        torch.testing.assert_close(cache["pattern", layer], ref.attentions[layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["text", "av_audio_longer"])
def test_greedy_generation_is_token_identical(hf_thinker, model, case):
    inp = build_inputs(**CASES[case])
    with torch.no_grad():
        ref = hf_thinker.generate(**inp, max_new_tokens=12, do_sample=False, eos_token_id=TOK["eos"],
                                  pad_token_id=TOK["pad"])
    out = model.generate(**inp, max_new_tokens=12)
    assert torch.equal(out.sequences, ref[:, : out.sequences.shape[1]])
    assert out.sequences.shape == ref.shape


def test_generation_padded_batch(hf_thinker, model):
    inp = collate([build_inputs(**CASES["av_audio_longer"], seed=1), build_inputs(kind="text", seed=3)])
    with torch.no_grad():
        ref = hf_thinker.generate(**inp, max_new_tokens=8, do_sample=False, eos_token_id=TOK["eos"],
                                  pad_token_id=TOK["pad"])
    out = model.generate(**inp, max_new_tokens=8)
    assert torch.equal(out.sequences, ref)


def test_generation_logits_match_forward(model):
    """The KV-cached decoding steps give the same logits as a full forward over the generated sequence."""
    inp = build_inputs(**CASES["av_video_longer"])
    out = model.generate(**inp, max_new_tokens=5, eos_token_id=[])
    full = dict(inp, input_ids=out.sequences[:, :-1], attention_mask=torch.ones_like(out.sequences[:, :-1]))
    with torch.no_grad():
        logits = model(**full)
    steps = logits[0, inp["input_ids"].shape[1] - 1 :]
    torch.testing.assert_close(out.logits[:, 0], steps, atol=ATOL, rtol=0)
