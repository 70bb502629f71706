"""What a study needs of one sample, whatever its source (official VGGSound lists with media, the organism's
generated set, or synthetic inputs in tests).

A `PreparedSample` carries the model inputs of the three conditions of the dominance protocol, built from the
same prompt so their token layouts are identical (checked): "av" (clean), "a" (audio only: frames blacked) and
"v" (video only: audio zeroed). Answers are choice letters with their candidate token ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hooked_av.inputs import LayoutError
from hooked_av.recipes.scoring import AnswerCandidates

CONDITIONS: tuple[str, ...] = ("av", "a", "v")
#: which condition is the corrupted run when a modality dominates: audio-dominant -> silence the audio ("v")
CORRUPTED_CONDITION = {"audio": "v", "video": "a"}
#: the non-dominant ("base") modality whose tokens are restored
BASE_MODALITY = {"audio": "video", "video": "audio"}


@dataclass
class PreparedSample:
    """One sample ready for the studies.

    inputs: condition ("av", "a", "v") -> AVInputs (or processor outputs) of that condition.
    choices: letter -> AnswerCandidates, in display order.
    object_positions: modality -> token positions of the labelled object (video cells with the object on screen,
        audio tokens of the chunks where it sounds), when known.
    """

    id: str
    inputs: Mapping[str, Any]
    choices: Mapping[str, AnswerCandidates]
    label: str | None = None
    object_positions: Mapping[str, list[int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def check_layouts(self, model: Any) -> None:
        """All conditions must share the clean token layout (position-wise patching relies on it)."""
        missing = [c for c in CONDITIONS if c not in self.inputs]
        if missing:
            raise ValueError(f"sample {self.id}: conditions {missing} are missing (need {list(CONDITIONS)})")
        ref = model.modality_map(self.inputs["av"])
        for c in ("a", "v"):
            other = model.modality_map(self.inputs[c])
            if not ref.same_layout(other):
                raise LayoutError(f"sample {self.id}: the {c!r} inputs have another token layout than the clean "
                                  f"ones ({other.counts()} vs {ref.counts()})")


class SampleSource:
    """Samples by id, prepared on demand (a resumed run never prepares what it already has).

    Subclasses implement `ids()` and `prepare(sample_id)`; `ListSource` wraps ready samples.
    """

    def ids(self) -> list[str]:
        raise NotImplementedError

    def prepare(self, sample_id: str) -> PreparedSample:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids())


class ListSource(SampleSource):
    def __init__(self, samples: list[PreparedSample]):
        self._samples = {s.id: s for s in samples}
        if len(self._samples) != len(samples):
            raise ValueError("sample ids are not unique")

    def ids(self) -> list[str]:
        return list(self._samples)

    def prepare(self, sample_id: str) -> PreparedSample:
        return self._samples[sample_id]
