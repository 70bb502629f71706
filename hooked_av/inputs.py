"""Per-position description of a multimodal batch: which modality each position holds, when, and where.

`ModalityMap` is one class for every model of the zoo. Each model family's layout parser (e.g.
`model_zoo.qwen2_5_omni.parse_layout`) fills it while computing position ids, so the map always agrees with what
the model actually saw. Recipes select token subsets through it (`mm.positions("video")`, `mm.ranges("audio")`,
`mm.positions("audio", chunk=2)`) instead of searching for token ids.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


class Modality(enum.IntEnum):
    TEXT = 0
    AUDIO = 1
    VIDEO = 2
    IMAGE = 3
    SPECIAL = 4  # modality delimiters: <|audio_bos|>, <|vision_eos|>, ...
    PAD = 5  # padding (attention_mask == 0)

    @classmethod
    def parse(cls, value: "Modality | str | int") -> "Modality":
        if isinstance(value, Modality):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                names = ", ".join(m.name.lower() for m in cls)
                raise ValueError(f"Unknown modality {value!r}; expected one of: {names}") from None
        return cls(int(value))


class LayoutError(ValueError):
    """The token layout disagrees with the multimodal inputs (token counts, grids, delimiters)."""


@dataclass
class ModalityMap:
    """Per position of a [batch, pos] sequence: modality, 2-second chunk, time and grid cell.

    Attributes:
        modality: Modality code per position.
        chunk: index of the audio-visual chunk (`seconds_per_chunk` long) of audio/video tokens, -1 elsewhere.
        time: start time in seconds of the audio/video token's span, NaN elsewhere.
        grid: (t, h, w) cell in the merged vision grid for video/image tokens, -1 elsewhere.
        item: which audio/video/image of the sample the token belongs to (0-based), -1 elsewhere.
        seconds_per_chunk: chunk length used for `chunk`.
    """

    modality: Int[Tensor, "batch pos"]
    chunk: Int[Tensor, "batch pos"]
    time: Float[Tensor, "batch pos"]
    grid: Int[Tensor, "batch pos 3"]
    item: Int[Tensor, "batch pos"]
    seconds_per_chunk: float = 2.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.modality.shape)  # type: ignore[return-value]

    @property
    def batch_size(self) -> int:
        return self.modality.shape[0]

    @property
    def seq_len(self) -> int:
        return self.modality.shape[1]

    def mask(self, modality: Modality | str | int) -> Bool[Tensor, "batch pos"]:
        return self.modality == int(Modality.parse(modality))

    def positions(
        self, modality: Modality | str | int, batch: int = 0, chunk: int | None = None
    ) -> Int[Tensor, " n"]:
        """Positions (ascending) of one modality in sample `batch`, optionally restricted to one chunk."""
        keep = self.mask(modality)[batch]
        if chunk is not None:
            keep = keep & (self.chunk[batch] == chunk)
        return keep.nonzero().squeeze(-1)

    def ranges(self, modality: Modality | str | int, batch: int = 0) -> list[tuple[int, int]]:
        """Contiguous [start, end) ranges of one modality in sample `batch`."""
        pos = self.positions(modality, batch).tolist()
        out: list[tuple[int, int]] = []
        for p in pos:
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + 1)
            else:
                out.append((p, p + 1))
        return out

    def n_chunks(self, batch: int = 0) -> int:
        c = self.chunk[batch]
        return int(c.max().item()) + 1 if (c >= 0).any() else 0

    def counts(self, batch: int = 0) -> dict[str, int]:
        """Number of positions per modality in sample `batch`."""
        return {m.name.lower(): int((self.modality[batch] == int(m)).sum()) for m in Modality}

    def select(self, batch: int) -> "ModalityMap":
        """The map of one sample, keeping a batch dimension of 1."""
        sl = slice(batch, batch + 1)
        return ModalityMap(
            self.modality[sl], self.chunk[sl], self.time[sl], self.grid[sl], self.item[sl],
            self.seconds_per_chunk, dict(self.meta),
        )

    def repeat(self, n: int) -> "ModalityMap":
        """The map of a batch of one sample repeated `n` times (e.g. one row per patched subset)."""
        if self.batch_size != 1:
            raise ValueError(f"repeat needs a map of one sample, got a batch of {self.batch_size}")
        return ModalityMap(
            self.modality.expand(n, -1), self.chunk.expand(n, -1), self.time.expand(n, -1),
            self.grid.expand(n, -1, -1), self.item.expand(n, -1), self.seconds_per_chunk, dict(self.meta),
        )

    def av_end(self, batch: int = 0) -> int:
        """One past the last audio or video position of sample `batch` (where the prompt text after the clip
        starts; the official `text_start`). 0 when the sample has no audio or video."""
        av = self.mask(Modality.AUDIO)[batch] | self.mask(Modality.VIDEO)[batch]
        idx = av.nonzero()
        return int(idx.max()) + 1 if idx.numel() else 0

    def same_layout(self, other: "ModalityMap") -> bool:
        """True when both maps describe the same token layout (used to check corrupted inputs)."""
        return (
            self.shape == other.shape
            and torch.equal(self.modality, other.modality)
            and torch.equal(self.chunk, other.chunk)
            and torch.equal(self.grid, other.grid)
        )

    def describe(self, batch: int = 0) -> str:
        """One line per contiguous run of a modality, e.g. 'video [18, 50) chunk 0'."""
        mod, chunk = self.modality[batch].tolist(), self.chunk[batch].tolist()
        lines, start = [], 0
        for i in range(1, len(mod) + 1):
            if i == len(mod) or mod[i] != mod[start] or chunk[i] != chunk[start]:
                name = Modality(mod[start]).name.lower()
                suffix = f" chunk {chunk[start]}" if chunk[start] >= 0 else ""
                lines.append(f"{name:8s}[{start}, {i}){suffix}")
                start = i
        return "\n".join(lines)


class ModalityMapBuilder:
    """Fills a ModalityMap one block at a time (used by the layout parsers)."""

    def __init__(self, batch: int, seq_len: int, seconds_per_chunk: float):
        self.modality = torch.full((batch, seq_len), int(Modality.PAD), dtype=torch.long)
        self.chunk = torch.full((batch, seq_len), -1, dtype=torch.long)
        self.time = torch.full((batch, seq_len), math.nan, dtype=torch.float32)
        self.grid = torch.full((batch, seq_len, 3), -1, dtype=torch.long)
        self.item = torch.full((batch, seq_len), -1, dtype=torch.long)
        self.seconds_per_chunk = seconds_per_chunk

    def set(
        self,
        b: int,
        idx: Tensor | list[int] | slice,
        modality: Modality,
        chunk: Tensor | int = -1,
        time: Tensor | float = math.nan,
        grid: Tensor | None = None,
        item: int = -1,
    ) -> None:
        self.modality[b, idx] = int(modality)
        self.chunk[b, idx] = chunk if isinstance(chunk, int) else chunk.long()
        self.time[b, idx] = time if isinstance(time, float) else time.float()
        if grid is not None:
            self.grid[b, idx] = grid.long()
        self.item[b, idx] = item

    def build(self, **meta: Any) -> ModalityMap:
        return ModalityMap(
            self.modality, self.chunk, self.time, self.grid, self.item, float(self.seconds_per_chunk), meta
        )
