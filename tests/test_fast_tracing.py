"""The fast tracing path (prefix reuse, partial recomputation, K/V substitution, batching) against the
straightforward one (a full decoder pass per subset with restore hooks), on tiny random thinkers: the indirect
effects must agree to 1e-5 percentage points for every site, layer set and subset kind."""

import pytest
import torch

from analyses import tracing
from analyses.study import PreparedSample
from hooked_av import HookedAVModel, SinkConstants, hook_names
from hooked_av.recipes import fast_patching, patching, roles, scoring, sinks
from model_zoo.tiny import build_inputs

SITES = ["before_attn", "kv", "resid_pre", "attn_out", "mlp_out"]
ANSWERS = {"clean": scoring.AnswerCandidates("A", (3, 40)), "corrupt": scoring.AnswerCandidates("B", (17,))}


@pytest.fixture(scope="module")
def smodel():
    """A tiny random thinker of its own whose decoder weights are scaled up 4x: the default init barely lets the
    answer depend on the clip (restorations move its logits by ~1e-4), this one by ~1e-2, far above float noise."""
    from model_zoo.tiny import tiny_hf_thinker

    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0), sinks=SinkConstants(dims=(7, 11), tau=1.5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks") and p.ndim == 2:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def pair(smodel):
    """Clean inputs and black frames (the video-dominant corruption: the audio tokens are the ones restored)."""
    raw = build_inputs("av", seed=5)
    black = dict(raw, pixel_values_videos=torch.zeros_like(raw["pixel_values_videos"]))
    return smodel.prepare_inputs(**raw), smodel.prepare_inputs(**black)


def subset_kinds(clean, base="audio", other="video", seed=0):
    """One subset of every kind the study restores (all, sink-like, random, half), plus edge cases: empty, a
    single token, the corrupted modality, the answer position, positions before the first corrupted token."""
    mm = clean.modality_map
    b, o = mm.positions(base).tolist(), mm.positions(other).tolist()
    gen = torch.Generator().manual_seed(seed)
    rnd = sorted(b[i] for i in torch.randperm(len(b), generator=gen)[: len(b) // 3].tolist())
    t = clean.input_ids.shape[1]
    return {"all": b, "sink-like": b[::4], "random": rnd, "half": rnd[: len(rnd) // 2], "first": b[:1],
            "empty": [], "corrupted modality": o[::5], "with answer": b[-3:] + [t - 1],
            "before c0": list(range(1, o[0]))}


def straightforward_logits(model, clean, corrupt, subsets, site, layers):
    """A full decoder pass per subset with restore hooks on the captured clean site (the reference)."""
    acts = patching.capture(model, clean, sorted({p for s in subsets for p in s}), site=site, layers=layers)
    out = []
    with torch.no_grad():
        for s in subsets:
            with patching.restored(model, acts, [s]):
                out.append(model(corrupt, return_type="last_logits"))
    return torch.cat(out)


def ie_table(model, corrupt, logits):
    """IE_clean and IE_corrupt (percentage points) of each restored run, for two fixed answers."""
    with torch.no_grad():
        base = model(corrupt, return_type="last_logits")
    p = {k: scoring.candidate_prob(logits, c) for k, c in ANSWERS.items()}
    p0 = {k: scoring.candidate_prob(base, c) for k, c in ANSWERS.items()}
    return torch.stack([patching.PP * (p["clean"] - p0["clean"]), patching.PP * (p0["corrupt"] - p["corrupt"])])


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("layers", [None, [1, 2], [0, 2], [0]], ids=["all", "upper", "gapped", "first"])
def test_fast_ie_equals_straightforward(smodel, pair, site, layers):
    clean, corrupt = pair
    kinds = subset_kinds(clean)
    subsets = list(kinds.values())
    expected = straightforward_logits(smodel, clean, corrupt, subsets, site, layers)
    with torch.no_grad():
        plain = smodel(corrupt, return_type="last_logits")
    moved = (expected[list(kinds).index("all")] - plain[0]).abs().max()
    if layers == [0] and site in ("before_attn", "kv", "resid_pre"):
        assert moved == 0  # layer 0 reads the embeddings, and the audio ones are not corrupted
    else:
        assert moved > 1e-3  # the restoration does something, far above the tolerance below
    recorder = patching.ActivationRecorder(smodel, sorted({p for s in subsets for p in s}), site, layers)
    clean_run = fast_patching.clean_pass(smodel, clean, recorder.hooks())
    corrupt_run = fast_patching.corrupt_pass(smodel, clean_run, corrupt)
    for batch_size in (1, 3):  # batching pads the runs to a common width
        fast = fast_patching.restored_logits(smodel, clean_run, corrupt_run, subsets, site, layers,
                                             recorder.activations(), batch_size=batch_size)
        torch.testing.assert_close(fast, expected, rtol=0, atol=5e-7)
        torch.testing.assert_close(ie_table(smodel, corrupt, fast), ie_table(smodel, corrupt, expected),
                                   rtol=0, atol=1e-5)
    probs = fast_patching.fast_patched_probs(smodel, clean, corrupt, subsets, ANSWERS, site=site, layers=layers)
    for name, c in ANSWERS.items():
        torch.testing.assert_close(probs[name], scoring.candidate_prob(expected, c), rtol=1e-5, atol=1e-8)


def test_prefix_reuse_and_partial_rows(smodel):
    raw = build_inputs("av", seed=5)
    clean = smodel.prepare_inputs(**raw)
    corrupt = smodel.prepare_inputs(**dict(raw, input_features=torch.zeros_like(raw["input_features"])))
    mm = clean.modality_map
    c0 = int(mm.positions("audio")[0])
    run = fast_patching.clean_pass(smodel, clean)
    bad = fast_patching.corrupt_pass(smodel, run, corrupt)
    assert bad.first_change == c0  # the silenced audio starts here; the prefix is the clean pass's
    reference = smodel.start_decoding(corrupt)[1].cache  # a full corrupted prefill
    for layer in range(smodel.cfg.n_layers):
        assert torch.equal(bad.keys[layer][:, :c0], run.keys[layer][:, :c0])
        torch.testing.assert_close(bad.keys[layer], reference.keys[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bad.values[layer], reference.values[layer], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bad.last_logits, smodel(corrupt, return_type="last_logits"), rtol=1e-5, atol=1e-6)
    # a restored run computes [p0, T) minus S, p0 = the first position of S at or after c0
    t = clean.input_ids.shape[1]
    video = mm.positions("video").tolist()
    s = [p for p in video if p > c0][:5] + [3]
    plan = fast_patching.plan_run(s, t, c0, drop=0)
    p0 = min(p for p in s if p >= c0)
    assert plan.early is None and plan.late.tolist() == [p for p in range(p0, t) if p not in s]
    assert fast_patching.plan_run([p for p in video if p < c0], t, c0, drop=0) is None  # = the corrupted run
    assert fast_patching.drop_layer("before_attn", [0, 1, 2], 3) == 0
    assert fast_patching.drop_layer("kv", [0, 2], 3) == 2
    assert fast_patching.drop_layer("kv", [0, 1], 3) == 3
    assert fast_patching.drop_layer("resid_pre", [0, 1, 2], 3) == 3


def test_fast_path_refuses_what_it_cannot_do(smodel, pair):
    clean, corrupt = pair
    run = fast_patching.clean_pass(smodel, clean)
    with smodel.hooks(fwd_hooks=[(hook_names.resid_pre(1), lambda t, hook: None)]):
        with pytest.raises(ValueError, match="hooks attached"):
            fast_patching.corrupt_pass(smodel, run, corrupt)
    bad = fast_patching.corrupt_pass(smodel, run, corrupt)
    with pytest.raises(ValueError, match="needs the clean activations"):
        fast_patching.restored_logits(smodel, run, bad, [[int(clean.modality_map.positions("video")[-1])]],
                                      site="resid_pre")
    with pytest.raises(ValueError, match="one sample"):
        fast_patching.clean_pass(smodel, clean.repeat(2))


def test_recorders_equal_their_own_passes(smodel):
    av = smodel.prepare_inputs(**build_inputs("av", seed=11))
    mm = av.modality_map
    positions = mm.positions("video")[::5].tolist() + mm.positions("audio")[::7].tolist() + [0, 2]
    sink_rec, roles_rec = sinks.SinkRecorder(smodel), roles.ModalityAttentionRecorder(smodel, av, query_block=17)
    run = fast_patching.clean_pass(smodel, av, sink_rec.hooks() + roles_rec.hooks())
    torch.testing.assert_close(run.last_logits, smodel(av, return_type="last_logits"))
    torch.testing.assert_close(sink_rec.values(), sinks.sink_values(smodel, av))
    streamed = roles.modality_attention(smodel, av, positions)  # eager, in query blocks
    got = roles_rec.roles(positions)
    torch.testing.assert_close(got.v_score, streamed.v_score, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.a_score, streamed.a_score, rtol=1e-4, atol=1e-7)
    assert got.modality == streamed.modality and got.positions == positions


def test_attention_lse_matches_logsumexp_with_padding():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 30, 8, generator=gen) for h in (4, 2, 2))
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, :4] = False  # left padding: those keys are never visible
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    for key_valid, allowed in ((None, causal), (valid, causal & valid[0][None])):
        allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(30, dtype=torch.bool))
        expected = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
        got = roles.attention_lse(q, k, v, 0.3, key_valid, block_rows=7)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dominant", ["audio", "video"])
def test_trace_sample_fast_equals_straightforward(smodel, dominant):
    raw = build_inputs("av", seed=3)
    silent = dict(raw, input_features=torch.zeros_like(raw["input_features"]))
    black = dict(raw, pixel_values_videos=torch.zeros_like(raw["pixel_values_videos"]))
    choices = {L: scoring.AnswerCandidates(L, (10 + i, 300 + i)) for i, L in enumerate("ABCD")}
    av = smodel.prepare_inputs(**raw)
    base = "video" if dominant == "audio" else "audio"
    sample = PreparedSample("s", {"av": raw, "a": black, "v": silent}, choices, label="A",
                            object_positions={base: av.modality_map.positions(base)[2:9].tolist()})
    settings = tracing.TraceSettings(n_divs=(2, 3), seed=1)
    fast, st_fast = tracing.trace_sample(smodel, sample, dominant, "A", "B", settings)
    slow, st_slow = tracing.trace_sample(smodel, sample, dominant, "A", "B", settings, fast=False)
    assert [(c["subset"], c["n_div"], c["positions"]) for c in fast["cells"]] == \
        [(c["subset"], c["n_div"], c["positions"]) for c in slow["cells"]]
    assert any(c["subset"] == "object" for c in fast["cells"])
    for a, b in zip(fast["cells"], slow["cells"]):
        assert a["ie_clean"] == pytest.approx(b["ie_clean"], abs=1e-5)
        assert a["ie_corrupt"] == pytest.approx(b["ie_corrupt"], abs=1e-5)
    assert fast["sinks"] == slow["sinks"] and st_fast.history.keys() == st_slow.history.keys()


def test_qwen3_omni_fast_path_with_qk_norm_moe_and_deepstack():
    from model_zoo.tiny_qwen3_omni import build_inputs as build3
    from model_zoo.tiny_qwen3_omni import tiny_hf_thinker as thinker3

    model = HookedAVModel.from_hf_model(thinker3(seed=0))
    assert model.cfg.qk_norm and model.cfg.deepstack_layers
    raw = build3("av", seed=2)
    black = dict(raw, pixel_values_videos=torch.zeros_like(raw["pixel_values_videos"]))  # DeepStack writes differ
    clean, corrupt = model.prepare_inputs(**raw), model.prepare_inputs(**black)
    mm = clean.modality_map
    audio, video = mm.positions("audio").tolist(), mm.positions("video").tolist()
    subsets = [audio, audio[::3], video[::4], []]
    for site in ("before_attn", "resid_pre"):
        expected = straightforward_logits(model, clean, corrupt, subsets, site, None)
        recorder = patching.ActivationRecorder(model, sorted({p for s in subsets for p in s}), site)
        clean_run = fast_patching.clean_pass(model, clean, recorder.hooks())
        corrupt_run = fast_patching.corrupt_pass(model, clean_run, corrupt)
        for batch_size in (1, 2):
            fast = fast_patching.restored_logits(model, clean_run, corrupt_run, subsets, site,
                                                 captured=recorder.activations(), batch_size=batch_size)
            torch.testing.assert_close(fast, expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(ie_table(model, corrupt, fast), ie_table(model, corrupt, expected),
                                       rtol=0, atol=1e-5)


def test_mlp_in_chunks_gives_the_same_values_and_yields_to_mlp_hooks(smodel):
    av = smodel.prepare_inputs(**build_inputs("av", seed=2))
    with torch.no_grad():
        whole = smodel(av, return_type="last_logits")
        with fast_patching.mlp_in_chunks(smodel, rows=7):
            chunked = smodel(av, return_type="last_logits")
            seen = []
            with smodel.hooks(fwd_hooks=[(hook_names.block(1, "mlp.hook_post"), lambda t, hook: seen.append(t.shape))]):
                smodel(av, return_type="none")
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert seen == [(1, av.input_ids.shape[1], smodel.cfg.d_mlp)]  # a hooked MLP sees the whole sequence
    assert all(b.mlp_chunk_rows is None for b in smodel.blocks)
