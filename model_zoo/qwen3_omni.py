"""Qwen3-Omni (the MoE thinker of Qwen3-Omni-30B-A3B) as a HookedAVModel with the zoo's uniform hook names.

The LLM decoder is the hooked reimplementation of `hooked_av.components` with the Qwen3 options switched on by
the config: per-head q/k RMSNorm, interleaved multimodal rope, sparse mixture-of-experts MLPs (router and expert
hooks), and DeepStack: the vision encoder's intermediate layers, merged like its output, are added to the
residual stream at image/video positions after the first decoder layers (`blocks.{l}.hook_deepstack`).
The audio encoder (AuT) and the vision encoder are transformers' own `Qwen3OmniMoeAudioEncoder` /
`Qwen3OmniMoeVisionEncoder`, so they match the reference by construction; they are exposed as `audio_tower`,
`video_tower` and `image_tower` (the last two share the ViT).

`parse_layout` computes the 3-D position ids, equal to transformers' `get_rope_index` (float: video times are
fractional at 13 positions per second), and the ModalityMap. Unlike Qwen2.5-Omni, audio in video is interleaved
token by token by timestamp, not in 2-second chunks; the map's `chunk` labels are 2-second time bins.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_av.checkpoint import rename
from hooked_av.config import AVModelConfig, SinkConstants, TokenIds
from hooked_av.inputs import LayoutError, Modality, ModalityMap, ModalityMapBuilder
from hooked_av.model import AVInputs, HookedAVModel
from hooked_av.towers import HookedTower

from .families import DISPLAY_NAMES, FamilyMismatchError, describe_class, describe_model_type

FAMILY = "qwen3_omni"
HF_THINKER_CLASS = "Qwen3OmniMoeThinkerForConditionalGeneration"
#: HF model_type of the full model (thinker + talker + code2wav) and of the thinker alone
MODEL_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")

#: Qwen3-Omni token ids (thinker config of Qwen3-Omni-30B-A3B-Instruct, MODELS.md 2.2); bos/eos/pad are the Qwen
#: tokenizer's <|im_start|>, <|im_end|>, <|endoftext|>. Used only where a config does not give them.
QWEN3_OMNI_TOKENS = dict(
    audio=151675, image=151655, video=151656, audio_start=151669, audio_end=151670,
    vision_start=151652, vision_end=151653, bos=151644, eos=151645, pad=151643,
)
#: Mel frames per second of the Whisper front end (hop 160 at 16 kHz), to date audio tokens in the ModalityMap.
MEL_FRAMES_PER_SECOND = 100
#: LLM tokens of one full audio chunk of 2 * n_window mel frames; transformers' `_get_feat_extract_output_lengths`
#: hard-codes 13 (100 frames through three stride-2 convolutions: 100 -> 50 -> 25 -> 13).
FULL_CHUNK_TOKENS = 13
#: Mel frames between consecutive audio tokens inside a chunk (three stride-2 convolutions).
AUDIO_TOKEN_STRIDE_FRAMES = 8

SINKS_30B_A3B = SinkConstants(
    dims=(), tau=None, calibrated=False,
    provenance="not calibrated: no published massive-activation dims for Qwen3-Omni or its Qwen3-30B-A3B-style "
    "backbone (MODELS.md section 6 lists only Qwen3-VL dense models, third-party, different backbones); run "
    "hooked_av.recipes.sinks.calibrate_sinks on the real weights",
)
SINKS_TINY = SinkConstants(dims=(), tau=None, calibrated=False,
                           provenance="random tiny test model: no sinks to calibrate")

#: Decoder presets. "qwen3-omni-30b-a3b": the thinker of Qwen3-Omni-30B-A3B (Instruct, Thinking and Captioner share
#: it; config dump in MODELS.md 2.2). "qwen3-omni-tiny": the tiny random test config of `tiny_hf_config`.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-omni-30b-a3b": dict(
        n_layers=48, d_model=2048, n_heads=32, n_key_value_heads=4, d_head=128, d_vocab=152064, n_ctx=65536,
        rope_theta=1_000_000.0, mrope_section=(24, 20, 20), mrope_interleaved=True, qk_norm=True,
        n_experts=128, n_experts_per_tok=8, d_expert=768, norm_topk_prob=True, tie_word_embeddings=False,
        deepstack_layers=(0, 1, 2), position_id_per_seconds=13, sinks=SINKS_30B_A3B,
    ),
    "qwen3-omni-tiny": dict(
        n_layers=3, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=96, d_vocab=512, n_ctx=4096,
        mrope_section=(4, 2, 2), mrope_interleaved=True, qk_norm=True, n_experts=4, n_experts_per_tok=2,
        d_expert=32, deepstack_layers=(0, 1), position_id_per_seconds=13, sinks=SINKS_TINY,
    ),
}
#: Preset fields compared with a checkpoint's config on loading (architecture, not runtime constants).
PRESET_CHECKED = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab",
                  "n_experts", "n_experts_per_tok", "d_expert", "deepstack_layers", "mrope_section")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    value = obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)
    return default if value is None else value


def thinker_config(hf_config: Any) -> Any:
    """The thinker part of a Qwen3-Omni config (full `Qwen3OmniMoeConfig`, thinker config, or their dicts).

    Raises FamilyMismatchError, naming both families, for a config of another family."""
    model_type = _get(hf_config, "model_type")
    if model_type not in MODEL_TYPES:
        raise FamilyMismatchError(
            f"expected a {DISPLAY_NAMES[FAMILY]} config (model_type {' or '.join(MODEL_TYPES)}), got "
            f"{describe_model_type(model_type).replace('checkpoint', 'config')}"
        )
    return _get(hf_config, "thinker_config") or hf_config


def config_from_hf(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
                   dtype: torch.dtype = torch.float32) -> AVModelConfig:
    """AVModelConfig from a transformers `Qwen3OmniMoeThinkerConfig` (or the full config, or their dicts).

    Mirrors what transformers' thinker reads: head_dim from the text config when given (the 30B model has
    d_head 128 with d_model 2048 and 32 heads), attention bias on q/k/v/o from `attention_bias`, the interleaved
    rope always (transformers interleaves whatever the `interleaved` flag says), DeepStack after decoder layers
    0..k-1 for k = len(vision_config.deepstack_visual_indexes) (capped at the number of layers).
    """
    thinker = thinker_config(hf_config)
    text = _get(thinker, "text_config")
    vision = _get(thinker, "vision_config")
    if text is None or vision is None:
        raise ValueError("the Qwen3-Omni thinker config lacks text_config or vision_config")
    rope = _get(text, "rope_parameters") or _get(text, "rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (the hooked decoder implements the default "
                         "interleaved multimodal rope of the released Qwen3-Omni checkpoints)")
    n_heads = _get(text, "num_attention_heads")
    d_model = _get(text, "hidden_size")
    n_layers = _get(text, "num_hidden_layers")
    n_deepstack = len(_get(vision, "deepstack_visual_indexes", ()))
    tokens = TokenIds(
        audio=_get(thinker, "audio_token_id", QWEN3_OMNI_TOKENS["audio"]),
        image=_get(thinker, "image_token_id", QWEN3_OMNI_TOKENS["image"]),
        video=_get(thinker, "video_token_id", QWEN3_OMNI_TOKENS["video"]),
        audio_start=_get(thinker, "audio_start_token_id", QWEN3_OMNI_TOKENS["audio_start"]),
        audio_end=_get(thinker, "audio_end_token_id", QWEN3_OMNI_TOKENS["audio_end"]),
        vision_start=_get(thinker, "vision_start_token_id", QWEN3_OMNI_TOKENS["vision_start"]),
        vision_end=_get(thinker, "vision_end_token_id", QWEN3_OMNI_TOKENS["vision_end"]),
        bos=_get(thinker, "bos_token_id", _get(text, "bos_token_id", QWEN3_OMNI_TOKENS["bos"])),
        eos=_get(thinker, "eos_token_id", _get(text, "eos_token_id", QWEN3_OMNI_TOKENS["eos"])),
        pad=_get(thinker, "pad_token_id", _get(text, "pad_token_id", QWEN3_OMNI_TOKENS["pad"])),
    )
    attention_bias = bool(_get(text, "attention_bias", False))
    return AVModelConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_key_value_heads=_get(text, "num_key_value_heads"),
        d_head=_get(text, "head_dim") or d_model // n_heads,
        d_mlp=_get(text, "intermediate_size"),
        d_vocab=_get(text, "vocab_size"),
        n_ctx=_get(text, "max_position_embeddings", 65536),
        act_fn=_get(text, "hidden_act", "silu"),
        rms_norm_eps=_get(text, "rms_norm_eps", 1e-6),
        attn_qkv_bias=attention_bias,
        attn_o_bias=attention_bias,
        tie_word_embeddings=bool(_get(thinker, "tie_word_embeddings", False)),
        qk_norm=True,
        rope_theta=float(rope.get("rope_theta", _get(text, "rope_theta", 1_000_000.0))),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=True,
        n_experts=_get(text, "num_experts", 0),
        n_experts_per_tok=_get(text, "num_experts_per_tok", 0),
        d_expert=_get(text, "moe_intermediate_size", 0),
        norm_topk_prob=bool(_get(text, "norm_topk_prob", True)),
        decoder_sparse_step=_get(text, "decoder_sparse_step", 1),
        mlp_only_layers=tuple(_get(text, "mlp_only_layers", ())),
        deepstack_layers=tuple(range(min(n_deepstack, n_layers))),
        token_ids=tokens,
        position_id_per_seconds=_get(thinker, "position_id_per_seconds", 13),
        seconds_per_chunk=_get(thinker, "seconds_per_chunk", 2),
        spatial_merge_size=_get(vision, "spatial_merge_size", 2),
        sinks=sinks or SinkConstants(),
        model_family=FAMILY,
        model_name=model_name,
        dtype=dtype,
    )


def tiny_hf_config(**text_overrides: Any) -> Any:
    """A tiny random `Qwen3OmniMoeThinkerConfig` exercising every path (the "qwen3-omni-tiny" preset).

    3 decoder layers (0 and 2 MoE with 4 experts / top-2, 1 dense via mlp_only_layers), head_dim 16 with
    interleaved rope sections [4, 2, 2], q/k norms; ViT of 3 blocks with DeepStack taps after blocks 0 and 2 (so
    decoder layers 0 and 1 receive DeepStack writes and layer 2 none); AuT of 2 layers with 16 mel bins and 2-s
    attention windows (n_window_infer 200), so audio longer than 2 s spans several windows.
    """
    from transformers import Qwen3OmniMoeThinkerConfig

    from .tiny_qwen3_omni import MEL, TOK

    text = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                mlp_only_layers=[1], max_position_embeddings=4096,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 2, 2], interleaved=True))
    text.update(text_overrides)
    d_model = text["hidden_size"]
    return Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=d_model, n_window=50, n_window_infer=200, conv_chunksize=500,
                          downsample_hidden_size=8, max_source_positions=200),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=d_model,
                           patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
        text_config=text,
        audio_token_id=TOK["audio"], image_token_id=TOK["image"], video_token_id=TOK["video"],
        audio_start_token_id=TOK["audio_start"], audio_end_token_id=TOK["audio_end"],
        vision_start_token_id=TOK["vision_start"], vision_end_token_id=TOK["vision_end"],
        bos_token_id=TOK["bos"], eos_token_id=TOK["eos"], pad_token_id=TOK["pad"], position_id_per_seconds=13,
    )


# ---------------------------------------------------------------------------------------------------- layout
def audio_token_count(mel_frames: int, n_window: int = 50) -> int:
    """LLM tokens of an audio of `mel_frames` valid frames (transformers' `_get_feat_extract_output_lengths`):
    13 per full chunk of 2 * n_window frames, plus the tail chunk through three stride-2 convolutions."""
    chunk = 2 * n_window
    tail = (mel_frames % chunk - 1) // 2 + 1
    return ((tail - 1) // 2 + 1 - 1) // 2 + 1 + (mel_frames // chunk) * FULL_CHUNK_TOKENS


def audio_token_times(n_tokens: int, n_window: int = 50) -> Float[Tensor, " n"]:
    """Start time (s) of each audio token's mel frames: token i of chunk c starts at frame c * 2 * n_window + 8 i."""
    per_chunk = audio_token_count(2 * n_window, n_window)
    k = torch.arange(n_tokens)
    frames = (k // per_chunk) * 2 * n_window + (k % per_chunk) * AUDIO_TOKEN_STRIDE_FRAMES
    return frames.float() / MEL_FRAMES_PER_SECOND


def audio_in_video_order(video_t: Float[Tensor, " n_video"], audio_t: Float[Tensor, " n_audio"],
                         ) -> Int[Tensor, " n"]:
    """Interleaving of an audio-in-video block: indices into cat([video, audio]) in sequence order.

    A video token comes before an audio token when its temporal position is <= the audio token's (both
    non-decreasing), which is a stable merge with ties to video; leftovers follow in order. This is the order of
    transformers' `Qwen3OmniMoeProcessor.replace_video_with_audio_token` and of `get_rope_index`.
    """
    if len(video_t) > 1 and bool((video_t[1:] < video_t[:-1]).any()):
        raise LayoutError("video temporal positions must be non-decreasing (video_second_per_grid >= 0)")
    return torch.sort(torch.cat([video_t, audio_t]), stable=True).indices


def parse_layout(
    cfg: AVModelConfig,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    image_grid_thw: Int[Tensor, "n_image 3"] | None = None,
    video_grid_thw: Int[Tensor, "n_video 3"] | None = None,
    video_second_per_grid: Tensor | None = None,
    audio_lengths: Int[Tensor, " n_audio"] | None = None,
    use_audio_in_video: bool = False,
    audio_n_window: int = 50,
) -> tuple[Float[Tensor, "3 batch pos"], ModalityMap]:
    """3-D position ids (float32) and the ModalityMap of a Qwen3-Omni prompt layout.

    Blocks: text; `<|audio_start|> AUDIO* <|audio_end|>`; `<|vision_start|> IMAGE* <|vision_end|>`;
    `<|vision_start|> VIDEO* <|vision_end|>`; with `use_audio_in_video`,
    `<|vision_start|><|audio_start|> [video and audio tokens merged by time] <|audio_end|><|vision_end|>`.
    Positions: text and delimiters consecutive on all three rows; audio token k at start + k; image/video token at
    (start + t, start + h, start + w) with t = grid index * seconds_per_grid * position_id_per_seconds (float).
    Each piece starts one past the largest position of the piece before it (the bos pair, the eos pair and the
    leftover run of an audio-in-video block are pieces), as transformers computes it. Media items are consumed
    in order across the batch. Padding positions hold 0 when the inputs have an image or video grid, else 1
    (transformers' two code paths).
    """
    tok = cfg.token_ids
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pps, merge = cfg.position_id_per_seconds, cfg.spatial_merge_size
    pad_value = 0.0 if (image_grid_thw is not None or video_grid_thw is not None) else 1.0
    positions = torch.full((3, batch, seq_len), pad_value, dtype=torch.float32)
    builder = ModalityMapBuilder(batch, seq_len, cfg.seconds_per_chunk)
    counters = {"image": 0, "video": 0, "audio": 0}
    given = {"image": image_grid_thw, "video": video_grid_thw, "audio": audio_lengths}
    spc = float(cfg.seconds_per_chunk)

    def take(kind: str) -> int:
        i = counters[kind]
        n = 0 if given[kind] is None else len(given[kind])
        if i >= n:
            raise LayoutError(f"the prompt holds more {kind} blocks than the inputs provide ({n} {kind} item(s))")
        counters[kind] += 1
        return i

    def seconds_per_grid(index: int) -> Tensor:
        if video_second_per_grid is None:
            raise LayoutError("video_second_per_grid is required for video inputs")
        spg = torch.as_tensor(video_second_per_grid)
        if index >= len(spg):
            raise LayoutError(f"video_second_per_grid has {len(spg)} value(s), video {index} needs one")
        return spg[index].cpu().float()

    def vision_grid(kind: str, index: int, start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Absolute [3, n] positions, (g, h, w) grid cells [n, 3] and times [n] of a vision item's tokens."""
        gt, gh, gw = (int(x) for x in given[kind][index])
        lh, lw = gh // merge, gw // merge
        if kind == "video":
            t_index = (torch.arange(gt) * seconds_per_grid(index) * pps).float()
            times = torch.arange(gt).float() * seconds_per_grid(index)
        else:
            t_index = (torch.arange(gt) * 1 * pps).float()
            times = torch.full((gt,), math.nan)
        g = torch.arange(gt).view(-1, 1).expand(-1, lh * lw).flatten()
        h = torch.arange(lh).view(1, -1, 1).expand(gt, -1, lw).flatten()
        w = torch.arange(lw).view(1, 1, -1).expand(gt, lh, -1).flatten()
        pos = torch.stack([t_index[g], h.float(), w.float()]) + start
        return pos, torch.stack([g, h, w], dim=-1), times[g]

    for b in range(batch):
        valid = attention_mask[b].bool()
        idx = valid.nonzero().squeeze(-1)  # absolute positions of the valid tokens
        ids = input_ids[b, idx].tolist()
        n = len(ids)
        pos = torch.zeros(3, n, dtype=torch.float32)
        start = torch.tensor(0.0)  # where the next piece starts: one past the largest position of the last piece
        i = 0

        def emit(j0: int, j1: int, modality: Modality, item: int = -1) -> None:
            """A piece of consecutive positions (text or delimiters) on all rows."""
            nonlocal start
            pos[:, j0:j1] = torch.arange(j1 - j0).float() + start
            start = pos[:, j1 - 1].max() + 1
            builder.set(b, idx[j0:j1], modality, item=item)

        def expect(j: int, token: int | None, what: str) -> None:
            if j >= n or ids[j] != token:
                got = "the end of the sequence" if j >= n else f"token {ids[j]}"
                where = int(idx[j]) if j < n else j
                raise LayoutError(f"sample {b}: expected {what} (id {token}) at position {where}, got {got}")

        names = {tok.audio: "audio", tok.image: "image", tok.video: "video"}

        def expect_tokens(j: int, expected: list[int], what: str) -> None:
            """The placeholder run from j must be exactly `expected` (counts and, in AV blocks, order)."""
            end = j
            while end < n and ids[end] in names:
                end += 1
            found = ids[j:end]
            if found == expected:
                return

            def describe(run: list[int]) -> str:
                return " + ".join(f"{run.count(t)} {name}" for t, name in names.items() if t in run) or "none"

            order = " (same counts, another order)" if sorted(found) == sorted(expected) else ""
            raise LayoutError(
                f"sample {b}: {what} expects {describe(expected)} placeholder tokens from position "
                f"{int(idx[j]) if j < n else j}; the prompt holds {describe(found)} there{order}"
            )

        while i < n:
            t = ids[i]
            nxt = ids[i + 1] if i + 1 < n else None
            if t == tok.vision_start and nxt == tok.audio_start:
                if not use_audio_in_video:
                    raise LayoutError(f"sample {b}: an audio-in-video block (<|vision_start|><|audio_start|>) at "
                                      f"position {int(idx[i])}, but use_audio_in_video is False")
                v, a = take("video"), take("audio")
                emit(i, i + 2, Modality.SPECIAL, item=v)
                vpos, vgrid, vtime = vision_grid("video", v, start)
                n_audio = audio_token_count(int(given["audio"][a]), audio_n_window)
                apos = (torch.arange(n_audio).float() + start).view(1, -1).expand(3, -1)
                atime = audio_token_times(n_audio, audio_n_window)
                order = audio_in_video_order(vpos[0], apos[0])
                n_video = vpos.shape[1]
                is_video = order < n_video
                expected = [tok.video if x else tok.audio for x in is_video.tolist()]
                j = i + 2
                expect_tokens(j, expected, f"audio-in-video block {v} (video grid {given['video'][v].tolist()}, "
                                           f"{n_audio} audio tokens)")
                block = idx[j : j + len(order)]
                vsel, asel = order[is_video], order[~is_video] - n_video
                pos[:, j : j + len(order)] = torch.cat([vpos, apos], dim=1)[:, order]
                builder.set(b, block[is_video], Modality.VIDEO, chunk=(vtime[vsel] // spc).long(),
                            time=vtime[vsel], grid=vgrid[vsel], item=v)
                builder.set(b, block[~is_video], Modality.AUDIO, chunk=(atime[asel] // spc).long(),
                            time=atime[asel], item=a)
                if len(order):
                    # the last piece: the run after the other modality's last token (the leftover)
                    last_kind = is_video[-1]
                    other = (is_video != last_kind).nonzero()
                    first = int(other.max()) + 1 if other.numel() else 0
                    start = pos[:, j + first : j + len(order)].max() + 1
                j += len(order)
                expect(j, tok.audio_end, "<|audio_end|> closing an audio-in-video block")
                expect(j + 1, tok.vision_end, "<|vision_end|> closing an audio-in-video block")
                emit(j, j + 2, Modality.SPECIAL, item=v)
                i = j + 2
            elif t == tok.vision_start and nxt is not None and nxt in (tok.image, tok.video):
                kind = "image" if nxt == tok.image else "video"
                k = take(kind)
                emit(i, i + 1, Modality.SPECIAL)
                vpos, vgrid, vtime = vision_grid(kind, k, start)
                m = vpos.shape[1]
                token = tok.image if kind == "image" else tok.video
                expect_tokens(i + 1, [token] * m, f"{kind} {k} (grid {given[kind][k].tolist()})")
                pos[:, i + 1 : i + 1 + m] = vpos
                start = vpos.max() + 1 if m else start
                if kind == "video":
                    builder.set(b, idx[i + 1 : i + 1 + m], Modality.VIDEO, chunk=(vtime // spc).long(), time=vtime,
                                grid=vgrid, item=k)
                else:
                    builder.set(b, idx[i + 1 : i + 1 + m], Modality.IMAGE, grid=vgrid, item=k)
                expect(i + 1 + m, tok.vision_end, f"<|vision_end|> closing {kind} {k}")
                emit(i + 1 + m, i + 2 + m, Modality.SPECIAL)
                i = i + 2 + m
            elif t == tok.audio_start and nxt == tok.audio:
                k = take("audio")
                emit(i, i + 1, Modality.SPECIAL)
                m = audio_token_count(int(given["audio"][k]), audio_n_window)
                expect_tokens(i + 1, [tok.audio] * m, f"audio {k} ({int(given['audio'][k])} mel frames)")
                pos[:, i + 1 : i + 1 + m] = torch.arange(m).float() + start
                start = start + m
                atime = audio_token_times(m, audio_n_window)
                builder.set(b, idx[i + 1 : i + 1 + m], Modality.AUDIO, chunk=(atime // spc).long(), time=atime,
                            item=k)
                expect(i + 1 + m, tok.audio_end, f"<|audio_end|> closing audio {k}")
                emit(i + 1 + m, i + 2 + m, Modality.SPECIAL)
                i = i + 2 + m
            else:
                if t in (tok.audio, tok.image, tok.video):
                    raise LayoutError(
                        f"sample {b}: placeholder token {t} at position {int(idx[i])} is outside a modality block"
                    )
                j = i + 1
                while j < n and ids[j] not in (tok.vision_start, tok.audio_start, tok.audio, tok.image, tok.video):
                    j += 1
                emit(i, j, Modality.TEXT)
                i = j
        positions[:, b, idx] = pos
    for kind, used in counters.items():
        if given[kind] is not None and len(given[kind]) != used:
            raise LayoutError(f"the inputs provide {len(given[kind])} {kind} item(s) but the prompt uses {used}")
    return positions, builder.build(family=FAMILY)


# ---------------------------------------------------------------------------------------------------- the model
_PROCESSOR_KEYS = (
    "input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
    "pixel_values_videos", "video_grid_thw", "video_second_per_grid", "use_audio_in_video", "num_audio_tokens",
)


class Qwen3OmniHookedModel(HookedAVModel):
    """Qwen3-Omni thinker: hooked MoE decoder with DeepStack writes, transformers AuT and ViT as hooked towers."""

    tower_names = ("audio_tower", "video_tower", "image_tower")

    def __init__(self, cfg: AVModelConfig, hf_config: Any):
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

        super().__init__(cfg)
        self.hf_config = hf_config
        audio_cfg, vision_cfg = hf_config.audio_config, hf_config.vision_config
        self.audio_encoder = hf.Qwen3OmniMoeAudioEncoder._from_config(audio_cfg)
        self.vision_encoder = hf.Qwen3OmniMoeVisionEncoder._from_config(vision_cfg)
        self.audio_tower = HookedTower(audio_cfg.encoder_layers,
                                       "layer outputs are the valid audio frames after the convolutions, all audios "
                                       "concatenated")
        vit_note = "ViT layer outputs are patches in 2x2 merge-block order (rows of the processor's pixel_values)"
        self.video_tower = HookedTower(vision_cfg.depth, vit_note)
        self.image_tower = HookedTower(vision_cfg.depth, vit_note)
        self.setup()

    # ------------------------------------------------------------ inputs
    def prepare_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        input_features: Float[Tensor, "n_audio mel frames"] | None = None,
        feature_attention_mask: Int[Tensor, "n_audio frames"] | None = None,
        pixel_values: Float[Tensor, "patches d_patch"] | None = None,
        image_grid_thw: Int[Tensor, "n_image 3"] | None = None,
        pixel_values_videos: Float[Tensor, "patches d_patch"] | None = None,
        video_grid_thw: Int[Tensor, "n_video 3"] | None = None,
        video_second_per_grid: Tensor | list[float] | None = None,
        use_audio_in_video: bool | Tensor = False,
        num_audio_tokens: Tensor | list[int] | None = None,
        **unexpected: Any,
    ) -> AVInputs:
        """AVInputs from the processor's tensors (transformers' `Qwen3OmniMoeProcessor` keys, or
        `model_zoo.qwen3_omni_processing`). `num_audio_tokens`, which transformers' processor also returns, is
        checked against the encoder's token count."""
        if unexpected:
            raise TypeError(
                f"unexpected input(s) {sorted(unexpected)}; Qwen3-Omni takes the processor's keys: "
                f"{', '.join(_PROCESSOR_KEYS)}"
            )
        if input_ids is None:
            raise TypeError("input_ids is required")
        device = self.device
        input_ids = input_ids.to(device)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        n_window = int(self.hf_config.audio_config.n_window)
        audio_lengths = None
        if input_features is not None:
            if feature_attention_mask is None:
                feature_attention_mask = torch.ones(input_features.shape[0], input_features.shape[-1],
                                                    dtype=torch.long)
            audio_lengths = feature_attention_mask.sum(-1).cpu()
            if num_audio_tokens is not None:
                ours = [audio_token_count(int(x), n_window) for x in audio_lengths]
                theirs = [int(x) for x in torch.as_tensor(num_audio_tokens).flatten()]
                if ours != theirs:
                    raise LayoutError(f"num_audio_tokens {theirs} disagree with the audio encoder's token counts "
                                      f"{ours} for {audio_lengths.tolist()} mel frames (n_window {n_window})")
        if video_second_per_grid is not None:
            video_second_per_grid = torch.as_tensor(video_second_per_grid)
        use_audio_in_video = bool(use_audio_in_video)
        position_ids, mmap = parse_layout(
            self.cfg, input_ids.cpu(), attention_mask.cpu(),
            image_grid_thw=None if image_grid_thw is None else image_grid_thw.cpu(),
            video_grid_thw=None if video_grid_thw is None else video_grid_thw.cpu(),
            video_second_per_grid=video_second_per_grid, audio_lengths=audio_lengths,
            use_audio_in_video=use_audio_in_video, audio_n_window=n_window,
        )
        mm = dict(input_features=input_features, feature_attention_mask=feature_attention_mask,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                  video_second_per_grid=video_second_per_grid, use_audio_in_video=use_audio_in_video)
        return AVInputs(input_ids, attention_mask, position_ids.to(device), mmap, mm)

    def embed_inputs(self, inputs: AVInputs) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the audio and vision towers' outputs at their placeholder positions.

        Also sets `inputs.residual_writes`: for each DeepStack layer, [batch, pos, d_model] holding the ViT's
        intermediate features (merged by the DeepStack mergers) at image and video positions, zero elsewhere.
        """
        tok = self.cfg.token_ids
        embeds = self.embed(inputs.input_ids)
        mm = inputs.mm
        if mm.get("input_features") is not None:
            audio = self.audio_tower.run(self._audio_encode(mm["feature_attention_mask"]), mm["input_features"],
                                        list(self.audio_encoder.layers))
            embeds = _scatter(embeds, inputs.input_ids == tok.audio, audio, "audio")
        writes: list[Tensor] = []
        for kind, key, grid_key, token in (("image", "pixel_values", "image_grid_thw", tok.image),
                                           ("video", "pixel_values_videos", "video_grid_thw", tok.video)):
            if mm.get(key) is None:
                continue
            tower = self.image_tower if kind == "image" else self.video_tower
            grid = mm[grid_key].to(self.device)
            deepstack: list[Tensor] = []

            def encode(px: Tensor, g: Tensor = grid, into: list[Tensor] = deepstack) -> Tensor:
                out = self.vision_encoder(px.type(self.vision_encoder.dtype), grid_thw=g)
                into.extend(out.deepstack_features)
                return out.pooler_output

            out = tower.run(encode, mm[key].to(self.device), list(self.vision_encoder.blocks))
            mask = inputs.input_ids == token
            embeds = _scatter(embeds, mask, out, kind)
            if not writes:
                writes = [torch.zeros_like(embeds) for _ in self.cfg.deepstack_layers]
            for k in range(len(writes)):
                writes[k] = _scatter(writes[k], mask, deepstack[k], f"{kind} deepstack feature {k}")
        inputs.residual_writes = dict(zip(self.cfg.deepstack_layers, writes)) if writes else {}
        return embeds

    def _audio_encode(self, feature_attention_mask: Tensor):
        """The audio encoder call of transformers' `get_audio_features`, on the processor's padded features."""

        def encode(input_features: Tensor) -> Tensor:
            fam = feature_attention_mask.to(input_features.device)
            flat = input_features.permute(0, 2, 1)[fam.bool()].permute(1, 0)
            return self.audio_encoder(flat.to(self.audio_encoder.dtype), feature_lens=fam.sum(-1)).last_hidden_state

        return encode

    def _decode(self, inputs: AVInputs, embeds: Tensor, *args: Any, **kwargs: Any) -> Tensor | None:
        """The base decoder, refusing a run over a prompt with image/video tokens but no DeepStack writes (the
        embeddings came from elsewhere than `embed_inputs(inputs)`), which would silently skip DeepStack."""
        cache = kwargs.get("kv_cache")
        prompt_run = kwargs.get("residual_writes") is None and (cache is None or len(cache) == 0)
        if prompt_run and self.cfg.deepstack_layers and not inputs.residual_writes:
            mmap = inputs.modality_map
            if bool((mmap.mask(Modality.IMAGE) | mmap.mask(Modality.VIDEO)).any()):
                raise LayoutError(
                    "these inputs hold image/video tokens but no DeepStack features: compute the embeddings with "
                    "model.embed_inputs(inputs) (it attaches inputs.residual_writes), or pass residual_writes"
                )
        return super()._decode(inputs, embeds, *args, **kwargs)

    # ------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, max_shard_bytes: int = 2 * 2**30) -> None:
        """Write an HF-format Qwen3-Omni thinker checkpoint (config.json + safetensors with per-expert weights, as
        transformers' save_pretrained writes them), loadable by transformers and by `from_pretrained`."""
        from hooked_av.checkpoint import save_hf_checkpoint

        save_hf_checkpoint(self, path, to_hf_key, max_shard_bytes=max_shard_bytes, to_hf_tensors=to_hf_tensors,
                           architecture=HF_THINKER_CLASS)


def _scatter(embeds: Tensor, mask: Tensor, values: Tensor, what: str) -> Tensor:
    n = int(mask.sum())
    if n != values.shape[0]:
        raise LayoutError(f"{what}: the prompt holds {n} placeholder tokens but the encoder produced "
                          f"{values.shape[0]} embeddings")
    return embeds.masked_scatter(mask[..., None].to(embeds.device), values.to(embeds.device, embeds.dtype))


# ---------------------------------------------------------------------------------------------------- weight names
_IGNORED_PREFIXES = ("talker.", "code2wav.")
_RULES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "ln_final.weight"),
    (r"lm_head\.weight", "unembed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blocks.\1.mlp.router.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", r"blocks.\1.mlp.experts.\2"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"audio_tower\.(.+)", r"audio_encoder.\1"),
    (r"visual\.(.+)", r"vision_encoder.\1"),
]
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _normalise_key(key: str) -> str:
    key = key.removeprefix("thinker.")
    key = re.sub(r"^model\.language_model\.", "model.", key)
    return re.sub(r"^model\.(audio_tower|visual)\.", r"\1.", key)


def key_mapper(cfg: AVModelConfig):
    """`map_key` for `hooked_av.checkpoint.load_into`: our parameter (or a slice of a stacked expert parameter)
    for a checkpoint key. Accepts the released layout (`thinker.model.layers.*`, per-expert
    `mlp.experts.{e}.{gate,up,down}_proj.weight`), thinker-only keys as transformers saves them, and the
    transformers 5.x in-memory names (`model.language_model.*`, fused `mlp.experts.gate_up_proj`). Weights of the
    talker and code2wav are skipped."""
    d_expert = cfg.d_expert

    def map_key(key: str) -> str | tuple[str, tuple] | None:
        if key.startswith(_IGNORED_PREFIXES):
            return None
        key = _normalise_key(key)
        match = _EXPERT.fullmatch(key)
        if match:
            layer, expert, which = int(match[1]), int(match[2]), match[3]
            if not cfg.is_moe_layer(layer):
                raise KeyError(f"{key}: layer {layer} has no experts in this config")
            if expert >= cfg.n_experts:
                raise KeyError(f"{key}: expert {expert} >= n_experts {cfg.n_experts}")
            if which == "down_proj":
                return f"blocks.{layer}.mlp.experts.down_proj", (expert,)
            rows = slice(0, d_expert) if which == "gate_proj" else slice(d_expert, 2 * d_expert)
            return f"blocks.{layer}.mlp.experts.gate_up_proj", (expert, rows)
        renamed = rename(key, _RULES)
        if renamed is not None:
            return renamed
        raise KeyError(f"unrecognised Qwen3-Omni checkpoint key {key!r}")

    return map_key


def to_hf_key(name: str) -> str:
    """Thinker-only checkpoint key for one of our (non-expert) parameters."""
    rules = [
        (r"embed\.weight", "model.embed_tokens.weight"),
        (r"ln_final\.weight", "model.norm.weight"),
        (r"unembed\.weight", "lm_head.weight"),
        (r"blocks\.(\d+)\.ln1\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"blocks\.(\d+)\.ln2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"blocks\.(\d+)\.attn\.([qkvo]_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
        (r"blocks\.(\d+)\.attn\.([qk]_norm)\.weight", r"model.layers.\1.self_attn.\2.weight"),
        (r"blocks\.(\d+)\.mlp\.router\.weight", r"model.layers.\1.mlp.gate.weight"),
        (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
        (r"audio_encoder\.(.+)", r"audio_tower.\1"),
        (r"vision_encoder\.(.+)", r"visual.\1"),
    ]
    renamed = rename(name, rules)
    if renamed is not None:
        return renamed
    raise KeyError(f"no checkpoint name for parameter {name!r}")


def to_hf_tensors(name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """Checkpoint tensors for one parameter; stacked experts split into the per-expert weights of the released
    layout (gate_up_proj [E, 2I, d] -> experts.{e}.gate_proj [I, d] and up_proj [I, d]; down_proj [E, d, I])."""
    match = re.fullmatch(r"blocks\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
    if match is None:
        return [(to_hf_key(name), tensor)]
    prefix = f"model.layers.{match[1]}.mlp.experts"
    if match[2] == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
    gate, up = tensor.chunk(2, dim=1)
    out = []
    for e in range(tensor.shape[0]):
        out += [(f"{prefix}.{e}.gate_proj.weight", gate[e]), (f"{prefix}.{e}.up_proj.weight", up[e])]
    return out


# ---------------------------------------------------------------------------------------------------- building
def build(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
          dtype: torch.dtype = torch.float32) -> Qwen3OmniHookedModel:
    """An (uninitialised-weights) model for a transformers Qwen3-Omni (thinker) config."""
    thinker = thinker_config(hf_config)
    if isinstance(thinker, dict):
        from transformers import Qwen3OmniMoeThinkerConfig

        thinker = Qwen3OmniMoeThinkerConfig(**thinker)
    cfg = config_from_hf(thinker, model_name=model_name, sinks=sinks, dtype=dtype)
    return Qwen3OmniHookedModel(cfg, thinker)


def from_hf_model(hf_model: Any, sinks: SinkConstants | None = None, model_name: str = "custom",
                  ) -> Qwen3OmniHookedModel:
    """Convert an in-memory `Qwen3OmniMoeThinkerForConditionalGeneration` (or the full model's thinker).

    The hooked model shares the reference model's weight tensors (no copy is made)."""
    thinker = getattr(hf_model, "thinker", hf_model)
    name = type(thinker).__name__
    if name != HF_THINKER_CLASS:
        raise FamilyMismatchError(f"expected a {DISPLAY_NAMES[FAMILY]} model ({HF_THINKER_CLASS}), got "
                                  f"{describe_class(name)}")
    dtype = next(thinker.parameters()).dtype
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build(thinker.config, model_name=model_name, sinks=sinks, dtype=dtype)
    map_key = key_mapper(model.cfg)
    state = {}
    for key, tensor in thinker.state_dict().items():
        target = map_key(key)
        if target is None:
            continue
        if not isinstance(target, str):
            raise KeyError(f"{key}: per-expert weights in an in-memory model (expected fused experts)")
        state[target] = tensor
    if model.cfg.tie_word_embeddings:
        state.pop("unembed.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "unembed.weight" and model.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"weight conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if model.cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    return model.to(next(thinker.parameters()).device).eval()
