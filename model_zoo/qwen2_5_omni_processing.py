"""Qwen2.5-Omni processor path that runs without torchvision: RawAV -> the keyword tensors of the HF processor.

transformers' `Qwen2_5OmniProcessor` cannot be built without torchvision (its video processor,
`Qwen2VLVideoProcessor`, is a torchvision backend). This module rebuilds its outputs from transformers' own pieces:

* audio: `WhisperFeatureExtractor` called exactly as the Omni processor's `_process_audio` calls it
  (`sampling_rate=16000, return_attention_mask=True, padding="max_length"`, 300-s padding of the Omni
  `preprocessor_config`), `attention_mask` renamed `feature_attention_mask`;
  audio tokens = `((L - 1) // 2 + 1 - 2) // 2 + 1` for L valid mel frames;
* video: per frame, `Qwen2VLImageProcessorPil`'s convert / resize (smart_resize with the *video* min/max
  pixels) / rescale / CLIP normalisation, then the temporal patchify of `Qwen2VLVideoProcessor.patchify`
  (rows of C x T x P x P ordered (t-block, h-block, w-block, merge-row, merge-col)); video tokens =
  t·h·w / merge²; `video_second_per_grid = temporal_patch_size / fps` with fps 2.0 as transformers hard-codes;
* audio in video: `<|vision_bos|><|audio_bos|>[V chunk0][A chunk0][V chunk1]...<|audio_eos|><|vision_eos|>`, the
  chunks cut by transformers' `get_chunked_index` on temporal positions (25 per second, 2-s chunks);
* images (optional): `Qwen2VLImageProcessorPil` itself.

What differs from the torchvision processor: the video resize runs in PIL (bicubic) instead of torchvision
(bicubic, antialias): the two kernels are close but not bit-identical, so resized pixels can differ by about a
grey level (not measured here: torchvision cannot be installed); rescale + normalise is unfused (x/255 then
(x - mean)/std instead of one fused affine map: float32 rounding, ~1e-7). Frames that already have the
smart_resize size are returned unchanged by PIL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float32, UInt8

from hooked_av.config import TokenIds
from hooked_av.media import RawAV

from .vision_processing import normalized_frames, patchify_video

#: Whisper front end of the Omni checkpoints' preprocessor_config.json.
SAMPLING_RATE = 16000
N_MELS = 128
HOP_LENGTH = 160
N_FFT = 400
#: The Omni feature extractor pads every audio to 300 s (n_samples 4_800_000, nb_max_frames 30_000).
CHUNK_LENGTH_SECONDS = 300
#: Vision patching of Qwen2.5-Omni's ViT.
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
#: Video pixel bounds of `Qwen2_5OmniProcessor.videos_kwargs` ("shortest_edge" / "longest_edge").
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
#: Image pixel bounds of the Omni checkpoints' preprocessor_config.json.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 16384
#: fps the Omni processor assumes when none is passed ("default fps not saved in official ckpt, hardcode").
VIDEO_FPS = 2.0
#: TMRoPE: temporal position ids per second, and the audio-in-video chunk length.
POSITION_ID_PER_SECONDS = 25
SECONDS_PER_CHUNK = 2
#: Qwen2VLVideoProcessor `max_video_tokens` and the share of it used as a pixel budget (cap_pixels_per_frame).
MAX_VIDEO_TOKENS = 128000
VIDEO_TOKEN_BUDGET_SHARE = 0.9
#: Floor of the capped per-frame maximum, x min_pixels (Qwen2VLVideoProcessor.resize).
MIN_PIXELS_SLACK = 1.05


@dataclass(frozen=True)
class OmniProcessorSettings:
    """Constants of the Qwen2.5-Omni processor (defaults: the released 7B/3B checkpoints and transformers).

    `video_fps=None` takes the clip's own sampling rate (`RawAV.fps`) for `video_second_per_grid`; the default 2.0
    is what `Qwen2_5OmniProcessor` uses when called without `fps` (the official usage).
    """

    sampling_rate: int = SAMPLING_RATE
    n_mels: int = N_MELS
    hop_length: int = HOP_LENGTH
    n_fft: int = N_FFT
    chunk_length: int = CHUNK_LENGTH_SECONDS
    patch_size: int = PATCH_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    merge_size: int = MERGE_SIZE
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    image_min_pixels: int = IMAGE_MIN_PIXELS
    image_max_pixels: int = IMAGE_MAX_PIXELS
    video_fps: float | None = VIDEO_FPS
    position_id_per_seconds: int = POSITION_ID_PER_SECONDS
    seconds_per_chunk: int = SECONDS_PER_CHUNK
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = MAX_VIDEO_TOKENS

    @property
    def tokens_per_chunk(self) -> int:
        """Temporal positions per audio-visual chunk (25 x 2 = 50)."""
        return int(self.position_id_per_seconds * self.seconds_per_chunk)

    @property
    def resize_factor(self) -> int:
        """Resized frame sides are multiples of patch x merge (28)."""
        return self.patch_size * self.merge_size


# ---------------------------------------------------------------------------------------------------- layout rules
def num_audio_tokens(mel_frames: int) -> int:
    """LLM tokens of an audio of `mel_frames` valid frames: conv stride 2, then pooling by 2 (25 per second)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def num_vision_tokens(grid_thw: Sequence[int], merge_size: int = MERGE_SIZE) -> int:
    """LLM tokens of an image/video grid: t·h·w / merge²."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // merge_size**2


def chunked_index(token_indices: Sequence[float], tokens_per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) slices of `token_indices` per chunk of `tokens_per_chunk` temporal positions.

    Same rule as transformers' `Qwen2_5OmniProcessor.get_chunked_index`: a new chunk opens when a value reaches
    the next boundary, and only one chunk opens per token (a jump over several boundaries opens one chunk).
    """
    spans, start, chunk = [], 0, 1
    for i, value in enumerate(token_indices):
        if value >= chunk * tokens_per_chunk:
            spans.append((start, i))
            start = i
            chunk += 1
    spans.append((start, len(token_indices)))
    return spans


def audio_in_video_ids(
    grid_thw: Sequence[int],
    second_per_grid: float,
    n_audio_tokens: int,
    token_ids: TokenIds,
    merge_size: int = MERGE_SIZE,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    seconds_per_chunk: float = SECONDS_PER_CHUNK,
) -> list[int]:
    """`<|audio_bos|> [V chunk0][A chunk0][V chunk1]... <|audio_eos|>`: what the processor puts in place of <|VIDEO|>.

    Mirrors `Qwen2_5OmniProcessor.replace_video_with_audio_token`: video tokens carry temporal position
    `g * second_per_grid * position_id_per_seconds` (g = temporal grid index, h/merge x w/merge tokens each),
    audio token k carries k; both are cut with `chunked_index` and interleaved chunk by chunk.
    """
    t, h, w = (int(x) for x in grid_thw)
    per_grid = (h // merge_size) * (w // merge_size)
    video_t = [g * second_per_grid * position_id_per_seconds for g in range(t) for _ in range(per_grid)]
    audio_t = list(range(n_audio_tokens))
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video_chunks = chunked_index(video_t, tokens_per_chunk)
    audio_chunks = chunked_index(audio_t, tokens_per_chunk)
    ids = [token_ids.audio_start]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            ids += [token_ids.video] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            ids += [token_ids.audio] * (audio_chunks[j][1] - audio_chunks[j][0])
    ids.append(token_ids.audio_end)
    return ids


# ---------------------------------------------------------------------------------------------------- processor
TextInput = str | Sequence[int]
ImageInput = Any  # PIL image or uint8 [H, W, 3] array


class Qwen25OmniMediaProcessor:
    """RawAV (+ text ids) -> `Qwen2_5OmniProcessor`-shaped inputs, built from transformers' own pieces.

    Output keys and dtypes are the processor's (`return_tensors="pt"`): input_ids / attention_mask int64
    [1, pos]; input_features float32 [1, n_mels, 30000] and feature_attention_mask int32 [1, 30000];
    pixel_values_videos float32 [patches, 1176], video_grid_thw int64 [1, 3], video_second_per_grid float32 [1];
    pixel_values / image_grid_thw for images. One key is added: `use_audio_in_video` (whether the audio was
    interleaved into the video block), which transformers takes as a separate argument and
    `HookedAVModel(**outputs)` reads from the dict.
    """

    def __init__(self, token_ids: TokenIds, tokenizer: Any = None, settings: OmniProcessorSettings | None = None,
                 **overrides: Any):
        from transformers import WhisperFeatureExtractor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        token_ids.require("audio", "video", "image", "audio_start", "audio_end", "vision_start", "vision_end")
        self.token_ids = token_ids
        self.tokenizer = tokenizer
        self.settings = dataclasses.replace(settings or OmniProcessorSettings(), **overrides)
        s = self.settings
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=s.n_mels, sampling_rate=s.sampling_rate, hop_length=s.hop_length, chunk_length=s.chunk_length,
            n_fft=s.n_fft, padding_value=0.0, return_attention_mask=True,
        )
        patching = dict(patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, merge_size=s.merge_size)
        self.video_frame_processor = Qwen2VLImageProcessorPil(min_pixels=s.video_min_pixels,
                                                              max_pixels=s.video_max_pixels, **patching)
        self.image_processor = Qwen2VLImageProcessorPil(min_pixels=s.image_min_pixels,
                                                        max_pixels=s.image_max_pixels, **patching)

    # ------------------------------------------------------------------ construction from a model
    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, **overrides: Any) -> "Qwen25OmniMediaProcessor":
        """A processor for a hooked Qwen2.5-Omni model: token ids from `model.cfg`, mel bins and patching from
        its transformers encoder configs (`model.hf_config`), TMRoPE chunking from `model.cfg`."""
        cfg, hf = model.cfg, model.hf_config
        settings = OmniProcessorSettings(
            n_mels=int(hf.audio_config.num_mel_bins),
            patch_size=int(hf.vision_config.patch_size),
            temporal_patch_size=int(hf.vision_config.temporal_patch_size),
            merge_size=int(hf.vision_config.spatial_merge_size),
            position_id_per_seconds=int(cfg.position_id_per_seconds),
            seconds_per_chunk=int(cfg.seconds_per_chunk),
        )
        return cls(cfg.token_ids, tokenizer=tokenizer, settings=settings, **overrides)

    # ------------------------------------------------------------------ pieces
    def encode_text(self, text: TextInput) -> list[int]:
        """Token ids of a text (needs the tokenizer) or ids given as such; no special tokens are added."""
        if not isinstance(text, str):
            return [int(i) for i in text]
        if self.tokenizer is None:
            raise ValueError("text given as a string but the processor has no tokenizer; pass token ids instead")
        if hasattr(self.tokenizer, "encode"):
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        out = self.tokenizer(text)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        return [int(i) for i in ids]

    def audio_features(self, waveform: Float32[np.ndarray, " samples"]) -> dict[str, torch.Tensor]:
        """input_features [1, n_mels, frames] and feature_attention_mask [1, frames], as `_process_audio` makes them."""
        out = self.feature_extractor(
            [waveform], sampling_rate=self.settings.sampling_rate, return_attention_mask=True,
            padding="max_length", return_tensors="pt",
        )
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def _frame_max_pixels(self, n_frames: int) -> int:
        """Per-frame pixel cap of Qwen2VLVideoProcessor.resize (budgeted over the clip with cap_pixels_per_frame)."""
        s = self.settings
        if not s.cap_pixels_per_frame:
            return s.video_max_pixels
        total = int(s.max_video_tokens * s.resize_factor * s.resize_factor * VIDEO_TOKEN_BUDGET_SHARE)
        return max(min(s.video_max_pixels, total * s.temporal_patch_size // n_frames),
                   int(s.video_min_pixels * MIN_PIXELS_SLACK))

    def normalized_frames(self, frames: UInt8[np.ndarray, "time height width 3"],
                          ) -> Float32[np.ndarray, "time 3 h2 w2"]:
        """Per frame: convert, smart_resize to the video pixel bounds, rescale, CLIP-normalise (channels first).

        Runs `Qwen2VLImageProcessorPil`'s own steps, in the order of its `_preprocess`, up to the patchify
        (`model_zoo.vision_processing.normalized_frames`).
        """
        s = self.settings
        return normalized_frames(self.video_frame_processor, frames, s.video_min_pixels,
                                 self._frame_max_pixels(len(frames)), s.resize_factor)

    def video_pixels(self, frames: UInt8[np.ndarray, "time height width 3"], fps: float,
                     ) -> dict[str, torch.Tensor]:
        """pixel_values_videos, video_grid_thw and video_second_per_grid of one clip."""
        s = self.settings
        rows, grid = patchify_video(self.normalized_frames(frames), s.patch_size, s.merge_size,
                                    s.temporal_patch_size)
        video_fps = s.video_fps if s.video_fps is not None else fps
        return {
            "pixel_values_videos": torch.from_numpy(rows),
            "video_grid_thw": torch.tensor([grid], dtype=torch.long),
            "video_second_per_grid": torch.tensor([s.temporal_patch_size / video_fps], dtype=torch.float32),
        }

    def image_pixels(self, images: Sequence[ImageInput]) -> dict[str, torch.Tensor]:
        """pixel_values and image_grid_thw from `Qwen2VLImageProcessorPil` with the image bounds."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    # ------------------------------------------------------------------ the processor call
    def __call__(
        self,
        raw: RawAV | None,
        text_ids_before: TextInput = (),
        text_ids_after: TextInput = (),
        use_audio_in_video: bool = True,
        images: Sequence[ImageInput] | None = None,
    ) -> dict[str, Any]:
        """Inputs for one sample: `text_ids_before` + media blocks + `text_ids_after`.

        Media blocks, in order: one `<|vision_bos|><|IMAGE|>...<|vision_eos|>` per image; the video (with its
        audio interleaved when `use_audio_in_video` and the clip has a waveform, else a plain video block); a
        separate `<|audio_bos|><|AUDIO|>...<|audio_eos|>` block for audio that is not interleaved. The texts are
        token ids, or strings when the processor has a tokenizer (special tokens delimit the media blocks, so
        encoding the two texts apart gives the ids of the whole prompt).
        """
        tok, s = self.token_ids, self.settings
        data: dict[str, Any] = {}
        media: list[int] = []
        if images:
            data.update(self.image_pixels(images))
            for grid in data["image_grid_thw"].tolist():
                media += [tok.vision_start] + [tok.image] * num_vision_tokens(grid, s.merge_size) + [tok.vision_end]
        n_audio = None
        audio: dict[str, torch.Tensor] = {}
        if raw is not None and raw.waveform is not None:
            if raw.sample_rate != s.sampling_rate:
                raise ValueError(f"the waveform is at {raw.sample_rate} Hz; the processor needs {s.sampling_rate} Hz "
                                 "(load it with hooked_av.media.load_audio)")
            audio = self.audio_features(raw.waveform)
            n_audio = num_audio_tokens(int(audio["feature_attention_mask"].sum()))
        interleaved = bool(use_audio_in_video and n_audio is not None and raw is not None and raw.frames is not None)
        if raw is not None and raw.frames is not None:
            video = self.video_pixels(raw.frames, raw.fps)
            data.update(video)
            grid = video["video_grid_thw"][0].tolist()
            if interleaved:
                inner = audio_in_video_ids(grid, float(video["video_second_per_grid"][0]), n_audio, tok,
                                           s.merge_size, s.position_id_per_seconds, s.seconds_per_chunk)
            else:
                inner = [tok.video] * num_vision_tokens(grid, s.merge_size)
            media += [tok.vision_start] + inner + [tok.vision_end]
        if n_audio is not None and not interleaved:
            media += [tok.audio_start] + [tok.audio] * n_audio + [tok.audio_end]
        data.update(audio)
        ids = self.encode_text(text_ids_before) + media + self.encode_text(text_ids_after)
        input_ids = torch.tensor([ids], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        out.update(data)
        out["use_audio_in_video"] = interleaved
        return out

    def for_prompt(self, text_ids_before: TextInput = (), text_ids_after: TextInput = (),
                   use_audio_in_video: bool = True) -> Callable[[RawAV], dict[str, Any]]:
        """This processor with the prompt fixed: a RawAV -> inputs callable (for `hooked_av.corrupt.corrupted_pair`)."""

        def process(raw: RawAV) -> dict[str, Any]:
            return self(raw, text_ids_before, text_ids_after, use_audio_in_video=use_audio_in_video)

        return process


#: the Qwen chat template around one user turn whose media come first (what `apply_chat_template` renders for
#: [system, user(video, text)] with `add_generation_prompt=True`); the media blocks go between the two parts
QWEN_CHAT_BEFORE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
QWEN_CHAT_AFTER = "{prompt}<|im_end|>\n<|im_start|>assistant\n"
#: the system prompt of the paper's runs (not Qwen's default speech-enabling one)
DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass
class ChatProcessor:
    """(RawAV, prompt) -> processor outputs of a one-turn chat: system message, then the user's clip and prompt.

    Equals rendering the official conversation with the chat template and running the processor on it."""

    media: Qwen25OmniMediaProcessor
    system: str = DEFAULT_SYSTEM
    use_audio_in_video: bool = True

    def __post_init__(self) -> None:
        if self.media.tokenizer is None:
            raise ValueError("ChatProcessor needs a media processor with a tokenizer")

    def __call__(self, raw: RawAV, prompt: str) -> dict[str, Any]:
        return self.media(raw, QWEN_CHAT_BEFORE.format(system=self.system), QWEN_CHAT_AFTER.format(prompt=prompt),
                          use_audio_in_video=self.use_audio_in_video)


def collate(samples: Sequence[Mapping[str, Any]], pad_id: int, padding_side: str = "left") -> dict[str, Any]:
    """Batch single-sample processor outputs the way the processor batches: ids padded with `pad_id` (left by
    default, as for generation), audio features padded to the longest, vision patches concatenated."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n = max(s["input_ids"].shape[1] for s in samples)
    ids, mask = [], []
    for s in samples:
        k = n - s["input_ids"].shape[1]
        pad_ids = torch.full((1, k), pad_id, dtype=torch.long)
        pad_mask = torch.zeros((1, k), dtype=s["attention_mask"].dtype)
        pair = ((pad_ids, s["input_ids"]), (pad_mask, s["attention_mask"]))
        if padding_side == "right":
            pair = tuple((b, a) for a, b in pair)
        ids.append(torch.cat(pair[0], 1))
        mask.append(torch.cat(pair[1], 1))
    out: dict[str, Any] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
    feats = [s for s in samples if s.get("input_features") is not None]
    if feats:
        frames = max(s["input_features"].shape[-1] for s in feats)
        out["input_features"] = torch.cat([torch.nn.functional.pad(s["input_features"],
                                                                   (0, frames - s["input_features"].shape[-1]))
                                           for s in feats])
        out["feature_attention_mask"] = torch.cat([torch.nn.functional.pad(
            s["feature_attention_mask"], (0, frames - s["feature_attention_mask"].shape[-1])) for s in feats])
    for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "video_second_per_grid"):
        parts = [s[key] for s in samples if s.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    if any(bool(s.get("use_audio_in_video")) for s in samples):
        out["use_audio_in_video"] = True
    return out


def trim_audio_padding(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same inputs with the audio features cut to the valid frames (the processor pads them to
    `chunk_length` seconds; the encoder reads only the valid ones, so the model's outputs do not change).
    Saves memory when many samples are kept."""
    mask = inputs.get("feature_attention_mask")
    if mask is None:
        return inputs
    n = int(mask.sum(-1).max())
    return {**inputs, "input_features": inputs["input_features"][..., :n].contiguous(),
            "feature_attention_mask": mask[..., :n].contiguous()}
