"""Corruptions of raw clips that keep the token layout, and clean/corrupted processor-output pairs.

The paper corrupts a modality at the raw-input level (METHOD §2.4): the 16 kHz waveform is replaced by zeros of the
same length (`np.zeros_like`), video frames by black frames of the same size; both still go through the processor
and the encoders. Position-wise activation patching then needs the clean and corrupted runs to share the token
layout (ids, grids, feature lengths), which `corrupted_pair` checks, raising `LayoutError` naming what differs.
Every corruption is recorded on the returned RawAV (`raw.corruptions`), with its seed for the noisy ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hooked_av.inputs import LayoutError
from hooked_av.media import CorruptionRecord, RawAV

AUDIO = "audio"
VIDEO = "video"
#: Default std of additive waveform noise (full scale is 1.0).
DEFAULT_AUDIO_NOISE_STD = 0.01
#: Default std of additive frame noise, in 8-bit pixel units.
DEFAULT_FRAME_NOISE_STD = 25.0
PIXEL_MAX = 255
DEFAULT_SEED = 0

#: Processor outputs that define the token layout: compared exactly between clean and corrupted inputs.
LAYOUT_KEYS = ("input_ids", "attention_mask", "feature_attention_mask", "image_grid_thw", "video_grid_thw",
               "video_second_per_grid", "use_audio_in_video",
               # video-SALMONN 2+ / o1 (model_zoo.video_salmonn_processing)
               "second_per_grid_ts", "audio_lengths", "org_groups", "real_time")
#: Feature tensors (or lists of them) whose values change under a corruption but whose shapes must not.
FEATURE_KEYS = ("input_features", "pixel_values", "pixel_values_videos", "audio_feature", "spectrogram", "images")
#: Keys whose entries are sequence positions (differences are reported per position).
_POSITION_KEYS = ("input_ids", "attention_mask")

#: A model family's processor: RawAV -> processor-output dict (e.g. `Qwen25OmniMediaProcessor.__call__`).
Processor = Callable[[RawAV], Mapping[str, Any]]


def _record(raw: RawAV, name: str, modality: str, params: dict[str, Any] | None = None, **changes: Any) -> RawAV:
    """`raw` with `changes` applied and the corruption appended to its record."""
    record = CorruptionRecord(name, modality, dict(params or {}))
    return dataclasses.replace(raw, corruptions=raw.corruptions + (record,), **changes)


def _need(raw: RawAV, modality: str, name: str) -> None:
    if modality == AUDIO and raw.waveform is None:
        raise ValueError(f"{name}: the clip has no waveform to corrupt")
    if modality == VIDEO and raw.frames is None:
        raise ValueError(f"{name}: the clip has no frames to corrupt")


def zero_audio(raw: RawAV) -> RawAV:
    """Silence: the waveform replaced by zeros of the same length (the paper's video-only run)."""
    _need(raw, AUDIO, "zero_audio")
    return _record(raw, "zero_audio", AUDIO, waveform=np.zeros_like(raw.waveform))


def black_frames(raw: RawAV) -> RawAV:
    """Black video: every frame replaced by zeros of the same shape (the paper's audio-only run)."""
    _need(raw, VIDEO, "black_frames")
    return _record(raw, "black_frames", VIDEO, frames=np.zeros_like(raw.frames))


def noise_audio(raw: RawAV, std: float = DEFAULT_AUDIO_NOISE_STD, seed: int = DEFAULT_SEED) -> RawAV:
    """Additive Gaussian noise on the waveform (seeded; not clipped, as the waveform is float)."""
    _need(raw, AUDIO, "noise_audio")
    rng = np.random.default_rng(seed)
    noisy = raw.waveform + rng.normal(0.0, std, raw.waveform.shape).astype(np.float32)
    return _record(raw, "noise_audio", AUDIO, waveform=noisy.astype(np.float32),
                   params={"std": float(std), "seed": int(seed)})


def noise_frames(raw: RawAV, std: float = DEFAULT_FRAME_NOISE_STD, seed: int = DEFAULT_SEED) -> RawAV:
    """Additive Gaussian noise on the frames in pixel units (seeded), rounded and clipped back to uint8."""
    _need(raw, VIDEO, "noise_frames")
    rng = np.random.default_rng(seed)
    noisy = raw.frames.astype(np.float32) + rng.normal(0.0, std, raw.frames.shape).astype(np.float32)
    frames = np.clip(np.rint(noisy), 0, PIXEL_MAX).astype(np.uint8)
    return _record(raw, "noise_frames", VIDEO, frames=frames, params={"std": float(std), "seed": int(seed)})


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: name, the modality it destroys, and the function RawAV -> RawAV."""

    name: str
    modality: str
    apply: Callable[..., RawAV]
    description: str

    def __call__(self, raw: RawAV, **kw: Any) -> RawAV:
        return self.apply(raw, **kw)


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("zero_audio", AUDIO, zero_audio, "waveform -> zeros of the same length (paper)"),
        Corruption("black_frames", VIDEO, black_frames, "frames -> black frames of the same shape (paper)"),
        Corruption("noise_audio", AUDIO, noise_audio, "waveform + N(0, std), seeded"),
        Corruption("noise_frames", VIDEO, noise_frames, "frames + N(0, std) in pixel units, seeded"),
    )
}


def get_corruption(name: str) -> Corruption:
    """The registered corruption `name`; unknown names list the known ones."""
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}") from None


def corrupt(raw: RawAV, name: str, **kw: Any) -> RawAV:
    """Apply the registered corruption `name` (keyword arguments go to it, e.g. std=, seed=)."""
    return get_corruption(name)(raw, **kw)


def which_modality_is_corrupted(name: str) -> str:
    """'audio' or 'video': the modality a registered corruption destroys (recipes' bookkeeping)."""
    return get_corruption(name).modality


# ---------------------------------------------------------------------------------------------------- layouts
def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _feature_shape(x: Any) -> Any:
    """Shape of a feature tensor, or the shapes of a list of them (o1's per-sample frame tensors)."""
    if isinstance(x, (list, tuple)):
        return [_feature_shape(v) if v is not None else None for v in x]
    return tuple(_as_array(x).shape)


def _first_index(idx: np.ndarray, shape: tuple[int, ...]) -> str:
    """A readable index: the position alone for [1, pos] tensors, a tuple otherwise."""
    if len(shape) == 2 and shape[0] == 1:
        idx = idx[1:]
    items = [int(i) for i in idx]
    return str(items[0]) if len(items) == 1 else str(tuple(items))


def _value_difference(key: str, a: np.ndarray, b: np.ndarray) -> str | None:
    if a.shape != b.shape:
        return f"{key} shape {tuple(a.shape)} vs {tuple(b.shape)}"
    differ = np.argwhere(a != b)
    if len(differ) == 0:
        return None
    first = differ[0]
    unit = "positions" if key in _POSITION_KEYS else "entries"
    va, vb = a[tuple(first)].item(), b[tuple(first)].item()
    return f"{key} differ at {len(differ)} {unit} (first at {_first_index(first, a.shape)}: {va} vs {vb})"


def layout_differences(clean: Mapping[str, Any], corrupted: Mapping[str, Any]) -> list[str]:
    """What differs between the token layouts of two processor outputs (empty when they match).

    Compared: the LAYOUT_KEYS exactly (ids, masks, grids, seconds per grid, audio feature lengths) and the
    shapes of the FEATURE_KEYS; a key present in only one output is a difference too.
    """
    out: list[str] = []
    for key in LAYOUT_KEYS + FEATURE_KEYS:
        has_a, has_b = clean.get(key) is not None, corrupted.get(key) is not None
        if has_a != has_b:
            out.append(f"{key} is {'missing from' if has_a else 'only in'} the corrupted inputs")
            continue
        if not has_a:
            continue
        if key in FEATURE_KEYS:
            sa, sb = _feature_shape(clean[key]), _feature_shape(corrupted[key])
            if sa != sb:
                out.append(f"{key} shape {sa} vs {sb}")
            continue
        a, b = _as_array(clean[key]), _as_array(corrupted[key])
        if key == "feature_attention_mask" and a.shape == b.shape and a.ndim == 2:
            la, lb = a.sum(-1), b.sum(-1)
            if not np.array_equal(la, lb):
                out.append(f"audio feature lengths differ: {la.tolist()} vs {lb.tolist()}")
                continue
        diff = _value_difference(key, a, b)
        if diff is not None:
            out.append(diff)
    return out


def check_same_layout(clean: Mapping[str, Any], corrupted: Mapping[str, Any]) -> None:
    """Raise LayoutError naming every difference between the two token layouts."""
    diffs = layout_differences(clean, corrupted)
    if diffs:
        raise LayoutError("corrupted inputs change the token layout: " + "; ".join(diffs))


def corrupted_pair(
    process: Processor,
    raw: RawAV,
    corruption: str | Callable[..., RawAV],
    **kw: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clean, corrupted) processor outputs for a clip and a corruption (a registered name or a function).

    Both go through `process`, so corrupted features are really recomputed; raises LayoutError when the
    corrupted token layout differs from the clean one (position-wise patching would be meaningless).
    """
    apply = get_corruption(corruption) if isinstance(corruption, str) else corruption
    clean = dict(process(raw))
    corrupted = dict(process(apply(raw, **kw)))
    check_same_layout(clean, corrupted)
    return clean, corrupted
