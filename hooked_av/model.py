"""HookedAVModel: an audio-visual LLM whose decoder is reimplemented with TransformerLens hook points.

The base class is model-agnostic: token embedding, the hooked decoder blocks, the final norm, the unembedding,
caching, hook-name checking and greedy generation with a KV cache. A model family (see `model_zoo`) subclasses it
and supplies the modality towers and the prompt layout: `prepare_inputs` turns the family processor's tensors into
`AVInputs` (positions and a ModalityMap), `embed_inputs` runs the towers and merges their outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import hook_names
from .components import AttentionMask, KVCache, RMSNorm, RotaryEmbedding, TransformerBlock
from .config import AVModelConfig, SinkConstants
from .inputs import ModalityMap

ReturnType = Literal["logits", "last_logits", "loss", "none"]


@dataclass
class AVInputs:
    """One batch ready for the decoder: the processor's tensors plus positions and a ModalityMap.

    `shape` is (batch, pos), so an AVInputs can stand where TransformerLens expects a token tensor
    (e.g. `transformer_lens.patching.generic_activation_patch(model, corrupted_inputs, ...)`).

    `position_ids` are integers, or floats where the family's positions are fractional (Qwen3-Omni).
    `residual_writes` holds, per decoder layer, a dense [batch, pos, d_model] addition to the residual stream
    after that layer (Qwen3-Omni DeepStack visual features). The towers compute them, so `embed_inputs` fills
    this field; `repeat` and `to` carry it, so `decode(inputs.repeat(n), embeds.expand(n, -1, -1))` after
    `embeds = model.embed_inputs(inputs)` runs the same model as `forward`.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "rows batch pos"]
    modality_map: ModalityMap
    mm: dict[str, Any] = field(default_factory=dict)  # family-specific multimodal tensors (features, grids)
    residual_writes: dict[int, Tensor] = field(default_factory=dict)  # layer -> [batch, pos, d_model]

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    @property
    def next_position(self) -> Int[Tensor, " batch"]:
        """Position id of the first generated token, per sample: one past the last valid token's position, as
        transformers' generation continues the prompt (for Qwen2.5-Omni layouts this is also the max + 1; in
        Qwen3-Omni layouts a media block's largest position can lie beyond the text that follows it)."""
        valid = self.attention_mask.bool()
        last = (torch.arange(valid.shape[1], device=valid.device) * valid).amax(1)  # [batch]
        rows = torch.arange(valid.shape[0], device=valid.device)
        return self.position_ids[:, rows, last].amax(0) + 1

    def repeat(self, n: int) -> "AVInputs":
        """The decoder-side tensors of one sample repeated `n` times along the batch.

        The multimodal tensors (`mm`) are not repeated: use it with `HookedAVModel.decode` and embeddings
        computed once (`model.embed_inputs(inputs).expand(n, -1, -1)`), so the towers run once.
        """
        if self.input_ids.shape[0] != 1:
            raise ValueError(f"repeat needs inputs of one sample, got a batch of {self.input_ids.shape[0]}")
        writes = {layer: w.expand(n, -1, -1) for layer, w in self.residual_writes.items()}
        return AVInputs(self.input_ids.expand(n, -1), self.attention_mask.expand(n, -1),
                        self.position_ids.expand(-1, n, -1), self.modality_map.repeat(n), {}, writes)

    def to(self, device: torch.device | str) -> "AVInputs":
        mm = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.mm.items()}
        writes = {layer: w.to(device) for layer, w in self.residual_writes.items()}
        return AVInputs(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                        self.modality_map, mm, writes)


@dataclass
class GenerateOutput:
    """Greedy (or sampled) generation result.

    sequences: prompt + generated ids, finished samples padded with the pad id.
    logits: raw logits of each generated step, [steps, batch, vocab] (before any processing).
    """

    sequences: Int[Tensor, "batch total"]
    new_tokens: Int[Tensor, "batch steps"]
    logits: Float[Tensor, "steps batch vocab"]
    prompt_length: int
    #: generated steps of each row up to and including its eos (the rest is padding)
    n_steps: Int[Tensor, " batch"] | None = None


@dataclass
class DecodeState:
    """A KV-cached decoding in progress (from `HookedAVModel.start_decoding`), advanced by `decode_step`.

    key_valid: real (non-padding) keys over the prompt and the tokens appended so far.
    next_position: position id the next appended token gets, per row.
    """

    inputs: AVInputs
    cache: KVCache
    key_valid: Bool[Tensor, "batch keys"]
    next_position: Int[Tensor, " batch"]


class HookedAVModel(HookedRootModule):
    """A hooked audio-visual LLM. Use `HookedAVModel.from_pretrained` or `.from_hf_model` to build one."""

    #: modality tower names this family exposes (each a `HookedTower` attribute)
    tower_names: tuple[str, ...] = ()

    def __init__(self, cfg: AVModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model] merged text + modality embeddings
        self.rotary = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        checkpoint: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        offload_folder: str | None = None,
        **overrides: Any,
    ) -> "HookedAVModel":
        """Load a preset (`qwen2.5-omni-7b`, ...) from a local checkpoint directory, or a checkpoint directory.

        Weights are streamed shard by shard into an empty model, so at most one copy is ever in memory.

        `device_map` spreads one model over several devices with accelerate's big-model dispatch (see
        `hooked_av.dispatch`): "auto" / "balanced" / "balanced_low_0" / "sequential" (bounded by `max_memory`,
        e.g. {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}), or a {module name: device} dict such as
        {"embed": 0, "blocks.0": 0, ..., "blocks.27": 1, "ln_final": 1, "unembed": 1, ...}. Each weight is loaded
        straight onto its device; modules on "disk" keep their weights in `offload_folder`. Decoder blocks and
        encoders are never split; hooks fire on the device of the block that computes the activation.
        """
        from model_zoo.registry import load_pretrained

        return load_pretrained(name_or_path, checkpoint=checkpoint, dtype=dtype, device=device,
                               device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                               **overrides)

    @classmethod
    def from_hf_model(cls, hf_model: nn.Module, **overrides: Any) -> "HookedAVModel":
        """Convert an in-memory transformers model (e.g. `Qwen2_5OmniThinkerForConditionalGeneration`).

        The hooked model shares the reference model's weight tensors (no copy is made).
        """
        from model_zoo.registry import from_hf_model

        return from_hf_model(hf_model, **overrides)

    def set_sinks(self, sinks: SinkConstants) -> None:
        """Use other sink constants (e.g. from `recipes.sinks.calibrate_sinks`): `hook_sink` then reads `sinks.dims`."""
        for d in sinks.dims:
            if not 0 <= d < self.cfg.d_model:
                raise ValueError(f"sink dim {d} is outside the residual stream (d_model {self.cfg.d_model})")
        self.cfg.sinks = sinks
        for block in self.blocks:
            block.sink_dims = torch.tensor(sinks.dims, dtype=torch.long, device=block.sink_dims.device)

    # ------------------------------------------------------------------ family interface
    def prepare_inputs(self, *args: Any, **kwargs: Any) -> AVInputs:
        """Turn the family processor's outputs into AVInputs (positions, ModalityMap). No tower runs here."""
        raise NotImplementedError

    def embed_inputs(self, inputs: AVInputs) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the towers' outputs merged in at their placeholder positions."""
        raise NotImplementedError

    def modality_map(self, *args: Any, **kwargs: Any) -> ModalityMap:
        """The ModalityMap of a batch of processor outputs (cheap: no forward pass)."""
        return self._as_inputs(args, kwargs).modality_map

    # ------------------------------------------------------------------ forward
    def as_inputs(self, inputs: "AVInputs | Mapping[str, Any]") -> AVInputs:
        """An AVInputs from an AVInputs (returned as is) or a mapping of processor outputs."""
        return self._as_inputs((inputs,), {})

    def _as_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> AVInputs:
        if args and isinstance(args[0], AVInputs):
            if len(args) > 1 or kwargs:
                raise TypeError("pass either an AVInputs or the processor's keyword tensors, not both")
            return args[0]
        if args and isinstance(args[0], Mapping):
            if len(args) > 1:
                raise TypeError("pass one mapping of processor outputs")
            return self.prepare_inputs(**{**dict(args[0]), **kwargs})
        return self.prepare_inputs(*args, **kwargs)

    def forward(self, *args: Any, return_type: ReturnType = "logits", **kwargs: Any) -> Tensor | None:
        """Run the model on the processor's outputs (`model(**processor(...))`), an AVInputs or a dict of them.

        Returns logits [batch, pos, vocab] (`return_type="logits"`), the logits of each row's last valid
        position [batch, vocab] ("last_logits": the next-token distribution, without unembedding every
        position), the mean next-token loss over valid positions ("loss"), or None ("none": stops after the final
        norm, e.g. for caching).
        """
        inputs = self._as_inputs(args, kwargs)
        embeds = self.embed_inputs(inputs)
        return self._decode(inputs, embeds, return_type=return_type)

    def decode(
        self,
        inputs: AVInputs,
        embeds: Float[Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
    ) -> Tensor | None:
        """The decoder on given input embeddings (from `embed_inputs`), e.g. to run the towers once and the
        decoder on many patched copies. Hooks fire from `hook_embed` on."""
        return self._decode(inputs, embeds, return_type=return_type)

    def _decode(
        self,
        inputs: AVInputs,
        embeds: Float[Tensor, "batch pos d_model"],
        return_type: ReturnType = "logits",
        kv_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        key_valid: Tensor | None = None,
        residual_writes: Mapping[int, Tensor] | None = None,
    ) -> Tensor | None:
        """The decoder on `embeds`. `residual_writes` (layer -> [batch, pos, d_model]) defaults to the inputs'
        own (`inputs.residual_writes`) on a run over the prompt, and to none on a step that continues a filled
        KV cache (the writes belong to the prompt's positions)."""
        resid = self.hook_embed(embeds)
        position_ids = inputs.position_ids if position_ids is None else position_ids
        mask = AttentionMask(inputs.attention_mask if key_valid is None else key_valid, n_query=resid.shape[1])
        rotary = self.rotary(position_ids, resid.dtype)
        if residual_writes is None:
            residual_writes = inputs.residual_writes if kv_cache is None or len(kv_cache) == 0 else {}
        for block in self.blocks:
            resid = block(resid, rotary, mask, kv_cache, residual_writes.get(block.layer))
        resid = self.ln_final(resid)
        if return_type == "none":
            return None
        if return_type == "last_logits":  # only each row's last valid position: no [pos, vocab] unembedding
            valid = inputs.attention_mask.bool().to(resid.device)
            last = (torch.arange(resid.shape[1], device=resid.device) * valid).amax(1)
            return self.unembed(resid[torch.arange(resid.shape[0], device=resid.device), last])
        logits = self.unembed(resid)
        if return_type == "logits":
            return logits
        if return_type == "loss":
            valid = inputs.attention_mask[:, 1:].bool().to(logits.device)
            lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), inputs.input_ids[:, 1:].to(logits.device),
                                 reduction="none")
            return lp[valid].mean()
        raise ValueError(f"return_type must be 'logits', 'last_logits', 'loss' or 'none', got {return_type!r}")

    # ------------------------------------------------------------------ generation
    def eos_ids(self, eos_token_id: int | Sequence[int] | None = None) -> set[int]:
        """The stop tokens of a generation: the ids given, else (None or empty) the config's eos."""
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        if not eos and self.cfg.token_ids.eos is not None:
            eos = {self.cfg.token_ids.eos}
        return eos

    @torch.no_grad()
    def start_decoding(
        self, inputs: "AVInputs | Mapping[str, Any]", embeds: Float[Tensor, "batch pos d_model"] | None = None
    ) -> tuple[Float[Tensor, "batch vocab"], DecodeState]:
        """Prefill a KV cache with the prompt: the next-token logits at each row's last valid position (the
        answer position) and the state `decode_step` continues from. `embeds` (from `embed_inputs`) lets several
        decodings of one prompt share one run of the towers. Hooks attached to the model fire on the prompt."""
        inputs = self.as_inputs(inputs)
        cache = KVCache(self.cfg.n_layers)
        key_valid = inputs.attention_mask.bool()
        embeds = self.embed_inputs(inputs) if embeds is None else embeds
        logits = self._decode(inputs, embeds, kv_cache=cache, key_valid=key_valid)
        last = (torch.arange(key_valid.shape[1], device=key_valid.device) * key_valid).amax(1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, last.to(logits.device)], DecodeState(inputs, cache, key_valid, inputs.next_position)

    @torch.no_grad()
    def decode_step(self, state: DecodeState, token: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        """Append one token per row to a decoding started by `start_decoding`; the next-token logits.
        Hooks attached to the model fire on this one position."""
        batch = token.shape[0]
        device = token.device
        state.key_valid = torch.cat([state.key_valid, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        positions = state.next_position[None, :, None].expand(self._position_rows(state.inputs), batch, 1)
        logits = self._decode(state.inputs, self.embed(token[:, None]), kv_cache=state.cache,
                              position_ids=positions, key_valid=state.key_valid)[:, -1]
        state.next_position = state.next_position + 1
        return logits

    @torch.no_grad()
    def generate(
        self,
        *args: Any,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> GenerateOutput:
        """Generate with a KV cache; greedy unless `do_sample`. Hooks attached to the model fire at every step
        (the prefill sees the whole prompt, each decoding step one position)."""
        inputs = self._as_inputs(args, kwargs)
        eos = self.eos_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (self.cfg.token_ids.pad or 0)
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None

        batch = inputs.input_ids.shape[0]
        device = inputs.input_ids.device
        logits, state = self.start_decoding(inputs)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens, step_logits = [], []
        n_steps = torch.zeros(batch, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            step_logits.append(logits.float())
            n_steps += (~finished).long()
            if do_sample:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
            else:
                token = logits.argmax(dim=-1).to(device)  # the unembedding may sit on another device (device_map)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            if eos:
                finished |= torch.isin(token, torch.tensor(sorted(eos), device=device))
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = self.decode_step(state, token)
        new = torch.stack(new_tokens, dim=1)
        return GenerateOutput(
            sequences=torch.cat([inputs.input_ids, new], dim=1),
            new_tokens=new,
            logits=torch.stack(step_logits, dim=0),
            prompt_length=inputs.input_ids.shape[1],
            n_steps=n_steps,
        )

    def _position_rows(self, inputs: AVInputs) -> int:
        return inputs.position_ids.shape[0]

    # ------------------------------------------------------------------ hooks and caching
    @property
    def hook_name_list(self) -> list[str]:
        return list(self.hook_dict)

    def check_hook_name(self, name: str) -> str:
        """`name` if the model has it; otherwise an error listing the closest valid names."""
        return hook_names.check_hook_name(name, self.hook_dict)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:  # type: ignore[override]
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]) -> None:
        self.check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    def get_caching_hooks(self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False,
                          cache=None, pos_slice=None):  # type: ignore[override]
        """TransformerLens' caching hooks, with name checking and reassembly of blockwise attention maps."""
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
        elif isinstance(names_filter, list):
            for name in names_filter:
                self.check_hook_name(name)
        cache_dict, fwd, bwd = super().get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, cache=cache, pos_slice=pos_slice
        )
        map_sites = tuple(s for s in hook_names.ATTENTION_MAP_SITES)
        wrapped = []
        for name, fn in fwd:
            if name.endswith(map_sites):
                fn = partial(_save_attention_block, save=fn, cache=cache_dict)
            wrapped.append((name, fn))
        return cache_dict, wrapped, bwd

    def run_with_cache(self, *model_args: Any, names_filter=None, device=None, remove_batch_dim=False,
                       incl_bwd=False, reset_hooks_end=True, clear_contexts=False, pos_slice=None,
                       **model_kwargs: Any) -> tuple[Any, ActivationCache]:  # type: ignore[override]
        """Like TransformerLens: returns (output, ActivationCache); `cache["pattern", 0]`, `cache["resid_pre", 3]`.

        Attention maps computed in query blocks are concatenated back to full [batch, head, q, k] tensors.
        As in TransformerLens, no `names_filter` caches every hook, attention maps included: that switches every
        layer to eager attention and keeps n_layers maps of [batch, head, pos, pos]. On long multimodal sequences
        pass a `names_filter` (e.g. `lambda n: not n.endswith(("hook_pattern", "hook_attn_scores"))`).
        """
        rows = self._with_single_block() if pos_slice is not None else contextlib.nullcontext()
        with rows:
            out, cache_dict = super().run_with_cache(
                *model_args, names_filter=names_filter, device=device, remove_batch_dim=remove_batch_dim,
                incl_bwd=incl_bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts,
                pos_slice=pos_slice, **model_kwargs,
            )
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    @contextlib.contextmanager
    def _with_single_block(self) -> Iterator[None]:
        old = self.cfg.eager_attn_block_rows
        self.cfg.eager_attn_block_rows = 1 << 40
        try:
            yield
        finally:
            self.cfg.eager_attn_block_rows = old

    @contextlib.contextmanager
    def force_eager_attention(self, enabled: bool = True) -> Iterator[None]:
        """Run eager attention (in query-row blocks) even without hooks on scores/pattern.

        Useful for numerics comparisons against an eager reference. For nnsight tracing use
        `hooked_av.integrations.nnsight.wrap`, which can also compute each layer's map in one block.
        """
        old = [b.attn.force_eager for b in self.blocks]
        for b in self.blocks:
            b.attn.force_eager = enabled
        try:
            yield
        finally:
            for b, o in zip(self.blocks, old):
                b.attn.force_eager = o

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (its execution device when the model is dispatched over
        several devices with a device_map)."""
        if getattr(self, "hf_device_map", None):
            from .dispatch import execution_device

            return execution_device(self.embed, default=self.embed.weight.device)
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype


def _save_attention_block(tensor: Tensor, *, hook: HookPoint, save: Callable, cache: dict) -> None:
    """Caching hook for attention maps: the first block of a call replaces the entry, later blocks append rows."""
    if getattr(hook, "block_index", 0) == 0 or hook.name not in cache:
        save(tensor, hook=hook)
        return
    previous = cache[hook.name]
    save(tensor, hook=hook)
    cache[hook.name] = torch.cat([previous, cache[hook.name]], dim=-2)
