"""Qwen3-Omni processor path that runs without torchvision: RawAV -> the keyword tensors of the HF processor.

transformers' `Qwen3OmniMoeProcessor` cannot be built without torchvision (its video processor,
`Qwen2VLVideoProcessor`, is a torchvision backend). This module produces its outputs from transformers' own
pieces, as `qwen2_5_omni_processing` does for Qwen2.5-Omni (whose frame resizing and patchify it reuses), with
Qwen3-Omni's settings and layout:

* audio: `WhisperFeatureExtractor` called as `Qwen3OmniMoeProcessor.audio_kwargs` say (`padding=True`, i.e. to
  the longest audio of the call, `truncation=False`, attention mask returned and renamed
  `feature_attention_mask`); audio tokens from transformers' `_get_feat_extract_output_lengths` (13 per second of
  mel frames plus the tail of the last 1-s chunk);
* video: 16-pixel patches, merge 2 (frame sides multiples of 32), video pixel bounds 128·32² .. 768·32²
  (`Qwen3OmniMoeProcessor.videos_kwargs`), `video_second_per_grid = temporal_patch_size / fps`. transformers'
  processor assumes fps = 1.0 when the call does not pass one; here fps defaults to the clip's own sampling rate
  (`RawAV.fps`), which is what the frames are (set `video_fps` to force a value);
* audio in video: `<|vision_start|><|audio_start|> ... <|audio_end|><|vision_end|>` with video and audio tokens
  merged one by one by temporal position (video grid g at g · spg · 13, audio token k at k; video first on ties),
  as `Qwen3OmniMoeProcessor.replace_video_with_audio_token` does;
* images: `Qwen2VLImageProcessorPil` with patch 16 and the image bounds of the released preprocessor config.

The same caveats as for Qwen2.5-Omni apply to the video resize (PIL bicubic instead of torchvision).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float32

from hooked_av.config import TokenIds
from hooked_av.media import RawAV

from .qwen2_5_omni_processing import ImageInput, OmniProcessorSettings, Qwen25OmniMediaProcessor, TextInput
from .qwen3_omni import audio_token_count

#: Vision patching of Qwen3-Omni's ViT.
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: Video pixel bounds of `Qwen3OmniMoeProcessor.videos_kwargs` ("shortest_edge" / "longest_edge").
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
#: Image pixel bounds of the Qwen3-Omni preprocessor_config.json (MODELS.md 2.2).
IMAGE_MIN_PIXELS = 3136
IMAGE_MAX_PIXELS = 12845056
#: Temporal positions per second and the audio encoder's half window (Qwen3OmniMoeProcessor class constants).
POSITION_ID_PER_SECONDS = 13
N_WINDOW = 50


def qwen3_settings(**overrides: Any) -> OmniProcessorSettings:
    """Processor constants of the released Qwen3-Omni checkpoints (fields as for Qwen2.5-Omni)."""
    base = OmniProcessorSettings(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        video_min_pixels=VIDEO_MIN_PIXELS, video_max_pixels=VIDEO_MAX_PIXELS,
        image_min_pixels=IMAGE_MIN_PIXELS, image_max_pixels=IMAGE_MAX_PIXELS,
        video_fps=None, position_id_per_seconds=POSITION_ID_PER_SECONDS, seconds_per_chunk=2,
    )
    return dataclasses.replace(base, **overrides)


def audio_in_video_ids(
    grid_thw: Sequence[int],
    second_per_grid: float,
    n_audio_tokens: int,
    token_ids: TokenIds,
    merge_size: int = MERGE_SIZE,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
) -> list[int]:
    """`<|audio_start|> [video and audio tokens merged by time] <|audio_end|>`: what the processor puts in place
    of the video placeholder when the video's audio is used.

    Video tokens of temporal grid g carry `g * second_per_grid * position_id_per_seconds` (h/merge x w/merge tokens
    each), audio token k carries k; a video token goes first when its value is <= the next audio token's, and the
    leftovers of either follow (float64 arithmetic, as the processor's numpy code).
    """
    t, h, w = (int(x) for x in grid_thw)
    per_grid = (h // merge_size) * (w // merge_size)
    video_t = [g * second_per_grid * position_id_per_seconds for g in range(t) for _ in range(per_grid)]
    ids, v, a = [token_ids.audio_start], 0, 0
    while v < len(video_t) and a < n_audio_tokens:
        if video_t[v] <= a:
            ids.append(token_ids.video)
            v += 1
        else:
            ids.append(token_ids.audio)
            a += 1
    ids += [token_ids.video] * (len(video_t) - v) + [token_ids.audio] * (n_audio_tokens - a)
    ids.append(token_ids.audio_end)
    return ids


class Qwen3OmniMediaProcessor(Qwen25OmniMediaProcessor):
    """RawAV (+ text ids) -> `Qwen3OmniMoeProcessor`-shaped inputs, built from transformers' own pieces.

    Output keys and dtypes are the processor's (`return_tensors="pt"`): input_ids / attention_mask int64 [1, pos];
    input_features float32 [1, n_mels, frames] (frames of this audio, no 300-s padding) and
    feature_attention_mask int32 [1, frames]; pixel_values_videos float32 [patches, 1536], video_grid_thw int64
    [1, 3], video_second_per_grid float32 [1]; pixel_values / image_grid_thw for images. Added: `use_audio_in_video`
    (whether the audio was interleaved into the video block), which `HookedAVModel(**outputs)` reads.
    """

    def __init__(self, token_ids: TokenIds, tokenizer: Any = None, settings: OmniProcessorSettings | None = None,
                 n_window: int = N_WINDOW, **overrides: Any):
        super().__init__(token_ids, tokenizer=tokenizer, settings=settings or qwen3_settings(), **overrides)
        self.n_window = n_window

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, **overrides: Any) -> "Qwen3OmniMediaProcessor":
        """A processor for a hooked Qwen3-Omni model: token ids and temporal rate from `model.cfg`, mel bins,
        patching and the audio window from its transformers encoder configs (`model.hf_config`)."""
        cfg, hf = model.cfg, model.hf_config
        if cfg.model_family != "qwen3_omni":
            raise ValueError(f"Qwen3OmniMediaProcessor needs a Qwen3-Omni model, got family {cfg.model_family!r} "
                             "(use model_zoo.qwen2_5_omni_processing for Qwen2.5-Omni)")
        settings = qwen3_settings(
            n_mels=int(hf.audio_config.num_mel_bins),
            patch_size=int(hf.vision_config.patch_size),
            temporal_patch_size=int(hf.vision_config.temporal_patch_size),
            merge_size=int(hf.vision_config.spatial_merge_size),
            position_id_per_seconds=int(cfg.position_id_per_seconds),
            seconds_per_chunk=int(cfg.seconds_per_chunk),
        )
        return cls(cfg.token_ids, tokenizer=tokenizer, settings=settings, n_window=int(hf.audio_config.n_window),
                   **overrides)

    def audio_features(self, waveform: Float32[np.ndarray, " samples"]) -> dict[str, torch.Tensor]:
        """input_features [1, n_mels, frames] and feature_attention_mask [1, frames], with
        `Qwen3OmniMoeProcessor.audio_kwargs` (padded to the longest audio of the call, not to 300 s)."""
        out = self.feature_extractor(
            [waveform], sampling_rate=self.settings.sampling_rate, return_attention_mask=True, padding=True,
            truncation=False, return_tensors="pt",
        )
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def num_audio_tokens(self, mel_frames: int) -> int:
        return audio_token_count(mel_frames, self.n_window)

    def __call__(
        self,
        raw: RawAV | None,
        text_ids_before: TextInput = (),
        text_ids_after: TextInput = (),
        use_audio_in_video: bool = True,
        images: Sequence[ImageInput] | None = None,
    ) -> dict[str, Any]:
        """Inputs for one sample: `text_ids_before` + media blocks + `text_ids_after`.

        Media blocks, in order: one `<|vision_start|><|image_pad|>...<|vision_end|>` per image; the video (with its
        audio merged in by time when `use_audio_in_video` and the clip has a waveform, else a plain video block);
        a separate `<|audio_start|><|audio_pad|>...<|audio_end|>` block for audio that is not interleaved.
        """
        tok, s = self.token_ids, self.settings
        data: dict[str, Any] = {}
        media: list[int] = []
        if images:
            data.update(self.image_pixels(images))
            for grid in data["image_grid_thw"].tolist():
                n = int(np.prod(grid)) // s.merge_size**2
                media += [tok.vision_start] + [tok.image] * n + [tok.vision_end]
        n_audio = None
        audio: dict[str, torch.Tensor] = {}
        if raw is not None and raw.waveform is not None:
            if raw.sample_rate != s.sampling_rate:
                raise ValueError(f"the waveform is at {raw.sample_rate} Hz; the processor needs {s.sampling_rate} Hz "
                                 "(load it with hooked_av.media.load_audio)")
            audio = self.audio_features(raw.waveform)
            n_audio = self.num_audio_tokens(int(audio["feature_attention_mask"].sum()))
        interleaved = bool(use_audio_in_video and n_audio is not None and raw is not None and raw.frames is not None)
        if raw is not None and raw.frames is not None:
            video = self.video_pixels(raw.frames, raw.fps)
            data.update(video)
            grid = video["video_grid_thw"][0].tolist()
            if interleaved:
                inner = audio_in_video_ids(grid, float(video["video_second_per_grid"][0]), n_audio, tok,
                                           s.merge_size, s.position_id_per_seconds)
            else:
                inner = [tok.video] * (int(np.prod(grid)) // s.merge_size**2)
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
