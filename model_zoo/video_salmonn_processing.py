"""Raw-media processing of video-SALMONN 2+ and video-SALMONN-o1: RawAV (+ text) -> the models' input tensors.

Neither family has a transformers processor; the rules below are those of the public inference code (MODELS.md
sections 3 and 4), built from transformers' own pieces, constructed from explicit values (nothing is read from the
Hub): `WhisperFeatureExtractor` for the audio of both, `Qwen2VLImageProcessorPil` for the 2+ frames (through
`model_zoo.vision_processing`, shared with the Omni processors), `SiglipImageProcessorPil` for the o1 frames.

A RawAV's frames are taken as the decoded video (`len(frames)` frames at `RawAV.fps`, so its duration is
`len(frames) / fps`) and each family's frame-sampling rule is applied to them. `load_av` of each processor reads a
file with the same rule applied to the file's own frames (`hooked_av.media.load_av(frame_sampler=...)`), which gives
the public code's frames; applying the rule again in the processor then keeps them all (the rules are idempotent on
their own output). A RawAV loaded at another rate (e.g. qwen-omni-utils' 2 fps) is processed by the same rule, with
the frames it has.

video-SALMONN 2+ (`bytedance/video-SALMONN-2`, `video_SALMONN2_plus/`: `inference.py` settings, `qwenvl/data/
dataset.py` rules; the torchcodec path of `video_torchcodec`):

* frames: k = round(duration / 0.1) clamped to [16, 768]; indices `np.unique(np.linspace(0, n - 1, k, dtype=int))`
  (a clip with fewer than k frames keeps all); fps = kept / duration; `second_per_grid_ts` = 2 / fps;
* pixels: per-frame maximum `video_max_frame_pixels` 61250, scaled by 0.95 x 768 / kept when fewer than 768 frames
  are kept, minimum 4 x 28 x 28; smart_resize to multiples of 28, rescale, CLIP normalisation, temporal patchify;
* audio: 16 kHz mono, zero-padded to at least 1 s, cut into 30-s segments, each through the Whisper feature
  extractor (128 mel bins, padded to 30 s): `audio_feature` [segments, 128, 3000]; `audio_lengths` =
  ceil(samples / 480000) x 60 tokens (tiny test models: their own segment length and tokens per segment);
* layout: `<|vision_start|>` [grid 0 video tokens][its audio tokens][grid 1 ...] `<|vision_end|>`, grid g taking
  floor((g+1) spg 2) - floor(g spg 2) audio tokens and the last grid the rest (`video_salmonn2.av_block_ids`);
  without audio (`use_audio=False`) the Qwen2.5-VL video block; audio alone `<|vision_start|><|audio_pad|>*
  <|vision_end|>`. The chat: the public dataset's template (system turn, user turn `<video>\\n{prompt}`, the
  assistant prefix).

video-SALMONN-o1 (`BriansIDP/video-SALMONN-o1`, `videosalmonno1/`: `inference.py` DataArguments,
`llava/dataset/av_test_dataset.py`, `llava/dataset/preprocess_utils.py`):

* frames: every round(max(round(fps / 2), 1))-th frame from 0; if that gives more than round(30 x 2) = 60,
  `np.linspace(0, n - 1, 60, dtype=int)`; real_time = n / fps;
* pixels: LLaVA's `SigLipImageProcessor` (resize to 384 x 384, bicubic, no aspect ratio kept; rescale 1/255;
  normalise with mean = std = 0.5), i.e. transformers' `SiglipImageProcessorPil` with those values;
* audio: padded to at least 1 s, then cut to round(16000 x real_time) samples (audio alone: to 30 s), 30-s
  segments through the Whisper feature extractor: `spectrogram` [segments, 128, 3000], `org_groups` [segments];
  a video without audio gets silence of the video's length (modality "video"), as the public dataset does;
* layout: one `<image>` placeholder (id -200) replaced in the model by the frames' tokens, each frame followed by
  its share of the audio tokens (`VideoSalmonnO1HookedModel.prepare_inputs`); the chat is the public
  `preprocess_qwen` token sequence with the user's text `<image>\\n{prompt}`.

Differences from the public pipelines: frames are resized with PIL (bicubic) where video-SALMONN 2+ uses
torchvision (bicubic, antialiased) -- close, not bit-identical (as for the Omni processors); rescale and normalise
are unfused; a stereo file is averaged to mono by `hooked_av.media` where o1's dataset keeps the first channel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float32, UInt8

from hooked_av import media
from hooked_av.config import TokenIds
from hooked_av.media import RawAV

from .salmonn_audio import HOP_LENGTH, N_FFT, SAMPLING_RATE, whisper_feature_extractor, whisper_segments
from .vision_processing import normalized_frames, patchify_video

TextInput = str | Sequence[int]

#: the system message of both public codes
DEFAULT_SYSTEM = "You are a helpful assistant."
#: Qwen2.5-VL's preprocessor_config.json (the OpenAI CLIP statistics)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------- shared
def encode_text(tokenizer: Any, text: TextInput) -> list[int]:
    """Token ids of a text (needs a tokenizer) or ids given as such; no special tokens are added."""
    if not isinstance(text, str):
        return [int(i) for i in text]
    if tokenizer is None:
        raise ValueError("text given as a string but the processor has no tokenizer; pass token ids instead")
    if hasattr(tokenizer, "encode"):
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    out = tokenizer(text)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(i) for i in ids]


def _check_rate(raw: RawAV, rate: int, family: str) -> None:
    if raw.waveform is not None and raw.sample_rate != rate:
        raise ValueError(f"the waveform is at {raw.sample_rate} Hz; {family} needs {rate} Hz audio (load it with "
                         "hooked_av.media.load_audio / load_av, which resample)")


def _pad_to(waveform: np.ndarray, n_samples: int) -> np.ndarray:
    """Zero-padded at the end to at least `n_samples` (the public `np.pad(..., (0, padding))`)."""
    if len(waveform) >= n_samples:
        return waveform
    return np.concatenate([waveform, np.zeros(n_samples - len(waveform), dtype=waveform.dtype)])


# ---------------------------------------------------------------------------------------------------- 2+ rules
#: `inference.py` of video-SALMONN 2+ (`prepare_dataset`) and the DataArguments defaults it keeps
VS2_BASE_INTERVAL = 0.1
VS2_MIN_FRAMES = 16
VS2_MAX_FRAMES = 768
VS2_MAX_FRAME_PIXELS = 61250
VS2_MIN_FRAME_PIXELS = 4 * 28 * 28
#: `process_video_frames`: fewer frames than the maximum get 0.95 x max_frames / frames times the pixel budget
VS2_PIXEL_SCALE = 0.95
#: audio shorter than this is zero-padded (`process_audio`)
MIN_AUDIO_SECONDS = 1


def vs2_frame_indices(n_frames: int, fps: float, base_interval: float = VS2_BASE_INTERVAL,
                      min_frames: int = VS2_MIN_FRAMES, max_frames: int = VS2_MAX_FRAMES) -> list[int]:
    """Indices of the frames video-SALMONN 2+ keeps of a video of `n_frames` at `fps` (public `video_torchcodec`):
    round(duration / base_interval) clamped to [min_frames, max_frames], at `np.linspace(0, n - 1, k, dtype=int)`,
    duplicates removed."""
    duration = n_frames / fps
    target = min(max(round(duration / base_interval), min_frames), max_frames)
    return np.unique(np.linspace(0, n_frames - 1, target, dtype=int)).tolist()


def vs2_frame_max_pixels(n_frames: int, max_frame_pixels: float = VS2_MAX_FRAME_PIXELS,
                         max_frames: int = VS2_MAX_FRAMES, scale: float = VS2_PIXEL_SCALE) -> float:
    """Per-frame pixel maximum of a clip of `n_frames` kept frames (public `process_video_frames`, same float
    operation order)."""
    if n_frames < max_frames:
        return scale * max_frames / n_frames * max_frame_pixels
    return max_frame_pixels


@dataclass(frozen=True)
class Salmonn2ProcessorSettings:
    """video-SALMONN 2+ processing constants (defaults: the released `inference.py`, Qwen2.5-VL's ViT patching,
    whisper-large-v3's front end with 30-s segments of 60 tokens). `from_model` takes the patching, mel bins,
    segment length and tokens per segment from the model."""

    base_interval: float = VS2_BASE_INTERVAL
    min_frames: int = VS2_MIN_FRAMES
    max_frames: int = VS2_MAX_FRAMES
    max_frame_pixels: float = VS2_MAX_FRAME_PIXELS
    min_frame_pixels: int = VS2_MIN_FRAME_PIXELS
    pixel_scale: float = VS2_PIXEL_SCALE
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    sampling_rate: int = SAMPLING_RATE
    n_mels: int = 128
    hop_length: int = HOP_LENGTH
    n_fft: int = N_FFT
    segment_seconds: float = 30.0
    tokens_per_segment: int = 60
    min_audio_seconds: float = MIN_AUDIO_SECONDS

    @property
    def resize_factor(self) -> int:
        return self.patch_size * self.merge_size


class Salmonn2MediaProcessor:
    """RawAV (+ text) -> video-SALMONN 2+ inputs (`VideoSalmonn2HookedModel.prepare_inputs` keywords):
    input_ids / attention_mask int64 [1, pos]; pixel_values_videos float32 [patches, 3 x 2 x 14 x 14],
    video_grid_thw int64 [1, 3], second_per_grid_ts float32 [1]; audio_feature float32 [segments, mel, frames],
    audio_lengths int64 [1]. See the module docstring for the rules."""

    family = "video_salmonn2"

    def __init__(self, token_ids: TokenIds, tokenizer: Any = None,
                 settings: Salmonn2ProcessorSettings | None = None, **overrides: Any):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        token_ids.require("audio", "video", "vision_start", "vision_end")
        self.token_ids = token_ids
        self.tokenizer = tokenizer
        self.settings = dataclasses.replace(settings or Salmonn2ProcessorSettings(), **overrides)
        s = self.settings
        self.frame_processor = Qwen2VLImageProcessorPil(
            patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, merge_size=s.merge_size,
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
        )
        self.feature_extractor = whisper_feature_extractor(s.n_mels, s.segment_seconds, s.sampling_rate,
                                                           s.hop_length, s.n_fft)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, **overrides: Any) -> "Salmonn2MediaProcessor":
        """A processor for a hooked video-SALMONN 2+: token ids from `model.cfg`, ViT patching from its vision
        config, mel bins from its Whisper config, segment length and tokens per segment from its audio encoder."""
        if model.cfg.model_family != cls.family:
            raise ValueError(f"Salmonn2MediaProcessor needs a video-SALMONN 2+ model, got family "
                             f"{model.cfg.model_family!r}")
        vision, audio = model.hf_config.vision, model.audio_encoder
        settings = Salmonn2ProcessorSettings(
            patch_size=int(vision.patch_size), temporal_patch_size=int(vision.temporal_patch_size),
            merge_size=int(vision.spatial_merge_size), n_mels=int(model.hf_config.whisper.num_mel_bins),
            segment_seconds=float(audio.segment_seconds), tokens_per_segment=int(audio.tokens_per_segment),
        )
        return cls(model.cfg.token_ids, tokenizer=tokenizer, settings=dataclasses.replace(settings, **overrides))

    # ------------------------------------------------------------------ rules
    def frame_sampler(self, n_frames: int, fps: float) -> list[int]:
        s = self.settings
        return vs2_frame_indices(n_frames, fps, s.base_interval, s.min_frames, s.max_frames)

    def load_av(self, video: Any, audio: Any = None, **kwargs: Any) -> RawAV:
        """A clip read with this family's frame sampling (`hooked_av.media.load_av`, 16 kHz mono audio)."""
        return media.load_av(video, audio=audio, sample_rate=self.settings.sampling_rate,
                             frame_sampler=self.frame_sampler, **kwargs)

    def frame_max_pixels(self, n_frames: int) -> float:
        s = self.settings
        return vs2_frame_max_pixels(n_frames, s.max_frame_pixels, s.max_frames, s.pixel_scale)

    # ------------------------------------------------------------------ pieces
    def video_pixels(self, frames: UInt8[np.ndarray, "time height width 3"], fps: float) -> dict[str, torch.Tensor]:
        """pixel_values_videos, video_grid_thw and second_per_grid_ts of frames kept at `fps`."""
        s = self.settings
        pixels = normalized_frames(self.frame_processor, frames, s.min_frame_pixels,
                                   self.frame_max_pixels(len(frames)), s.resize_factor)
        rows, grid = patchify_video(pixels, s.patch_size, s.merge_size, s.temporal_patch_size)
        return {
            "pixel_values_videos": torch.from_numpy(rows),
            "video_grid_thw": torch.tensor([grid], dtype=torch.long),
            "second_per_grid_ts": torch.tensor([s.temporal_patch_size / fps], dtype=torch.float32),
        }

    def audio_features(self, waveform: Float32[np.ndarray, " samples"]) -> tuple[torch.Tensor, int]:
        """(audio_feature [segments, mel, frames], LLM audio tokens) of a 16 kHz mono waveform."""
        s = self.settings
        wav = _pad_to(np.asarray(waveform, dtype=np.float32), round(s.min_audio_seconds * s.sampling_rate))
        features = whisper_segments(self.feature_extractor, wav, s.sampling_rate)
        n_tokens = math.ceil(len(wav) / self.feature_extractor.n_samples) * s.tokens_per_segment
        return features, n_tokens

    # ------------------------------------------------------------------ the processor call
    def __call__(self, raw: RawAV, text_ids_before: TextInput = (), text_ids_after: TextInput = (),
                 use_audio: bool = True) -> dict[str, Any]:
        """Inputs for one sample: `text_ids_before` + the media block + `text_ids_after`.

        A clip with frames gives a video block, its audio interleaved per temporal grid when `use_audio` (the
        public `use_audio` flag; such a clip must have a waveform) or the plain Qwen2.5-VL video block when not; a
        clip without frames gives the audio block."""
        from .video_salmonn2 import audio_block_ids, av_block_ids, video_block_ids

        tok, s = self.token_ids, self.settings
        _check_rate(raw, s.sampling_rate, "video-SALMONN 2+")
        if raw.frames is not None and use_audio and raw.waveform is None:
            raise ValueError("the clip has no audio track; video-SALMONN 2+ with use_audio=True interleaves the "
                             "video's audio (pass use_audio=False for the visual-only layout)")
        data: dict[str, Any] = {}
        if raw.frames is not None:
            n = len(raw.frames)
            keep = self.frame_sampler(n, raw.fps)
            data.update(self.video_pixels(raw.frames[keep], len(keep) / (n / raw.fps)))
        n_audio = None
        if raw.waveform is not None and (use_audio or raw.frames is None):
            data["audio_feature"], n_audio = self.audio_features(raw.waveform)
            data["audio_lengths"] = torch.tensor([n_audio], dtype=torch.long)
        if raw.frames is not None:
            grid = tuple(int(x) for x in data["video_grid_thw"][0])
            if n_audio is not None:
                block = av_block_ids(tok, grid, float(data["second_per_grid_ts"][0]), n_audio, s.merge_size)
            else:
                block = video_block_ids(tok, grid, s.merge_size)
        else:
            block = audio_block_ids(tok, n_audio)
        ids = encode_text(self.tokenizer, text_ids_before) + block + encode_text(self.tokenizer, text_ids_after)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **data}


@dataclass
class Salmonn2ChatProcessor:
    """(RawAV, prompt) -> video-SALMONN 2+ inputs of a one-turn chat, as the public dataset builds them for
    inference: the system turn, the user turn `<video>\\n{prompt}` (each turn tokenized on its own by the chat
    template `<|im_start|>{role}\\n{content}<|im_end|>\\n`), then the assistant prefix `<|im_start|>assistant\\n`."""

    media: Salmonn2MediaProcessor
    system: str = DEFAULT_SYSTEM
    use_audio: bool = True

    def __post_init__(self) -> None:
        if self.media.tokenizer is None:
            raise ValueError("Salmonn2ChatProcessor needs a media processor with a tokenizer")

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the media block."""
        tok = self.media.tokenizer
        before = (encode_text(tok, f"<|im_start|>system\n{self.system}<|im_end|>\n")
                  + encode_text(tok, "<|im_start|>user\n"))
        after = encode_text(tok, f"\n{prompt}<|im_end|>\n") + encode_text(tok, "<|im_start|>assistant\n")
        return before, after

    def __call__(self, raw: RawAV, prompt: str) -> dict[str, Any]:
        before, after = self.prompt_ids(prompt)
        return self.media(raw, before, after, use_audio=self.use_audio)

    def load_av(self, video: Any, audio: Any = None, **kwargs: Any) -> RawAV:
        return self.media.load_av(video, audio, **kwargs)


# ---------------------------------------------------------------------------------------------------- o1 rules
#: o1 `inference.py` DataArguments: frames per second sampled, and the longest video / audio kept (s)
O1_VIDEO_FPS = 2
O1_MAX_TIME = 30
#: google/siglip-so400m-patch14-384 input side and LLaVA's SigLipImageProcessor statistics
O1_IMAGE_SIZE = 384
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def o1_frame_indices(n_frames: int, fps: float, video_fps: float = O1_VIDEO_FPS,
                     max_time: float = O1_MAX_TIME) -> list[int]:
    """Indices of the frames video-SALMONN-o1 keeps of a video of `n_frames` at `fps` (public
    `av_test_dataset.py`): every round(max(round(fps / video_fps), 1))-th frame from 0, or
    `np.linspace(0, n - 1, round(max_time * video_fps), dtype=int)` when that gives more frames."""
    step = max(round(fps / video_fps), 1)
    idx = list(range(0, n_frames, round(step)))
    max_frames = round(max_time * video_fps)
    if len(idx) > max_frames:
        idx = np.linspace(0, n_frames - 1, max_frames, dtype=int).tolist()
    return idx


@dataclass(frozen=True)
class O1ProcessorSettings:
    """video-SALMONN-o1 processing constants (defaults: the public `inference.py` and its SigLIP / Whisper
    releases). `from_model` takes the image side, mel bins and segment length from the model."""

    video_fps: float = O1_VIDEO_FPS
    max_time: float = O1_MAX_TIME
    image_size: int = O1_IMAGE_SIZE
    sampling_rate: int = SAMPLING_RATE
    n_mels: int = 128
    hop_length: int = HOP_LENGTH
    n_fft: int = N_FFT
    segment_seconds: float = 30.0
    min_audio_seconds: float = MIN_AUDIO_SECONDS


class O1MediaProcessor:
    """RawAV (+ text) -> video-SALMONN-o1 inputs (`VideoSalmonnO1HookedModel.prepare_inputs` keywords):
    input_ids / attention_mask int64 [1, pos] with one `<image>` placeholder (-200); images [frames float32
    [F, 3, S, S]] (None for audio alone); spectrogram float32 [segments, mel, frames]; org_groups [segments];
    real_time [seconds]; modalities ["audio-video" | "video" | "audio"]; frame_times [[seconds of each kept
    frame]] (for the ModalityMap). See the module docstring for the rules."""

    family = "video_salmonn_o1"

    def __init__(self, tokenizer: Any = None, settings: O1ProcessorSettings | None = None, **overrides: Any):
        from transformers.image_utils import PILImageResampling
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        self.tokenizer = tokenizer
        self.settings = dataclasses.replace(settings or O1ProcessorSettings(), **overrides)
        s = self.settings
        self.image_processor = SiglipImageProcessorPil(
            size={"height": s.image_size, "width": s.image_size}, resample=PILImageResampling.BICUBIC,
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(SIGLIP_MEAN),
            image_std=list(SIGLIP_STD), do_convert_rgb=True,
        )
        self.feature_extractor = whisper_feature_extractor(s.n_mels, s.segment_seconds, s.sampling_rate,
                                                           s.hop_length, s.n_fft)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, **overrides: Any) -> "O1MediaProcessor":
        """A processor for a hooked video-SALMONN-o1: SigLIP input side, Whisper mel bins and segment length from
        the model."""
        if model.cfg.model_family != cls.family:
            raise ValueError(f"O1MediaProcessor needs a video-SALMONN-o1 model, got family {model.cfg.model_family!r}")
        settings = O1ProcessorSettings(image_size=int(model.hf_config.vision.image_size),
                                       n_mels=int(model.hf_config.whisper.num_mel_bins),
                                       segment_seconds=float(model.audio_encoder.segment_seconds))
        return cls(tokenizer=tokenizer, settings=dataclasses.replace(settings, **overrides))

    # ------------------------------------------------------------------ rules
    def frame_sampler(self, n_frames: int, fps: float) -> list[int]:
        s = self.settings
        return o1_frame_indices(n_frames, fps, s.video_fps, s.max_time)

    def load_av(self, video: Any, audio: Any = None, **kwargs: Any) -> RawAV:
        """A clip read with this family's frame sampling (`hooked_av.media.load_av`, 16 kHz mono audio)."""
        return media.load_av(video, audio=audio, sample_rate=self.settings.sampling_rate,
                             frame_sampler=self.frame_sampler, **kwargs)

    # ------------------------------------------------------------------ pieces
    def frame_pixels(self, frames: UInt8[np.ndarray, "time height width 3"]) -> torch.Tensor:
        """[F, 3, S, S] SigLIP pixels (resize to S x S, rescale, normalise)."""
        from transformers.image_utils import ChannelDimension

        out = self.image_processor(images=list(frames), input_data_format=ChannelDimension.LAST,
                                   return_tensors="pt")
        return out["pixel_values"]

    def audio_waveform(self, waveform: np.ndarray | None, real_time: float | None) -> np.ndarray:
        """The samples o1 encodes: padded to >= 1 s, then cut to the video's length (round(sr x real_time)) or,
        for audio alone, to `max_time`; silence of the video's length when there is no waveform."""
        s = self.settings
        sr = s.sampling_rate
        if waveform is None:
            return np.zeros(round(sr * real_time), dtype=np.float32)
        wav = _pad_to(np.asarray(waveform, dtype=np.float32), round(s.min_audio_seconds * sr))
        return wav[: round(sr * (real_time if real_time is not None else s.max_time))]

    # ------------------------------------------------------------------ the processor call
    def __call__(self, raw: RawAV, text_ids_before: TextInput = (), text_ids_after: TextInput = (),
                 ) -> dict[str, Any]:
        """Inputs for one sample: `text_ids_before` + the `<image>` placeholder + `text_ids_after`."""
        from .video_salmonn_o1 import IMAGE_TOKEN_INDEX

        s = self.settings
        _check_rate(raw, s.sampling_rate, "video-SALMONN-o1")
        out: dict[str, Any] = {}
        real_time = None
        if raw.frames is not None:
            n = len(raw.frames)
            keep = self.frame_sampler(n, raw.fps)
            if len(keep) < 2:
                raise ValueError(f"video-SALMONN-o1 keeps {len(keep)} frame(s) of this {n}-frame clip; a video "
                                 "needs at least 2 (the public code takes one frame as an image)")
            real_time = n / raw.fps
            out["images"] = [self.frame_pixels(raw.frames[keep])]
            out["frame_times"] = [[i / raw.fps for i in keep]]
            modality = "audio-video" if raw.waveform is not None else "video"
        else:
            out["images"] = None
            modality = "audio"
        wav = self.audio_waveform(raw.waveform, real_time)
        if len(wav) == 0:
            raise ValueError("no audio samples to encode (a video shorter than one audio sample)")
        spectrogram = whisper_segments(self.feature_extractor, wav, s.sampling_rate)
        ids = (encode_text(self.tokenizer, text_ids_before) + [IMAGE_TOKEN_INDEX]
               + encode_text(self.tokenizer, text_ids_after))
        input_ids = torch.tensor([ids], dtype=torch.long)
        out.update(spectrogram=spectrogram, org_groups=[int(spectrogram.shape[0])],
                   real_time=[float(real_time) if real_time is not None else 0.0], modalities=[modality])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **out}


@dataclass
class O1ChatProcessor:
    """(RawAV, prompt) -> video-SALMONN-o1 inputs of a one-turn chat, the token sequence of the public
    `preprocess_qwen` for a user turn `<image>\\n{prompt}`:
    `<|im_start|>` system `\\n` {system} `<|im_end|>` `\\n`, `<|im_start|>user` `\\n` <image> `\\n` `\\n{prompt}`
    `<|im_end|>` `\\n`, `<|im_start|>assistant` `\\n` (each piece tokenized on its own, as there)."""

    media: O1MediaProcessor
    system: str = DEFAULT_SYSTEM

    def __post_init__(self) -> None:
        if self.media.tokenizer is None:
            raise ValueError("O1ChatProcessor needs a media processor with a tokenizer")

    def _special(self, token: str) -> int:
        ids = encode_text(self.media.tokenizer, token)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer encodes {token!r} to {ids}, not one special token")
        return ids[0]

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the `<image>` placeholder."""
        tok = self.media.tokenizer
        nl = encode_text(tok, "\n")
        im_start, im_end = self._special("<|im_start|>"), self._special("<|im_end|>")
        before = ([im_start] + encode_text(tok, "system") + nl + encode_text(tok, self.system) + [im_end] + nl
                  + encode_text(tok, "<|im_start|>user") + nl)
        after = (nl + encode_text(tok, "\n" + prompt) + [im_end] + nl
                 + encode_text(tok, "<|im_start|>assistant") + nl)
        return before, after

    def __call__(self, raw: RawAV, prompt: str) -> dict[str, Any]:
        before, after = self.prompt_ids(prompt)
        return self.media(raw, before, after)

    def load_av(self, video: Any, audio: Any = None, **kwargs: Any) -> RawAV:
        return self.media.load_av(video, audio, **kwargs)
