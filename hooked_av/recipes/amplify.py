"""Attention amplification on chosen keys (PAI-style; the official, commented-out rule of the paper's code).

On the pre-softmax scores (`blocks.{l}.attn.hook_attn_scores`, after the causal mask), for chosen key positions
S, chosen query rows and chosen layers: a <- a + alpha * |a|. Every selected logit rises (x(1 + alpha) when
positive, x(1 - alpha) when negative), so the softmax moves mass toward S. Official: layers l > 5, alpha 0.2,
queries = text after the audio-visual block in prefill (q >= text_start = one past the last audio/video token)
and the new token at every decoding step, which the same rule covers (new tokens sit past the prompt).
Masked entries (padding, future keys) are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import hook_names
from ..inputs import ModalityMap

#: the official constants (modeling_qwen2_5_omni_low.py, commented out): alpha 0.2 on layers with index > 5
OFFICIAL_ALPHA = 0.2
OFFICIAL_FIRST_LAYER = 6
QuerySelector = Callable[[Tensor, int], Tensor]  # (absolute query positions, batch row) -> bool mask


def official_layers(n_layers: int) -> list[int]:
    return list(range(OFFICIAL_FIRST_LAYER, n_layers))


def amplify_hooks(
    keys: Sequence[Sequence[int]],
    query_start: Sequence[int],
    alpha: float,
    layers: Sequence[int],
) -> list[tuple[str, Any]]:
    """Hooks amplifying keys[b] for queries at positions >= query_start[b] of batch row b."""
    key_sets = [torch.tensor(sorted(set(map(int, k))), dtype=torch.long) for k in keys]
    starts = torch.tensor(list(query_start), dtype=torch.long)

    def amplify(scores: Tensor, hook: Any) -> Tensor:
        if scores.shape[0] != len(key_sets):
            raise ValueError(f"{len(key_sets)} key sets for a batch of {scores.shape[0]}")
        rows: slice = hook.query_slice
        q = torch.arange(rows.start, rows.stop, device=scores.device)
        n_keys = scores.shape[-1]
        sel = torch.zeros(scores.shape[0], 1, scores.shape[2], n_keys, dtype=torch.bool, device=scores.device)
        for b, k in enumerate(key_sets):
            k = k[k < n_keys].to(scores.device)
            qmask = q >= starts[b].item()
            sel[b, 0][qmask.nonzero()[:, 0][:, None], k[None, :]] = True
        masked = scores <= torch.finfo(scores.dtype).min / 2
        return torch.where(sel & ~masked, scores + alpha * scores.abs(), scores)

    return [(hook_names.attn_scores(layer), amplify) for layer in layers]


@contextlib.contextmanager
def amplified_attention(
    model: Any,
    keys: Sequence[int] | Sequence[Sequence[int]],
    modality_map: ModalityMap | None = None,
    alpha: float = OFFICIAL_ALPHA,
    layers: Sequence[int] | None = None,
    query_start: int | Sequence[int] | None = None,
) -> Iterator[None]:
    """Amplify attention to `keys` inside the block (around `model(...)` or `model.generate(...)`).

    keys: positions (one list for a batch of one or for every row, or one list per row).
    query_start: first query position amplified per row; by default one past the last audio/video token of
        `modality_map` (the official text queries), so decoding steps are always amplified. 0 = every query.
    layers: default the official l > 5.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    layers = official_layers(model.cfg.n_layers) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {model.cfg.n_layers} layers")
    if isinstance(keys, Tensor):
        keys = keys.tolist()  # 1-D: one set for every row; 2-D: one set per row
    nested = len(keys) > 0 and isinstance(keys[0], (list, tuple, Tensor))
    if query_start is None:
        if modality_map is None:
            raise ValueError("pass modality_map (to start at the text after the clip) or query_start")
        query_start = [modality_map.av_end(b) for b in range(modality_map.batch_size)]
    batch = len(query_start) if isinstance(query_start, Sequence) else (len(keys) if nested else 1)
    starts = list(query_start) if isinstance(query_start, Sequence) else [int(query_start)] * batch
    key_sets = [list(map(int, k)) for k in keys] if nested else [list(map(int, keys))] * len(starts)
    if len(key_sets) != len(starts):
        raise ValueError(f"{len(key_sets)} key sets for {len(starts)} rows")
    with model.hooks(fwd_hooks=amplify_hooks(key_sets, starts, alpha, layers)):
        yield
