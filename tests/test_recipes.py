"""The generic recipes (scoring, sinks, roles, patching, amplification) on a tiny random Qwen2.5-Omni thinker,
each against a direct computation from the cache or a literal transcription of the official rule."""

from collections import Counter

import numpy as np
import pytest
import torch

from hooked_av import HookedAVModel, Modality, SinkConstants, hook_names
from hooked_av.recipes import amplify, patching, roles, scoring, sinks
from model_zoo.tiny import TOK, build_inputs, collate

SINK_DIMS = (7, 11)


@pytest.fixture(scope="module")
def smodel(hf_thinker):
    """A hooked copy with sink dims set (shares the reference weights)."""
    return HookedAVModel.from_hf_model(hf_thinker, sinks=SinkConstants(dims=SINK_DIMS, tau=1.5))


@pytest.fixture(scope="module")
def av():
    return build_inputs("av", seed=11)


class CharTokenizer:
    """A tokenizer where ' X' and 'X' are different tokens, like BPE vocabularies."""

    def encode(self, text, add_special_tokens=False):
        return [(200 if c == " " else 0) + ord(text[i + (c == " ")]) for i, c in enumerate(text[:1])]


# ------------------------------------------------------------------ scoring
def test_answer_candidates_take_first_subtoken_with_and_without_space():
    c = scoring.AnswerCandidates.from_tokenizer(CharTokenizer(), "B")
    assert c.ids == (ord("B"), 200 + ord("B"))


def test_teacher_forced_probability_reads_last_valid_position_under_padding(smodel):
    a, b = build_inputs("audio", seed=1), build_inputs("av", seed=2)
    cands = scoring.AnswerCandidates("x", (3, 40))
    single = [scoring.score(smodel, s, {"x": cands})["x"] for s in (a, b)]
    for side in ("left", "right"):
        batched = scoring.score(smodel, collate([a, b], padding_side=side), {"x": cands})["x"]
        torch.testing.assert_close(batched, torch.cat(single), rtol=1e-4, atol=1e-6)
    logits = smodel(**a)
    expected = torch.softmax(logits[0, -1].float(), -1)[[3, 40]].max()
    torch.testing.assert_close(single[0][0], expected)


def test_official_probability_is_max_over_generated_steps(smodel, av):
    cands = scoring.AnswerCandidates("x", (5, 9))
    gen = smodel.generate(**av, max_new_tokens=6)
    manual = max(torch.softmax(gen.logits[s, 0], -1)[[5, 9]].max() for s in range(gen.logits.shape[0]))
    got = scoring.score(smodel, av, {"x": cands}, mode="official", max_new_tokens=6)["x"]
    torch.testing.assert_close(got[0], manual)
    with pytest.raises(ValueError, match="score mode"):
        scoring.score(smodel, av, {"x": cands}, mode="greedy")


def test_official_probability_ignores_steps_after_eos():
    logits = torch.full((3, 2, 10), -10.0)
    logits[2, :, 4] = 10.0  # only the third step favours token 4
    n_steps = torch.tensor([2, 3])
    p = scoring.official_probs(logits, {"x": scoring.AnswerCandidates("x", (4,))}, n_steps=n_steps)["x"]
    assert p[0] == pytest.approx(0.1) and p[1] > 0.99  # uniform over 10 before its eos


# ------------------------------------------------------------------ sinks
def test_sink_values_equal_rms_normalised_resid_at_sink_dims(smodel, av):
    values = sinks.sink_values(smodel, av)
    _, cache = smodel.run_with_cache(**av, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer in range(smodel.cfg.n_layers):
        x = cache["resid_pre", layer][0].float()
        r = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()[:, list(SINK_DIMS)].amax(-1)
        torch.testing.assert_close(values[layer, 0], r)


def _official_global(is_sink: torch.Tensor, k: int):
    counter = Counter()
    for layer in range(is_sink.shape[0]):
        counter.update(is_sink[layer].nonzero().squeeze(-1).tolist())
    return counter.most_common(k)


@pytest.mark.parametrize("seed", range(5))
def test_global_sink_ranking_matches_counter_most_common(seed, av, smodel):
    mm = smodel.modality_map(**av)
    gen = torch.Generator().manual_seed(seed)
    is_sink = torch.rand(6, mm.seq_len, generator=gen) < torch.rand(1, mm.seq_len, generator=gen) * 0.6
    for k_divide in (2, 3, 4, 40):
        g = sinks.global_sinks(is_sink, mm, k_divide=k_divide)
        expected = _official_global(is_sink, int(mm.seq_len / k_divide))
        assert g.positions == [p for p, _ in expected]
        assert g.k == int(mm.seq_len / k_divide)
        mod = mm.modality[0]
        assert g.video == [p for p in g.positions if mod[p] == Modality.VIDEO]
        assert g.audio == [p for p in g.positions if mod[p] == Modality.AUDIO]
    g = sinks.global_sinks(is_sink, mm, min_layers=4)
    assert set(g.positions) == set((is_sink.sum(0) >= 4).nonzero().squeeze(-1).tolist())


def test_calibration_finds_planted_massive_dims(hf_thinker):
    model = HookedAVModel.from_hf_model(hf_thinker)
    planted = (13, 42)
    with torch.no_grad():
        emb = model.embed.weight.clone()
        model.embed.weight = torch.nn.Parameter(emb)
        model.embed.weight[TOK["bos"], list(planted)] = torch.tensor([60.0, -45.0])
    samples = [build_inputs(k, seed=s) for k, s in (("av", 1), ("audio", 2), ("video", 3))]
    cal = sinks.calibrate_sinks(model, samples, n_dims=2, tau_rule="scaled")
    assert cal.sinks.dims == planted
    d = model.cfg.d_model
    assert cal.tau_scaled == pytest.approx(25 * np.sqrt(d / 3584))
    assert cal.max_possible == pytest.approx(np.sqrt(d))
    assert cal.sinks.calibrated and "calibrate_sinks" in cal.sinks.provenance
    # the planted token (position 0 of every sample) is a sink in every layer; almost nothing else is
    model.set_sinks(cal.sinks)
    values = sinks.sink_values(model, samples[0])
    flagged = sinks.layer_sinks(values, cal.tau_gap)[:, 0]
    assert flagged[:, 0].all() and flagged[:, 1:].float().mean() < 0.05
    mid = sinks.layer_sinks(values, cal.tau_midpoint)[:, 0]
    assert mid[:, 0].all() and mid[:, 1:].float().mean() < 0.05 and cal.sink_fraction["midpoint"] < 0.05
    with pytest.raises(ValueError, match="outside the residual stream"):
        model.set_sinks(SinkConstants(dims=(d,), tau=1.0))


# ------------------------------------------------------------------ roles
def _brute_force_roles(model, inputs, positions):
    _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    mod = model.modality_map(**inputs).modality[0]
    v, a = [], []
    for layer in range(model.cfg.n_layers):
        pat = cache["pattern", layer][0].double()  # [head, q, k]
        vl, al = [], []
        for s in positions:
            for store, code in ((vl, Modality.VIDEO), (al, Modality.AUDIO)):
                qs = [q for q in range(s + 1, pat.shape[1]) if mod[q] == code]
                store.append(float(pat[:, qs, s].mean()) if qs else 0.0)
        v.append(vl), a.append(al)
    return torch.tensor(v), torch.tensor(a)


def test_modality_attention_streams_the_official_scores(smodel, av):
    mm = smodel.modality_map(**av)
    positions = mm.positions("video")[::7].tolist() + mm.positions("audio")[::9].tolist() + [0, 3]
    old = smodel.cfg.eager_attn_block_rows
    smodel.cfg.eager_attn_block_rows = 13  # several query blocks per layer
    try:
        r = roles.modality_attention(smodel, av, positions)
    finally:
        smodel.cfg.eager_attn_block_rows = old
    v, a = _brute_force_roles(smodel, av, positions)
    torch.testing.assert_close(r.v_score, v.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.a_score, a.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.mds, (v - a).float() / (v + a + 1e-9).float(), rtol=1e-4, atol=1e-6)
    assert r.modality[-2:] == ["text", "text"]
    hist = r.history()
    assert list(hist) == positions and len(hist[positions[0]]["mds"]) == smodel.cfg.n_layers


def _official_build_layerlist(history_mds, base, dominant):
    keys = [k for k in history_mds if k in base]
    scores = {k: np.nanmean(history_mds[k]) for k in keys}
    keys = sorted(keys, key=lambda k: scores[k], reverse=(dominant == "audio"))
    mid = len(keys) // 2
    return keys[:mid], keys[mid:]


@pytest.mark.parametrize("dominant", ["audio", "video"])
@pytest.mark.parametrize("n", [0, 1, 6, 7])
def test_official_split_matches_transcription(dominant, n):
    rng = np.random.default_rng(n)
    pos = list(rng.permutation(100)[:n])
    mds = {p: list(np.round(rng.uniform(-1, 1, 4), 1)) for p in pos}  # rounding makes ties
    uni, cross = roles.split_sinks(pos, [np.nanmean(mds[p]) for p in pos], dominant)
    e_uni, e_cross = _official_build_layerlist(mds, set(pos), dominant)
    assert (uni, cross) == (e_uni, e_cross)
    assert len(uni) == n // 2 and sorted(uni + cross) == sorted(pos)


def test_threshold_split_uses_the_sign():
    uni, cross = roles.split_sinks([1, 2, 3], [0.5, -0.2, 0.0], "audio", rule="threshold")
    assert (uni, cross) == ([1, 3], [2])
    uni, cross = roles.split_sinks([1, 2, 3], [0.5, -0.2, 0.0], "video", rule="threshold")
    assert (uni, cross) == ([2, 3], [1])
    with pytest.raises(ValueError, match="dominant"):
        roles.split_sinks([1], [0.1], "text")
    with pytest.raises(ValueError, match="split rule"):
        roles.split_sinks([1], [0.1], "audio", rule="median")


# ------------------------------------------------------------------ patching
@pytest.fixture(scope="module")
def pair(smodel):
    clean = smodel.prepare_inputs(**build_inputs("av", seed=5))
    corrupt_raw = build_inputs("av", seed=5)
    corrupt_raw["input_features"] = torch.zeros_like(corrupt_raw["input_features"])  # silent audio features
    corrupt = smodel.prepare_inputs(**corrupt_raw)
    return clean, corrupt


def test_restoring_everything_at_layer_zero_gives_the_clean_run(smodel, pair):
    clean, corrupt = pair
    everything = list(range(clean.input_ids.shape[1]))
    acts = patching.capture(smodel, clean, everything, site="resid_pre", layers=[0])
    with patching.restored(smodel, acts, [everything]):
        restored = smodel(corrupt)
    torch.testing.assert_close(restored, smodel(clean), rtol=0, atol=1e-6)
    assert not torch.allclose(smodel(corrupt), smodel(clean), atol=1e-4)


def test_before_attn_at_every_layer_equals_restoring_kv(smodel, pair):
    clean, corrupt = pair
    audio = clean.modality_map.positions("audio").tolist()
    out = {}
    for site in ("before_attn", "kv"):
        acts = patching.capture(smodel, clean, audio, site=site)
        with patching.restored(smodel, acts, [audio]):
            out[site] = smodel(corrupt)[0, -1]
    torch.testing.assert_close(out["before_attn"], out["kv"], rtol=1e-5, atol=1e-5)
    # and it matters: the restored run differs from the corrupted one
    assert not torch.allclose(out["kv"], smodel(corrupt)[0, -1], atol=1e-4)


def test_batched_patching_equals_one_subset_at_a_time(smodel, pair):
    clean, corrupt = pair
    mm = clean.modality_map
    subsets = [mm.positions("audio")[:20].tolist(), [], mm.positions("audio")[::3].tolist(),
               mm.positions("video").tolist()]
    union = sorted({p for s in subsets for p in s})
    acts = patching.capture(smodel, clean, union)
    answers = {"a": scoring.AnswerCandidates("a", (3,)), "b": scoring.AnswerCandidates("b", (17, 18))}
    batched = patching.patched_probs(smodel, acts, corrupt, subsets, answers, batch_size=3)
    for i, s in enumerate(subsets):
        with patching.restored(smodel, acts, [s]):
            one = scoring.score(smodel, corrupt, answers)
        for name in answers:
            torch.testing.assert_close(batched[name][i], one[name][0], rtol=1e-5, atol=1e-7)
    plain = scoring.score(smodel, corrupt, answers)
    torch.testing.assert_close(batched["a"][1], plain["a"][0], rtol=1e-5, atol=1e-7)  # empty subset = corrupt


def test_patching_during_generate_restores_the_prefill_only(smodel, pair):
    """Restoring the ln1 input of S at every layer during generation equals restoring S's keys and values (the
    decoding steps are not patched, the restored K/V stay in the cache), and differs from the corrupted run."""
    clean, corrupt = pair
    audio = clean.modality_map.positions("audio").tolist()
    answers = {"a": scoring.AnswerCandidates("a", (3,))}
    runs = {}
    for site in ("before_attn", "kv"):
        acts = patching.capture(smodel, clean, audio, site=site)
        with patching.restored(smodel, acts, [audio]):
            runs[site] = smodel.generate(corrupt, max_new_tokens=4)
        got = patching.patched_probs(smodel, acts, corrupt, [audio], answers, mode="official", max_new_tokens=4)
        expected = scoring.official_probs(runs[site].logits, answers, n_steps=runs[site].n_steps)["a"]
        torch.testing.assert_close(got["a"], expected)
    torch.testing.assert_close(runs["before_attn"].logits, runs["kv"].logits, rtol=1e-4, atol=1e-5)
    plain = smodel.generate(corrupt, max_new_tokens=4)
    assert all(not torch.allclose(runs["kv"].logits[s], plain.logits[s], atol=1e-4) for s in range(4))
    acts = patching.capture(smodel, clean, audio)
    with pytest.raises(ValueError, match="not captured"):
        patching.restore_hooks(acts, [[0]])
    with pytest.raises(ValueError, match="unknown patching site"):
        patching.capture(smodel, clean, audio, site="resid")


def test_indirect_effect_arithmetic():
    ie = patching.indirect_effect(p_corrupt_clean=0.2, p_restored_clean=0.5, p_corrupt_corrupt=0.6,
                                  p_restored_corrupt=0.45)
    assert ie.ie_clean == pytest.approx(30.0) and ie.ie_corrupt == pytest.approx(15.0)


# ------------------------------------------------------------------ amplification
def test_amplification_changes_exactly_the_selected_scores(smodel, av):
    mm = smodel.modality_map(**av)
    keys = mm.positions("video")[:10].tolist()
    start = mm.av_end()
    name = hook_names.attn_scores(0)
    _, base = smodel.run_with_cache(**av, names_filter=name)
    with amplify.amplified_attention(smodel, keys, mm, alpha=0.5, layers=[0]):
        _, amp = smodel.run_with_cache(**av, names_filter=name)
    a, b = base[name][0], amp[name][0]
    sel = torch.zeros_like(a, dtype=torch.bool)
    sel[:, start:, keys] = True
    torch.testing.assert_close(b[sel], a[sel] + 0.5 * a[sel].abs())
    torch.testing.assert_close(b[~sel], a[~sel])
    assert start == max(mm.positions("audio").max(), mm.positions("video").max()) + 1


def test_amplification_alpha_zero_is_identity_and_reaches_decoding(smodel, av):
    mm = smodel.modality_map(**av)
    keys = mm.positions("audio").tolist()
    plain = smodel.generate(**av, max_new_tokens=5)
    with amplify.amplified_attention(smodel, keys, mm, alpha=0.0, layers=[0, 1, 2]):
        same = smodel.generate(**av, max_new_tokens=5)
    torch.testing.assert_close(same.logits, plain.logits, rtol=1e-5, atol=1e-5)
    with amplify.amplified_attention(smodel, keys, mm, alpha=2.0, layers=[0, 1, 2]):
        moved = smodel.generate(**av, max_new_tokens=5)
    # prefill rows after the clip and every decoding step change
    assert all(not torch.allclose(moved.logits[s], plain.logits[s], atol=1e-4) for s in range(5))
    with pytest.raises(ValueError, match="outside"):
        with amplify.amplified_attention(smodel, keys, mm, layers=[7]):
            pass
    assert amplify.official_layers(28) == list(range(6, 28))


def test_repeat_and_decode_equal_a_batched_forward(smodel, av):
    inputs = smodel.prepare_inputs(**av)
    logits = smodel.decode(inputs.repeat(3), smodel.embed_inputs(inputs).expand(3, -1, -1))
    torch.testing.assert_close(logits, smodel(inputs).expand(3, -1, -1), rtol=1e-5, atol=1e-5)


def test_global_sinks_ignore_padding(smodel):
    a, b = build_inputs("audio", seed=1), build_inputs("av", seed=2)
    batch = collate([a, b], padding_side="left")
    pad = batch["input_ids"].shape[1] - a["input_ids"].shape[1]
    mm = smodel.modality_map(**batch)
    values = sinks.sink_values(smodel, batch)
    single = sinks.sink_values(smodel, a)
    torch.testing.assert_close(values[:, 0, pad:], single[:, 0], rtol=1e-4, atol=1e-4)
    g = sinks.global_sinks(sinks.layer_sinks(values[:, 0], 1.5), mm, batch=0, k_divide=2)
    g1 = sinks.global_sinks(sinks.layer_sinks(single[:, 0], 1.5), smodel.modality_map(**a), k_divide=2)
    assert g.k == g1.k and all(p >= pad for p in g.positions)
    assert [p - pad for p in g.audio] == g1.audio


def test_amplification_never_touches_masked_scores_in_bf16(av):
    from model_zoo.tiny import tiny_hf_thinker

    # a model of its own: casting shares no storage with the session's reference model
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)).to(torch.bfloat16)
    mm = model.modality_map(**av)
    name = hook_names.attn_scores(1)
    everything = list(range(mm.seq_len))
    _, base = model.run_with_cache(**av, names_filter=name)
    with amplify.amplified_attention(model, everything, alpha=0.2, layers=[1], query_start=0):
        logits, amp = model.run_with_cache(**av, names_filter=name)
    a, b = base[name][0].float(), amp[name][0].float()
    masked = a <= torch.finfo(torch.bfloat16).min / 2
    assert masked.any() and torch.isfinite(logits).all()
    assert torch.equal(b[masked], a[masked])
    torch.testing.assert_close(b[~masked], (a + 0.2 * a.abs())[~masked], rtol=1e-2, atol=1e-2)
    keys = torch.tensor(everything[:5])  # a 1-D tensor of keys works too
    with amplify.amplified_attention(model, keys, mm, layers=[1]):
        model(**av)


def test_modality_attention_batch_padding_and_layer_subset(smodel):
    a, b = build_inputs("av", seed=4), build_inputs("video", seed=5)
    batch = collate([b, a], padding_side="left")
    pad = batch["input_ids"].shape[1] - a["input_ids"].shape[1]
    mm = smodel.modality_map(**a)
    positions = mm.positions("video")[::5].tolist() + mm.positions("audio")[::6].tolist()
    single = roles.modality_attention(smodel, a, positions)
    batched = roles.modality_attention(smodel, batch, [p + pad for p in positions], batch=1, layers=[2, 1])
    torch.testing.assert_close(batched.v_score, single.v_score[[2, 1]], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched.a_score, single.a_score[[2, 1]], rtol=1e-4, atol=1e-6)
