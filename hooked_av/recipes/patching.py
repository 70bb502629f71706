"""Restore clean activations of a position set inside a corrupted run, and the indirect effects this has.

Sites (per layer, over a layer range; the official setting is `before_attn` at every layer):
- "before_attn": the attention input, `blocks.{l}.ln1.hook_normalized` (the official hook on input_layernorm;
  restoring the pre-gain value equals restoring the post-gain one). At every layer this equals restoring the
  keys and values of S (plus S's own queries, which only move S's own outputs).
- "kv": `attn.hook_k` and `attn.hook_v` (the K/V-cache entries of S).
- "resid_pre", "attn_out", "mlp_out": the residual stream entering the block, the attention / MLP outputs.

Only the prompt (prefill) is patched; during generation the restored keys and values stay in the KV cache,
as in the official code. Indirect effects, in percentage points, for a clean answer o_clean and a corrupted
answer o_corrupt:
    IE_clean(S)   = P_restored(o_clean)   - P_corrupt(o_clean)
    IE_corrupt(S) = P_corrupt(o_corrupt)  - P_restored(o_corrupt)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import hook_names
from .scoring import AnswerCandidates, ScoreMode, candidate_prob, official_probs

#: site -> hook sites inside `blocks.{l}`
SITES: dict[str, tuple[str, ...]] = {
    "before_attn": ("ln1.hook_normalized",),
    "kv": ("attn.hook_k", "attn.hook_v"),
    "resid_pre": ("hook_resid_pre",),
    "attn_out": ("hook_attn_out",),
    "mlp_out": ("hook_mlp_out",),
}
Site = Literal["before_attn", "kv", "resid_pre", "attn_out", "mlp_out"]
#: patched copies per decoder pass on an accelerator
GPU_BATCH = 8
#: percentage points per unit of probability
PP = 100.0


def site_names(site: str, layer: int) -> list[str]:
    if site not in SITES:
        raise ValueError(f"unknown patching site {site!r}; expected one of {sorted(SITES)}")
    return [hook_names.block(layer, s) for s in SITES[site]]


@dataclass
class CleanActivations:
    """Clean activations at one site for the positions that will be restored (not the whole sequence)."""

    site: str
    layers: list[int]
    positions: list[int]
    values: dict[str, Tensor]  # hook name -> [n_positions, ...]
    seq_len: int

    def rows_for(self, positions: Sequence[int]) -> Tensor:
        index = {p: i for i, p in enumerate(self.positions)}
        missing = [p for p in positions if p not in index]
        if missing:
            raise ValueError(f"positions {missing[:5]} were not captured (captured {len(self.positions)})")
        return torch.tensor([index[p] for p in positions], dtype=torch.long)


def _as_inputs(model: Any, inputs: Any) -> Any:
    from ..model import AVInputs

    return inputs if isinstance(inputs, AVInputs) else model.prepare_inputs(**inputs)


class ActivationRecorder:
    """The hooks of `capture`, for a pass the caller runs anyway (e.g. the clean scoring pass): they keep the site's
    activations at `positions` of a one-sample prompt. Only the first call per hook is kept (inside `generate`, the
    prompt). `activations()` returns them as `CleanActivations`."""

    def __init__(self, model: Any, positions: Sequence[int], site: Site = "before_attn",
                 layers: Sequence[int] | None = None, seq_len: int | None = None):
        self.site = site
        self.layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        self.positions = sorted({int(p) for p in positions})
        self.names = [n for layer in self.layers for n in site_names(site, layer)]
        self.seq_len = seq_len
        self._index = torch.tensor(self.positions, dtype=torch.long, device=model.device)
        self.values: dict[str, Tensor] = {}

    def _keep(self, act: Tensor, hook: Any) -> None:
        if hook.name in self.values:
            return
        if act.shape[0] != 1:
            raise ValueError(f"capture needs one clean sample, got a batch of {act.shape[0]}")
        if self.seq_len is None:
            self.seq_len = act.shape[1]
        self.values[hook.name] = act[0].index_select(0, self._index.to(act.device)).detach().clone()

    def hooks(self) -> list[tuple[str, Any]]:
        return [(n, self._keep) for n in self.names]

    def activations(self) -> CleanActivations:
        missing = [n for n in self.names if n not in self.values]
        if missing or self.seq_len is None:
            raise RuntimeError(f"nothing captured at {missing[:3]}: run a pass with the recorder's hooks")
        return CleanActivations(self.site, self.layers, self.positions, dict(self.values), seq_len=self.seq_len)


def capture(
    model: Any, clean_inputs: Any, positions: Sequence[int], site: Site = "before_attn",
    layers: Sequence[int] | None = None,
) -> CleanActivations:
    """One clean forward (batch of one), keeping the site's activations at `positions` only."""
    av = _as_inputs(model, clean_inputs)
    if av.input_ids.shape[0] != 1:
        raise ValueError(f"capture needs one clean sample, got a batch of {av.input_ids.shape[0]}")
    rec = ActivationRecorder(model, positions, site, layers, seq_len=av.input_ids.shape[1])
    with torch.no_grad():
        model.run_with_hooks(av, return_type="none", fwd_hooks=rec.hooks())
    return rec.activations()


def restore_hooks(clean: CleanActivations, subsets: Sequence[Sequence[int]]) -> list[tuple[str, Any]]:
    """Forward hooks writing the clean values of `subsets[b]` into batch row b (prefill only)."""
    rows = [(torch.tensor(list(s), dtype=torch.long), clean.rows_for(s)) for s in subsets]

    def write(act: Tensor, hook: Any) -> Tensor:
        if act.shape[1] != clean.seq_len:  # a decoding step: the prompt's restored K/V are already cached
            return act
        if act.shape[0] != len(rows):
            raise ValueError(f"{len(rows)} position sets for a batch of {act.shape[0]}")
        act = act.clone()
        src = clean.values[hook.name]
        for b, (pos, idx) in enumerate(rows):
            if len(pos):
                act[b, pos.to(act.device)] = src[idx.to(src.device)].to(act.dtype)
        return act

    return [(name, write) for name in clean.values]


@contextlib.contextmanager
def restored(model: Any, clean: CleanActivations, subsets: Sequence[Sequence[int]]) -> Iterator[None]:
    """Inside the block, the model's runs restore `subsets[b]` in batch row b (e.g. around `generate`)."""
    with model.hooks(fwd_hooks=restore_hooks(clean, subsets)):
        yield


def patched_probs(
    model: Any,
    clean: CleanActivations,
    corrupt_inputs: Any,
    subsets: Sequence[Sequence[int]],
    answers: Mapping[str, AnswerCandidates],
    mode: ScoreMode = "teacher_forced",
    batch_size: int | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> dict[str, Float[Tensor, " subset"]]:
    """P(answer) in the corrupted run with each subset restored, for every named answer.

    Teacher-forced: the towers run once on the corrupted inputs; the decoder runs on `batch_size` patched
    copies at a time (default: 1 on CPU, where batching gains nothing, `GPU_BATCH` on an accelerator).
    Official: one greedy generation per subset.
    """
    if batch_size is None:
        batch_size = 1 if model.device.type == "cpu" else GPU_BATCH
    av = _as_inputs(model, corrupt_inputs)
    if av.input_ids.shape[1] != clean.seq_len:
        raise ValueError(f"corrupted inputs have {av.input_ids.shape[1]} positions, clean {clean.seq_len}")
    out: dict[str, list[Tensor]] = {name: [] for name in answers}
    with torch.no_grad():
        if mode == "teacher_forced":
            embeds = model.embed_inputs(av)
            starts = range(0, len(subsets), batch_size)
            for start in tqdm(starts, desc="patching", disable=not progress, leave=False):
                chunk = subsets[start:start + batch_size]
                rep = av.repeat(len(chunk))
                with restored(model, clean, chunk):
                    final = model.decode(rep, embeds.expand(len(chunk), -1, -1), return_type="last_logits")
                for name, c in answers.items():
                    out[name].append(candidate_prob(final, c).cpu())
        elif mode == "official":
            for subset in tqdm(subsets, desc="patching", disable=not progress, leave=False):
                with restored(model, clean, [subset]):
                    gen = model.generate(av, max_new_tokens=max_new_tokens)
                for name, p in official_probs(gen.logits, answers, n_steps=gen.n_steps).items():
                    out[name].append(p.cpu())
        else:
            raise ValueError(f"score mode must be 'teacher_forced' or 'official', got {mode!r}")
    return {name: torch.cat(ps) if ps else torch.empty(0) for name, ps in out.items()}


@dataclass(frozen=True)
class IndirectEffect:
    """Indirect effects (percentage points) of restoring a subset, with the probabilities behind them."""

    ie_clean: float
    ie_corrupt: float
    p_corrupt_clean: float  # P_corrupt(o_clean)
    p_restored_clean: float  # P_restored(o_clean)
    p_corrupt_corrupt: float  # P_corrupt(o_corrupt)
    p_restored_corrupt: float  # P_restored(o_corrupt)


def indirect_effect(
    p_corrupt_clean: float, p_restored_clean: float, p_corrupt_corrupt: float, p_restored_corrupt: float
) -> IndirectEffect:
    """IE_clean and IE_corrupt in percentage points (floats or 0-d tensors in, floats out)."""
    p_corrupt_clean, p_restored_clean = float(p_corrupt_clean), float(p_restored_clean)
    p_corrupt_corrupt, p_restored_corrupt = float(p_corrupt_corrupt), float(p_restored_corrupt)
    return IndirectEffect(
        ie_clean=PP * (p_restored_clean - p_corrupt_clean),
        ie_corrupt=PP * (p_corrupt_corrupt - p_restored_corrupt),
        p_corrupt_clean=p_corrupt_clean, p_restored_clean=p_restored_clean,
        p_corrupt_corrupt=p_corrupt_corrupt, p_restored_corrupt=p_restored_corrupt,
    )
