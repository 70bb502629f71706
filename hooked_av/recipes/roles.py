"""Which modality reads each sink: modality attention scores and the unimodal / cross-modal split.

For a sink at position s and layer l, v_l(s) is the mean attention it receives from later video queries
(mean over heads and over video queries q > s) and a_l(s) the same for audio queries (0 when there is no such
query; text queries are ignored). MDS_l(s) = (v - a) / (v + a + eps) in [-1, 1]: +1 read by video only, -1 by
audio only. The scores are accumulated while each attention block is computed (`blocks.{l}.attn.hook_pattern`),
so no attention map is kept: memory is one block of one layer's scores.

The split of the sinks of the non-dominant ("base") modality into unimodal and cross-modal ones has two rules:
- "official" (the official build_layerlist): sort by the layer-mean MDS, descending when audio is dominant
  (base = video sinks), ascending when video is dominant (base = audio sinks), stable; the first half
  (n // 2) is unimodal, the rest cross-modal. A relative median split, not a sign rule.
- "threshold": cross-modal = attended more by the other modality on average over layers (layer-mean MDS < 0
  for a video sink, > 0 for an audio sink); the rest unimodal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .. import hook_names
from ..inputs import Modality

#: denominator guard of the official MDS
MDS_EPS = 1e-9
SPLIT_RULES: tuple[str, ...] = ("official", "threshold")
SplitRule = Literal["official", "threshold"]


@dataclass
class SinkRoles:
    """Per sink (in the order given) and layer: mean attention from later video and audio queries, and MDS."""

    positions: list[int]
    modality: list[str]  # each sink's own modality ("video", "audio", "text", ...)
    v_score: Float[Tensor, "layer sink"]
    a_score: Float[Tensor, "layer sink"]

    @property
    def mds(self) -> Float[Tensor, "layer sink"]:
        return (self.v_score - self.a_score) / (self.v_score + self.a_score + MDS_EPS)

    @property
    def mean_mds(self) -> Float[Tensor, " sink"]:
        """Layer-mean MDS per sink (NaN-aware, as the official nanmean)."""
        return torch.nanmean(self.mds, dim=0)

    def history(self) -> dict[int, dict[str, list[float]]]:
        """The official history layout: {position: {"mds": [...], "v_score": [...], "a_score": [...]}}."""
        mds = self.mds
        return {p: {"mds": mds[:, i].tolist(), "v_score": self.v_score[:, i].tolist(),
                    "a_score": self.a_score[:, i].tolist()} for i, p in enumerate(self.positions)}


def modality_attention(
    model: Any,
    inputs: Any,
    sinks: Sequence[int],
    batch: int = 0,
    layers: Sequence[int] | None = None,
) -> SinkRoles:
    """v and a scores of the given sink positions of sample `batch`, streamed over attention blocks.

    One forward pass with eager attention computed in query blocks (the model's block budget).
    """
    from ..model import AVInputs

    av = inputs if isinstance(inputs, AVInputs) else model.prepare_inputs(**inputs)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    mm = av.modality_map
    device = model.device
    s_pos = torch.tensor(list(sinks), dtype=torch.long, device=device)
    q_mod = mm.modality[batch].to(device)
    n = len(sinks)
    sums = {m: torch.zeros(len(layers), n, dtype=torch.float64, device=device) for m in ("v", "a")}
    counts = {m: torch.zeros(n, dtype=torch.float64, device=device) for m in ("v", "a")}
    layer_index = {layer: i for i, layer in enumerate(layers)}
    codes = {"v": int(Modality.VIDEO), "a": int(Modality.AUDIO)}

    def accumulate(pattern: Tensor, hook: Any) -> None:
        rows: slice = hook.query_slice
        if pattern.shape[-1] != mm.seq_len:  # decoding steps inside generate: not part of the prefill score
            return
        li = layer_index[hook.layer()]
        q = torch.arange(rows.start, rows.stop, device=device)
        att = pattern[batch].float().sum(0)[:, s_pos]  # [rows, sink], summed over heads
        later = q[:, None] > s_pos[None, :]
        for m, code in codes.items():
            sel = (q_mod[rows] == code)[:, None] & later
            sums[m][li] += (att * sel).sum(0).double()
            if li == 0:  # query counts do not depend on the layer: count them once
                counts[m] += sel.sum(0).double() * pattern.shape[1]

    with torch.no_grad():
        model.run_with_hooks(av, return_type="none",
                             fwd_hooks=[(hook_names.pattern(layer), accumulate) for layer in layers])
    scores = {m: torch.where(counts[m] > 0, sums[m] / counts[m].clamp_min(1), torch.zeros_like(sums[m]))
              for m in codes}
    mod_names = [Modality(int(c)).name.lower() for c in mm.modality[batch, s_pos.cpu()].tolist()]
    return SinkRoles(list(map(int, sinks)), mod_names, scores["v"].float().cpu(), scores["a"].float().cpu())


def split_sinks(
    positions: Sequence[int],
    mean_mds: Sequence[float] | Tensor,
    dominant: str,
    rule: SplitRule = "official",
) -> tuple[list[int], list[int]]:
    """(unimodal, cross_modal) among sinks of the non-dominant modality, given in ranking order with their
    layer-mean MDS. `dominant` is "audio" (the sinks are video sinks) or "video" (they are audio sinks)."""
    if dominant not in ("audio", "video"):
        raise ValueError(f"dominant must be 'audio' or 'video', got {dominant!r}")
    m = np.asarray(mean_mds.tolist() if isinstance(mean_mds, Tensor) else list(mean_mds), dtype=np.float64)
    if len(m) != len(positions):
        raise ValueError(f"{len(positions)} positions but {len(m)} MDS values")
    if rule == "official":
        # Python's stable sort, as build_layerlist: ascending for video-dominant, descending for audio-dominant
        ranked = [int(p) for p, _ in sorted(zip(positions, m.tolist()), key=lambda pm: pm[1],
                                             reverse=dominant == "audio")]
        mid = len(ranked) // 2
        return ranked[:mid], ranked[mid:]
    if rule == "threshold":
        # base = video sinks when audio dominates: cross-modal if read more by audio (MDS < 0); symmetric.
        cross = (m < 0) if dominant == "audio" else (m > 0)
        return ([int(p) for p, c in zip(positions, cross) if not c], [int(p) for p, c in zip(positions, cross) if c])
    raise ValueError(f"split rule must be one of {SPLIT_RULES}, got {rule!r}")


def split_roles(roles: SinkRoles, dominant: str, rule: SplitRule = "official") -> tuple[list[int], list[int]]:
    """`split_sinks` over the sinks of `roles` that belong to the non-dominant modality, in `roles` order."""
    base = "video" if dominant == "audio" else "audio"
    keep = [i for i, m in enumerate(roles.modality) if m == base]
    mean = roles.mean_mds
    return split_sinks([roles.positions[i] for i in keep], [float(mean[i]) for i in keep], dominant, rule)
