"""Object tokens: where the labelled object is, in token positions (the 'object' subset of the IE table).

- Video: per-frame object masks (e.g. SAM2 masks on black, grayscale). Temporal grid t covers frames 2t and 2t+1;
  merged grid cell (t, y, x) covers pixels [round(y H / h), round((y+1) H / h)) x [round(x W / w), ...) of each
  mask, whatever the mask resolution. A cell holds the object when the fraction of its pixels brighter than
  `pixel_threshold` exceeds `min_fraction` in both frames (official strict level "high": 20 and 0.2; "very_high":
  40 and 0.4). When an odd frame list was padded by repeating its last frame, the last temporal grid has one mask
  and gets no object tokens, as in the official code.
- Audio: the 2-second chunks in which the object sounds (e.g. from a sound-event detector); every audio token of
  those chunks. Chunks come from the ModalityMap, so an audio stream that outlasts the video still splits by
  chunk (the official code indexes contiguous audio runs, which merge when no video separates them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hooked_av.inputs import Modality, ModalityMap

#: strict level -> (pixel threshold on 0..255 grayscale, minimum fraction of the cell's pixels)
STRICT_LEVELS: dict[str, tuple[int, float]] = {"high": (20, 0.2), "very_high": (40, 0.4)}
#: frames per temporal grid (Qwen's temporal_patch_size)
FRAMES_PER_GRID = 2


class ObjectMaskError(ValueError):
    """Masks that do not fit the sample (missing frames, unreadable files)."""


def mask_path_for_frame(frame_path: str | Path) -> Path:
    """The official naming: the mask of `NNN_raw.jpg` is `NNN.jpg` in the same folder."""
    p = Path(frame_path)
    if not p.name.endswith("_raw.jpg"):
        raise ObjectMaskError(f"{p}: frame names must end with '_raw.jpg' to find their masks")
    return p.with_name(p.name[: -len("_raw.jpg")] + ".jpg")


def load_masks(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Grayscale uint8 masks [H, W], with errors naming the file."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("L")))
        except FileNotFoundError:
            raise ObjectMaskError(f"{p}: mask file not found") from None
        except OSError as e:
            raise ObjectMaskError(f"{p}: unreadable mask ({e})") from None
    return out


def _cell_fraction(mask: np.ndarray, y: int, x: int, h: int, w: int, threshold: int) -> float:
    H, W = mask.shape[:2]
    cell_h, cell_w = H / float(h), W / float(w)  # the official rounding: round(index * cell size)
    y0, y1 = int(round(y * cell_h)), int(round((y + 1) * cell_h))
    x0, x1 = int(round(x * cell_w)), int(round((x + 1) * cell_w))
    cell = mask[y0:y1, x0:x1]
    return float((cell > threshold).mean()) if cell.size else 0.0


def video_object_positions(
    modality_map: ModalityMap,
    masks: Sequence[np.ndarray],
    batch: int = 0,
    item: int = 0,
    strict_level: str = "high",
) -> list[int]:
    """Video token positions whose grid cell holds the object in both frames of its temporal grid."""
    if strict_level not in STRICT_LEVELS:
        raise ValueError(f"strict_level must be one of {sorted(STRICT_LEVELS)}, got {strict_level!r}")
    threshold, min_fraction = STRICT_LEVELS[strict_level]
    sel = modality_map.mask(Modality.VIDEO)[batch] & (modality_map.item[batch] == item)
    positions = sel.nonzero().squeeze(-1).tolist()
    if not positions:
        return []
    grid = modality_map.grid[batch, positions].tolist()
    n_t = max(g[0] for g in grid) + 1
    h, w = max(g[1] for g in grid) + 1, max(g[2] for g in grid) + 1
    if len(masks) < FRAMES_PER_GRID * n_t - 1:
        raise ObjectMaskError(f"{len(masks)} masks for {n_t} temporal grids (need {FRAMES_PER_GRID * n_t}, or "
                              f"{FRAMES_PER_GRID * n_t - 1} when the frame list was padded)")
    out = []
    for pos, (t, y, x) in zip(positions, grid):
        frames = masks[FRAMES_PER_GRID * t: FRAMES_PER_GRID * (t + 1)]
        if len(frames) < FRAMES_PER_GRID:  # the padded last grid has no mask of its own (as the official code)
            continue
        if all(_cell_fraction(m, y, x, h, w, threshold) > min_fraction for m in frames):
            out.append(pos)
    return out


def audio_object_positions(modality_map: ModalityMap, chunks: Sequence[int], batch: int = 0) -> list[int]:
    """Audio token positions of the given 2-second chunks."""
    audio_chunks = set(modality_map.chunk[batch][modality_map.mask(Modality.AUDIO)[batch]].tolist())
    bad = [c for c in chunks if c not in audio_chunks]
    if bad:
        raise ObjectMaskError(f"audio chunks {bad} hold no audio tokens (the sample's audio is in chunks "
                              f"{sorted(audio_chunks)})")
    out: list[int] = []
    for c in sorted(set(chunks)):
        out += modality_map.positions(Modality.AUDIO, batch, chunk=c).tolist()
    return out
