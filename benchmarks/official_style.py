"""The official pipeline's way of computing one sample's IE table, on a transformers Qwen2.5-Omni thinker.

Written from METHOD.md §3-§8 (the official code is not copied), for the cost comparison in `tracing.py`:
- stage 1, clean and corrupted runs: `generate` with the LLM in eager attention, `output_attentions=True`,
  `output_hidden_states=True`, `output_logits=True` (the official custom generate passes all of them); answer
  probabilities = max over the generated steps of softmax(raw logits) over the letter's candidate ids; for the
  clean run, per-layer sinks from the prefill's hidden states 0..L-1 (no-gain RMS normalisation, fp32,
  phi = max over the sink dims, phi > tau), global sinks = `Counter.most_common(int(T / N))`, and each sink's
  modality scores from the prefill's attention maps (mean over heads and later video / audio queries), then the
  median split by layer-mean MDS (`build_layerlist`);
- stage 2, per subset: a clean `generate` whose forward hooks on every layer's `input_layernorm` copy the outputs
  at S (prefill only), then a corrupted `generate` whose hooks overwrite them (`trace_with_patch_memory_optimized`);
  restored probabilities as in stage 1.
Random subsets use the library's seeded draw (the official draw is unseeded) so both pipelines restore the same
sets. Every `generate` produces exactly `answer_tokens` tokens (a letter and the end of the turn for a real model;
random weights never stop by themselves).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analyses.tracing import random_subset
from model_zoo.tiny import TOK


@dataclass
class OfficialResult:
    """Probabilities per subset (max over generated steps, and at the first step = teacher-forced), the subsets,
    and wall times per stage."""

    subsets: dict[str, list[int]]
    p_clean: dict[str, float]
    p_corrupt: dict[str, float]
    p_corrupt_first: dict[str, float]
    restored: dict[str, dict[str, float]]
    restored_first: dict[str, dict[str, float]]
    times: dict[str, float] = field(default_factory=dict)


def use_eager_llm(hf: Any) -> None:
    """The official setting: the thinker's language model in eager attention (towers keep their own)."""
    hf.config.text_config._attn_implementation = "eager"
    hf.model.language_model.config._attn_implementation = "eager"


def generate(hf: Any, inputs: dict[str, Any], answer_tokens: int, maps: bool) -> Any:
    """One official-style `generate` call (greedy, raw logits kept; attention maps and hidden states if `maps`)."""
    return hf.generate(**inputs, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=False,
                       output_scores=True, output_logits=True, return_dict_in_generate=True,
                       output_attentions=maps, output_hidden_states=maps, eos_token_id=TOK["eos"],
                       pad_token_id=TOK["pad"])


def letter_probs(step_logits: Sequence[torch.Tensor], letters: dict[str, Sequence[int]],
                 first_only: bool = False) -> dict[str, float]:
    """max over steps (official `max_prob_for_word`) of max over the letter's ids of softmax(raw logits)."""
    steps = step_logits[:1] if first_only else step_logits
    probs = [torch.softmax(s[0].float(), -1) for s in steps]
    return {L: max(float(p[list(ids)].max()) for p in probs) for L, ids in letters.items()}


def global_sinks(hidden: Sequence[torch.Tensor], dims: Sequence[int], tau: float, n_div: int) -> list[int]:
    """Positions of the top int(T / N) tokens by the number of layers (inputs 0..L-1) in which they are sinks."""
    counter: Counter[int] = Counter()
    n_layers = len(hidden) - 1
    for layer in range(n_layers):
        x = hidden[layer][0].float()
        r = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
        phi = r[:, list(dims)].amax(-1)
        counter.update(torch.nonzero(phi > tau).squeeze(-1).tolist())
    return [p for p, _ in counter.most_common(int(hidden[0].shape[1] / n_div))]


def modality_scores(attentions: Sequence[torch.Tensor], sinks: list[int], video: torch.Tensor,
                    audio: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """v_l(s), a_l(s): mean over heads and later video / audio queries of the prefill attention to each sink."""
    s = torch.tensor(sinks, dtype=torch.long)
    t = attentions[0].shape[-1]
    later = torch.arange(t)[:, None] > s[None, :]  # [q, sink]
    out = []
    for queries in (video, audio):
        sel = (queries[:, None] & later).float()  # [q, sink]
        count = sel.sum(0) * attentions[0].shape[1]
        per_layer = []
        for a in attentions:
            cols = a[0][:, :, s].float()  # [head, q, sink]
            total = (cols * sel[None]).sum((0, 1))
            per_layer.append(torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)))
        out.append(torch.stack(per_layer).numpy())
    return out[0], out[1]


def official_split(sinks: list[int], v: np.ndarray, a: np.ndarray, dominant: str) -> tuple[list[int], list[int]]:
    """`build_layerlist`: stable sort by nanmean MDS (descending when audio dominates), first half unimodal."""
    mds = (v - a) / (v + a + 1e-9)
    score = {p: float(np.nanmean(mds[:, i])) for i, p in enumerate(sinks)}
    ranked = sorted(sinks, key=lambda p: score[p], reverse=dominant == "audio")
    mid = len(ranked) // 2
    return ranked[:mid], ranked[mid:]


def _layer_hooks(hf: Any, positions: list[int], store: dict[int, torch.Tensor], write: bool) -> list[Any]:
    """Forward hooks on every layer's input_layernorm that copy (or overwrite) the outputs at `positions`,
    prefill only (`trace_with_patch_memory_optimized`)."""
    index = torch.tensor(positions, dtype=torch.long)
    handles = []
    for layer, module in enumerate(hf.model.language_model.layers):
        def hook(mod: Any, args: Any, out: torch.Tensor, layer: int = layer) -> None:
            if out.shape[1] == 1:  # a decoding step
                return
            if write:
                out[0, index] = store[layer]
            else:
                store[layer] = out[0, index].clone()
        handles.append(module.input_layernorm.register_forward_hook(hook))
    return handles


def restore_run(hf: Any, clean: dict[str, Any], corrupt: dict[str, Any], positions: list[int],
                answer_tokens: int) -> Any:
    """Stage 2 for one subset: the clean generate that captures, then the corrupted generate that restores."""
    store: dict[int, torch.Tensor] = {}
    for write, inputs in ((False, clean), (True, corrupt)):
        handles = _layer_hooks(hf, positions, store, write)
        try:
            out = generate(hf, inputs, answer_tokens, maps=False)
        finally:
            for h in handles:
                h.remove()
    return out


def ie_table(
    hf: Any, clean: dict[str, Any], corrupt: dict[str, Any], letters: dict[str, Sequence[int]],
    modality: torch.Tensor, dominant: str, dims: Sequence[int], tau: float, n_div: int = 2, seed: int = 0,
    sample_id: str = "bench", answer_tokens: int = 2, subsets: Sequence[str] | None = None,
) -> OfficialResult:
    """The official pipeline for one sample: stage 1 (clean with sinks and MDS, corrupted) and stage 2 per subset.

    `modality`: [pos] codes of the ModalityMap (video 2, audio 1 as in `hooked_av.inputs.Modality`).
    `subsets` (default: all six of the table) names which stage-2 runs to make.
    """
    from hooked_av.inputs import Modality

    times: dict[str, float] = {}
    video, audio = modality == int(Modality.VIDEO), modality == int(Modality.AUDIO)
    base = video if dominant == "audio" else audio
    base_positions = torch.nonzero(base).squeeze(-1).tolist()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = generate(hf, clean, answer_tokens, maps=True)
        p_clean = letter_probs(out.logits, letters)
        ever = global_sinks(out.hidden_states[0], dims, tau, n_div)
        vis = [p for p in ever if video[p]]
        aud = [p for p in ever if audio[p]]
        history = vis + aud
        v, a = modality_scores(out.attentions[0], history, video, audio) if history else (np.zeros((0, 0)),) * 2
        base_sinks = vis if dominant == "audio" else aud
        keep = [history.index(p) for p in base_sinks]
        uni, cross = official_split(base_sinks, v[:, keep], a[:, keep], dominant) if keep else ([], [])
        del out
        times["stage 1 clean (maps, sinks, MDS)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(hf, corrupt, answer_tokens, maps=True)
        p_corrupt, p_corrupt_first = letter_probs(out.logits, letters), letter_probs(out.logits, letters, True)
        del out
        times["stage 1 corrupted (maps)"] = time.perf_counter() - t0
        chosen = {"all": base_positions, "sink": sorted(base_sinks),
                  "random_sink_num": random_subset(base_positions, len(base_sinks), seed, sample_id, n_div),
                  "random_sink_num_half": random_subset(base_positions, len(base_sinks) // 2, seed + 1, sample_id,
                                                        n_div),
                  "cross_modal_sink": sorted(cross), "uni_modal_sink": sorted(uni)}
        if subsets is not None:
            chosen = {k: chosen[k] for k in subsets}
        restored, restored_first = {}, {}
        t0 = time.perf_counter()
        for name, positions in chosen.items():
            out = restore_run(hf, clean, corrupt, positions, answer_tokens)
            restored[name] = letter_probs(out.logits, letters)
            restored_first[name] = letter_probs(out.logits, letters, first_only=True)
            del out
        times[f"stage 2 ({len(chosen)} subsets x 2 generates)"] = time.perf_counter() - t0
    return OfficialResult(chosen, p_clean, p_corrupt, p_corrupt_first, restored, restored_first, times)
