"""Attention amplification on chosen keys (PAI-style; the official, commented-out rule of the paper's code).

On the pre-softmax scores (`blocks.{l}.attn.hook_attn_scores`, after the causal mask), for chosen key positions
S, chosen query rows and chosen layers: a <- a + alpha * |a|. Every selected logit rises (x(1 + alpha) when
positive, x(1 - alpha) when negative), so the softmax moves mass toward S. Official: layers l > 5, alpha 0.2,
queries = text after the audio-visual block in prefill (q >= text_start = one past the last audio/video token)
and the new token at every decoding step, which the same rule covers (new tokens sit past the prompt).
Masked entries (padding, future keys) are never touched.

Options beyond the official rule: which query rows (`queries`: "text" = official, "last" = PAI's last query only
= the answer position in prefill plus every decoding step, "all" = every query), and which heads per layer
(`heads`, e.g. chosen from sink-role statistics by `recipes.mitigate.select_heads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .. import hook_names
from ..inputs import Modality, ModalityMap

#: the official constants (modeling_qwen2_5_omni_low.py, commented out): alpha 0.2 on layers with index > 5
OFFICIAL_ALPHA = 0.2
OFFICIAL_FIRST_LAYER = 6
QuerySelector = Callable[[Tensor, int], Tensor]  # (absolute query positions, batch row) -> bool mask
QueryRows = Literal["text", "last", "all"]
QUERY_ROWS: tuple[str, ...] = ("text", "last", "all")
#: layer -> heads amplified in that layer (a layer absent from the mapping: all heads)
HeadMap = Mapping[int, Sequence[int]]


def official_layers(n_layers: int) -> list[int]:
    return list(range(OFFICIAL_FIRST_LAYER, n_layers))


def query_starts(modality_map: ModalityMap, queries: QueryRows = "text") -> list[int]:
    """First amplified query position of each row: "text" one past the last audio/video token (official),
    "last" the row's last prompt token (the answer position; PAI's last query), "all" 0. Decoding steps sit past
    the prompt, so every rule amplifies them."""
    if queries == "text":
        return [modality_map.av_end(b) for b in range(modality_map.batch_size)]
    if queries == "last":
        valid = modality_map.modality != int(Modality.PAD)
        pos = torch.arange(modality_map.seq_len, device=valid.device)
        return [int((pos * valid[b]).amax()) for b in range(modality_map.batch_size)]
    if queries == "all":
        return [0] * modality_map.batch_size
    raise ValueError(f"queries must be one of {QUERY_ROWS}, got {queries!r}")


def _head_mask(heads: Sequence[int] | None, n_heads: int, device: torch.device) -> Tensor:
    """[1, head, 1, 1] True for the amplified heads (all when `heads` is None)."""
    mask = torch.zeros(1, n_heads, 1, 1, dtype=torch.bool, device=device)
    mask[:, list(heads) if heads is not None else slice(None)] = True
    return mask


def amplify_hooks(
    keys: Sequence[Sequence[int]],
    query_start: Sequence[int],
    alpha: float,
    layers: Sequence[int],
    heads: HeadMap | None = None,
) -> list[tuple[str, Any]]:
    """Hooks amplifying keys[b] for queries at positions >= query_start[b] of batch row b, in `layers`
    (and only in `heads[layer]` of a layer listed in `heads`)."""
    key_sets = [torch.tensor(sorted(set(map(int, k))), dtype=torch.long) for k in keys]
    starts = torch.tensor(list(query_start), dtype=torch.long)

    def make(layer_heads: Sequence[int] | None) -> Callable[[Tensor, Any], Tensor]:
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
            if layer_heads is not None:
                sel = sel & _head_mask(layer_heads, scores.shape[1], scores.device)
            masked = scores <= torch.finfo(scores.dtype).min / 2
            return torch.where(sel & ~masked, scores + alpha * scores.abs(), scores)

        return amplify

    heads = heads or {}
    return [(hook_names.attn_scores(layer), make(heads.get(layer))) for layer in layers]


def check_layers_and_heads(model: Any, layers: Sequence[int], heads: HeadMap | None = None) -> None:
    """ValueError naming layers or heads the model does not have."""
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {model.cfg.n_layers} layers")
    for layer, hs in (heads or {}).items():
        wrong = [h for h in hs if not 0 <= int(h) < model.cfg.n_heads]
        if wrong:
            raise ValueError(f"heads {wrong} of layer {layer} are outside the model's {model.cfg.n_heads} heads")


@contextlib.contextmanager
def amplified_attention(
    model: Any,
    keys: Sequence[int] | Sequence[Sequence[int]],
    modality_map: ModalityMap | None = None,
    alpha: float = OFFICIAL_ALPHA,
    layers: Sequence[int] | None = None,
    query_start: int | Sequence[int] | None = None,
    heads: HeadMap | None = None,
    queries: QueryRows = "text",
) -> Iterator[None]:
    """Amplify attention to `keys` inside the block (around `model(...)` or `model.generate(...)`).

    keys: positions (one list for a batch of one or for every row, or one list per row).
    query_start: first query position amplified per row; by default from `queries` and `modality_map`
        ("text": one past the last audio/video token, the official text queries; "last": the answer position;
        "all": every query), so decoding steps are always amplified. 0 = every query.
    layers: default the official l > 5. heads: layer -> heads to amplify there (default every head).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    layers = official_layers(model.cfg.n_layers) if layers is None else list(layers)
    check_layers_and_heads(model, layers, heads)
    if isinstance(keys, Tensor):
        keys = keys.tolist()  # 1-D: one set for every row; 2-D: one set per row
    nested = len(keys) > 0 and isinstance(keys[0], (list, tuple, Tensor))
    if query_start is None:
        if modality_map is None:
            raise ValueError("pass modality_map (to start at the text after the clip) or query_start")
        query_start = query_starts(modality_map, queries)
    batch = len(query_start) if isinstance(query_start, Sequence) else (len(keys) if nested else 1)
    starts = list(query_start) if isinstance(query_start, Sequence) else [int(query_start)] * batch
    key_sets = [list(map(int, k)) for k in keys] if nested else [list(map(int, keys))] * len(starts)
    if len(key_sets) != len(starts):
        raise ValueError(f"{len(key_sets)} key sets for {len(starts)} rows")
    with model.hooks(fwd_hooks=amplify_hooks(key_sets, starts, alpha, layers, heads)):
        yield
