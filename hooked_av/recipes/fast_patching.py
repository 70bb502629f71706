"""Indirect effects at the cost of a few prefills: restore token subsets by recomputing only what changes.

Straightforward patching (`patching.patched_probs`) runs the whole decoder once per subset. This module gets the
same answer logits (to float rounding) from far less work, by causality:

1. One clean pass (`clean_pass`: the model's own sdpa forward) keeps its K/V cache and the answer logits. Recorder
   hooks of other recipes (`sinks.SinkRecorder`, `roles.ModalityAttentionRecorder`,
   `patching.ActivationRecorder`) ride on it, so sinks, MDS and captured sites cost no pass of their own.
2. The corrupted pass (`corrupt_pass`) equals the clean one before c0, the first position whose input differs
   (embedding or residual write): it reuses the clean cache for [0, c0) and computes [c0, T) only.
3. A restored run for a subset S equals the corrupted run before p0, the first position of S at or after c0
   (before c0 clean and corrupted activations agree, so restoring them changes nothing): it reuses the corrupted
   cache for [0, p0). When the site is the attention input or the K/V (`before_attn`, `kv`) at every layer from
   some layer on (the official setting: every layer), restoring S from that layer on *is* substituting S's clean
   keys and values: S's own queries and residual rows are read by nothing else (except the answer position's,
   which is never dropped). So S's rows are not computed at all there; their keys and values come from the clean
   cache. Other sites, and layers below that point, patch S's rows exactly where the hooks of the straightforward
   path would. Only the rows [p0, T) (minus S where dropped) go through the linear layers; attention runs over
   the full key range as one causal sdpa call per layer (queries of rows not computed are zero and their outputs
   dropped), so no mask is ever materialised.
4. At the last layer only the answer position needs a query, attention output and MLP; the other rows need just
   their keys and values. Every pass runs the MLP on chunks of `MLP_CHUNK_ROWS` positions (its [pos, d_mlp]
   intermediates are otherwise the largest transient), so memory is the K/V caches plus small blocks.

Cost of a subset: the fraction (T - p0 - |S|) / T of a prefill's linear layers plus one causal attention per
layer; the clean and corrupted passes are shared by every subset (and every N of the sink subsets). Subsets are
batched with padding on accelerators (`batch_size`); on a CPU padding only costs, so 1 is the default there.

The fast path computes only some positions, so hooks attached to the model would see partial tensors: restored
runs refuse a model with hooks attached (use `patching.patched_probs` for hooked experiments). Inputs are one
unpadded sample whose answer position is the last one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .. import hook_names
from ..components import KVCache, apply_rotary
from ..dispatch import execution_device, parameter
from ..inputs import LayoutError
from .patching import GPU_BATCH, SITES, CleanActivations, Site

#: sites whose restoration at every layer from some layer on equals substituting S's clean keys and values
KV_SITES = ("before_attn", "kv")
#: positions per MLP call in the passes of this module (`TransformerBlock.mlp_chunk_rows`): the MLP's
#: [pos, d_mlp] intermediates are the largest transient of a pass; in chunks they stay small
MLP_CHUNK_ROWS = 256


@contextlib.contextmanager
def mlp_in_chunks(model: Any, rows: int | None = MLP_CHUNK_ROWS) -> Iterator[None]:
    """Inside the block, every decoder block runs its MLP on `rows` positions at a time (same values)."""
    old = [b.mlp_chunk_rows for b in model.blocks]
    for b in model.blocks:
        b.mlp_chunk_rows = rows
    try:
        yield
    finally:
        for b, o in zip(model.blocks, old):
            b.mlp_chunk_rows = o


@dataclass
class Pass:
    """One pass over a sample's prompt, kept so that later passes can reuse it.

    keys / values: the rotated keys and the values of every layer, [1, pos, kv_head, d_head] each.
    last_logits: the next-token logits at the answer position (the last one), [1, vocab].
    first_change: for a corrupted pass, the first position whose input differs from the clean pass's (c0): the
        clean and corrupted passes agree before it. 0 for a clean pass.
    """

    inputs: Any  # AVInputs of one sample
    embeds: Float[Tensor, "1 pos d_model"]
    keys: list[Tensor]
    values: list[Tensor]
    last_logits: Float[Tensor, "1 vocab"]
    first_change: int = 0

    @property
    def seq_len(self) -> int:
        return int(self.inputs.input_ids.shape[1])


def _check_one_sample(av: Any) -> None:
    if av.input_ids.shape[0] != 1:
        raise ValueError(f"the fast path takes one sample, got a batch of {av.input_ids.shape[0]}")
    if not bool(av.attention_mask.bool().all()):
        raise ValueError("the fast path takes one unpadded sample (its answer position is the last one)")


def _check_no_hooks(model: Any) -> None:
    hooked = [hp.name for hp in model.hook_points() if hp.has_hooks()]
    if hooked:
        raise ValueError(f"the model has hooks attached ({hooked[:3]}...); the fast path computes only some "
                         "positions, so they would see partial tensors. Remove them, or use "
                         "patching.patched_probs for hooked runs")


def clean_pass(model: Any, inputs: Any, hooks: Sequence[tuple[str, Any]] = ()) -> Pass:
    """The clean prompt through the model's own (sdpa) forward, keeping its K/V cache and the answer logits.

    `hooks` (e.g. `SinkRecorder(model).hooks()`) are attached for this pass only, towers included.
    """
    av = model.as_inputs(inputs)
    _check_one_sample(av)
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)), mlp_in_chunks(model):
        embeds = model.embed_inputs(av)  # (sets the inputs' residual writes where the family has them)
        logits = model._decode(av, embeds, return_type="last_logits", kv_cache=cache)
    return Pass(av, embeds, list(cache.keys), list(cache.values), logits)


def _same_layout(clean: Any, other: Any) -> None:
    if clean.input_ids.shape != other.input_ids.shape or not torch.equal(clean.position_ids, other.position_ids):
        raise LayoutError("the corrupted inputs have another token layout than the clean ones "
                          f"({tuple(other.input_ids.shape)} vs {tuple(clean.input_ids.shape)} positions, or other "
                          "position ids); position-wise restoring needs identical layouts")


def first_change(clean: Pass, embeds: Tensor, residual_writes: dict[int, Tensor]) -> int:
    """c0: the first position whose embedding or residual write differs from the clean pass's (T if none)."""
    differs = (clean.embeds[0] != embeds[0]).any(-1)  # [pos]
    layers = set(clean.inputs.residual_writes) | set(residual_writes)
    for layer in layers:
        a, b = clean.inputs.residual_writes.get(layer), residual_writes.get(layer)
        if a is None or b is None:
            differs = differs | (a if a is not None else b)[0].ne(0).any(-1)
        else:
            differs = differs | (a[0] != b[0]).any(-1)
    hit = torch.nonzero(differs)
    return int(hit[0]) if len(hit) else int(differs.shape[0])


def corrupt_pass(model: Any, clean: Pass, inputs: Any) -> Pass:
    """The corrupted prompt, computing only the positions from c0 on (before it, it is the clean pass)."""
    _check_no_hooks(model)
    av = model.as_inputs(inputs)
    _check_one_sample(av)
    _same_layout(clean.inputs, av)
    with torch.no_grad(), mlp_in_chunks(model):
        embeds = model.embed_inputs(av)
        c0 = first_change(clean, embeds, av.residual_writes)
        t = clean.seq_len
        if c0 == t:  # nothing differs: the corrupted run is the clean run
            return Pass(av, embeds, clean.keys, clean.values, clean.last_logits, first_change=t)
        run = _Run(early=None, late=torch.arange(c0, t), dropped=torch.empty(0, dtype=torch.long),
                   patched=torch.empty(0, dtype=torch.long))
        logits, kv = _partial_pass(model, av, embeds, clean, None, [run], drop=0, site=None, patch_layers=set(),
                                   captured=None, keep_kv=True)
    keys = [torch.cat([clean.keys[layer][:, :c0], k], dim=1) for layer, (k, _) in enumerate(kv)]
    values = [torch.cat([clean.values[layer][:, :c0], v], dim=1) for layer, (_, v) in enumerate(kv)]
    return Pass(av, embeds, keys, values, logits, first_change=c0)


# ---------------------------------------------------------------------------------------------- restored runs
@dataclass
class _Run:
    """One restored run: which rows are computed and which rows of S are substituted or patched.

    early: positions computed below the drop layer (None when it is 0); late: positions computed from it on;
    dropped: positions of S whose clean K/V are read from the clean cache from the drop layer on; patched:
    positions of S whose site activation is patched where they are computed.
    """

    early: Tensor | None
    late: Tensor
    dropped: Tensor
    patched: Tensor


def drop_layer(site: str, layers: Sequence[int], n_layers: int) -> int:
    """The first layer from which S's rows need not be computed (their clean K/V substitute for them): the
    start of the run of patched layers that reaches the last layer, for K/V sites; `n_layers` otherwise."""
    if site not in KV_SITES:
        return n_layers
    patched = set(layers)
    drop = n_layers
    while drop > 0 and drop - 1 in patched:
        drop -= 1
    return drop


def plan_run(subset: Sequence[int], seq_len: int, c0: int, drop: int) -> _Run | None:
    """The rows a restored run computes, or None when it equals the corrupted run (S has nothing at or after c0).

    p0 = min(S >= c0); rows [p0, T) below the drop layer, [p0, T) minus S (never the answer position) from it on.
    """
    s = sorted({int(p) for p in subset if c0 <= int(p) < seq_len})
    if not s:
        return None
    p0 = s[0]
    answer = seq_len - 1
    rows = torch.arange(p0, seq_len)
    dropped = torch.tensor([p for p in s if p != answer], dtype=torch.long)
    keep = torch.ones(seq_len - p0, dtype=torch.bool)
    keep[dropped - p0] = False
    late = rows[keep]
    patched = torch.tensor(s, dtype=torch.long)
    return _Run(early=rows if drop > 0 else None, late=late, dropped=dropped, patched=patched)


def restored_logits(
    model: Any,
    clean: Pass,
    corrupt: Pass,
    subsets: Sequence[Sequence[int]],
    site: Site = "before_attn",
    layers: Sequence[int] | None = None,
    captured: CleanActivations | None = None,
    batch_size: int | None = None,
) -> Float[Tensor, "subset vocab"]:
    """Answer logits of the corrupted run with each subset's clean `site` activations restored at `layers`
    (default: every layer), equal to `patching.patched_probs`' runs to float rounding.

    `captured` (clean activations of the site at the subsets' positions, e.g. from a `patching.ActivationRecorder`
    on the clean pass) is needed unless the site is `before_attn` / `kv` at every layer, where the clean cache
    suffices. `batch_size` runs per decoder pass (default 1 on CPU, `GPU_BATCH` on an accelerator).
    """
    if site not in SITES:
        raise ValueError(f"unknown patching site {site!r}; expected one of {sorted(SITES)}")
    _check_no_hooks(model)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted({int(x) for x in layers})
    if any(not 0 <= x < n_layers for x in layers):
        raise ValueError(f"layers {layers} outside the model's {n_layers}")
    if batch_size is None:
        batch_size = 1 if model.device.type == "cpu" else GPU_BATCH
    t, c0 = clean.seq_len, corrupt.first_change
    drop = drop_layer(site, layers, n_layers)
    patch_layers = {x for x in layers if x < drop}
    plans = [plan_run(s, t, c0, drop) for s in subsets]
    needs_capture = any(p is not None and len(p.patched) for p in plans) and (
        patch_layers or (t - 1) in {int(x) for s in subsets for x in s})
    if needs_capture:
        if captured is None:
            raise ValueError(f"restoring {site!r} at layers below {drop} needs the clean activations: pass "
                             "captured= (a patching.ActivationRecorder on the clean pass)")
        if captured.site != site:
            raise ValueError(f"captured activations are of site {captured.site!r}, not {site!r}")
    out = corrupt.last_logits.expand(len(subsets), -1).clone()
    todo = sorted((i for i, p in enumerate(plans) if p is not None), key=lambda i: len(plans[i].late))
    with torch.no_grad(), mlp_in_chunks(model):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            logits, _ = _partial_pass(model, corrupt.inputs, corrupt.embeds, corrupt, clean,
                                      [plans[i] for i in chunk], drop=drop, site=site, patch_layers=patch_layers,
                                      captured=captured if needs_capture else None, keep_kv=False)
            out[chunk] = logits.to(out.device)
    return out


def fast_patched_probs(
    model: Any,
    clean_inputs: Any,
    corrupt_inputs: Any,
    subsets: Sequence[Sequence[int]],
    answers: Any,
    site: Site = "before_attn",
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> dict[str, Float[Tensor, " subset"]]:
    """`patching.patched_probs` (teacher-forced) by the fast path, from the inputs: P(answer) in the corrupted
    run with each subset restored, for every named answer. Captures the site at the subsets' positions on the
    clean pass when the clean cache does not suffice."""
    from .patching import ActivationRecorder
    from .scoring import candidate_prob

    recorder = None
    clean_inputs = model.as_inputs(clean_inputs)
    union = sorted({int(p) for s in subsets for p in s})
    n_layers, answer = model.cfg.n_layers, int(clean_inputs.input_ids.shape[1]) - 1
    lay = list(range(n_layers)) if layers is None else list(layers)
    if union and (drop_layer(site, lay, n_layers) > 0 or answer in union):
        recorder = ActivationRecorder(model, union, site, lay)
    clean = clean_pass(model, clean_inputs, recorder.hooks() if recorder else ())
    corrupt = corrupt_pass(model, clean, corrupt_inputs)
    logits = restored_logits(model, clean, corrupt, subsets, site, layers,
                             recorder.activations() if recorder else None, batch_size)
    return {name: candidate_prob(logits, c) for name, c in answers.items()}


# ---------------------------------------------------------------------------------------------- the engine
@dataclass
class _Rows:
    """The rows of one stage for a batch of runs, padded with the scratch position T (a slot past the prompt that
    only padded rows write and read)."""

    pos: Tensor  # [batch, rows] absolute positions (T = padding)
    cos: Tensor  # [batch, rows, d_head]
    sin: Tensor
    answer: Tensor  # [batch] index of the answer position among the rows
    patch: tuple[Tensor, Tensor, Tensor]  # (batch index, row index, index into the captured positions)


def _stage_rows(model: Any, inputs: Any, per_run: list[Tensor], patched: list[Tensor],
                captured: CleanActivations | None, dtype: torch.dtype) -> _Rows:
    t = int(inputs.input_ids.shape[1])
    width = max(len(p) for p in per_run)
    pos = torch.full((len(per_run), width), t, dtype=torch.long)
    for b, p in enumerate(per_run):
        pos[b, :len(p)] = p
    answer = (pos == t - 1).int().argmax(1)
    pb, pr, ps = [], [], []
    if captured is not None:
        index = {p: i for i, p in enumerate(captured.positions)}
        for b, (rows, s) in enumerate(zip(per_run, patched)):
            where = {int(p): i for i, p in enumerate(rows.tolist())}
            for p in s.tolist():
                if p in where:
                    if p not in index:
                        raise ValueError(f"position {p} was not captured (captured {len(captured.positions)})")
                    pb.append(b), pr.append(where[p]), ps.append(index[p])
    device = model.device
    pid = inputs.position_ids[:, 0][:, pos.clamp(max=t - 1).to(inputs.position_ids.device)]  # [rows, batch, n]
    cos, sin = model.rotary(pid.to(device), dtype)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return _Rows(pos.to(device), cos, sin, answer.to(device), (as_t(pb), as_t(pr), as_t(ps)))


def _rows_on(rows: _Rows, device: torch.device) -> _Rows:
    """The same rows with their tensors on `device` (the device of the block at hand under a device_map)."""
    if rows.pos.device == device:
        return rows
    move = lambda t: t.to(device)  # noqa: E731
    return _Rows(move(rows.pos), move(rows.cos), move(rows.sin), move(rows.answer), tuple(map(move, rows.patch)))


def _with_scratch(x: Tensor) -> Tensor:
    """[1, T, ...] -> [T + 1, ...]: a zero slot at T for padded rows."""
    return torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], dim=0)


def _partial_pass(
    model: Any,
    inputs: Any,
    embeds: Tensor,
    base: Pass,
    clean: Pass | None,
    runs: list[_Run],
    drop: int,
    site: str | None,
    patch_layers: set[int],
    captured: CleanActivations | None,
    keep_kv: bool,
) -> tuple[Float[Tensor, "batch vocab"], list[tuple[Tensor, Tensor]]]:
    """Run the rows of `runs` through the decoder over `base`'s keys and values (the positions not computed).

    Returns the answer logits [batch, vocab] and, with `keep_kv` (one run), the computed rows' keys and values per
    layer, [1, rows, kv_head, d_head].
    """
    cfg = model.cfg
    n_layers, t = cfg.n_layers, int(inputs.input_ids.shape[1])
    dtype = embeds.dtype
    batch = len(runs)
    b_idx = torch.arange(batch, device=model.device)
    late = _stage_rows(model, inputs, [r.late for r in runs], [r.patched for r in runs], captured, dtype)
    early = None
    if drop > 0:
        early = _stage_rows(model, inputs, [r.early for r in runs], [r.patched for r in runs], captured, dtype)
        # where each late row sits among the early rows
        late_in_early = torch.zeros_like(late.pos)
        for b, r in enumerate(runs):
            where = {int(p): i for i, p in enumerate(r.early.tolist())}
            late_in_early[b, :len(r.late)] = torch.tensor([where[int(p)] for p in r.late.tolist()])
    width = max(len(r.dropped) for r in runs)
    dropped = torch.full((batch, width), t, dtype=torch.long, device=model.device)
    for b, r in enumerate(runs):
        dropped[b, :len(r.dropped)] = r.dropped.to(model.device)
    writes = inputs.residual_writes
    rows = early if early is not None else late
    resid = embeds[0][rows.pos.clamp(max=t - 1)]  # [batch, rows, d_model]
    kept: list[tuple[Tensor, Tensor]] = []
    for layer, block in enumerate(model.blocks):
        # under a device_map each block computes on its own device: bring what this layer combines there
        dev = execution_device(block, default=resid.device)
        resid, b_idx, dropped = resid.to(dev), b_idx.to(dev), dropped.to(dev)
        if layer == drop and early is not None:
            rows = late
            resid = resid.gather(1, late_in_early.to(resid.device)[..., None].expand(-1, -1, resid.shape[-1]))
        rows = _rows_on(rows, dev)
        attn = block.attn
        patch = site is not None and captured is not None and (layer in patch_layers or layer >= drop)
        pb, pr, ps = rows.patch
        patch = patch and len(pb) > 0

        def cap(name: str) -> Tensor:
            values = captured.values[hook_names.block(layer, name)]
            return values[ps.to(values.device)].to(dev)

        x = resid
        if patch and site == "resid_pre":
            x = x.clone()
            x[pb, pr] = cap("hook_resid_pre").to(x.dtype)
        h = block.ln1(x)
        if patch and site == "before_attn":
            h = h.clone()
            h[pb, pr] = parameter(block.ln1).to(h.device) * cap("ln1.hook_normalized").to(h.dtype)
        n, w = h.shape[:2]
        k = attn.k_proj(h).view(n, w, cfg.n_key_value_heads, cfg.d_head)
        v = attn.v_proj(h).view(n, w, cfg.n_key_value_heads, cfg.d_head)
        if patch and site == "kv":
            k, v = k.clone(), v.clone()
            k[pb, pr] = cap("attn.hook_k").to(k.dtype)
            v[pb, pr] = cap("attn.hook_v").to(v.dtype)
        if cfg.qk_norm:
            k = attn.k_norm(k)
        k, v = apply_rotary(k.to(dev), rows.cos, rows.sin), v.to(dev)
        if keep_kv:
            kept.append((k, v))
        keys = _with_scratch(base.keys[layer].to(dev)).expand(batch, -1, -1, -1).clone()  # [batch, T + 1, kv, d]
        vals = _with_scratch(base.values[layer].to(dev)).expand(batch, -1, -1, -1).clone()
        if layer >= drop and width and clean is not None:
            keys[b_idx[:, None], dropped] = _with_scratch(clean.keys[layer].to(dev))[dropped]
            vals[b_idx[:, None], dropped] = _with_scratch(clean.values[layer].to(dev))[dropped]
        keys[b_idx[:, None], rows.pos] = k
        vals[b_idx[:, None], rows.pos] = v
        last = layer == n_layers - 1
        if last:  # only the answer position: one query over every real key
            h = h[b_idx, rows.answer][:, None]
            x = x[b_idx, rows.answer][:, None]
            cos, sin = rows.cos[b_idx, rows.answer][:, None], rows.sin[b_idx, rows.answer][:, None]
            keys, vals = keys[:, :t], vals[:, :t]
        else:
            cos, sin = rows.cos, rows.sin
        q = attn.q_proj(h).view(h.shape[0], h.shape[1], cfg.n_heads, cfg.d_head)
        if cfg.qk_norm:
            q = attn.q_norm(q)
        q = apply_rotary(q.to(dev), cos, sin)
        if last:
            z = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                               scale=attn.scale, enable_gqa=cfg.n_rep > 1).transpose(1, 2)
        else:
            queries = q.new_zeros(batch, t + 1, cfg.n_heads, cfg.d_head)
            queries[b_idx[:, None], rows.pos] = q
            z = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                               is_causal=True, scale=attn.scale, enable_gqa=cfg.n_rep > 1)
            z = z.transpose(1, 2)[b_idx[:, None], rows.pos]  # [batch, rows, head, d_head]
        attn_out = attn.o_proj(z.reshape(z.shape[0], z.shape[1], cfg.n_heads * cfg.d_head)).to(dev)
        if patch and site in ("attn_out", "mlp_out"):
            if last:  # only the answer row is left; patch it if it is in S
                hit = rows.answer[pb] == pr
                sel, src = (pb[hit], torch.zeros_like(pb[hit])), ps[hit]
            else:
                sel, src = (pb, pr), ps
        if patch and site == "attn_out":
            attn_out = attn_out.clone()
            values = captured.values[hook_names.block(layer, "hook_attn_out")]
            attn_out[sel] = values[src.to(values.device)].to(dev, attn_out.dtype)
        resid = x + attn_out
        mlp_out = block.run_mlp(block.ln2(resid)).to(dev)
        if patch and site == "mlp_out":
            mlp_out = mlp_out.clone()
            values = captured.values[hook_names.block(layer, "hook_mlp_out")]
            mlp_out[sel] = values[src.to(values.device)].to(dev, mlp_out.dtype)
        resid = resid + mlp_out
        write = writes.get(layer)
        if write is not None:
            at = rows.pos.clamp(max=t - 1)
            if last:
                at = at[b_idx, rows.answer][:, None]
            resid = resid + write[0][at.to(write.device)].to(dev, resid.dtype)
    logits = model.unembed(model.ln_final(resid))[:, 0]  # [batch, vocab]
    return logits, kept
