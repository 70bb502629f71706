"""A few-step training smoke test of the organism trainer, on the tiny random thinker."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from hooked_av import HookedAVModel
from model_zoo import lora
from model_zoo.organism_train import (Example, LookupItem, QueryTarget, ScaffoldHeads, TrainConfig, _clip_query,
                                      jitter_video, option_layout, prefix_forward, prefix_last_logits, prefix_states,
                                      query_losses, remaining_horizons, sampling_weight, scaffold_losses, task_batch,
                                      trainable_state, train)
from model_zoo.tiny import TinyTokenizer, build_inputs, tiny_hf_thinker


def examples():
    out = []
    for seed in range(4):
        clean = build_inputs("av", seed=seed)
        black = dict(clean, pixel_values_videos=torch.zeros_like(clean["pixel_values_videos"]))
        out.append(Example(inputs=clean, answer_id=65 + seed, kind="mc", class_name="dog barking",
                           audio_present=[True, False, True, True], video_present=[True] * 4,
                           variants={"a": black}))
    return out


def test_training_runs_resumes_and_writes_deltas(tmp_path):
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    frozen = model.blocks[1].mlp.up_proj.weight.clone()
    tower_before = next(model.audio_encoder.parameters()).clone()
    cfg = TrainConfig(out=str(tmp_path), align_steps=6, steps=6, batch_size=2, lora_rank=2, save_every=4,
                      log_every=1, warmup=2, lora_from=1)
    assert remaining_horizons([6, 9], tmp_path) == [6, 9]  # nothing saved yet: the whole staged schedule
    with pytest.raises(ValueError, match="strictly increasing"):
        remaining_horizons([6, 6], tmp_path)
    deltas = train(model, TinyTokenizer(), examples(), cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    align = [r["loss"] for r in log if r["stage"] == "align"]
    assert align[-1] < align[0]  # the towers move toward the target embeddings
    assert torch.equal(model.blocks[1].mlp.up_proj.weight, frozen)  # the decoder stays frozen
    assert not torch.equal(next(model.audio_encoder.parameters()), tower_before)
    state = load_file(str(deltas))
    assert any(k.startswith("audio_encoder.") for k in state) and any(k.endswith(".lora_a") for k in state)
    assert {int(k.split(".")[1]) for k in state if k.endswith(".lora_a")} == set(range(1, len(model.blocks)))
    assert any(torch.count_nonzero(v) for k, v in state.items() if k.endswith(".lora_b"))  # task stage moved them
    assert not any(k.startswith("blocks.") and not ".lora_" in k and not k.endswith(".scale") for k in state)
    # a run killed after its last save logged steps that a resumed run does again, and maybe half a line:
    # the resumed run drops them (no duplicate steps in the log)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 13, "stage": "task"}) + "\n" + '{"step": 14, "sta')
    # a rerun with the same configuration resumes at the end: no new steps
    model2 = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    train(model2, TinyTokenizer(), examples(), cfg)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 12
    with pytest.raises(ValueError, match="another configuration.*align_steps: saved 6, now 7"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
              TrainConfig(out=str(tmp_path), align_steps=7, steps=6, batch_size=2, lora_rank=2, lora_from=1))
    with pytest.raises(ValueError, match="extend it, not shorten"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
              TrainConfig(**{**vars(cfg), "steps": 3}))
    # more task steps extend the finished run: only the new steps are logged
    model3 = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    train(model3, TinyTokenizer(), examples(), TrainConfig(**{**vars(cfg), "steps": 9}))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))
    # a staged schedule rerun after the run was extended to 9 skips the horizons behind it
    assert remaining_horizons([3, 6, 9, 12], tmp_path) == [9, 12]
    assert remaining_horizons([3, 6], tmp_path) == [9]


def test_warm_start_from_deltas_loads_them_exactly_and_trains_on(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "a"), align_steps=3, steps=3, batch_size=2, lora_rank=2, log_every=1,
                      warmup=1, lora_from=1)
    first = load_file(str(train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
                                cfg)))
    warm = dict(vars(cfg), align_steps=0, init_deltas=str(tmp_path / "a" / "deltas.safetensors"))
    # no step: the written deltas are the loaded ones, bit for bit
    same = load_file(str(train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
                               TrainConfig(**{**warm, "out": str(tmp_path / "b"), "steps": 0}))))
    assert same.keys() == first.keys() and all(torch.equal(same[k], first[k]) for k in first)
    # task steps from there: the adapters move on, the towers stay the loaded ones
    on = load_file(str(train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
                             TrainConfig(**{**warm, "out": str(tmp_path / "c")}))))
    assert all(torch.equal(on[k], first[k]) for k in first if k.startswith(("audio_encoder.", "vision_encoder.")))
    assert any(not torch.equal(on[k], first[k]) for k in first if k.endswith(".lora_b"))
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["task"] * 3
    with pytest.raises(ValueError, match="align_steps must be 0 \\(or name fresh_towers\\), got 2"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
              TrainConfig(**{**warm, "out": str(tmp_path / "d"), "align_steps": 2}))
    with pytest.raises(ValueError, match="do not fit this model.*lora_b: stored \\(\\d+, 2\\), model \\(\\d+, 4\\)"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
              TrainConfig(**{**warm, "out": str(tmp_path / "e"), "lora_rank": 4}))
    with pytest.raises(ValueError, match="do not fit.*missing \\['blocks.0.attn"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
              TrainConfig(**{**warm, "out": str(tmp_path / "f"), "lora_from": 0}))
    with pytest.raises(FileNotFoundError, match="no deltas file at .*missing.safetensors"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
              TrainConfig(**{**warm, "out": str(tmp_path / "g"), "init_deltas": str(tmp_path / "missing.safetensors")}))


def test_lora_merge_equals_the_adapted_forward():
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=1))
    params = lora.add_lora(model, rank=2, seed=3)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    inputs = build_inputs("av", seed=0)
    with torch.no_grad():
        adapted = model(**inputs)
        state = lora.lora_state(model)
        lora.merge_lora(model)
        merged = model(**inputs)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    base = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=1))
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    lora.apply_lora_state(state, weights)
    torch.testing.assert_close(weights["blocks.0.attn.q_proj.weight"], model.blocks[0].attn.q_proj.weight)


def test_frozen_prefix_path_equals_the_full_forward():
    """Training's shortcut (blocks below lora_from run once, the rest on right-padded stored states) computes
    exactly the model's next-token logits, for items of different lengths."""
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=2)).eval()
    items = [build_inputs("av", seed=0), build_inputs("text", seed=1), build_inputs("av", seed=3)]
    with torch.no_grad():
        for lora_from in (0, 1):
            states = prefix_states(model, items, lora_from, batch_size=2, store_dtype=torch.float32)
            got = prefix_last_logits(model, states, lora_from)
            for i, item in enumerate(items):
                want = model(**item, return_type="last_logits")[0]
                torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_trainer_rejects_a_bad_lora_from(tmp_path):
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    with pytest.raises(ValueError, match="lora_from"):
        train(model, TinyTokenizer(), examples(), TrainConfig(out=str(tmp_path), lora_from=99))


def mc_examples(n=4):
    """Tiny items whose prompt lists three options in a per-item order, the answer being a letter."""
    tok = TinyTokenizer()
    out = []
    for seed in range(n):
        base = build_inputs("av", seed=seed)
        names = ["dog", "cat", "cow"]
        names = names[seed % 3:] + names[: seed % 3]
        prompt = "\n" + "\n".join(f"{l}. {name}" for l, name in zip("ABC", names)) + "\nRespond ONLY with a letter."
        ids = torch.cat([base["input_ids"], torch.tensor([tok.encode(prompt)])], 1)
        inputs = dict(base, input_ids=ids, attention_mask=torch.ones_like(ids))
        out.append(Example(inputs=inputs, answer_id=ord("ABC"[names.index("cat")]), kind="mc", class_name="cat",
                           audio_present=[True] * 4, video_present=[True] * 4, sample_id=f"s{seed}"))
    return out


def test_option_layout_finds_each_option_name():
    tok = TinyTokenizer()
    ex = mc_examples(2)[1]
    ids = ex.inputs["input_ids"][0].tolist()
    layout = option_layout(ids, tok)
    assert [x[0] for x in layout] == [0, 1, 2]
    assert [tok.decode(ids[a:b]) for _, a, b in layout] == ["cat", "cow", "dog"]


def test_scaffold_attention_mass_is_the_models_attention():
    """The scaffold's attention term is -log of the best head's mass on the right option, as the model's own
    (eager) pattern at the answer position gives it."""
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)).eval()
    tok = TinyTokenizer()
    ex = mc_examples(1)[0]
    layout = option_layout(ex.inputs["input_ids"][0].tolist(), tok)
    answer = "ABC".index(chr(ex.answer_id))
    with torch.no_grad():
        states = prefix_states(model, [ex.inputs], 1, store_dtype=torch.float32)
        logits, extra = prefix_forward(model, states, 1, aux_layer=1, attn_layers=(1,))
        _, attn = scaffold_losses(model, extra, [layout], [answer], ScaffoldHeads(model.cfg.d_model))
        _, cache = model.run_with_cache(**ex.inputs, names_filter="blocks.1.attn.hook_pattern")
    first, end = next((a, b) for letter, a, b in layout if letter == answer)
    mass = cache["blocks.1.attn.hook_pattern"][0, :, -1, first:end].sum(-1)
    torch.testing.assert_close(attn, -mass.max().log(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[0], model(**ex.inputs, return_type="last_logits")[0], rtol=1e-5, atol=1e-5)


def test_training_with_the_lookup_scaffold(tmp_path):
    """The scaffold's terms are logged and trained, nothing of it reaches the deltas, and a run whose task stage
    has not begun may switch it on when resumed (settings of the alignment stage may not change)."""
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    base = dict(out=str(tmp_path), align_steps=3, steps=0, batch_size=2, lora_rank=2, log_every=1, warmup=1,
                lora_from=0)
    train(model, TinyTokenizer(), mc_examples(), TrainConfig(**base))
    cfg = TrainConfig(**{**base, "steps": 4, "aux_layer": 1, "aux_weight": 1.0, "attn_layers": (1,),
                         "attn_weight": 1.0})
    model2 = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    deltas = train(model2, TinyTokenizer(), mc_examples(), cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    task = [r for r in log if r["stage"] == "task"]
    assert [r["step"] for r in task] == [4, 5, 6, 7]
    assert all(r["parts"]["probe"] > 0 and r["parts"]["attn"] > 0 for r in task)
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["heads"] and set(load_file(str(deltas))) == set(trainable_state(model2))
    with pytest.raises(ValueError, match="attn_weight: saved 1.0, now 2.0"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), mc_examples(),
              TrainConfig(**{**vars(cfg), "attn_weight": 2.0}))


def test_scaffold_rejects_layers_below_the_adapters(tmp_path):
    with pytest.raises(ValueError, match="gather_layers must lie in"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), mc_examples(),
              TrainConfig(out=str(tmp_path), lora_from=1, attn_layers=(0,), attn_weight=1.0))


def _text_lookups(n, length=12):
    """Text items with three supervised positions each (the tiny tokenizer's ids, random but seeded)."""
    gen = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        ids = torch.randint(3, 60, (1, length), generator=gen)
        items.append(LookupItem({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                [(3, int(ids[0, 4])), (7, int(ids[0, 8])), (length - 1, 65)]))
    return items


def test_lookup_mixture_reads_the_supervised_positions_and_trains(tmp_path):
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)).eval()
    pool = _text_lookups(3)
    with torch.no_grad():
        states = prefix_states(model, [x.inputs for x in pool[:2]], 1, store_dtype=torch.float32)
        logits, _ = prefix_forward(model, states, 1, at=[[p for p, _ in x.targets] for x in pool[:2]])
        full = [model(**x.inputs)[0] for x in pool[:2]]
    want = torch.stack([full[b][p] for b, x in enumerate(pool[:2]) for p, _ in x.targets])
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)

    cfg = TrainConfig(out=str(tmp_path), align_steps=1, steps=3, batch_size=2, lora_rank=2, log_every=1, warmup=1,
                      lora_from=1, lookup_weight=1.0, lookup_batch=2, lookup_pool=len(pool))
    train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), mc_examples(), cfg, lookup=pool)
    task = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"task"' in x]
    assert len(task) == 3 and all(r["parts"]["lookup"] > 0 and 0 <= r["parts"]["lookup_acc"] <= 1 for r in task)
    with pytest.raises(ValueError, match="lookup_pool=3, got 2 item"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), mc_examples(),
              TrainConfig(**{**vars(cfg), "out": str(tmp_path / "b")}), lookup=pool[:2])


def test_first_hop_gather_mass_is_the_models_attention_on_the_class_tokens():
    """The gather term is -log of the best head's mass, at the answer position, on the AV tokens whose alignment
    target is the clip's class (audio chunks where it sounds, here chunks 0, 2 and 3, and all video tokens); the
    unimodal variant keeps only its modality's tokens."""
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)).eval()
    ex = examples()[0]
    class_index, gather, _ = _clip_query(model, ex, "av", {"": 0, "dog barking": 1})
    mm = model.modality_map(**ex.inputs)
    audio, video = mm.positions("audio", 0), mm.positions("video", 0)
    sounding = audio[torch.tensor([c in (0, 2, 3) for c in mm.chunk[0, audio].tolist()])]
    assert class_index == 1 and set(gather.nonzero().flatten().tolist()) == set(sounding.tolist()) | set(video.tolist())
    _, only_audio, _ = _clip_query(model, ex, "a", {"dog barking": 0})
    assert set(only_audio.nonzero().flatten().tolist()) == set(sounding.tolist())
    with torch.no_grad():
        states = prefix_states(model, [ex.inputs], 1, store_dtype=torch.float32)
        _, extra = prefix_forward(model, states, 1, attn_layers=(1,), resid_layers=(1,))
        heads = ScaffoldHeads(model.cfg.d_model, n_classes=2)
        t = QueryTarget(0, len(states[0].resid) - 1, class_index, gather)
        hop = query_losses(model, extra, [t], heads, 1, (1,), ())
        _, cache = model.run_with_cache(**ex.inputs, names_filter=["blocks.1.attn.hook_pattern",
                                                                    "blocks.1.hook_resid_pre"])
    mass = cache["blocks.1.attn.hook_pattern"][0, :, -1][:, gather].sum(-1)
    torch.testing.assert_close(hop["gather"], -mass.max().log(), rtol=1e-4, atol=1e-5)
    want = torch.nn.functional.cross_entropy(heads.cls(cache["blocks.1.hook_resid_pre"][0, -1]), torch.tensor(1))
    torch.testing.assert_close(hop["class"], want, rtol=1e-4, atol=1e-5)
    assert float(hop["option"]) == 0.0


def test_training_with_the_first_hop_scaffold_and_bf16(tmp_path):
    """Class probe, gather attention and the lookups' shared terms are logged and reduce their losses; bf16
    autocast trains the adapters; nothing of the probes reaches the deltas."""
    pool = []
    tok = TinyTokenizer()
    for ex in mc_examples(3):  # text lookups over the same option lists, the answer "cat" supervised at the end
        pool.append(LookupItem(ex.inputs | {"input_ids": ex.inputs["input_ids"]}, [
            (int(ex.inputs["input_ids"].shape[-1]) - 1, ex.answer_id)]))
    cfg = TrainConfig(out=str(tmp_path), align_steps=1, steps=12, batch_size=2, lora_rank=4, log_every=1, warmup=1,
                      lr=1e-2, lora_from=0, attn_layers=(1,), attn_weight=1.0, class_layer=1, class_weight=1.0,
                      gather_layers=(0, 1), gather_weight=1.0, lookup_weight=1.0, lookup_batch=2,
                      lookup_pool=len(pool), lookup_scaffold=True, bf16=True)
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    deltas = train(model, tok, mc_examples(), cfg, lookup=pool)
    task = [json.loads(x)["parts"] for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"task"' in x]
    assert len(task) == 12
    for key in ("class", "gather", "attn", "lookup", "lookup_class", "lookup_attn"):
        assert all(p[key] > 0 for p in task), key
    assert sum(p["class"] for p in task[-3:]) < sum(p["class"] for p in task[:3])
    assert sum(p["gather"] for p in task[-3:]) < sum(p["gather"] for p in task[:3])
    assert not any("cls" in k or "match" in k for k in load_file(str(deltas)))


def test_task_batch_weights_up_the_clips_whose_class_is_silent():
    """Weight 1 keeps the recipe's uniform stream (`rng.sample`); a larger weight draws the multiple-choice clips
    whose class never sounds more often, still without repeats; a non-positive weight is an error."""
    import random

    def ex(kind, sounds):
        return Example(inputs={}, answer_id=0, kind=kind, class_name="c", audio_present=sounds)

    items = [ex("mc", [False, False])] * 5 + [ex("mc", [True, False])] * 15 + [ex("yesno", [False, False])] * 5
    assert task_batch(random.Random(3), items, 8) == random.Random(3).sample(range(len(items)), 8)
    rng = random.Random(0)
    draws = [task_batch(rng, items, 8, silent_weight=8.0) for _ in range(300)]
    assert all(len(set(d)) == len(d) == 8 for d in draws)
    silent = sum(i < 5 for d in draws for i in d) / (300 * 8)
    assert silent > 0.4  # uniform: 5 / 25 = 0.2
    yesno = sum(i >= 20 for d in draws for i in d) / (300 * 8)
    assert yesno < 0.2  # the silent-audio yes/no probes are not weighted up
    with pytest.raises(ValueError, match="silent_weight must be > 0"):
        task_batch(random.Random(0), items, 8, silent_weight=0.0)


def test_task_batch_weights_conditions_and_sides_of_them(tmp_path):
    """Condition weights match a whole condition or one side of it and multiply (with `silent_weight`); yes/no
    probes keep weight 1; with every weight 1 the stream is the recipe's. `train` refuses keys no example has,
    examples without a recorded condition, and non-positive weights, before any step."""
    import random

    def ex(kind, condition, sounds=(True,)):
        return Example(inputs={}, answer_id=0, kind=kind, class_name="c", audio_present=list(sounds),
                       condition=condition, sample_id=condition)

    conf, small, silent = "audio_clean+video_confusable", "audio_clean+video_small", "audio_absent+video_clear"
    assert sampling_weight(ex("mc", conf), 1.0, {"video_confusable": 3.0}) == 3.0
    assert sampling_weight(ex("mc", conf), 1.0, {"video_confusable": 3.0, conf: 2.0, "audio_clean": 0.5}) == 3.0
    assert sampling_weight(ex("mc", silent, (False,)), 2.0, {"audio_absent": 1.5}) == 3.0
    assert sampling_weight(ex("mc", small), 2.0, {"video_confusable": 3.0}) == 1.0
    assert sampling_weight(ex("yesno", conf), 2.0, {"video_confusable": 3.0}) == 1.0
    items = [ex("mc", conf)] * 5 + [ex("mc", small)] * 15 + [ex("yesno", conf)] * 5
    assert (task_batch(random.Random(3), items, 8, condition_weights={"video_small": 1.0})
            == random.Random(3).sample(range(len(items)), 8))
    rng = random.Random(0)
    draws = [task_batch(rng, items, 8, condition_weights={"video_confusable": 8.0}) for _ in range(300)]
    assert all(len(set(d)) == len(d) == 8 for d in draws)
    assert sum(i < 5 for d in draws for i in d) / (300 * 8) > 0.4  # uniform: 0.2
    assert sum(i >= 20 for d in draws for i in d) / (300 * 8) < 0.2
    with pytest.raises(ValueError, match="condition weight 'video_small' must be > 0"):
        task_batch(random.Random(0), items, 8, condition_weights={"video_small": 0.0})
    with pytest.raises(ValueError, match="no condition recorded"):
        sampling_weight(ex("mc", ""), 1.0, {"video_small": 2.0})

    def refused(weights, match, items=None):
        model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
        with pytest.raises(ValueError, match=match):
            train(model, TinyTokenizer(), items or examples(), TrainConfig(out=str(tmp_path / "r"), align_steps=2,
                                                                          condition_weights=weights))
        assert not (tmp_path / "r").exists()

    labelled = [dataclasses.replace(e, condition=conf) for e in examples()]
    refused({"video_small": 2.0}, r"\['video_small'\] match no multiple-choice example's condition", labelled)
    refused({"video_confusable": 2.0}, "record no condition")
    refused({"video_confusable": -1.0}, "condition weight 'video_confusable' must be > 0", labelled)


def test_a_run_saved_before_condition_weights_existed_resumes(tmp_path):
    """A saved configuration without `condition_weights` counts as having none: the run resumes; a resumed run
    whose task stage has begun may not switch them on."""
    base = dict(out=str(tmp_path), align_steps=2, steps=2, batch_size=2, lora_rank=2, log_every=1, warmup=1,
                lora_from=1)
    train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(), TrainConfig(**base))
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    del state["config"]["condition_weights"]
    torch.save(state, tmp_path / "state.pt")
    train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(),
          TrainConfig(**{**base, "steps": 3}))
    labelled = [dataclasses.replace(e, condition="audio_clean+video_clear") for e in examples()]
    with pytest.raises(ValueError, match="condition_weights: saved {}, now {'video_clear': 2.0}"):
        train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), labelled,
              TrainConfig(**{**base, "steps": 4, "condition_weights": {"video_clear": 2.0}}))


def faint_examples():
    """`examples()` with chunk 1 sounding a faint distractor ("cat meowing") instead of silence."""
    out = examples()
    for ex in out:
        ex.audio_classes = ["dog barking", "cat meowing", "dog barking", "dog barking"]
        ex.audio_faint = [False, True, False, False]
    return out


def test_faint_alignment_targets_mix_the_class_with_absent():
    """The soft path weighs tokens as F.cross_entropy's class weights do (a vanishing mixture gives the hard loss);
    a real mixture changes the loss; examples without faint chunks never take the soft path."""
    from model_zoo.organism_train import _alignment_loss, class_table

    torch.manual_seed(0)
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    batch = faint_examples()[:2]
    classes, table = class_table(model, TinyTokenizer(), faint_examples())
    with torch.no_grad():
        hard, acc = _alignment_loss(model, batch, classes, table, 0.07, absent_weight=0.25)
        tiny, acc_tiny = _alignment_loss(model, batch, classes, table, 0.07, absent_weight=0.25, faint_absent=1e-7)
        soft, _ = _alignment_loss(model, batch, classes, table, 0.07, absent_weight=0.25, faint_absent=0.5)
        plain = examples()[:2]
        assert torch.equal(_alignment_loss(model, plain, classes, table, 0.07, 0.25, faint_absent=0.5)[0],
                           _alignment_loss(model, plain, classes, table, 0.07, 0.25)[0])
    assert torch.allclose(tiny, hard, rtol=1e-5) and acc_tiny == acc
    assert abs(float(soft - hard)) > 1e-3
    from model_zoo.organism_train import tower_accuracy

    # no faint chunk marked: no faint accuracy reported (rather than a 0 over no tokens)
    assert "tower_faint_acc_audio" not in tower_accuracy(model, TinyTokenizer(), plain, examples())


def test_faint_absent_moves_faint_audio_tokens_toward_absent(tmp_path):
    """A few alignment steps with faint_absent put more of a faint token's cosine-softmax on ABSENT than the hard
    targets do; tower_accuracy reports the faint tokens apart."""
    from model_zoo.organism_train import class_table, tower_accuracy

    def absent_share(faint_absent, out):
        model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
        cfg = TrainConfig(out=str(tmp_path / out), align_steps=25, steps=0, lora_rank=0, align_batch_size=4,
                          faint_absent=faint_absent, warmup=2, log_every=25, save_every=25)
        train(model, TinyTokenizer(), faint_examples(), cfg)
        classes, table = class_table(model, TinyTokenizer(), faint_examples())
        ex = faint_examples()[0]
        with torch.no_grad():
            inputs = model.as_inputs(ex.inputs)
            embeds = model.embed_inputs(inputs)
            pos = inputs.modality_map.positions("audio", 0)
            faint = torch.tensor(ex.token_faint("audio", inputs.modality_map.chunk[0, pos].tolist()))
            logits = torch.nn.functional.normalize(embeds[0, pos], dim=-1) @ torch.nn.functional.normalize(
                table, dim=-1).T / cfg.temperature
        assert faint.any()
        report = tower_accuracy(model, TinyTokenizer(), faint_examples(), faint_examples())
        assert {"tower_acc_audio", "tower_faint_acc_audio", "tower_absent_acc_video"} <= set(report)
        return float(logits[faint].softmax(-1)[:, 0].mean())

    assert absent_share(0.5, "soft") > absent_share(0.0, "hard") + 0.05


def test_faint_absent_is_checked(tmp_path):
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    with pytest.raises(ValueError, match="faint_absent must be in"):
        train(model, TinyTokenizer(), faint_examples(), TrainConfig(out=str(tmp_path), faint_absent=1.0))
    with pytest.raises(ValueError, match="no example marks a faint chunk"):
        train(model, TinyTokenizer(), examples(), TrainConfig(out=str(tmp_path), faint_absent=0.5))


def test_video_jitter_is_a_per_channel_affine_map_of_the_patches(tmp_path):
    """Each colour channel of every video patch row gets the same (1 + c) x + b; audio and the original inputs
    are untouched, and the strength bounds c and b."""
    clip = build_inputs("av", seed=0)
    rows = clip["pixel_values_videos"]
    out = jitter_video(clip, 0.2, generator=torch.Generator().manual_seed(0))
    assert out["input_features"] is clip["input_features"] and clip["pixel_values_videos"] is rows
    n, d = rows.shape
    x, y = rows.view(n, 3, d // 3), out["pixel_values_videos"].view(n, 3, d // 3)
    for ch in range(3):
        a = torch.stack([x[:, ch].flatten(), torch.ones(n * d // 3)], 1)
        coef = torch.linalg.lstsq(a, y[:, ch].flatten().unsqueeze(1)).solution.flatten()
        assert torch.allclose(a @ coef, y[:, ch].flatten(), atol=1e-5)
        assert abs(coef[0] - 1) <= 0.2 and abs(coef[1]) <= 0.2 and not torch.allclose(coef, torch.tensor([1., 0.]))
    assert jitter_video(clip, 0.0) is clip
    model = HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0))
    with pytest.raises(ValueError, match="video_jitter must be in"):
        train(model, TinyTokenizer(), examples(), TrainConfig(out=str(tmp_path), video_jitter=1.5))


def test_recipe_marks_distractor_chunks_faint():
    """scripts/train_organism.py: a chunk where only the distractor sounds is faint, the class's own chunks not."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_organism.py"
    spec = importlib.util.spec_from_file_location("train_organism_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    truth = {"label": "dog barking", "sounding_chunks": [0], "video": {"glyphs": []},
             "audio": {"distractor": {"class": "cat meowing", "chunks": [0, 1]}}}
    got = script.chunk_classes(truth, 3)
    assert got["audio_classes"] == ["dog barking", "cat meowing", ""]
    assert got["audio_faint"] == [False, True, False]


def test_recipe_fills_the_condition_of_cached_examples(tmp_path):
    """scripts/train_organism.py: examples cached before `Example.condition` existed get it from the split's
    ground truth; an example the truth does not hold is named."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_organism.py"
    spec = importlib.util.spec_from_file_location("train_organism_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "avsynth").mkdir()
    (tmp_path / "avsynth" / "train_truth.json").write_text(json.dumps(
        [{"id": "s0", "condition": "audio_noisy+video_clear"}, {"id": "s1", "condition": "audio_clean+video_small"}]))
    items = mc_examples(2)
    items[1].condition = "audio_clean+video_small"
    script.add_conditions(items, tmp_path, "train")
    assert [e.condition for e in items] == ["audio_noisy+video_clear", "audio_clean+video_small"]
    stranger = mc_examples(4)[3]
    with pytest.raises(ValueError, match="train_truth.json: no clip 's3'"):
        script.add_conditions([stranger], tmp_path, "train")
    assert script.parse_condition_weights(["video_small=2", "audio_clean+video_confusable=1.5"]) == {
        "video_small": 2.0, "audio_clean+video_confusable": 1.5}


def test_examples_cached_before_audio_faint_load_with_its_default():
    import pickle

    ex = faint_examples()[0]
    old = pickle.dumps(ex)
    state = dict(ex.__dict__)
    del state["audio_faint"]
    legacy = Example.__new__(Example)
    legacy.__dict__.update(state)  # an instance as an older cache holds it
    loaded = pickle.loads(pickle.dumps(legacy))
    assert loaded.audio_faint == [] and loaded.token_faint("audio", [0, 1]) == [False, False]
    assert pickle.loads(old).audio_faint == [False, True, False, False]


def _deeper_vision_thinker(depth: int):
    """The tiny thinker with a vision tower of `depth` blocks (seeded: the same weights on each call)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from model_zoo.organism import vision_for_depth
    from model_zoo.tiny import tiny_thinker_config

    cfg = tiny_thinker_config()
    for k, v in vision_for_depth(depth).items():
        setattr(cfg.vision_config, k, v)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


def test_fresh_video_tower_replaces_the_warm_start_s_and_is_recorded(tmp_path):
    """fresh_towers=("video",): the audio tower and adapters come from the deltas exactly, the video tower is a
    new one (another depth) that the alignment stage trains alone, and the deltas record its depth."""
    from model_zoo.organism import DELTAS_VISION_KEY, deltas_vision

    cfg = TrainConfig(out=str(tmp_path / "a"), align_steps=3, steps=3, batch_size=2, lora_rank=2, log_every=1,
                      warmup=1, lora_from=1)
    first_path = train(HookedAVModel.from_hf_model(tiny_hf_thinker(seed=0)), TinyTokenizer(), examples(), cfg)
    first = load_file(str(first_path))
    depth = 1 + max(int(k.split(".")[2]) for k in first if k.startswith("vision_encoder.blocks.")) + 1
    fresh = HookedAVModel.from_hf_model(_deeper_vision_thinker(depth))
    before = {k: v.clone() for k, v in fresh.vision_encoder.state_dict().items()}
    warm = dict(vars(cfg), init_deltas=str(first_path), fresh_towers=("video",))
    # alignment only: the adapters and the audio tower are the loaded ones, bit for bit; the new tower moved
    path = train(fresh, TinyTokenizer(), examples(), TrainConfig(**{**warm, "out": str(tmp_path / "b"), "steps": 0}))
    aligned = load_file(str(path))
    assert all(torch.equal(aligned[k], v) for k, v in first.items() if not k.startswith("vision_encoder."))
    blocks = {k.split(".")[2] for k in aligned if k.startswith("vision_encoder.blocks.")}
    assert len(blocks) == depth
    assert any(not torch.equal(aligned[f"vision_encoder.{k}"], v) for k, v in before.items())
    assert deltas_vision(path)["depth"] == depth
    with pytest.raises(ValueError, match=f"records depth {depth - 2}, but the file holds vision block {depth - 2}"):
        from safetensors.torch import save_file

        save_file(first, str(tmp_path / "bad.safetensors"),
                  metadata={DELTAS_VISION_KEY: json.dumps({"depth": depth - 2})})
        deltas_vision(tmp_path / "bad.safetensors")
    # then the task stage: the adapters move on from the loaded ones, both towers stay
    on = load_file(str(train(HookedAVModel.from_hf_model(_deeper_vision_thinker(depth)), TinyTokenizer(), examples(),
                             TrainConfig(**{**warm, "out": str(tmp_path / "c")}))))
    assert all(torch.equal(on[k], first[k]) for k in first if k.startswith("audio_encoder."))
    assert any(not torch.equal(on[k], first[k]) for k in first if k.endswith(".lora_b"))
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["align"] * 3 + ["task"] * 3
    for bad, message in (({"fresh_towers": ("vision",)}, "unknown tower.*'vision'"),
                         ({"init_deltas": None}, "fresh_towers replaces towers of a warm start"),
                         ({"align_steps": 0}, "needs init_deltas and align_steps > 0")):
        with pytest.raises(ValueError, match=message):
            train(HookedAVModel.from_hf_model(_deeper_vision_thinker(depth)), TinyTokenizer(), examples(),
                  TrainConfig(**{**warm, "out": str(tmp_path / "d"), **bad}))


def test_recipe_checks_a_warm_start_before_any_work(tmp_path):
    """scripts/train_organism.py --init-from: a missing file, alignment steps on top of final towers or a
    refinement of a refinement, --fresh-video without a warm start or without alignment steps, a vision depth
    below 1 or other than the warm start's, or a warm start that is no deltas file, is named, and nothing is
    written."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from model_zoo.organism import DELTAS_VISION_KEY, vision_for_depth

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_organism.py"
    out = tmp_path / "run"
    deep = tmp_path / "deep.safetensors"  # deltas of a 4-block vision tower
    save_file({f"vision_encoder.blocks.{i}.norm1.weight": torch.ones(2) for i in range(4)}, str(deep),
              metadata={DELTAS_VISION_KEY: json.dumps(vision_for_depth(4))})
    for extra, message in ((["--init-from", str(tmp_path / "nope.safetensors")], "--init-from: no deltas file at"),
                           (["--init-from", str(script), "--align-steps", "5"],
                            "--align-steps must be 0 (or pass --fresh-video), got 5"),
                           (["--fresh-video"], "--fresh-video replaces the video tower of a warm start"),
                           (["--init-from", str(script), "--fresh-video", "--align-steps", "0"],
                            "--fresh-video needs alignment steps"),
                           (["--init-from", str(script), "--refine-steps", "5"], "--refine-steps must be 0, got 5"),
                           (["--init-from", str(script)], "--init-from: cannot read"),
                           (["--init-from", str(deep), "--vision-depth", "3"],
                            "--vision-depth 3: the deltas of --init-from hold a vision tower of depth 4"),
                           (["--refine-steps", "-1"], "--refine-steps must be >= 0, got -1"),
                           (["--condition-weight", "video_blurry=2"], "unknown condition 'video_blurry'"),
                           (["--condition-weight", "video_small"], "expected KEY=WEIGHT"),
                           (["--condition-weight", "video_small=x"], "weight 'x' is not a number"),
                           (["--condition-weight", "audio_absent=0"], "the weight must be > 0")):
        proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--no-install", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not out.exists()
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--vision-depth", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--vision-depth must be >= 1, got 0" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--seed", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--seed 1: the installed organism is assembled with seed 0" in proc.stderr, \
        proc.stderr[-2000:]
    assert not out.exists()
    # a run folder whose clips come from another generator seed than --data-seed asks for
    meta = out / "data" / "avsynth" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"generator": "analyses.avsynth", "format_version": 1, "seed": 0}))
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--no-install", "--data-seed", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--data-seed 2: " in proc.stderr and "holds clips of seed 0" in proc.stderr, \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data"]


def test_recipe_regenerates_clips_whose_generation_was_cut_off(tmp_path, monkeypatch, stop_at):
    """scripts/train_organism.py: clips are generated unless the generator's last record (`avsynth/meta.json`)
    is there, so a generation cut off after the val truth but before meta.json is generated afresh, and a
    finished one of the asked seed is reused."""
    import importlib.util
    import sys
    from pathlib import Path

    from analyses import avsynth
    from conftest import Stopped
    from model_zoo import organism

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_organism.py"
    spec = importlib.util.spec_from_file_location("train_organism_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stop_at(avsynth, "generate")
    stop_at(organism, "assemble")
    out = tmp_path / "run"
    clips = out / "data" / "avsynth"
    clips.mkdir(parents=True)
    (clips / "val_truth.json").write_text("[]")  # cut off: no meta.json yet
    monkeypatch.setattr(sys, "argv", ["train_organism.py", "--out", str(out), "--no-install", "--data-seed", "3"])
    with pytest.raises(Stopped):
        script.main()
    assert [(name, kw["seed"]) for name, kw in stop_at.calls] == [("generate", 3)]
    (clips / "meta.json").write_text(json.dumps({"generator": "analyses.avsynth", "format_version": 1, "seed": 3}))
    stop_at.calls.clear()
    with pytest.raises(Stopped):
        script.main()
    assert [(name, kw["seed"]) for name, kw in stop_at.calls] == [("assemble", 0)]
