"""video-SALMONN 2+ (7B, 3B) as a HookedAVModel with the zoo's uniform hook names.

There is no transformers class for this model; the reference is the public code, `bytedance/video-SALMONN-2`,
folder `video_SALMONN2_plus/` (class `video_SALMONN2_plus`, transformers 4.51.3). Its parts:

* LLM: the Qwen2.5-VL-{7B,3B} language model (Qwen2 decoder, 3-D multimodal rope with sections [16, 24, 24]),
  reimplemented with hooks by `hooked_av.components`.
* `video_tower` / `image_tower`: transformers' own Qwen2.5-VL ViT (`Qwen2_5_VisionTransformerPretrainedModel`,
  windowed attention, 2x2 patch merger), shared by both towers as in the public code.
* `audio_tower`: transformers' `WhisperEncoder` on 30-s segments, then a window-level BLIP-2 Q-Former
  (transformers' `Blip2QFormerModel`) and a Linear (`model_zoo.salmonn_audio`): 2 tokens/s with the released
  0.5-s windows and one query.
* Prompt layout (public `qwenvl/data/dataset.py`): a video with audio is
  `<|vision_start|> [grid 0 video tokens][its audio tokens][grid 1 video tokens][its audio tokens] ... <|vision_end|>`,
  i.e. the audio falling in each temporal grid (a pair of frames) follows that grid: grid g takes
  floor((g+1) * spg * 2) - floor(g * spg * 2) audio tokens (spg = seconds per grid) and the last grid takes all
  the rest, padded silence of the last 30-s segment included. Audio alone is
  `<|vision_start|> <|audio_pad|>* <|vision_end|>` (no audio delimiters); images and videos without audio follow
  Qwen2.5-VL. `<|audio_pad|>` (id 151665) was added to the Qwen2.5-VL tokenizer; the embedding matrix already had
  the row.

Position ids (`parse_layout`). The public code computes them in two different ways:

* `position_mode="inference"` (default): what the released `inference.py` and the evaluation path of
  `train_qwen.py` feed the model. Both drop `audio_lengths` and `second_per_grid_ts` before `model.generate`, and
  `prepare_inputs_for_generation` discards the dataset's position ids, so `get_rope_index` takes its Qwen2.5-VL
  branch with 1 second per grid: the T*h*w positions of a video (t = 2g, h, w) go to the T*h*w tokens following
  the first `<|video_pad|>`, whatever their type (audio tokens interleaved there get video grid positions), and
  every later token (remaining video and audio tokens included) counts on as text from max + 1. Audio alone gets
  plain 1-D positions.
* `position_mode="training"`: what training used (the dataset's `get_rope_index_25`, passed to the forward):
  video token (floor(g * spg * 2), h, w); audio token k of an audio-in-video block (k, 0, k); audio token k of an
  audio-only block (k, k, 0) (h and w swapped between the two); all offset by the block start; text after an
  audio-visual or audio block restarts from the block's t-row maximum + 1 (not the maximum over all rows).

Generated tokens continue from the largest prompt position + 1 in both modes (the cached `rope_deltas`).
The ModalityMap does not depend on the mode: it is read off the token layout (times from `second_per_grid_ts`
and the audio windows).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_av.checkpoint import rename
from hooked_av.config import AVModelConfig, SinkConstants, TokenIds
from hooked_av.inputs import LayoutError, Modality, ModalityMap, ModalityMapBuilder
from hooked_av.model import AVInputs, DecodeState, HookedAVModel
from hooked_av.towers import HookedTower

from .families import DISPLAY_NAMES, FamilyMismatchError, describe_class, describe_config, family_of_config
from .salmonn_audio import WindowQFormerAudio, WindowSettings, qformer_config, qformer_key, qformer_released_key, \
    whisper_key

FAMILY = "video_salmonn2"
UPSTREAM_CLASS = "video_SALMONN2_plus"
MODEL_TYPE = "qwen2_5_vl"
POSITION_MODES = ("inference", "training")
#: temporal position units per second of video: the public `get_rope_index` hard-codes `second_per_grid_t * 2`
#: (= Qwen2.5-VL's `tokens_per_second` 2), whatever the vision config says
TOKENS_PER_SECOND = 2

#: Token ids of the released checkpoints (Qwen2.5-VL tokenizer + the added `<|audio_pad|>`, config default 151665).
VS2_TOKENS = dict(audio=151665, image=151655, video=151656, vision_start=151652, vision_end=151653,
                  bos=151644, eos=151645, pad=151643)

#: The public code's config defaults (`configuration_qwen2_5_vl.py`): Whisper-large-v3 encoder and the Q-Former's
#: BertConfig. Used only for fields a checkpoint's config.json does not give.
PUBLIC_WHISPER_DEFAULTS = dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                               d_model=1280, max_source_positions=1500, activation_function="gelu")
PUBLIC_QFORMER_DEFAULTS = dict(hidden_size=3072, num_hidden_layers=2, num_attention_heads=12, intermediate_size=12288,
                               hidden_act="gelu", layer_norm_eps=1e-12, encoder_width=1280, cross_attention_freq=1,
                               query_length=1, initializer_range=0.02)

SINKS_7B = SinkConstants(
    dims=(458, 2570), tau=None, calibrated=False,
    provenance="not calibrated: dims [458, 2570] are the massive-activation channels reported for Qwen2.5-VL-7B "
    "and Qwen2-VL-7B in third-party code (MODELS.md section 6), the initialisation of this LLM; expected, not "
    "verified on video-SALMONN 2+ weights. No published tau (the official 25 is for Qwen2.5-Omni-7B): run "
    "hooked_av.recipes.sinks.calibrate_sinks on the real weights",
)
SINKS_3B = SinkConstants(
    dims=(), tau=None, calibrated=False,
    provenance="not calibrated: no published constants for Qwen2.5-VL-3B-based models (two third-party "
    "calibrations on Qwen2.5-VL-3B disagree: [318, 1874, 1819] and [1874, 1819], MODELS.md section 6); run "
    "hooked_av.recipes.sinks.calibrate_sinks on the real weights",
)
SINKS_TINY = SinkConstants(dims=(), tau=None, calibrated=False,
                           provenance="random tiny test model: no sinks to calibrate")

#: Decoder presets (config.json of the Qwen2.5-VL-{7B,3B}-Instruct LLMs the releases are built from).
PRESETS: dict[str, dict[str, Any]] = {
    "video-salmonn2plus-7b": dict(
        n_layers=28, d_model=3584, n_heads=28, n_key_value_heads=4, d_head=128, d_mlp=18944, d_vocab=152064,
        n_ctx=128000, rope_theta=1_000_000.0, mrope_section=(16, 24, 24), tie_word_embeddings=False, sinks=SINKS_7B,
    ),
    "video-salmonn2plus-3b": dict(
        n_layers=36, d_model=2048, n_heads=16, n_key_value_heads=2, d_head=128, d_mlp=11008, d_vocab=151936,
        n_ctx=128000, rope_theta=1_000_000.0, mrope_section=(16, 24, 24), tie_word_embeddings=True, sinks=SINKS_3B,
    ),
    # `model_zoo.tiny_video_salmonn.tiny_vs2_config`
    "video-salmonn2plus-tiny": dict(
        n_layers=3, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=96, d_vocab=512, n_ctx=4096,
        mrope_section=(2, 3, 3), sinks=SINKS_TINY,
    ),
}
#: Preset fields compared with a checkpoint's config on loading. tie_word_embeddings is not among them: the 3B
#: value follows Qwen2.5-VL-3B (tied) but is not confirmed on the release, so the checkpoint decides.
PRESET_CHECKED = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab",
                  "mrope_section")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class Salmonn2Config:
    """A video-SALMONN 2+ checkpoint config, split into what each part needs.

    raw: the config.json dict (the public `Qwen2_5_VLConfig` with its `audio_config`).
    text: the LLM fields (top-level in the released 4.51 layout, `text_config` in the transformers 5 layout).
    vision / whisper / qformer: transformers configs of the ViT, the Whisper encoder and the Q-Former.
    window: the Q-Former windows (`audio_config.second_per_window` / `second_stride`, `query_length`).
    """

    raw: dict[str, Any]
    text: dict[str, Any]
    vision: Any
    whisper: Any
    qformer: Any
    window: WindowSettings
    tokens: TokenIds = field(default_factory=TokenIds)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


def parse_config(config: Any) -> Salmonn2Config:
    """Salmonn2Config from a config.json dict (or an object with `to_dict`). Raises FamilyMismatchError, naming
    both, for a config of another family (e.g. plain Qwen2.5-VL, which has no `audio_config`)."""
    from transformers import Qwen2_5_VLVisionConfig, WhisperConfig

    if isinstance(config, Salmonn2Config):
        return config
    raw = dict(config if isinstance(config, dict) else config.to_dict())
    if family_of_config(raw) != FAMILY:
        raise FamilyMismatchError(f"expected a {DISPLAY_NAMES[FAMILY]} config (model_type {MODEL_TYPE!r} with an "
                                  f"audio_config), got {describe_config(raw).replace('checkpoint', 'config')}")
    text = {k: v for k, v in raw.items() if k not in ("vision_config", "audio_config", "text_config")}
    text.update(raw.get("text_config") or {})
    vision = dict(raw["vision_config"])
    vision.pop("model_type", None)
    audio = dict(raw["audio_config"])
    bert = {**PUBLIC_QFORMER_DEFAULTS, **(audio.pop("qformer_config", None) or {})}
    window = WindowSettings(float(audio.pop("second_per_window", 0.5)), float(audio.pop("second_stride", 0.5)),
                            int(bert.get("query_length", 1)))
    audio.pop("model_type", None)
    whisper = WhisperConfig(**{**PUBLIC_WHISPER_DEFAULTS, **audio})
    d_model = text["hidden_size"]
    if vision.get("out_hidden_size", d_model) != d_model:
        raise ValueError(f"vision_config.out_hidden_size {vision.get('out_hidden_size')} != LLM hidden_size {d_model}")
    tokens = TokenIds(
        audio=raw.get("audio_token_id", VS2_TOKENS["audio"]),
        image=raw.get("image_token_id", VS2_TOKENS["image"]),
        video=raw.get("video_token_id", VS2_TOKENS["video"]),
        vision_start=raw.get("vision_start_token_id", VS2_TOKENS["vision_start"]),
        vision_end=raw.get("vision_end_token_id", VS2_TOKENS["vision_end"]),
        bos=raw.get("bos_token_id", VS2_TOKENS["bos"]),
        eos=raw.get("eos_token_id", VS2_TOKENS["eos"]),
        pad=raw.get("pad_token_id", VS2_TOKENS["pad"]),
    )
    return Salmonn2Config(raw=raw, text=text, vision=Qwen2_5_VLVisionConfig(**vision), whisper=whisper,
                          qformer=qformer_config(bert, encoder_width=whisper.d_model), window=window, tokens=tokens)


def config_from_hf(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
                   dtype: torch.dtype = torch.float32) -> AVModelConfig:
    """AVModelConfig of the LLM and prompt layout from a checkpoint config (dict or Salmonn2Config)."""
    parsed = parse_config(hf_config)
    text = parsed.text
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    n_heads = text["num_attention_heads"]
    d_model = text["hidden_size"]
    return AVModelConfig(
        n_layers=text["num_hidden_layers"],
        d_model=d_model,
        n_heads=n_heads,
        n_key_value_heads=text.get("num_key_value_heads") or n_heads,
        d_head=text.get("head_dim") or d_model // n_heads,
        d_mlp=text["intermediate_size"],
        d_vocab=text["vocab_size"],
        n_ctx=text.get("max_position_embeddings", 128000),
        act_fn=text.get("hidden_act", "silu"),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        token_ids=parsed.tokens,
        position_id_per_seconds=TOKENS_PER_SECOND,
        spatial_merge_size=parsed.vision.spatial_merge_size,
        sinks=sinks or SinkConstants(),
        model_family=FAMILY,
        model_name=model_name,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------------- layout glue
def audio_tokens_per_grid(n_grids: int, second_per_grid: float, n_audio: int,
                          tokens_per_second: int = TOKENS_PER_SECOND) -> list[int]:
    """Audio tokens after each temporal grid of an audio-in-video block (the public `split_into_groups`):
    grid g < T-1 takes floor((g+1)*spg*2) - floor(g*spg*2) (float32 arithmetic, as there), the last grid the rest."""
    frame_idx = (torch.arange(n_grids) * float(second_per_grid) * tokens_per_second).long()
    counts = torch.diff(frame_idx).tolist()
    counts.append(n_audio - sum(counts))
    if counts[-1] < 0:
        raise LayoutError(f"{n_audio} audio tokens are fewer than the {sum(counts[:-1])} the first {n_grids - 1} "
                          f"grids of {second_per_grid:g} s take: the audio is shorter than the video")
    return counts


def av_block_ids(tokens: TokenIds, grid_thw: tuple[int, int, int], second_per_grid: float, n_audio: int,
                 merge: int = 2) -> list[int]:
    """Placeholder ids of a video with its audio: `<|vision_start|>` [grid g video tokens][its audio tokens]...
    `<|vision_end|>` (the public dataset's `<video>` replacement with audio)."""
    t, h, w = grid_thw
    per_grid = h * w // merge**2
    ids = [tokens.vision_start]
    for n in audio_tokens_per_grid(t, second_per_grid, n_audio):
        ids += [tokens.video] * per_grid + [tokens.audio] * n
    return ids + [tokens.vision_end]


def video_block_ids(tokens: TokenIds, grid_thw: tuple[int, int, int], merge: int = 2) -> list[int]:
    t, h, w = grid_thw
    return [tokens.vision_start] + [tokens.video] * (t * h * w // merge**2) + [tokens.vision_end]


def image_block_ids(tokens: TokenIds, grid_thw: tuple[int, int, int], merge: int = 2) -> list[int]:
    t, h, w = grid_thw
    return [tokens.vision_start] + [tokens.image] * (t * h * w // merge**2) + [tokens.vision_end]


def audio_block_ids(tokens: TokenIds, n_audio: int) -> list[int]:
    """Audio alone: `<|vision_start|>` + audio tokens + `<|vision_end|>` (the public code reuses the vision
    delimiters)."""
    return [tokens.vision_start] + [tokens.audio] * n_audio + [tokens.vision_end]


def audio_token_count(n_samples: int, sampling_rate: int, tokens_per_segment: int, segment_seconds: float) -> int:
    """LLM tokens of an audio of `n_samples` samples: padded to >= 1 s, cut into segments, each padded to a full
    segment (the public `process_audio`: ceil(duration / 30) * 60 with the released windows)."""
    n_samples = max(n_samples, sampling_rate)
    per_segment = round(segment_seconds * sampling_rate)
    return math.ceil(n_samples / per_segment) * tokens_per_segment


# ---------------------------------------------------------------------------------------------------- layout
@dataclass
class _Block:
    kind: str  # "image", "video", "audio"
    start: int  # index (within the valid tokens) of the <|vision_start|>
    item: int
    audio_item: int = -1
    audio_per_grid: list[int] = field(default_factory=list)


def _text_piece(n: int, start: int | Tensor) -> Tensor:
    return torch.arange(n).view(1, -1).expand(3, -1) + start


def _grid_rows(grid: Tensor, merge: int, seconds_per_grid: float, tokens_per_second: int) -> Tensor:
    """(t, h, w) rows of a vision item's merged tokens in raster order; t = long(g * spg * tps) in float32."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    t_index = (torch.arange(t).view(-1, 1).expand(-1, h * w) * seconds_per_grid * tokens_per_second).long().flatten()
    h_index = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
    w_index = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
    return torch.stack([t_index, h_index, w_index])


def _find(ids: list[int], token: int, start: int, what: str) -> int:
    try:
        return ids.index(token, start)
    except ValueError:
        raise LayoutError(f"no {what} token (id {token}) after position {start}") from None


def _starts_of(ids: list[int], vision_start: int, token: int) -> int:
    """How many `<|vision_start|>` are followed by `token` (the public code's `vision_tokens == token`)."""
    return sum(1 for i in range(len(ids) - 1) if ids[i] == vision_start and ids[i + 1] == token)


def _positions_vl(ids: list[int], tok: TokenIds, image_grids: Tensor | None, video_grids: Tensor | None,
                  spg: list[float] | None, merge: int, tps: int, counters: dict[str, int]) -> Tensor:
    """The public `get_rope_index` Qwen2.5-VL branch on one sample: each image/video claims the next
    T*h*w tokens from its first placeholder (whatever they are); text before/after counts on from max + 1."""
    n_images = _starts_of(ids, tok.vision_start, tok.image)
    n_videos = _starts_of(ids, tok.vision_start, tok.video)
    pieces: list[Tensor] = []
    st = 0
    remain_images, remain_videos = n_images, n_videos
    for _ in range(n_images + n_videos):
        ed_image = _find(ids, tok.image, st, "image") if tok.image in ids and remain_images > 0 else len(ids) + 1
        ed_video = _find(ids, tok.video, st, "video") if tok.video in ids and remain_videos > 0 else len(ids) + 1
        if ed_image < ed_video:
            grid, seconds = image_grids[counters["image"]], 0.0
            counters["image"] += 1
            remain_images -= 1
            ed = ed_image
        else:
            grid = video_grids[counters["video"]]
            seconds = spg[counters["video"]] if spg is not None else 1.0
            counters["video"] += 1
            remain_videos -= 1
            ed = ed_video
        st_idx = pieces[-1].max() + 1 if pieces else 0
        pieces.append(_text_piece(ed - st, st_idx))
        rows = _grid_rows(grid, merge, seconds, tps)
        pieces.append(rows + (ed - st) + st_idx)
        st = ed + rows.shape[1]
    if st < len(ids):
        st_idx = pieces[-1].max() + 1 if pieces else 0
        pieces.append(_text_piece(len(ids) - st, st_idx))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _positions_av(ids: list[int], tok: TokenIds, video_grids: Tensor, spg: list[float] | None,
                  audio_lengths: list[int], merge: int, tps: int, counters: dict[str, int]) -> Tensor:
    """The public `get_rope_index` audio-visual branch (training): video (floor(g*spg*2), h, w), audio k of the
    block (k, 0, k), both from the block start, scattered by token type; text after the last block restarts at
    the block's t-row max + 1."""
    n_videos = _starts_of(ids, tok.vision_start, tok.video)
    pieces: list[Tensor] = []
    st = 0
    for _ in range(n_videos):
        v = counters["video"]
        ed = _find(ids, tok.video, st, "video")
        grid = video_grids[v]
        seconds = spg[v] if spg is not None else 1.0
        text_len = ed - st
        st_idx = pieces[-1].max() + 1 if pieces else 0
        pieces.append(_text_piece(text_len, st_idx))
        vpos = _grid_rows(grid, merge, seconds, tps) + text_len + st_idx
        if v >= len(audio_lengths):
            raise LayoutError(f"video {v} has no audio length ({len(audio_lengths)} given)")
        n_audio = int(audio_lengths[v])
        k = torch.arange(n_audio)
        apos = torch.stack([k, torch.zeros_like(k), k]) + st_idx + text_len
        region = torch.tensor(ids[ed: ed + vpos.shape[1] + n_audio])
        is_audio, is_video = region == tok.audio, region == tok.video
        if len(region) != vpos.shape[1] + n_audio or int(is_audio.sum()) != n_audio \
                or int(is_video.sum()) != vpos.shape[1]:
            raise LayoutError(f"audio-visual block of video {v}: expected {vpos.shape[1]} video and {n_audio} audio "
                              f"tokens from position {ed}, found {int(is_video.sum())} video and "
                              f"{int(is_audio.sum())} audio among the next {len(region)} tokens")
        av = torch.zeros(3, len(region), dtype=torch.long)
        av[:, is_audio] = apos
        av[:, is_video] = vpos
        pieces.append(av)
        st = ed + len(region)
        counters["video"] += 1
    if st < len(ids):
        st_idx = pieces[-1][0].max() + 1 if pieces else 0
        pieces.append(_text_piece(len(ids) - st, st_idx))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _positions_audio(ids: list[int], tok: TokenIds, audio_lengths: list[int], counters: dict[str, int]) -> Tensor:
    """The public `get_rope_index` audio branch (training): audio k at (k, k, 0) from the block start; text after
    the last block restarts at its t-row max + 1."""
    n_audios = _starts_of(ids, tok.vision_start, tok.audio)
    pieces: list[Tensor] = []
    st = 0
    for _ in range(n_audios):
        ed = _find(ids, tok.audio, st, "audio")
        n_audio = int(audio_lengths[counters["audio"]])
        text_len = ed - st
        st_idx = pieces[-1].max() + 1 if pieces else 0
        pieces.append(_text_piece(text_len, st_idx))
        k = torch.arange(n_audio)
        pieces.append(torch.stack([k, k, torch.zeros_like(k)]) + st_idx + text_len)
        st = ed + n_audio
        counters["audio"] += 1
    if st < len(ids):
        st_idx = pieces[-1][0].max() + 1 if pieces else 0
        pieces.append(_text_piece(len(ids) - st, st_idx))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def parse_layout(
    cfg: AVModelConfig,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    image_grid_thw: Int[Tensor, "n_image 3"] | None = None,
    video_grid_thw: Int[Tensor, "n_video 3"] | None = None,
    second_per_grid_ts: Tensor | list[float] | None = None,
    audio_lengths: list[int] | Tensor | None = None,
    audio_token_times: Any = None,
    position_mode: str = "inference",
) -> tuple[Int[Tensor, "3 batch pos"], ModalityMap, list[int]]:
    """Position ids, ModalityMap and per-audio token counts of a video-SALMONN 2+ prompt layout.

    The token structure is checked block by block (image, video, video with its audio interleaved per grid, audio
    alone) against the grids and, when `second_per_grid_ts` is given, against the public interleaving rule
    (`audio_tokens_per_grid`). Positions follow `position_mode` (module docstring). Media items are numbered in
    order across the batch, as the public code consumes them. `audio_token_times(n)` gives the start time (s) of
    an audio's n tokens (the audio tower's windows); `audio_lengths`, when given, must equal the token counts of
    the audio blocks. Padding positions hold position 1, as the public code leaves them.
    """
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
    tok = cfg.token_ids
    merge, tps = cfg.spatial_merge_size, cfg.position_id_per_seconds
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    spg = None if second_per_grid_ts is None else [float(x) for x in torch.as_tensor(second_per_grid_ts).flatten()]
    grids = {"image": image_grid_thw, "video": video_grid_thw}
    builder = ModalityMapBuilder(batch, seq_len, cfg.seconds_per_chunk)
    counters = {"image": 0, "video": 0, "audio": 0}
    found_audio: list[int] = []
    per_sample: list[tuple[list[int], Tensor]] = []
    spc = float(cfg.seconds_per_chunk)

    def take(kind: str, b: int) -> int:
        given = grids[kind]
        n = 0 if given is None else len(given)
        if counters[kind] >= n:
            raise LayoutError(f"sample {b}: the prompt holds more {kind} blocks than the inputs provide ({n})")
        counters[kind] += 1
        return counters[kind] - 1

    for b in range(batch):
        idx = attention_mask[b].bool().nonzero().squeeze(-1)
        ids = input_ids[b, idx].tolist()
        per_sample.append((ids, idx))
        n = len(ids)
        i = 0

        def run_of(j: int, token: int) -> int:
            k = j
            while k < n and ids[k] == token:
                k += 1
            return k - j

        def expect(j: int, token: int, what: str) -> None:
            if j >= n or ids[j] != token:
                got = "the end of the sequence" if j >= n else f"token {ids[j]}"
                raise LayoutError(f"sample {b}: expected {what} (id {token}) at position "
                                  f"{int(idx[j]) if j < n else j}, got {got}")

        while i < n:
            t = ids[i]
            nxt = ids[i + 1] if i + 1 < n else None
            if t == tok.vision_start and nxt in (tok.image, tok.video):
                kind = "image" if nxt == tok.image else "video"
                k = take(kind, b)
                gt, gh, gw = (int(x) for x in grids[kind][k])
                per_grid = (gh // merge) * (gw // merge)
                builder.set(b, int(idx[i]), Modality.SPECIAL, item=k)
                j = i + 1
                audio_counts = []
                a = -1
                seconds = None if kind == "image" or spg is None else spg[k]
                if kind == "video" and seconds is None:
                    raise LayoutError("second_per_grid_ts is required for video inputs (the ModalityMap dates "
                                      "video tokens with it)")
                grid_times: list[float] = []
                audio_runs: list[tuple[int, int]] = []
                for g in range(gt):
                    m = run_of(j, tok.image if kind == "image" else tok.video)
                    if m < per_grid:
                        raise LayoutError(f"sample {b}: {kind} {k} (grid {[gt, gh, gw]}) expects {per_grid} "
                                          f"placeholder tokens for temporal grid {g} from position "
                                          f"{int(idx[j]) if j < n else j}, found {m}")
                    cells = torch.arange(per_grid)
                    cell = torch.stack([torch.full_like(cells, g), cells // (gw // merge), cells % (gw // merge)], -1)
                    sl = idx[j: j + per_grid]
                    if kind == "image":
                        builder.set(b, sl, Modality.IMAGE, grid=cell, item=k)
                    else:
                        time = g * seconds
                        builder.set(b, sl, Modality.VIDEO, chunk=int(time // spc), time=float(time), grid=cell,
                                    item=k)
                    j += per_grid
                    n_a = run_of(j, tok.audio) if kind == "video" else 0
                    audio_runs.append((j, n_a))
                    audio_counts.append(n_a)
                    j += n_a
                if sum(audio_counts):
                    a = counters["audio"]
                    counters["audio"] += 1
                    total = sum(audio_counts)
                    found_audio.append(total)
                    if seconds is not None:
                        expected = audio_tokens_per_grid(gt, seconds, total, tps)
                        if expected != audio_counts:
                            raise LayoutError(
                                f"sample {b}: video {k} interleaves {audio_counts} audio tokens after its {gt} "
                                f"temporal grids; the public layout with {seconds:g} s per grid puts {expected}")
                    times = audio_token_times(total) if audio_token_times is not None else torch.full((total,), math.nan)
                    offset = 0
                    for j0, n_a in audio_runs:
                        tt = times[offset: offset + n_a]
                        builder.set(b, idx[j0: j0 + n_a], Modality.AUDIO, chunk=(tt // spc).long(), time=tt, item=a)
                        offset += n_a
                expect(j, tok.vision_end, f"<|vision_end|> closing {kind} {k}")
                builder.set(b, int(idx[j]), Modality.SPECIAL, item=k)
                i = j + 1
            elif t == tok.vision_start and nxt == tok.audio:
                a = counters["audio"]
                counters["audio"] += 1
                m = run_of(i + 1, tok.audio)
                found_audio.append(m)
                builder.set(b, int(idx[i]), Modality.SPECIAL, item=a)
                times = audio_token_times(m) if audio_token_times is not None else torch.full((m,), math.nan)
                builder.set(b, idx[i + 1: i + 1 + m], Modality.AUDIO, chunk=(times // spc).long(), time=times, item=a)
                expect(i + 1 + m, tok.vision_end, f"<|vision_end|> closing audio {a}")
                builder.set(b, int(idx[i + 1 + m]), Modality.SPECIAL, item=a)
                i = i + 2 + m
            elif t in (tok.audio, tok.image, tok.video):
                raise LayoutError(f"sample {b}: placeholder token {t} at position {int(idx[i])} is outside a "
                                  "<|vision_start|> ... <|vision_end|> block")
            else:
                builder.set(b, int(idx[i]), Modality.TEXT)
                i += 1
    for kind in ("image", "video"):
        given = grids[kind]
        if given is not None and len(given) != counters[kind]:
            raise LayoutError(f"the inputs provide {len(given)} {kind} grid(s) but the prompt uses {counters[kind]}")
    if audio_lengths is not None:
        given = [int(x) for x in torch.as_tensor(audio_lengths).flatten()]
        if given != found_audio:
            raise LayoutError(f"audio_lengths {given} disagree with the prompt's audio blocks ({found_audio} tokens)")

    # positions: the public get_rope_index branch the mode's inputs select
    positions = torch.ones(3, batch, seq_len, dtype=torch.long)
    counters = {"image": 0, "video": 0, "audio": 0}
    has_vision = image_grid_thw is not None or video_grid_thw is not None
    for b, (ids, idx) in enumerate(per_sample):
        if position_mode == "training" and found_audio and video_grid_thw is not None:
            pos = _positions_av(ids, tok, video_grid_thw, spg, found_audio, merge, tps, counters)
        elif has_vision:
            pos = _positions_vl(ids, tok, image_grid_thw, video_grid_thw,
                                spg if position_mode == "training" else None, merge, tps, counters)
        elif position_mode == "training" and found_audio:
            pos = _positions_audio(ids, tok, found_audio, counters)
        else:
            pos = _text_piece(len(ids), 0)
        if pos.shape[1] != len(ids):
            raise LayoutError(f"sample {b}: {pos.shape[1]} positions for {len(ids)} tokens")
        positions[:, b, idx] = pos
    return positions, builder.build(family=FAMILY, position_mode=position_mode), found_audio


# ---------------------------------------------------------------------------------------------------- the model
_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
               "video_grid_thw", "second_per_grid_ts", "audio_feature", "audio_lengths", "position_mode")


class VideoSalmonn2HookedModel(HookedAVModel):
    """video-SALMONN 2+: hooked Qwen2.5-VL LLM; transformers' Qwen2.5-VL ViT, Whisper encoder and BLIP-2 Q-Former
    as hooked towers. `position_mode` ("inference" or "training", module docstring) is the default of
    `prepare_inputs`."""

    tower_names = ("audio_tower", "video_tower", "image_tower")

    def __init__(self, cfg: AVModelConfig, hf_config: Salmonn2Config, position_mode: str = "inference"):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        super().__init__(cfg)
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        self.hf_config = hf_config
        self.position_mode = position_mode
        self.vision_encoder = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_config.vision)
        self.audio_encoder = WindowQFormerAudio(hf_config.whisper, hf_config.qformer, cfg.d_model, hf_config.window)
        self.audio_tower = HookedTower(hf_config.whisper.encoder_layers,
                                       "layer outputs are Whisper encoder frames, [segments, frames, d_audio]; "
                                       "hook_out holds the Q-Former tokens of all segments, [tokens, d_model]")
        vit_note = "ViT layer outputs are in window order (transformers' window_index), not raster order"
        self.video_tower = HookedTower(hf_config.vision.depth, vit_note)
        self.image_tower = HookedTower(hf_config.vision.depth, vit_note)
        self.setup()

    # ------------------------------------------------------------ inputs
    def prepare_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        pixel_values: Float[Tensor, "patches d_patch"] | None = None,
        image_grid_thw: Int[Tensor, "n_image 3"] | None = None,
        pixel_values_videos: Float[Tensor, "patches d_patch"] | None = None,
        video_grid_thw: Int[Tensor, "n_video 3"] | None = None,
        second_per_grid_ts: Tensor | list[float] | None = None,
        audio_feature: Float[Tensor, "n_segments n_mel frames"] | None = None,
        audio_lengths: list[int] | Tensor | None = None,
        position_mode: str | None = None,
        **unexpected: Any,
    ) -> AVInputs:
        """AVInputs from the public dataset's tensors (`audio_feature`: all audios' 30-s segments concatenated;
        `audio_lengths`: LLM tokens per audio, optional, checked against the prompt)."""
        if unexpected:
            raise TypeError(f"unexpected input(s) {sorted(unexpected)}; video-SALMONN 2+ takes: "
                            f"{', '.join(_INPUT_KEYS)}")
        if input_ids is None:
            raise TypeError("input_ids is required")
        device = self.device
        input_ids = input_ids.to(device)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        audio = self.audio_encoder
        position_ids, mmap, found = parse_layout(
            self.cfg, input_ids.cpu(), attention_mask.cpu(),
            image_grid_thw=None if image_grid_thw is None else image_grid_thw.cpu(),
            video_grid_thw=None if video_grid_thw is None else video_grid_thw.cpu(),
            second_per_grid_ts=second_per_grid_ts, audio_lengths=audio_lengths, audio_token_times=audio.token_times,
            position_mode=position_mode or self.position_mode,
        )
        n_tokens = sum(found)
        if found and audio_feature is None:
            raise LayoutError(f"the prompt holds {n_tokens} audio tokens but no audio_feature was given")
        if audio_feature is not None:
            bad = [n for n in found if n % audio.tokens_per_segment]
            expected_segments = n_tokens // audio.tokens_per_segment
            if bad or audio_feature.shape[0] != expected_segments:
                raise LayoutError(
                    f"audio token counts {found} need whole segments of {audio.tokens_per_segment} tokens "
                    f"({expected_segments} segments in all); audio_feature holds {audio_feature.shape[0]} segments")
        mm = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, audio_feature=audio_feature)
        return AVInputs(input_ids, attention_mask, position_ids.to(device), mmap, mm)

    def embed_inputs(self, inputs: AVInputs) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the towers' outputs at their placeholder positions, in order (masked_scatter, as
        the public code)."""
        tok = self.cfg.token_ids
        embeds = self.embed(inputs.input_ids)
        mm = inputs.mm
        for kind, key, grid_key, token in (("image", "pixel_values", "image_grid_thw", tok.image),
                                           ("video", "pixel_values_videos", "video_grid_thw", tok.video)):
            if mm.get(key) is None:
                continue
            tower = self.image_tower if kind == "image" else self.video_tower
            grid = mm[grid_key].to(self.device)
            out = tower.run(lambda px, g=grid: self.vision_encoder(px.type(self.vision_encoder.dtype),
                                                                   grid_thw=g).pooler_output,
                            mm[key].to(self.device), list(self.vision_encoder.blocks))
            embeds = _scatter(embeds, inputs.input_ids == token, out, kind)
        if mm.get("audio_feature") is not None:
            out = self.audio_tower.run(lambda mel: self.audio_encoder(mel).flatten(0, 1),
                                       mm["audio_feature"].to(self.device), list(self.audio_encoder.whisper.layers))
            embeds = _scatter(embeds, inputs.input_ids == tok.audio, out, "audio")
        return embeds

    @torch.no_grad()
    def start_decoding(self, inputs: Any, embeds: Tensor | None = None) -> tuple[Tensor, DecodeState]:
        """As the base class, but generated tokens continue from the largest prompt position + 1 (the public
        code's cached `rope_deltas`), which can exceed the last token's position + 1."""
        logits, state = super().start_decoding(inputs, embeds)
        valid = state.inputs.attention_mask.bool()
        pos = state.inputs.position_ids.masked_fill(~valid[None], torch.iinfo(torch.long).min)
        state.next_position = pos.amax(dim=(0, 2)) + 1
        return logits, state

    # ------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str, max_shard_bytes: int = 2 * 2**30) -> None:
        """Write a checkpoint in the released layout (config.json of the public `Qwen2_5_VLConfig`, keys as
        `video_SALMONN2_plus.save_pretrained` writes them), loadable by `from_pretrained`."""
        from hooked_av.checkpoint import save_hf_checkpoint

        save_hf_checkpoint(self, path, to_released_key, max_shard_bytes=max_shard_bytes, architecture=UPSTREAM_CLASS)


def _scatter(embeds: Tensor, mask: Tensor, values: Tensor, what: str) -> Tensor:
    n = int(mask.sum())
    if n != values.shape[0]:
        raise LayoutError(f"{what}: the prompt holds {n} placeholder tokens but the encoder produced "
                          f"{values.shape[0]} embeddings")
    return embeds.masked_scatter(mask[..., None].to(embeds.device), values.to(embeds.device, embeds.dtype))


# ---------------------------------------------------------------------------------------------------- weight names
#: released key (after normalisation) -> our parameter. The released `_full` checkpoints were written by
#: transformers 4.51.3: `model.*` (LLM), `lm_head.weight`, `visual.*` (ViT), `audio.*` (Whisper encoder,
#: `audio.qformer.bert.*`, `audio.q_tokens`, `audio.audio_proj.*`).
_DECODER_RULES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "ln_final.weight"),
    (r"lm_head\.weight", "unembed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"blocks.\1.mlp.\2.weight"),
]
_DECODER_INVERSE = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"ln_final\.weight", "model.norm.weight"),
    (r"unembed\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.ln1\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.ln2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo]_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
]


def decoder_key(key: str) -> str | None:
    """Our decoder parameter for a Qwen2 LM key (`model.*`, `lm_head.weight`), else None."""
    return rename(key, _DECODER_RULES)


def decoder_released_key(name: str) -> str | None:
    return rename(name, _DECODER_INVERSE)


def from_released_key(key: str) -> str | None:
    """Our parameter for a released video-SALMONN 2+ key; None for entries the forward never uses. Also accepts
    the transformers 5 in-memory spellings `model.language_model.*` and `model.visual.*`.

    Key mapping (released -> ours): `model.embed_tokens` -> `embed`; `model.layers.{l}.input_layernorm` /
    `post_attention_layernorm` -> `blocks.{l}.ln1` / `ln2`; `model.layers.{l}.self_attn.{q,k,v,o}_proj` ->
    `blocks.{l}.attn.*`; `model.layers.{l}.mlp.*` -> `blocks.{l}.mlp.*`; `model.norm` -> `ln_final`; `lm_head` ->
    `unembed`; `visual.*` -> `vision_encoder.*` (transformers' ViT names); `audio.<whisper encoder>` ->
    `audio_encoder.whisper.*`; `audio.qformer.bert.embeddings.LayerNorm` -> `audio_encoder.qformer.layernorm`;
    `audio.qformer.bert.encoder.layer.{i}.{attention,crossattention}.self.*` ->
    `audio_encoder.qformer.encoder.layer.{i}.{attention,crossattention}.attention.*` (`.output.*`,
    `intermediate_query`, `output_query` unchanged); `audio.q_tokens` -> `audio_encoder.query_tokens`;
    `audio.audio_proj` -> `audio_encoder.proj`. Skipped: `audio.qformer.bert.embeddings.position_ids` (buffer)."""
    key = re.sub(r"^model\.language_model\.", "model.", key)
    key = re.sub(r"^model\.visual\.", "visual.", key)
    ours = decoder_key(key)
    if ours is not None:
        return ours
    if key.startswith("visual."):
        return "vision_encoder." + key.removeprefix("visual.")
    if key.startswith("audio.qformer.bert."):
        target = qformer_key(key.removeprefix("audio.qformer.bert."))
        return None if target is None else "audio_encoder." + target
    if key.startswith("audio.qformer.cls."):
        return None
    if key == "audio.q_tokens":
        return "audio_encoder.query_tokens"
    if re.fullmatch(r"audio\.audio_proj\.(weight|bias)", key):
        return "audio_encoder.proj." + key.rsplit(".", 1)[1]
    if key.startswith("audio."):
        return "audio_encoder." + whisper_key(key.removeprefix("audio."))
    raise KeyError(f"unrecognised video-SALMONN 2+ checkpoint key {key!r}")


def to_released_key(name: str) -> str:
    """The released checkpoint key of one of our parameters (inverse of `from_released_key`)."""
    ours = decoder_released_key(name)
    if ours is not None:
        return ours
    if name.startswith("vision_encoder."):
        return "visual." + name.removeprefix("vision_encoder.")
    if name.startswith("audio_encoder.qformer."):
        return "audio.qformer.bert." + qformer_released_key(name.removeprefix("audio_encoder.qformer."))
    if name == "audio_encoder.query_tokens":
        return "audio.q_tokens"
    if name.startswith("audio_encoder.proj."):
        return "audio.audio_proj." + name.removeprefix("audio_encoder.proj.")
    if name.startswith("audio_encoder.whisper."):
        return "audio." + name.removeprefix("audio_encoder.whisper.")
    raise KeyError(f"no released checkpoint key for parameter {name!r}")


# ---------------------------------------------------------------------------------------------------- building
def build(hf_config: Any, model_name: str = "custom", sinks: SinkConstants | None = None,
          dtype: torch.dtype = torch.float32, position_mode: str = "inference") -> VideoSalmonn2HookedModel:
    """An (uninitialised-weights) model for a checkpoint config (dict or Salmonn2Config)."""
    parsed = parse_config(hf_config)
    cfg = config_from_hf(parsed, model_name=model_name, sinks=sinks, dtype=dtype)
    return VideoSalmonn2HookedModel(cfg, parsed, position_mode=position_mode).to(dtype)


def from_hf_model(model: Any, sinks: SinkConstants | None = None, model_name: str = "custom",
                  position_mode: str = "inference") -> VideoSalmonn2HookedModel:
    """Convert an in-memory model of the public code (`video_SALMONN2_plus`, from its `config.to_dict()` and
    `state_dict()`); the hooked model shares its weight tensors."""
    name = type(model).__name__
    if name != UPSTREAM_CLASS:
        raise FamilyMismatchError(f"expected a {DISPLAY_NAMES[FAMILY]} model ({UPSTREAM_CLASS}), got "
                                  f"{describe_class(name)}")
    from accelerate import init_empty_weights

    dtype = next(model.parameters()).dtype
    with init_empty_weights(include_buffers=False):
        hooked = build(model.config.to_dict(), model_name=model_name, sinks=sinks, dtype=dtype,
                       position_mode=position_mode)
    return _assign_state(hooked, model.state_dict(), from_released_key).to(next(model.parameters()).device).eval()


def _assign_state(model: HookedAVModel, state: dict[str, Tensor], map_key: Any) -> Any:
    ours: dict[str, Tensor] = {}
    for key, tensor in state.items():
        target = map_key(key)
        if target is not None:
            ours[target] = tensor
    if model.cfg.tie_word_embeddings:
        ours.pop("unembed.weight", None)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    missing = [k for k in missing if not (k == "unembed.weight" and model.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"weight conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if model.cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    return model


def registry_family(family_class: Any) -> Any:
    """This family's `model_zoo.registry.Family` entry."""
    return family_class(
        name=FAMILY,
        model_types=(MODEL_TYPE,),
        hf_thinker_class=UPSTREAM_CLASS,
        presets=PRESETS,
        checked_fields=PRESET_CHECKED,
        hf_thinker_config=lambda config, path: parse_config(config),
        config_from_hf=config_from_hf,
        build=build,
        key_mapper=lambda cfg: from_released_key,
        from_hf_model=from_hf_model,
        accepts=lambda config: family_of_config(config) == FAMILY,
    )
