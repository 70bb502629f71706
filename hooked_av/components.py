"""Building blocks of the hooked LLM decoder, each with a HookPoint at every meaningful activation.

Shapes follow TransformerLens: activations are [batch, pos, ...]; per-head tensors are [batch, pos, head, d_head];
attention maps are [batch, head, query_pos, key_pos]. Numerics mirror transformers' Qwen2 lineage (RMSNorm in
float32, rotary cos/sin cast to the activation dtype, softmax in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .config import AVModelConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """RMSNorm; `hook_scale` is the rms (float32), `hook_normalized` the normalised input before the gain."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        in_dtype = x.dtype
        x = x.float()
        scale = self.hook_scale(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        normalized = self.hook_normalized((x / scale).to(in_dtype))
        return self.weight * normalized


class RotaryEmbedding(nn.Module):
    """Rotary embedding over 1-D positions, or multimodal rope over (t, h, w) position rows (`mrope_section`).

    Multimodal rope picks, for each of the d_head/2 frequencies, which position row drives it: contiguous sections
    (Qwen2.5) or the interleaved layout of Qwen3-Omni (`cfg.mrope_interleaved`, see AVModelConfig). Positions may
    be integer or float (Qwen3-Omni video times are fractional); they are multiplied in float32.
    """

    def __init__(self, cfg: AVModelConfig):
        super().__init__()
        self.mrope_section = list(cfg.mrope_section) if cfg.mrope_section is not None else None
        self.interleaved = cfg.mrope_interleaved
        exponent = torch.arange(0, cfg.d_head, 2, dtype=torch.float) / cfg.d_head
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta**exponent), persistent=False)

    @torch.no_grad()
    def forward(
        self, position_ids: Int[Tensor, "rows batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
        inv_freq = self.inv_freq.to(device=position_ids.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # [rows, batch, pos, d_head/2]
        if self.mrope_section is None:
            freqs = freqs[0]
        elif self.interleaved:
            freqs = self._interleave(freqs)
        else:
            pieces = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([piece[i % 3] for i, piece in enumerate(pieces)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _interleave(self, freqs: Float[Tensor, "3 batch pos half"]) -> Float[Tensor, "batch pos half"]:
        """Interleaved rows: frequency i from row h if i % 3 == 1 and i < 3*section[1], row w if i % 3 == 2 and
        i < 3*section[2], else row t."""
        if freqs.shape[0] != 3:
            raise ValueError(f"interleaved multimodal rope needs 3 position rows (t, h, w), got {freqs.shape[0]}")
        out = freqs[0].clone()
        for row in (1, 2):
            sel = slice(row, 3 * self.mrope_section[row], 3)
            out[..., sel] = freqs[row, ..., sel]
        return out


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Float[Tensor, "batch pos d_head"], sin: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Rotated keys and values of every layer, [batch, pos, kv_head, d_head], appended step by step."""

    def __init__(self, n_layers: int):
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class AttentionMask:
    """The attention mask of one forward call, in the forms the sdpa and eager paths need.

    `key_valid` marks real (non-padding) keys over the whole cached sequence; queries sit at the last `n_query`
    key positions. Masked entries of eager scores get `finfo(dtype).min` added, as transformers' eager attention.
    """

    def __init__(self, key_valid: torch.Tensor, n_query: int):
        self.key_valid = key_valid.bool()  # [batch, keys]
        self.n_query = n_query
        self.n_keys = key_valid.shape[1]
        self.offset = self.n_keys - n_query
        self.all_valid = bool(self.key_valid.all())
        self._bool: Tensor | None = None

    def allowed(self, rows: slice | None = None) -> Tensor:
        """Boolean [batch, 1, rows, keys]: True where a query may attend a key."""
        if rows is None:
            if self._bool is None:
                self._bool = self._build(slice(0, self.n_query))
            return self._bool
        return self._build(rows)

    def _build(self, rows: slice) -> Tensor:
        device = self.key_valid.device
        q = torch.arange(rows.start, rows.stop, device=device) + self.offset
        k = torch.arange(self.n_keys, device=device)
        allowed = (k[None, :] <= q[:, None])[None, None] & self.key_valid[:, None, None, :]
        # a padding query with no visible key attends to itself, so its (ignored) row stays finite
        empty = ~allowed.any(-1, keepdim=True)
        if empty.any():
            allowed = allowed | (empty & (k[None, :] == q[:, None])[None, None])
        return allowed

    def additive(self, rows: slice, dtype: torch.dtype) -> Tensor:
        allowed = self.allowed(rows)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "AttentionMask":
        """The same mask on another device (accelerate moves a block's inputs with `.to` under a device_map)."""
        device = torch.device(device) if not isinstance(device, torch.device) else device
        if self.key_valid.device == device:
            return self
        moved = AttentionMask.__new__(AttentionMask)
        moved.__dict__.update(self.__dict__)
        moved.key_valid = self.key_valid.to(device, non_blocking=non_blocking)
        moved._bool = None if self._bool is None else self._bool.to(device, non_blocking=non_blocking)
        return moved

    @property
    def sdpa_is_causal(self) -> bool:
        """True when sdpa's built-in causal mask is exact (no padding, no cache offset)."""
        return self.all_valid and self.offset == 0


def repeat_kv(x: Float[Tensor, "batch kv_head pos d_head"], n_rep: int) -> Float[Tensor, "batch head pos d_head"]:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embedding.

    With `cfg.qk_norm` (Qwen3), `q_norm` / `k_norm` (RMSNorm over d_head, with their own hook_scale and
    hook_normalized) act between `hook_q`/`hook_k` (the raw projections) and the rotary embedding.

    Runs torch sdpa unless a hook is attached to `hook_attn_scores` or `hook_pattern` (or `force_eager` is set);
    then eager attention runs in blocks of query rows so that only one block of one layer's scores exists at a
    time. Hooks on those two sites receive [batch, head, rows, keys] blocks and can read `hook.query_slice`
    (absolute query positions of the block) and `hook.block_index`; `run_with_cache` reassembles the blocks.
    """

    def __init__(self, cfg: AVModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, kv, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, h * d, bias=cfg.attn_qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv * d, bias=cfg.attn_qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv * d, bias=cfg.attn_qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.d_model, bias=cfg.attn_o_bias)
        if cfg.qk_norm:  # per-head RMSNorm over d_head, between hook_q/hook_k and the rotary embedding
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.scale = d**-0.5
        self.force_eager = False
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def needs_eager(self) -> bool:
        return self.force_eager or self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor],
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head))
        k = self.hook_k(self.k_proj(x).view(b, t, cfg.n_key_value_heads, cfg.d_head))
        v = self.hook_v(self.v_proj(x).view(b, t, cfg.n_key_value_heads, cfg.d_head))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        if self.needs_eager():
            z = self._eager(qh, kh, vh, mask)
        else:
            z = self._sdpa(qh, kh, vh, mask)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        return self.o_proj(z.reshape(b, t, cfg.n_heads * cfg.d_head))

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        if mask.sdpa_is_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.scale,
                                                  enable_gqa=self.cfg.n_rep > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed(), scale=self.scale,
                                              enable_gqa=self.cfg.n_rep > 1)

    def block_rows(self, batch: int, n_query: int, n_keys: int) -> int:
        """Query rows per eager block: `eager_attn_block_rows`, or what fits `eager_attn_block_bytes`."""
        if self.cfg.eager_attn_block_rows:
            return max(1, self.cfg.eager_attn_block_rows)
        per_row = batch * self.cfg.n_heads * n_keys * 4 * 3  # scores, float32 softmax, pattern
        return max(1, min(n_query, self.cfg.eager_attn_block_bytes // per_row))

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        b, _, t, _ = q.shape
        k, v = repeat_kv(k, self.cfg.n_rep), repeat_kv(v, self.cfg.n_rep)
        k_t = k.transpose(2, 3)
        rows = self.block_rows(b, t, k.shape[2])
        out = []
        for block_index, r0 in enumerate(range(0, t, rows)):
            r1 = min(t, r0 + rows)
            absolute = slice(mask.offset + r0, mask.offset + r1)
            for hp in (self.hook_attn_scores, self.hook_pattern):
                hp.query_slice, hp.block_index = absolute, block_index
            scores = torch.matmul(q[:, :, r0:r1], k_t) * self.scale
            scores = self.hook_attn_scores(scores + mask.additive(slice(r0, r1), scores.dtype))
            pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            out.append(torch.matmul(pattern, v))
        return torch.cat(out, dim=2) if len(out) > 1 else out[0]


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)). hook_pre = gate pre-activation, hook_pre_linear = up(x)."""

    def __init__(self, cfg: AVModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(self.act(pre) * pre_linear))


class MoEExperts(nn.Module):
    """The weights of `n_experts` SwiGLU experts, stacked as transformers 5.x stores them in memory.

    gate_up_proj: [n_experts, 2 * d_expert, d_model] (gate rows first, then up rows); down_proj:
    [n_experts, d_model, d_expert]. Expert e maps x to down_e(act(gate_e x) * up_e x).
    """

    def __init__(self, cfg: AVModelConfig):
        super().__init__()
        self.d_expert = cfg.d_expert
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_expert, cfg.d_model))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_expert))
        self.act = ACTIVATIONS[cfg.act_fn]
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=0.02)

    def forward(self, expert: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """Output of expert `expert` on the rows `x`."""
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[expert])


class MoEMLP(nn.Module):
    """Sparse mixture of SwiGLU experts with a softmax top-k router (Qwen3-MoE lineage), with hook points.

    router logits = router(x); probabilities = softmax in float32; the top `n_experts_per_tok` are kept and, with
    `norm_topk_prob`, renormalised, then cast to the activation dtype; the output is the weighted sum of the
    chosen experts' outputs, accumulated in ascending expert order (as transformers' expert loop does).

    Hooks: `hook_router_logits` [batch, pos, n_experts] (editing it re-routes), `hook_expert_indices`
    [batch, pos, top_k] (long), `hook_expert_weights` [batch, pos, top_k] (editing it re-weights, e.g. zero a slot
    to ablate that expert for a token), and `hook_expert_out` [batch, pos, top_k, d_model], each chosen expert's
    output before weighting, in slot order. The last one materialises top_k x d_model per token, so it is computed
    only while hooked (or with `always_run_expert_out_hook`).
    """

    def __init__(self, cfg: AVModelConfig):
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.n_experts_per_tok
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = MoEExperts(cfg)
        self.always_run_expert_out_hook = False
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
        self.hook_expert_indices = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_out = HookPoint()  # [batch, pos, top_k, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        b, t, d = x.shape
        logits = self.hook_router_logits(self.router(x))
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top, index = torch.topk(probs, self.top_k, dim=-1)  # [batch, pos, top_k]
        if self.cfg.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        index = self.hook_expert_indices(index)
        weights = self.hook_expert_weights(top.to(logits.dtype))
        flat, index, weights = x.reshape(-1, d), index.reshape(-1, self.top_k), weights.reshape(-1, self.top_k)
        n_experts = self.experts.gate_up_proj.shape[0]
        if ((index < 0) | (index >= n_experts)).any():
            raise ValueError(f"expert indices must lie in [0, {n_experts}) (edited hook_expert_indices?)")
        hit = torch.unique(index).tolist()  # ascending
        routes = {e: torch.where(index == e) for e in hit}  # expert -> (token rows, top-k slots)
        out = torch.zeros_like(flat)
        if self.always_run_expert_out_hook or self.hook_expert_out.has_hooks():
            per_slot = flat.new_zeros(flat.shape[0], self.top_k, d)
            for e, (rows, slots) in routes.items():
                per_slot[rows, slots] = self.experts(e, flat[rows])
            per_slot = self.hook_expert_out(per_slot.view(b, t, self.top_k, d)).reshape(-1, self.top_k, d)
            for e, (rows, slots) in routes.items():
                out.index_add_(0, rows, (per_slot[rows, slots] * weights[rows, slots, None]).to(out.dtype))
        else:
            for e, (rows, slots) in routes.items():
                out.index_add_(0, rows, (self.experts(e, flat[rows]) * weights[rows, slots, None]).to(out.dtype))
        return out.view(b, t, d)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block with a sink-value hook on its input.

    The MLP is a `MoEMLP` on the config's sparse layers, else a `GatedMLP`. On DeepStack layers
    (`cfg.deepstack_layers`) the block adds a residual write after `hook_resid_post`: `hook_deepstack`
    [batch, pos, d_model] holds it (the visual features at image/video positions, zero elsewhere), so the next
    block's `hook_resid_pre` is `resid_post + deepstack` (transformers' `hidden_states[l + 1]` is `resid_post`).
    """

    def __init__(self, cfg: AVModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(layer) else GatedMLP(cfg)
        self.has_deepstack = layer in cfg.deepstack_layers
        if self.has_deepstack:
            self.hook_deepstack = HookPoint()  # [batch, pos, d_model]
        #: hook_sink is computed only while hooked, unless this is set (tracing libraries that bypass TL hooks)
        self.always_run_sink_hook = False
        #: run the MLP on chunks of this many positions (None: all at once) while no hook inside it is attached:
        #: the same values (the MLP is position-wise) with O(rows x d_mlp) memory instead of O(pos x d_mlp)
        self.mlp_chunk_rows: int | None = None
        self.register_buffer("sink_dims", torch.tensor(cfg.sinks.dims, dtype=torch.long), persistent=False)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_sink = HookPoint()  # [batch, pos, n_sink_dims]
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def sink_values(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_sink"]:
        """|resid / rms(resid)| at the sink dims, in float32 and without the learned gain (official sink.py)."""
        if self.sink_dims.numel() == 0:
            return resid.new_zeros(*resid.shape[:-1], 0, dtype=torch.float32)
        x = resid.float()
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.sinks.eps)
        return (x.index_select(-1, self.sink_dims.to(x.device)) / rms).abs()

    def run_mlp(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """The MLP, on chunks of `mlp_chunk_rows` positions when set and no hook inside the MLP is attached."""
        rows = self.mlp_chunk_rows
        if not rows or x.shape[1] <= rows or any(
                m.has_hooks() for m in self.mlp.modules() if isinstance(m, HookPoint)):
            return self.mlp(x)
        return torch.cat([self.mlp(x[:, i:i + rows]) for i in range(0, x.shape[1], rows)], dim=1)

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        rotary: tuple[Tensor, Tensor],
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
        residual_write: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`residual_write`: the DeepStack addition after this block (only on `cfg.deepstack_layers`)."""
        resid = self.hook_resid_pre(resid)
        if self.always_run_sink_hook or self.hook_sink.has_hooks():
            self.hook_sink(self.sink_values(resid))
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid), rotary, mask, kv_cache))
        resid = self.hook_resid_mid(resid + attn_out)
        mlp_out = self.hook_mlp_out(self.run_mlp(self.ln2(resid)))
        resid = self.hook_resid_post(resid + mlp_out)
        if residual_write is not None:
            if not self.has_deepstack:
                raise ValueError(f"block {self.layer} takes no residual write (deepstack layers: "
                                 f"{list(self.cfg.deepstack_layers)})")
            if residual_write.shape != resid.shape:
                raise ValueError(f"block {self.layer}: residual write of shape {tuple(residual_write.shape)}, "
                                 f"the residual stream is {tuple(resid.shape)}")
            resid = resid + self.hook_deepstack(residual_write.to(resid.dtype))
        return resid

