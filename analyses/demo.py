"""`make demo`: the whole study on the embedded organism, offline, on CPU.

With the organism assembled in `.assets/organism` (the set-up does it), the demo generates a held-out avsynth test
split, runs the dominance filter, sinks and roles, the IE table for every subset and N, and every hallucination
mitigation method on the yes/no probes and captions of the clips where audio and video disagree, then writes
`<out>/report.md`, the plots, `<out>/mitigation/` and `<out>/summary.json` (`analyses.pipeline`). Without the organism (no assets), it falls back to the machinery check on a tiny *random*
Qwen2.5-Omni thinker (`run_tiny`) and says so.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from hooked_av import HookedAVModel, hook_names
from hooked_av.files import atomic_write_text
from model_zoo.tiny import TOK, build_inputs, tiny_hf_thinker

NOTICE = ("NOTE: without the organism this demo runs a tiny RANDOM Qwen2.5-Omni thinker "
          "(3 layers, d_model 64). Its numbers check the machinery, they say nothing about real models.")


ROOT = Path(__file__).resolve().parents[1]
ORGANISM_DIR = ROOT / ".assets" / "organism"
#: held-out clips of the demo (generated with another seed than the training clips) and the time budget knobs
DEMO_CLIPS, DEMO_SECONDS, MAX_TRACED_PER_GROUP = 150, 6, 15
#: the mitigation stage: yes/no questions and captions of the clips where audio and video disagree, caption length
MAX_MITIGATION_PROBES, MAX_MITIGATION_CAPTIONS, CAPTION_TOKENS = 24, 3, 12
CALIBRATION_CLIPS = 8


def run(out: str = "runs/demo", seed: int = 0, n_clips: int = DEMO_CLIPS,
        max_traced: int = MAX_TRACED_PER_GROUP, max_mitigation_probes: int = MAX_MITIGATION_PROBES,
        max_mitigation_captions: int = MAX_MITIGATION_CAPTIONS, caption_tokens: int = CAPTION_TOKENS) -> int:
    if not (ORGANISM_DIR / "config.json").exists():
        print(f"NOTE: no organism in {ORGANISM_DIR} (run `.venv/bin/python scripts/build_organism.py`); "
              "running the tiny random model instead.\n")
        return run_tiny(out, seed)
    return run_organism(out, seed, n_clips, max_traced, max_mitigation_probes, max_mitigation_captions,
                        caption_tokens)


def run_organism(out: str, seed: int, n_clips: int, max_traced: int, max_mitigation_probes: int,
                 max_mitigation_captions: int, caption_tokens: int = CAPTION_TOKENS) -> int:
    from analyses import avsynth
    from analyses.pipeline import StudyInputs, StudySettings, run_study
    from analyses.runtime import load_runtime
    from hooked_av.recipes.sinks import calibrate_sinks

    t0 = time.perf_counter()
    out_dir = Path(out)
    config = json.loads((ORGANISM_DIR / "config.json").read_text())
    trained = bool(config["hooked_av"]["organism"].get("deltas"))
    if not trained:
        print("NOTE: the organism's towers are UNTRAINED (no committed deltas; `make organism` trains them): "
              "accuracies will be at chance and the IE table says nothing about the model.\n")
    data = out_dir / "data"
    if not (data / "avsynth" / "test_mc.json").exists():
        avsynth.generate(data, n_train=0, n_val=0, n_test=n_clips, seed=seed + 1, duration=DEMO_SECONDS)
    rt = load_runtime(str(ORGANISM_DIR), seed=seed)
    rt.info["organism_trained"] = trained
    start_over_for(out_dir, rt.info["weights"])
    files = data / "avsynth"
    inputs = StudyInputs(mc_list=str(files / "test_mc.json"), media_root=str(data),
                         probes=str(files / "test_yesno.json"), object_blocks=str(files / "test_important_seconds.json"),
                         captions=str(files / "test_captions.json"))
    calibration = None
    if not rt.model.cfg.sinks.calibrated:
        from analyses.datasets import load_vggsound_mc, official_prompt
        from hooked_av import media

        samples = load_vggsound_mc(inputs.mc_list, media_root=data)[:CALIBRATION_CLIPS]
        clean = [rt.process(media.load_av(str(s.video), audio=str(s.audio)), official_prompt(s.choices, 1))
                 for s in samples]  # the clean clips only: calibration needs no corrupted conditions
        cal = calibrate_sinks(rt.model, clean, n_dims=1)
        rt.model.set_sinks(cal.sinks)
        rt.info["sinks"] = cal.sinks.to_dict()
        calibration = cal.to_dict()
        print(f"sink constants calibrated on {len(samples)} clips: dims {list(cal.sinks.dims)}, "
              f"tau {cal.sinks.tau:.2f} (flags {cal.sink_fraction['midpoint']:.1%} of token-layers)")
    summary = run_study(rt, inputs, out_dir, StudySettings(seed=seed, max_traced_per_group=max_traced,
                                                          max_mitigation_probes=max_mitigation_probes,
                                                          max_mitigation_captions=max_mitigation_captions,
                                                          caption_tokens=caption_tokens))
    summary["organism_trained"] = trained
    if calibration is not None:
        summary["calibration"] = calibration
    from analyses.records import atomic_write_text

    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print((out_dir / "report.md").read_text())
    print(f"wrote {out_dir / 'report.md'} and {out_dir / 'summary.json'} in {time.perf_counter() - t0:.0f} s")
    return 0


#: what `start_over_for` keeps of an earlier demo run: the generated clips do not depend on the model
KEPT_ON_RESTART = ("data",)
WEIGHTS_STAMP = "weights.txt"


def start_over_for(out_dir: Path, weights: str | None) -> None:
    """The demo's results are those of one checkpoint: when `out_dir` holds a run of other weights (the organism
    was retrained or reassembled since), clear its results (keeping the generated clips) instead of refusing to
    resume, and say so. A run of the same weights resumes where it stopped."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / WEIGHTS_STAMP
    old = stamp.read_text().strip() if stamp.exists() else None
    stale = [p for p in out_dir.iterdir() if p.name not in (*KEPT_ON_RESTART, WEIGHTS_STAMP)]
    if stale and old != str(weights):
        print(f"NOTE: {out_dir} holds results of other weights ({old or 'unrecorded'} there, {weights} now); "
              "starting the study over (the generated clips are kept).\n")
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    stamp.write_text(f"{weights}\n")


def run_tiny(out: str = "runs/demo", seed: int = 0) -> int:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    print(NOTICE, "\n")
    hf = tiny_hf_thinker(seed=seed, attn="eager")
    model = HookedAVModel.from_hf_model(hf)
    inputs = build_inputs(kind="av", grid=(5, 4, 4), frames=730, seed=seed)
    summary: dict = {"notice": NOTICE, "seed": seed, "torch": torch.__version__, "python": platform.python_version()}

    with torch.no_grad():
        ref = hf(**inputs, output_attentions=True)
        logits, cache = model.run_with_cache(**inputs)
    diff = (logits - ref.logits).abs().max().item()
    pattern_diff = max((cache["pattern", l] - ref.attentions[l]).abs().max().item() for l in range(model.cfg.n_layers))
    print(f"1. hooked model vs transformers Qwen2_5OmniThinkerForConditionalGeneration on a "
          f"{inputs['input_ids'].shape[1]}-token audio-in-video prompt:")
    print(f"   max |logit diff| = {diff:.2e}, max |pattern diff| = {pattern_diff:.2e}\n")
    summary["parity"] = {"max_abs_logit_diff": diff, "max_abs_pattern_diff": pattern_diff}

    mm = model.modality_map(**inputs)
    print("2. ModalityMap (contiguous runs):")
    print("   " + mm.describe().replace("\n", "\n   "), "\n")
    summary["modality_counts"] = mm.counts()

    print(f"3. run_with_cache: {len(model.hook_dict)} hook points, {len(cache)} cached activations, e.g.")
    for name in ("hook_embed", hook_names.pattern(0), hook_names.sink(1), "audio_tower.hook_out",
                 "video_tower.blocks.1.hook_resid_post"):
        print(f"   {name:40s} {tuple(cache[name].shape)}")
    print()

    corrupted = dict(inputs, input_features=torch.zeros_like(inputs["input_features"]))
    target = int(logits[0, -1].argmax())
    audio = mm.positions("audio")

    def restore(t, hook):
        t[:, audio] = cache[hook.name][:, audio]
        return t

    sites = [hook_names.ln1_normalized(layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        p_clean = logits[0, -1].softmax(-1)[target].item()
        p_corrupt = model(**corrupted)[0, -1].softmax(-1)[target].item()
        restored = model.run_with_hooks(**corrupted, fwd_hooks=[(s, restore) for s in sites])
        p_restored = restored[0, -1].softmax(-1)[target].item()
    print("4. zero the audio features, then restore the clean ln1 input at the audio positions in every layer")
    print(f"   P(clean top token): clean {p_clean:.4f}  corrupted {p_corrupt:.4f}  restored {p_restored:.4f}")
    print(f"   (restoring every audio position at every layer recovers the clean run: "
          f"|restored - clean| = {abs(p_restored - p_clean):.1e})\n")
    summary["patching"] = {"p_clean": p_clean, "p_corrupt": p_corrupt, "p_restored": p_restored,
                           "restored_positions": len(audio), "site": "blocks.{l}.ln1.hook_normalized"}

    gen = model.generate(**inputs, max_new_tokens=8)
    ref_gen = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=TOK["eos"], pad_token_id=TOK["pad"])
    same = torch.equal(gen.sequences, ref_gen[:, : gen.sequences.shape[1]])
    print(f"5. greedy generation with a KV cache: {gen.new_tokens[0].tolist()} "
          f"({'identical to' if same else 'DIFFERENT from'} transformers' generate)\n")
    summary["generation"] = {"new_tokens": gen.new_tokens[0].tolist(), "identical_to_transformers": same}

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"wrote {out_dir / 'summary.json'} in {summary['seconds']} s")
    ok = diff <= 1e-4 and same and abs(p_restored - p_clean) <= 1e-4
    return 0 if ok else 1


def list_hooks() -> int:
    model = HookedAVModel.from_hf_model(tiny_hf_thinker())
    for name in model.hook_dict:
        print(name)
    return 0
