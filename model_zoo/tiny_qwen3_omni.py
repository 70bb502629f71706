"""Tiny random Qwen3-Omni thinkers and processor-shaped inputs, for tests and benchmarks.

The config (`model_zoo.qwen3_omni.tiny_hf_config`) exercises every path of the Qwen3-Omni thinker at sizes that
run in milliseconds on a CPU. Inputs are built by hand in the layout and shapes transformers' Qwen3-Omni
processor emits: 13 audio tokens per second of mel frames, 16-pixel patches, audio in video merged token by token
by timestamp.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 512
TOK = dict(audio=500, image=501, video=502, audio_start=503, audio_end=504, vision_start=505, vision_end=506,
           bos=507, eos=508, pad=509)
MEL = 16
PATCH = 16
PATCH_DIM = 3 * 2 * PATCH * PATCH  # channels x temporal patch x patch x patch
POSITION_ID_PER_SECONDS = 13


def tiny_hf_thinker(seed: int = 0, attn: str = "eager", **text_overrides: Any):
    """A random `Qwen3OmniMoeThinkerForConditionalGeneration` of the tiny config, with perturbed norms and biases
    (random init leaves them at 1 and 0, which would hide a missing gain or bias)."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from .qwen3_omni import tiny_hf_config

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**text_overrides)
    cfg._attn_implementation = attn
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def n_audio_tokens(frames: int) -> int:
    from .qwen3_omni import audio_token_count

    return audio_token_count(frames, n_window=50)


def av_interleave(grid: tuple[int, int, int], spg: float, n_audio: int,
                  per_second: float = POSITION_ID_PER_SECONDS) -> list[int]:
    """Placeholder ids of an audio-in-video block (without delimiters): a video token comes first when its
    temporal position (grid index x spg x 13) is <= the audio token's (its index); leftovers at the end."""
    t, h, w = grid
    per_grid = h * w // 4
    video_t = [g * spg * per_second for g in range(t) for _ in range(per_grid)]
    ids, v, a = [], 0, 0
    while v < len(video_t) and a < n_audio:
        if video_t[v] <= a:
            ids.append(TOK["video"])
            v += 1
        else:
            ids.append(TOK["audio"])
            a += 1
    return ids + [TOK["video"]] * (len(video_t) - v) + [TOK["audio"]] * (n_audio - a)


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 400, (n,), generator=gen).tolist()


def _audio(gen: torch.Generator, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, MEL, frames, generator=gen), torch.ones(1, frames, dtype=torch.long)


def _patches(gen: torch.Generator, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    t, h, w = grid
    return torch.randn(t * h * w, PATCH_DIM, generator=gen), torch.tensor([grid], dtype=torch.long)


def build_inputs(kind: str, seed: int = 0, **kw: Any) -> dict[str, Any]:
    """Processor-shaped inputs for one sample: kind in text, audio, image, video, av (audio in video),
    image_video (an image block and a video block: DeepStack's joint image/video path)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [TOK["bos"]] + _text(gen, 5)
    out: dict[str, Any] = {}
    if kind == "audio":
        frames = kw.get("frames", 230)
        out["input_features"], out["feature_attention_mask"] = _audio(gen, frames)
        ids += [TOK["audio_start"]] + [TOK["audio"]] * n_audio_tokens(frames) + [TOK["audio_end"]]
    elif kind in ("image", "image_video"):
        grid = kw.get("grid", (1, 6, 8))
        out["pixel_values"], out["image_grid_thw"] = _patches(gen, grid)
        ids += [TOK["vision_start"]] + [TOK["image"]] * (grid[0] * grid[1] * grid[2] // 4) + [TOK["vision_end"]]
        if kind == "image_video":
            vgrid, spg = kw.get("video_grid", (2, 4, 4)), kw.get("spg", 1.0)
            out["pixel_values_videos"], out["video_grid_thw"] = _patches(gen, vgrid)
            out["video_second_per_grid"] = torch.tensor([spg])
            ids += _text(gen, 3) + [TOK["vision_start"]] + [TOK["video"]] * (vgrid[0] * vgrid[1] * vgrid[2] // 4)
            ids += [TOK["vision_end"]]
    elif kind == "video":
        grid, spg = kw.get("grid", (3, 4, 6)), kw.get("spg", 1.0)
        out["pixel_values_videos"], out["video_grid_thw"] = _patches(gen, grid)
        out["video_second_per_grid"] = torch.tensor([spg])
        ids += [TOK["vision_start"]] + [TOK["video"]] * (grid[0] * grid[1] * grid[2] // 4) + [TOK["vision_end"]]
    elif kind == "av":
        grid, spg, frames = kw.get("grid", (5, 4, 4)), kw.get("spg", 1.0), kw.get("frames", 730)
        out["pixel_values_videos"], out["video_grid_thw"] = _patches(gen, grid)
        out["video_second_per_grid"] = torch.tensor([spg])
        out["input_features"], out["feature_attention_mask"] = _audio(gen, frames)
        out["use_audio_in_video"] = True
        ids += [TOK["vision_start"], TOK["audio_start"]] + av_interleave(grid, spg, n_audio_tokens(frames))
        ids += [TOK["audio_end"], TOK["vision_end"]]
    elif kind != "text":
        raise ValueError(f"unknown input kind {kind!r}")
    ids += _text(gen, 7)
    out["input_ids"] = torch.tensor([ids])
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def collate(samples: list[dict], padding_side: str = "left") -> dict:
    """Batch single-sample inputs as the processor does (ids padded with the pad token, media stacked)."""
    from .qwen2_5_omni_processing import collate as omni_collate

    return omni_collate(samples, TOK["pad"], padding_side)
