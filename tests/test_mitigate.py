"""Decoding-time mitigation (hooked_av.recipes.mitigate) on the tiny random thinker: each method runs, equals the
plain model where it should (alpha 0, beta 0, strength 0), touches only what it should, and its KV-cached
decoding equals a decoding that reruns the whole sequence; the guidance strength against a literal transcription
of the official formula."""

import math

import numpy as np
import pytest
import torch

from hooked_av import HookedAVModel, Modality, SinkConstants, hook_names
from hooked_av.recipes import amplify, mitigate, roles, sinks
from hooked_av.recipes.mitigate import (Amplify, Contrastive, Guidance, HeadRule, HeadStats, MitigationSample,
                                        Plain, SinkSets)
from model_zoo.tiny import build_inputs

SINK_DIMS = (7, 11)
ALL_LAYERS = (0, 1, 2)
STEPS = 3


@pytest.fixture(scope="module")
def smodel(hf_thinker):
    return HookedAVModel.from_hf_model(hf_thinker, sinks=SinkConstants(dims=SINK_DIMS, tau=1.5))


def _without(inputs, key):
    """The inputs with one modality's features zeroed (what zeroed audio / black frames give, same layout)."""
    out = dict(inputs)
    out[key] = torch.zeros_like(inputs[key])
    return out


@pytest.fixture(scope="module")
def sample(smodel):
    av = build_inputs("av", seed=11)
    negatives = {"audio": _without(av, "input_features"), "video": _without(av, "pixel_values_videos")}
    return MitigationSample(av, negatives, mitigate.find_sink_sets(smodel, av, k_divide=2), seed=3)


def _plain(smodel, sample, n=STEPS):
    return Plain().generate(smodel, sample, max_new_tokens=n, stop_at_eos=False)


def _close_scores(a, b, atol=1e-4):
    """Equal log-probabilities, -inf at the same places."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(a)
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=atol)


# ------------------------------------------------------------------ sink sets and token sets
def test_sink_sets_split_the_global_sinks_by_modality_and_role(smodel, sample):
    s = sample.sinks
    mm = smodel.modality_map(**sample.inputs)
    mod = mm.modality[0]
    assert s.av and s.va and s.aa and s.vv  # the planted-noise model has sinks of every role
    assert all(mod[p] == Modality.AUDIO for p in s.av + s.aa) and all(mod[p] == Modality.VIDEO for p in s.va + s.vv)
    assert len(set(s.all)) == len(s.av) + len(s.va) + len(s.aa) + len(s.vv)
    is_sink = sinks.layer_sinks(sinks.sink_values(smodel, sample.inputs)[:, 0], smodel.cfg.sinks.tau)
    g = sinks.global_sinks(is_sink, mm, k_divide=2)
    assert s.all == sorted(g.video + g.audio)
    r = roles.modality_attention(smodel, sample.inputs, g.video + g.audio)
    assert (sorted(roles.split_roles(r, "audio")[0]), sorted(roles.split_roles(r, "audio")[1])) == (list(s.vv),
                                                                                                    list(s.va))
    assert SinkSets.from_dict(s.to_dict()) == s


def test_random_control_matches_count_and_modality_mix_and_is_seeded(smodel, sample):
    mm = smodel.modality_map(**sample.inputs)
    s = sample.sinks
    draw = mitigate.token_set("random", s, mm, seed=5)
    mod = mm.modality[0]
    assert len(draw) == len(s.cross_modal) and not set(draw) & set(s.all)
    for m in (Modality.AUDIO, Modality.VIDEO):
        assert sum(mod[p] == m for p in draw) == sum(mod[p] == m for p in s.cross_modal)
    assert draw == mitigate.token_set("random", s, mm, seed=5) != mitigate.token_set("random", s, mm, seed=6)
    assert mitigate.token_set("sinks", s, mm) == s.all and mitigate.token_set("unimodal", s, mm) == s.unimodal
    n_av = int(((mod == Modality.AUDIO) | (mod == Modality.VIDEO)).sum())
    with pytest.raises(ValueError, match="cannot draw"):
        mitigate.random_av_tokens(mm, list(range(n_av)), s.all, seed=0)
    with pytest.raises(ValueError, match="token set"):
        mitigate.token_set("objects", s, mm)


# ------------------------------------------------------------------ amplification
def test_amplify_alpha_zero_equals_plain(smodel, sample):
    plain = _plain(smodel, sample)
    same = Amplify(alpha=0.0, layers=ALL_LAYERS).generate(smodel, sample, max_new_tokens=STEPS, stop_at_eos=False)
    assert torch.equal(same.new_tokens, plain.new_tokens)
    _close_scores(same.scores, plain.scores)
    moved = Amplify(alpha=3.0, layers=ALL_LAYERS).scores(smodel, sample)
    assert not torch.allclose(moved, plain.scores[0], atol=1e-4)


def _changed_scores(smodel, inputs, hooks, layer):
    name = hook_names.attn_scores(layer)
    _, base = smodel.run_with_cache(**inputs, names_filter=name)
    with smodel.hooks(fwd_hooks=hooks):
        _, amp = smodel.run_with_cache(**inputs, names_filter=name)
    return base[name][0], amp[name][0]


def test_amplify_method_hooks_touch_only_the_chosen_keys_and_rows(smodel, sample):
    dec = Amplify(alpha=0.5, tokens="cross_modal", layers=(1,)).decoder(smodel, sample)
    a, b = _changed_scores(smodel, sample.inputs, dec.runner.hooks, layer=1)
    sel = torch.zeros_like(a, dtype=torch.bool)
    sel[:, smodel.modality_map(**sample.inputs).av_end():, sample.sinks.cross_modal] = True
    valid = a > torch.finfo(a.dtype).min / 2
    torch.testing.assert_close(b[sel & valid], (a + 0.5 * a.abs())[sel & valid])
    torch.testing.assert_close(b[~sel], a[~sel])


def test_amplification_by_head_and_last_query_only(smodel, sample):
    mm = smodel.modality_map(**sample.inputs)
    keys = sample.sinks.cross_modal
    last = amplify.query_starts(mm, "last")[0]
    assert last == mm.seq_len - 1 and amplify.query_starts(mm, "all") == [0]
    hooks = amplify.amplify_hooks([keys], [last], 1.0, [2], heads={2: [1, 3]})
    a, b = _changed_scores(smodel, sample.inputs, hooks, layer=2)
    sel = torch.zeros_like(a, dtype=torch.bool)
    sel[[1, 3], last:, :] = True
    sel[:, :, [k for k in range(a.shape[-1]) if k not in keys]] = False
    torch.testing.assert_close(b[sel], 2 * a[sel].clamp_min(0))  # a + |a|
    torch.testing.assert_close(b[~sel], a[~sel])
    with pytest.raises(ValueError, match="heads"):
        with amplify.amplified_attention(smodel, keys, mm, layers=[2], heads={2: [9]}):
            pass
    with pytest.raises(ValueError, match="queries"):
        amplify.query_starts(mm, "first")


def test_head_sink_mass_equals_the_cached_pattern(smodel, sample):
    stats = mitigate.head_sink_mass(smodel, sample.inputs, sample.sinks, queries="text")
    mm = smodel.modality_map(**sample.inputs)
    start, last = mm.av_end(), mm.seq_len - 1
    _, cache = smodel.run_with_cache(**sample.inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(smodel.cfg.n_layers):
        p = cache["pattern", layer][0, :, start:last + 1].double()  # [head, query, key]
        torch.testing.assert_close(stats.cross[layer], p[..., sample.sinks.cross_modal].sum(-1).mean(-1).float())
        torch.testing.assert_close(stats.uni[layer], p[..., sample.sinks.unimodal].sum(-1).mean(-1).float())
    assert stats.n_queries == last - start + 1


def test_head_selection_rules_by_hand():
    stats = HeadStats([0, 1], torch.tensor([[0.3, 0.1], [0.25, 0.5]]), torch.tensor([[0.1, 0.0], [0.3, 0.1]]), 4)
    assert mitigate.select_heads(stats).heads == {0: [0], 1: [1]}  # mass >= 0.2 and share >= 0.6
    assert mitigate.select_heads(stats, HeadRule(top_k=1)).heads == {1: [1]}
    assert mitigate.select_heads(stats, HeadRule(granularity="layer")).heads == {0: None, 1: None}
    only = mitigate.select_heads(stats, HeadRule(min_mass=0.3, granularity="layer"))
    assert only.layers == [1] and only.head_map() == {}
    with pytest.raises(ValueError, match="granularity"):
        HeadRule(granularity="block")


def test_amplify_with_head_rule_counts_its_setup_pass_and_can_choose_nothing(smodel, sample):
    everything = Amplify(alpha=1.0, layers=ALL_LAYERS, head_rule=HeadRule(min_mass=0.0, min_share=0.0))
    gen = everything.generate(smodel, sample, max_new_tokens=2, stop_at_eos=False)
    assert gen.cost.passes == 3 and gen.cost.passes_per_token == 1.5
    whole = Amplify(alpha=1.0, layers=ALL_LAYERS).scores(smodel, sample)
    _close_scores(gen.scores[0], whole)  # every head chosen = plain amplification
    nothing = Amplify(alpha=1.0, layers=ALL_LAYERS, head_rule=HeadRule(min_mass=2.0)).scores(smodel, sample)
    _close_scores(nothing, _plain(smodel, sample, 1).scores[0])


# ------------------------------------------------------------------ contrastive decoding
def test_contrastive_formula_and_plausibility_cutoff():
    full = torch.tensor([[2.0, 1.0, -3.0]])
    neg = torch.tensor([[1.0, 2.0, 0.0]])
    out = mitigate.contrastive_scores(full, [neg], beta=1.0, plausibility=0.1)
    # p_full(2) / p_full(0) = e^-5 < 0.1: cut; the rest is 2 * full - neg
    expected = torch.log_softmax(torch.tensor([3.0, 0.0]), -1)
    torch.testing.assert_close(out[0, :2], expected)
    assert out[0, 2] == -math.inf
    both = mitigate.contrastive_scores(full, [neg, torch.zeros_like(neg)], beta=1.0)
    torch.testing.assert_close(both[0, :2], torch.log_softmax(torch.tensor([3.5, 1.0]), -1))


def test_contrastive_beta_zero_equals_plain_on_plausible_tokens(smodel, sample):
    plain = _plain(smodel, sample)
    same = Contrastive(beta=0.0, drop="both").generate(smodel, sample, max_new_tokens=STEPS, stop_at_eos=False)
    assert torch.equal(same.new_tokens, plain.new_tokens)
    cut = plain.scores < math.log(mitigate.VCD_PLAUSIBILITY) + plain.scores.amax(-1, keepdim=True)
    assert torch.equal(torch.isinf(same.scores), cut)
    kept = torch.log_softmax(plain.scores.masked_fill(cut, -math.inf), -1)
    _close_scores(same.scores, kept)
    assert same.cost.passes_per_token == 3  # full + two negatives
    moved = Contrastive(beta=1.0, drop="video").scores(smodel, sample)
    assert not torch.allclose(moved.nan_to_num(0, 0, 0), kept[0].nan_to_num(0, 0, 0), atol=1e-3)
    with pytest.raises(ValueError, match="negatives"):
        Contrastive(drop="audio").scores(smodel, MitigationSample(sample.inputs, {}, sample.sinks))


# ------------------------------------------------------------------ guidance
def official_strength(layers_attn, s, text_start, base, s_prev):
    """A literal transcription of GuidanceLogits' strength (METHOD.md §11.3), batch of one, plain Python."""
    def mean(rows, idx):
        return float(rows[:, :, idx].mean()) if idx else 0.0

    text_mass = sum(float(a[:, :, text_start:].sum(-1).mean()) for a in layers_attn) / len(layers_attn)
    cross = sum(mean(a, list(s.av)) + mean(a, list(s.va)) for a in layers_attn)
    uni = sum(mean(a, list(s.aa)) + mean(a, list(s.vv)) for a in layers_attn)
    w = cross / (cross + uni + 1e-8)
    t = min(0.6, base * w)
    if text_mass > 0.4:
        t *= 0.5 * (1 + math.cos(math.pi * min(1.0, (text_mass - 0.4) / 0.2)))
    if w < 0.6:
        t *= (w / 0.6) ** 2
    return 0.5 * s_prev + 0.5 * t, text_mass, w


@pytest.mark.parametrize("seed", range(12))
def test_guidance_strength_equals_the_official_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    n_keys, text_start = 40, 30
    s = SinkSets((2, 5), (8, 11, 13), (20,), (24, 26), k_divide=3)
    logits = torch.randn(8, 1, 4, n_keys, generator=gen) * 2
    # tilt toward the sinks / the text by seed so every branch (text gate, low share) is exercised
    logits[..., list(s.av + s.va)] += (seed % 3) * 2.0
    logits[..., text_start:] += (seed % 4) - 1.0
    attn = torch.softmax(logits, -1)
    method = Guidance(strength=0.9 if seed % 2 else 0.5)
    sig = mitigate.guidance_signal(attn, s, torch.tensor([text_start]), method)
    s_prev = 0.3
    expected, text_mass, w = official_strength(list(attn), s, text_start, method.strength, s_prev)
    got = method.momentum * s_prev + (1 - method.momentum) * float(sig.target[0])
    assert got == pytest.approx(expected, abs=1e-6)
    assert float(sig.text_mass[0]) == pytest.approx(text_mass, abs=1e-6)
    assert float(sig.share[0]) == pytest.approx(w, abs=1e-6)


def test_guidance_strength_zero_equals_plain_greedy(smodel, sample):
    plain = _plain(smodel, sample, 4)
    g = Guidance(strength=0.0, first_step="adaptive").generate(smodel, sample, max_new_tokens=4, stop_at_eos=False)
    assert torch.equal(g.new_tokens, plain.new_tokens)
    _close_scores(g.scores, plain.scores)
    assert all(s == [0.0] for s in g.strengths) and g.cost.passes_per_token == 2


def test_guidance_official_first_step_and_momentum(smodel, sample):
    method = Guidance(strength=1.0, alpha=2.0, amplify_layers=ALL_LAYERS)
    dec = method.decoder(smodel, sample)
    gen = mitigate.greedy(dec, 4, set(), pad=0)
    assert gen.strengths[0] == [0.0]
    _close_scores(gen.scores[0], _plain(smodel, sample, 1).scores[0])
    s_prev = 0.0
    for step, signal in zip(gen.strengths[1:], dec.signals):
        s_prev = 0.5 * s_prev + 0.5 * float(signal.target[0])
        assert step[0] == pytest.approx(s_prev, abs=1e-7)
    assert any(s[0] > 0 for s in gen.strengths[1:])
    adaptive = Guidance(strength=1.0, alpha=2.0, amplify_layers=ALL_LAYERS, first_step="adaptive")
    assert adaptive.generate(smodel, sample, max_new_tokens=1).strengths[0][0] > 0
    assert mitigate.official_target_layers(28) == list(range(18, 26))
    assert mitigate.official_target_layers(3) == [1, 2] and mitigate.official_target_layers(1) == [0]


@pytest.mark.parametrize("method", [
    Plain(),
    Amplify(alpha=1.0, layers=ALL_LAYERS),
    Amplify(alpha=1.0, tokens="random", layers=(1, 2), queries="last"),
    Contrastive(beta=1.0, drop="video"),
    Guidance(strength=1.0, alpha=2.0, amplify_layers=ALL_LAYERS, first_step="adaptive"),
], ids=lambda m: m.key)
def test_kv_cached_decoding_equals_rerunning_the_sequence(smodel, sample, method):
    cached = method.generate(smodel, sample, max_new_tokens=STEPS, stop_at_eos=False)
    rerun = method.generate(smodel, sample, max_new_tokens=STEPS, stop_at_eos=False, use_cache=False)
    assert torch.equal(cached.new_tokens, rerun.new_tokens) and cached.new_tokens.shape == (1, STEPS)
    _close_scores(cached.scores, rerun.scores)
    if cached.strengths is not None:
        np.testing.assert_allclose(cached.strengths, rerun.strengths, atol=1e-5)
    c = cached.cost
    assert c.n_tokens == STEPS and c.seconds > 0 and c.seconds_per_token == pytest.approx(c.seconds / STEPS)


def test_generation_stops_at_eos_and_pads(smodel, sample):
    first = _plain(smodel, sample, 3).new_tokens[0]
    stopped = Plain().generate(smodel, sample, max_new_tokens=5, eos_token_id=int(first[1]), pad_token_id=0)
    assert stopped.new_tokens.shape[1] == 2 and int(stopped.n_steps[0]) == 2


# ------------------------------------------------------------------ interface
def test_method_specs_round_trip_and_reject_bad_values(smodel, sample):
    for m in (Plain(), Amplify(0.5, "random", (1, 2), "last", HeadRule(top_k=2)), Contrastive(0.3, "both", 0.2),
              Guidance(0.7, target_layers=(1,), first_step="adaptive")):
        assert mitigate.method_from_dict(m.to_dict()) == m
    assert [m.key for m in (Plain(), Amplify(0.5), Contrastive(1.0, "audio"), Guidance())] == [
        "plain", "amplify[cross_modal]@0.5", "contrastive[audio]@1", "guidance@0.5"]
    for bad in (lambda: Amplify(alpha=-1), lambda: Amplify(tokens="all"), lambda: Contrastive(drop="text"),
                lambda: Contrastive(plausibility=0), lambda: Guidance(momentum=1.0), lambda: Guidance(first_step="x")):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="sink sets"):
        Amplify().scores(smodel, MitigationSample(sample.inputs))
    with pytest.raises(ValueError, match="outside"):
        Amplify(layers=(5,)).scores(smodel, sample)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Plain().generate(smodel, sample, max_new_tokens=0)


def test_start_decoding_reads_the_answer_position_under_either_padding(smodel):
    from model_zoo.tiny import collate

    a, b = build_inputs("audio", seed=1), build_inputs("av", seed=2)
    for side in ("left", "right"):
        batch = collate([a, b], padding_side=side)
        logits, state = smodel.start_decoding(batch)
        torch.testing.assert_close(logits, smodel(**batch, return_type="last_logits"), rtol=1e-4, atol=1e-5)
        token = logits.argmax(-1)
        nxt = smodel.decode_step(state, token)
        assert state.key_valid.shape[1] == batch["input_ids"].shape[1] + 1
        for row, single in enumerate((a, b)):  # the padded batch continues each sample as it would alone
            first, alone = smodel.start_decoding(single)
            torch.testing.assert_close(smodel.decode_step(alone, first.argmax(-1)), nxt[row:row + 1],
                                       rtol=1e-4, atol=1e-5)
