"""Model configuration: every shape, token id and constant a hooked AV model needs, with provenance.

A config drives every shape in `hooked_av.components`; nothing in the library hard-codes a layer count, a width,
a token id or a sink dimension. The fields named like TransformerLens' config (`n_layers`, `n_heads`,
`n_key_value_heads`, `d_model`, `d_head`, `d_vocab`, `device`) are the ones `transformer_lens.patching` reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SinkConstants:
    """Massive-activation ("sink") dimensions of the LLM residual stream and the sink threshold tau.

    `dims` are channels of the RMS-normalised residual stream (no learned gain) where attention-sink tokens take
    huge values; a token is a sink at a layer when max over `dims` of |x / rms(x)| exceeds `tau`.
    `provenance` says where the numbers come from; `calibrated` is False when they are placeholders that must be
    calibrated on real weights before use.
    """

    dims: tuple[int, ...] = ()
    tau: float | None = None
    eps: float = 1e-6
    provenance: str = "not calibrated"
    calibrated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenIds:
    """Special token ids of a model family's prompt layout."""

    audio: int | None = None
    image: int | None = None
    video: int | None = None
    audio_start: int | None = None
    audio_end: int | None = None
    vision_start: int | None = None
    vision_end: int | None = None
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None

    def require(self, *fields: str) -> None:
        """Raise ValueError naming the fields among `fields` that are unset (a processor needs those ids)."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"token_ids lacks {', '.join(missing)} (take them from the model's cfg.token_ids)")

    def special_ids(self) -> set[int]:
        """Ids of the modality delimiters (labelled 'special' in a ModalityMap)."""
        ids = (self.audio_start, self.audio_end, self.vision_start, self.vision_end)
        return {i for i in ids if i is not None}


@dataclass
class AVModelConfig:
    """Configuration of a HookedAVModel's LLM decoder and of its prompt layout.

    The modality towers keep their own (transformers) configs; this config holds what the hooked decoder, the
    layout parser (positions and ModalityMap) and the recipes need.
    """

    # decoder shapes
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int = 32768
    act_fn: str = "silu"
    rms_norm_eps: float = 1e-6
    attn_qkv_bias: bool = True
    attn_o_bias: bool = False
    tie_word_embeddings: bool = False
    #: RMSNorm over d_head on every query and key head before the rotary embedding (Qwen3 lineage)
    qk_norm: bool = False
    # rotary embedding: 1-D rope when mrope_section is None, else multimodal rope over (t, h, w) rows
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] | None = (16, 24, 24)
    #: multimodal rope layout. False: contiguous sections (Qwen2.5: the first mrope_section[0] frequencies take
    #: the t row, the next the h row, then w). True: interleaved (Qwen3-Omni/VL): frequency i takes the h row when
    #: i % 3 == 1 and i < 3 * mrope_section[1], the w row when i % 3 == 2 and i < 3 * mrope_section[2], else t.
    mrope_interleaved: bool = False
    # mixture of experts (0 experts: every block has the dense gated MLP of width d_mlp)
    n_experts: int = 0
    n_experts_per_tok: int = 0
    #: hidden width of one expert's SwiGLU
    d_expert: int = 0
    #: renormalise the top-k routing probabilities to sum to one
    norm_topk_prob: bool = True
    #: a block is sparse when (layer + 1) % decoder_sparse_step == 0 and layer is not in mlp_only_layers
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    #: decoder layers after which visual features of the vision tower's intermediate layers are added to the
    #: residual stream at image/video positions (Qwen3-Omni DeepStack; feature k after layer deepstack_layers[k])
    deepstack_layers: tuple[int, ...] = ()
    # prompt layout
    token_ids: TokenIds = field(default_factory=TokenIds)
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2
    # constants of the sink recipes
    sinks: SinkConstants = field(default_factory=SinkConstants)
    # runtime
    model_family: str = "qwen2_5_omni"
    model_name: str = "custom"
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    #: Upper bound on the bytes of one query block of eager attention scores ([batch, head, rows, keys] in float32).
    #: Eager attention (used only while a hook on scores or pattern is active) runs in query blocks under this budget.
    eager_attn_block_bytes: int = 256 * 2**20
    #: Fixed number of query rows per eager block; overrides `eager_attn_block_bytes` when set.
    eager_attn_block_rows: int | None = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads ({self.n_key_value_heads})"
            )
        if self.mrope_section is not None:
            self.mrope_section = tuple(int(s) for s in self.mrope_section)
            if sum(self.mrope_section) != self.d_head // 2:
                raise ValueError(
                    f"mrope_section {list(self.mrope_section)} sums to {sum(self.mrope_section)}, "
                    f"expected d_head // 2 = {self.d_head // 2}"
                )
        bad = [d for d in self.sinks.dims if not 0 <= d < self.d_model]
        if bad:
            raise ValueError(f"sink dims {bad} are outside the residual stream [0, {self.d_model})")
        if self.mrope_interleaved and self.mrope_section is None:
            raise ValueError("mrope_interleaved needs an mrope_section")
        self.mlp_only_layers = tuple(int(layer) for layer in self.mlp_only_layers)
        self.deepstack_layers = tuple(int(layer) for layer in self.deepstack_layers)
        if self.n_experts:
            if not 1 <= self.n_experts_per_tok <= self.n_experts:
                raise ValueError(f"n_experts_per_tok ({self.n_experts_per_tok}) must be in [1, n_experts "
                                 f"({self.n_experts})]")
            if self.d_expert <= 0:
                raise ValueError(f"d_expert must be positive with n_experts = {self.n_experts}, got {self.d_expert}")
            if self.decoder_sparse_step < 1:
                raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        bad = [layer for layer in self.deepstack_layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"deepstack layers {bad} are outside the decoder [0, {self.n_layers})")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_key_value_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has a sparse mixture-of-experts MLP (else the dense gated MLP)."""
        return (self.n_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The blocks with a mixture-of-experts MLP."""
        return tuple(layer for layer in range(self.n_layers) if self.is_moe_layer(layer))

    @property
    def tokens_per_chunk(self) -> int:
        """Temporal position units per audio-visual chunk (Qwen2.5-Omni: 25/s x 2 s = 50)."""
        return int(self.position_id_per_seconds * self.seconds_per_chunk)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["device"] = str(self.device)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d
