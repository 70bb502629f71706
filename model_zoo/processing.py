"""Each model family's raw-media processing: how its clips are read, and RawAV (+ prompt) -> its model inputs.

`processing_for(model, tokenizer)` picks the family's processor from `model.cfg.model_family`:

| family | media processor | chat (RawAV, prompt) | frames read by `load_av` |
|---|---|---|---|
| qwen2_5_omni | `Qwen25OmniMediaProcessor` | `ChatProcessor` | qwen-omni-utils, 2 fps |
| qwen3_omni | `Qwen3OmniMediaProcessor` | `ChatProcessor` | qwen-omni-utils, 2 fps |
| video_salmonn2 | `Salmonn2MediaProcessor` | `Salmonn2ChatProcessor` | every 0.1 s, 16-768 frames |
| video_salmonn_o1 | `O1MediaProcessor` | `O1ChatProcessor` | 2 fps, at most 60 frames |
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hooked_av import media
from hooked_av.media import RawAV


@dataclass
class FamilyProcessing:
    """A family's processing. media: the media processor (RawAV, text before, text after -> inputs); chat:
    (RawAV, prompt) -> inputs of a one-turn chat; load_av: (video, audio=None) -> RawAV with the family's frame
    sampling."""

    family: str
    media: Any
    chat: Callable[[RawAV, str], dict[str, Any]]
    load_av: Callable[..., RawAV]


def processing_for(model: Any, tokenizer: Any, **overrides: Any) -> FamilyProcessing:
    """The processing of `model`'s family; `overrides` are settings of its media processor (e.g. the organism's
    small frame bounds, `video_max_pixels=...`). Raises ValueError for a family without a processor."""
    family = model.cfg.model_family
    if family == "qwen2_5_omni":
        from .qwen2_5_omni_processing import ChatProcessor, Qwen25OmniMediaProcessor

        proc = Qwen25OmniMediaProcessor.from_model(model, tokenizer, **overrides)
        return FamilyProcessing(family, proc, ChatProcessor(proc), functools.partial(media.load_av,
                                                                                     fps=media.DEFAULT_FPS))
    if family == "qwen3_omni":
        from .qwen2_5_omni_processing import ChatProcessor
        from .qwen3_omni_processing import Qwen3OmniMediaProcessor

        proc = Qwen3OmniMediaProcessor.from_model(model, tokenizer, **overrides)
        return FamilyProcessing(family, proc, ChatProcessor(proc), functools.partial(media.load_av,
                                                                                     fps=media.DEFAULT_FPS))
    if family == "video_salmonn2":
        from .video_salmonn_processing import Salmonn2ChatProcessor, Salmonn2MediaProcessor

        proc = Salmonn2MediaProcessor.from_model(model, tokenizer, **overrides)
        return FamilyProcessing(family, proc, Salmonn2ChatProcessor(proc), proc.load_av)
    if family == "video_salmonn_o1":
        from .video_salmonn_processing import O1ChatProcessor, O1MediaProcessor

        proc = O1MediaProcessor.from_model(model, tokenizer, **overrides)
        return FamilyProcessing(family, proc, O1ChatProcessor(proc), proc.load_av)
    raise ValueError(f"no raw-media processor for model family {family!r}")
