"""Sample sources for the studies: the official VGGSound multiple-choice lists with their media.

For each sample: load the clip (frames at 2 fps and the 16 kHz audio), make the two corrupted versions at the raw
input (black frames, zeroed waveform), run all three through the model family's processor with the same prompt,
and check that the token layouts agree. Object tokens come from the official SAM2 masks (frame lists: the mask of
`NNN_raw.jpg` is `NNN.jpg`) and from the per-clip sounding 2-second blocks file, when given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hooked_av import corrupt, media
from hooked_av.recipes.scoring import AnswerCandidates

from . import objects
from .datasets import MCSample, official_prompt
from .study import PreparedSample, SampleSource

#: condition -> corruption of the raw input
CONDITION_CORRUPTION = {"av": None, "a": "black_frames", "v": "zero_audio"}


def load_object_blocks(path: str | Path) -> dict[str, list[int]]:
    """The official `important_seconds_flam_qwen.json`: {sample id: sounding 2-s block indices}."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the object-block list ({e})") from None
    out = {}
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or "audio" not in e or "important_blocks" not in e:
            raise ValueError(f"{path} entry {i}: expected {{'audio': ..., 'important_blocks': [...]}}")
        out[Path(e["audio"]).stem] = [int(b) for b in e["important_blocks"]]
    return out


class VGGSoundSource(SampleSource):
    """Official MC samples -> PreparedSample, prepared on demand.

    process: (RawAV, prompt text) -> processor outputs (e.g. `ChatProcessor`).
    tokenizer: for the answer letters' candidate ids.
    prompt_step: 1 or 2, which official prompt to use for every condition (one prompt for all runs).
    load: (video, audio) -> RawAV, the model family's clip reader (`Runtime.load`); default
        `hooked_av.media.load_av` at `fps` (qwen-omni-utils' frame sampling).
    """

    def __init__(
        self,
        samples: Sequence[MCSample],
        process: Callable[[media.RawAV, str], dict[str, Any]],
        tokenizer: Any,
        prompt_step: int = 1,
        object_blocks: Mapping[str, list[int]] | None = None,
        use_masks: bool = True,
        strict_level: str = "high",
        model: Any = None,
        fps: float = media.DEFAULT_FPS,
        load: Callable[..., media.RawAV] | None = None,
    ):
        self.samples = {s.sample_id: s for s in samples}
        self.process = process
        self.tokenizer = tokenizer
        self.prompt_step = prompt_step
        self.object_blocks = dict(object_blocks or {})
        self.use_masks = use_masks
        self.strict_level = strict_level
        self.model = model
        self.fps = fps
        self.load = load

    def ids(self) -> list[str]:
        return list(self.samples)

    def sample(self, sample_id: str) -> MCSample:
        return self.samples[sample_id]

    def prepare(self, sample_id: str) -> PreparedSample:
        s = self.samples[sample_id]
        video = list(map(str, s.video)) if isinstance(s.video, tuple) else str(s.video)
        if self.load is not None:
            raw = self.load(video, audio=str(s.audio))
        else:
            raw = media.load_av(video, audio=str(s.audio), fps=self.fps)
        prompt = official_prompt(s.choices, self.prompt_step)
        inputs = {}
        for cond, corruption in CONDITION_CORRUPTION.items():
            inputs[cond] = self.process(raw if corruption is None else corrupt.corrupt(raw, corruption), prompt)
        for cond in ("a", "v"):
            corrupt.check_same_layout(inputs["av"], inputs[cond])
        choices = {L: AnswerCandidates.from_tokenizer(self.tokenizer, L) for L in s.choices}
        meta: dict[str, Any] = {"label_name": s.label_name, "prompt_step": self.prompt_step, "video": video,
                                "audio": str(s.audio)}
        found = self._objects(s, inputs["av"], meta)
        return PreparedSample(id=s.sample_id, inputs=inputs, choices=choices, label=s.label,
                              object_positions=found, meta=meta)

    def _objects(self, s: MCSample, clean: dict[str, Any], meta: dict[str, Any]) -> dict[str, list[int]] | None:
        """Object tokens per modality; a problem with a sample's masks or blocks is noted in `meta` (the sample
        then has no 'object' subset) instead of stopping the run."""
        if self.model is None:
            return None
        out: dict[str, list[int]] = {}
        mm = self.model.modality_map(clean)
        try:
            if s.sample_id in self.object_blocks:
                out["audio"] = objects.audio_object_positions(mm, self.object_blocks[s.sample_id])
            if self.use_masks and isinstance(s.video, tuple):
                paths = [objects.mask_path_for_frame(p) for p in s.video]
                if all(p.exists() for p in paths):
                    masks = objects.load_masks(paths)
                    out["video"] = objects.video_object_positions(mm, masks, strict_level=self.strict_level)
        except objects.ObjectMaskError as e:
            meta["object_error"] = str(e)
        return out or None
