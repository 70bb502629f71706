"""Which modality reads each sink: modality attention scores and the unimodal / cross-modal split.

For a sink at position s and layer l, v_l(s) is the mean attention it receives from later video queries
(mean over heads and over video queries q > s) and a_l(s) the same for audio queries (0 when there is no such
query; text queries are ignored). MDS_l(s) = (v - a) / (v + a + eps) in [-1, 1]: +1 read by video only, -1 by
audio only. The scores are accumulated while each attention block is computed (`blocks.{l}.attn.hook_pattern`),
so no attention map is kept: memory is one block of one layer's scores. `ModalityAttentionRecorder` gets the same
scores for every key from an sdpa pass run for something else (probabilities rebuilt block by block from queries,
keys and each row's log-sum-exp), so the sinks can be chosen after that pass.

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


def attention_lse(
    q: Float[Tensor, "batch head q_pos d_head"],
    k: Float[Tensor, "batch kv_head k_pos d_head"],
    v: Float[Tensor, "batch kv_head k_pos d_head"],
    scale: float,
    key_valid: Tensor | None = None,
    block_rows: int = 256,
) -> Float[Tensor, "batch head q_pos"]:
    """Log-sum-exp over the keys of each query row's scaled scores under the model's causal mask (float32).

    With it, any attention probability is exp(q.k * scale - lse) without the map ever existing. On a CPU with a
    plain causal mask the fused flash kernel returns it alongside the output (one extra attention call); otherwise
    it is computed in query blocks of `block_rows` rows (memory O(rows x keys)). `key_valid` [batch, k_pos] marks
    real keys (None: all); a query with no visible key sees itself, as `AttentionMask` does.
    """
    from ..components import AttentionMask, repeat_kv

    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    plain = key_valid is None or bool(key_valid.all())
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if plain and flash is not None and q.device.type == "cpu" and q.shape[2] == k.shape[2]:
        try:
            return flash(q, k, v, 0.0, True, scale=scale)[1].float()
        except (RuntimeError, NotImplementedError):  # a dtype or layout the kernel refuses: compute it below
            pass
    valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if key_valid is None else key_valid
    mask = AttentionMask(valid, n_query=q.shape[2])
    k_t = k.float().transpose(2, 3)
    out = []
    for r0 in range(0, q.shape[2], block_rows):
        rows = slice(r0, min(q.shape[2], r0 + block_rows))
        scores = torch.matmul(q[:, :, rows].float(), k_t) * scale
        scores = scores.masked_fill(~mask.allowed(rows), float("-inf"))
        out.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(out, dim=-1)


class ModalityAttentionRecorder:
    """The v / a scores of `modality_attention` for every key position, recorded during an sdpa pass the caller
    runs anyway (e.g. the clean scoring pass), so that the sinks can be chosen after the pass.

    At each layer the hooks take the rotated queries and keys of sample `batch`, get the log-sum-exp of every query
    row (`attention_lse`: on a CPU the fused kernel returns it with one extra attention call), and accumulate
    exp(q.k * scale - lse), i.e. the attention probabilities, from video and from audio queries onto every earlier
    key, in blocks of `query_block` query rows. No attention map is materialised and the pass stays sdpa; what is
    kept is two sums per layer and position. `roles(sinks)` reads the sinks' columns. Only the first call per layer
    over the whole prompt is recorded (inside `generate`, the prefill).
    """

    def __init__(self, model: Any, inputs: Any, batch: int = 0, layers: Sequence[int] | None = None,
                 query_block: int = 256):
        av = model.as_inputs(inputs)
        self.modality_map = av.modality_map
        self.batch = batch
        self.layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        self.seq_len = av.input_ids.shape[1]
        self.key_valid = av.attention_mask[batch:batch + 1].bool()
        self.scale = float(model.blocks[0].attn.scale)
        self.n_rep = model.cfg.n_rep
        self._n_heads = model.cfg.n_heads
        self.query_block = query_block
        self._codes = {"v": int(Modality.VIDEO), "a": int(Modality.AUDIO)}
        self._v: dict[int, Tensor] = {}
        self._q: dict[int, Tensor] = {}
        #: layer -> {"v": [pos], "a": [pos]}: summed probabilities (over heads and later queries of the modality)
        self.sums: dict[int, dict[str, Tensor]] = {}

    def _whole_prompt(self, act: Tensor, layer: int) -> bool:
        return act.shape[1] == self.seq_len and layer not in self.sums

    def _keep_v(self, v: Tensor, hook: Any) -> None:
        if self._whole_prompt(v, hook.layer()):
            self._v[hook.layer()] = v[self.batch:self.batch + 1]

    def _keep_q(self, q: Tensor, hook: Any) -> None:
        if self._whole_prompt(q, hook.layer()):
            self._q[hook.layer()] = q[self.batch:self.batch + 1]

    def _on_k(self, k: Tensor, hook: Any) -> None:
        layer = hook.layer()
        if not self._whole_prompt(k, layer):
            return
        q, v, k = self._q.pop(layer), self._v.pop(layer), k[self.batch:self.batch + 1]
        with torch.no_grad():
            self.sums[layer] = self._accumulate(q[0], k[0], v[0])

    def _accumulate(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """q [pos, head, d_head], k and v [pos, kv_head, d_head] -> per modality, [pos] summed probabilities."""
        valid = self.key_valid.to(q.device)[0]
        lse = attention_lse(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], self.scale,
                            valid[None])[0]  # [head, pos]
        mod = self.modality_map.modality[self.batch].to(q.device)
        kv_heads = k.shape[1]
        keys_t = k.float().permute(1, 2, 0)  # [kv, d_head, pos]
        lse = lse.view(kv_heads, self.n_rep, -1)
        out = {}
        for m, code in self._codes.items():
            total = torch.zeros(self.seq_len, dtype=torch.float64, device=q.device)
            queries = torch.nonzero(mod == code).squeeze(-1)  # one modality per block: no per-row selection
            for r0 in range(0, len(queries), self.query_block):
                rows = queries[r0:r0 + self.query_block]
                width = int(rows[-1])  # keys strictly before the block's last query
                if width == 0:
                    continue
                qr = q[rows].float().view(len(rows), kv_heads, self.n_rep, -1).permute(1, 2, 0, 3)  # [kv, rep, m, d]
                p = torch.matmul(qr, keys_t[:, None, :, :width]).mul_(self.scale)  # [kv, rep, m, width]
                p = p.sub_(lse[:, :, rows, None]).exp_().sum((0, 1))  # probabilities summed over heads: [m, width]
                hidden = rows[:, None] <= torch.arange(width, device=q.device)[None, :]  # not strictly later
                p.masked_fill_(hidden | ~valid[None, :width], 0.0)
                total[:width] += p.sum(0).double()
            out[m] = total.cpu()
        return out

    def hooks(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for layer in self.layers:
            out += [(hook_names.block(layer, "attn.hook_v"), self._keep_v),
                    (hook_names.block(layer, "attn.hook_rot_q"), self._keep_q),
                    (hook_names.block(layer, "attn.hook_rot_k"), self._on_k)]
        return out

    def roles(self, sinks: Sequence[int]) -> SinkRoles:
        """v and a scores (and MDS) of the given sink positions, as `modality_attention` computes them."""
        missing = [layer for layer in self.layers if layer not in self.sums]
        if missing:
            raise RuntimeError(f"nothing recorded for layers {missing[:5]}: run a pass with the recorder's hooks")
        mod = self.modality_map.modality[self.batch]
        s_pos = torch.tensor(list(sinks), dtype=torch.long)
        scores = {}
        for m, code in self._codes.items():
            is_m = (mod == code).long()
            after = (is_m.sum() - is_m.cumsum(0))[s_pos].double()  # later queries of modality m per sink
            total = torch.stack([self.sums[layer][m][s_pos] for layer in self.layers])  # [layer, sink]
            count = after * self._n_heads
            scores[m] = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).float()
        mod_names = [Modality(int(c)).name.lower() for c in mod[s_pos].tolist()]
        return SinkRoles([int(p) for p in s_pos.tolist()], mod_names, scores["v"], scores["a"])


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
