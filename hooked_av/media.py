"""Raw audio-visual media: load a clip's 16 kHz waveform and sampled RGB frames, without torchaudio or torchvision.

The paper's corruptions act on the raw inputs (a zeroed waveform, black frames) and the processor then recomputes
the features, so the corrupted run goes through feature extraction exactly like the clean one. `RawAV` is that raw
input: a mono float32 waveform and uint8 frames, before any processor. Loading follows the official
qwen-omni-utils pipeline of Qwen2.5-Omni (`vision_process.py`, `audio_process.py`):

* audio: mono, resampled to 16 kHz (soundfile for wav/flac/ogg, PyAV for the audio track of a video; channels are
  averaged as librosa's `to_mono` does, resampling uses FFmpeg's swresample through PyAV instead of soxr);
* video files: decord `VideoReader` (PyAV when decord is missing), `smart_nframes` frame count at `fps` (a multiple
  of FRAME_FACTOR = 2, clamped to [4, 768] and to the clip), indices `linspace(0, n - 1, nframes).round()`;
* frame lists (JPEG/PNG paths): read with PIL in RGB, padded to an even count by repeating the last frame.

qwen-omni-utils also resizes frames before the processor; pass a `FrameResize` (e.g. `PAPER_VIDEO`) to
reproduce it, or leave frames at their native size and let the processor's own resize (smart_resize with the
video min/max pixels) decide the grid. Errors are `MediaError("<path>: <problem>")`, never a decoder traceback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float32, UInt8

#: Sampling rate of the Whisper front end of Qwen2.5-Omni (and of qwen-omni-utils' `librosa.load(sr=16000)`).
DEFAULT_SAMPLE_RATE = 16000
#: qwen-omni-utils `FPS`: frames sampled per second of video.
DEFAULT_FPS = 2.0
#: qwen-omni-utils `FRAME_FACTOR`: frame counts are multiples of the ViT's temporal patch size.
FRAME_FACTOR = 2
#: qwen-omni-utils `FPS_MIN_FRAMES` / `FPS_MAX_FRAMES`.
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
#: qwen-omni-utils `IMAGE_FACTOR` (patch 14 x merge 2): resized sides are multiples of it.
IMAGE_FACTOR = 28
#: qwen-omni-utils video pixel bounds per frame, and the total budget over a whole video.
VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_TOTAL_PIXELS = int(128000 * IMAGE_FACTOR * IMAGE_FACTOR * 0.9)
#: The paper's copy of `vision_process.py` sets VIDEO_MAX_PIXELS = VIDEO_MIN_PIXELS (128 x 28 x 28).
PAPER_VIDEO_MAX_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR
#: qwen-omni-utils `fetch_image` bounds (used for every image of a frame list).
IMAGE_MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
IMAGE_MAX_PIXELS = 16384 * IMAGE_FACTOR * IMAGE_FACTOR
#: qwen-omni-utils raises above this aspect ratio.
MAX_ASPECT_RATIO = 200
#: The floor qwen-omni-utils puts under the per-frame cap derived from the total budget (x min_pixels).
MIN_PIXELS_SLACK = 1.05
#: Suffixes decoded with soundfile (libsndfile); everything else goes through PyAV (FFmpeg).
SOUNDFILE_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif"})
#: Samples per PyAV frame when resampling an in-memory waveform.
RESAMPLE_BLOCK = 1 << 16
RGB_CHANNELS = 3


class MediaError(Exception):
    """A media file is missing, unreadable or lacks the requested stream; the message starts with its path."""


@dataclass(frozen=True)
class CorruptionRecord:
    """One corruption applied to a RawAV: its registry name, the modality it changes and its parameters."""

    name: str
    modality: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RawAV:
    """A clip before any processor: mono waveform and sampled RGB frames, with where they came from.

    Attributes:
        waveform: mono float32 samples at `sample_rate`, or None for a silent/video-only clip.
        frames: uint8 RGB frames [time, height, width, 3], or None for an audio-only clip.
        sample_rate: sampling rate of `waveform` in Hz.
        fps: frames per second of video time that `frames` were sampled at (qwen-omni-utils' `sample_fps`).
        video_source, audio_source: paths the media were read from (None for synthetic inputs).
        corruptions: corruptions applied so far, in order (see `hooked_av.corrupt`).
    """

    waveform: Float32[np.ndarray, " samples"] | None = None
    frames: UInt8[np.ndarray, "time height width 3"] | None = None
    sample_rate: int = DEFAULT_SAMPLE_RATE
    fps: float = DEFAULT_FPS
    video_source: str | None = None
    audio_source: str | None = None
    corruptions: tuple[CorruptionRecord, ...] = ()

    def __post_init__(self) -> None:
        if self.waveform is None and self.frames is None:
            raise ValueError("RawAV needs a waveform, frames, or both")
        if self.waveform is not None:
            w = self.waveform
            if not isinstance(w, np.ndarray) or w.ndim != 1 or w.dtype != np.float32:
                raise ValueError(f"waveform must be a 1-D float32 numpy array, got {_describe_array(w)}")
        if self.frames is not None:
            f = self.frames
            if not isinstance(f, np.ndarray) or f.ndim != 4 or f.shape[-1] != RGB_CHANNELS or f.dtype != np.uint8:
                raise ValueError(f"frames must be a uint8 numpy array [time, height, width, 3], got {_describe_array(f)}")
        if self.sample_rate <= 0 or self.fps <= 0:
            raise ValueError(f"sample_rate and fps must be positive, got {self.sample_rate} and {self.fps}")

    @property
    def audio_duration(self) -> float | None:
        """Seconds of audio (None without a waveform)."""
        return None if self.waveform is None else len(self.waveform) / self.sample_rate

    @property
    def video_duration(self) -> float | None:
        """Seconds of video covered by the sampled frames (None without frames)."""
        return None if self.frames is None else len(self.frames) / self.fps

    @property
    def duration(self) -> float:
        """Length of the clip in seconds: the longer of its audio and its video."""
        return max(d for d in (self.audio_duration, self.video_duration) if d is not None)


@dataclass(frozen=True, eq=False)
class VideoFrames:
    """Frames sampled from a video file or read from a frame list.

    Attributes:
        frames: uint8 RGB frames [time, height, width, 3].
        fps: frames per second of video time of `frames` (for a frame list: the `fps` it was declared with).
        source: the path (video file) or the first path (frame list).
        indices: indices of the sampled frames in the source video (None for a frame list).
        source_fps: average frame rate of the source video (None for a frame list).
        source_frames: number of frames in the source (video frames, or images in the list before padding).
    """

    frames: UInt8[np.ndarray, "time height width 3"]
    fps: float
    source: str
    indices: tuple[int, ...] | None = None
    source_fps: float | None = None
    source_frames: int = 0


@dataclass(frozen=True)
class FrameResize:
    """qwen-omni-utils' resize of frames before the processor (`fetch_video` / `fetch_image`).

    For a video file of n sampled frames the per-frame cap is
    `max(min(max_pixels, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05))`; frame lists use the image
    bounds and no total budget (`total_pixels=None`). Sides become multiples of `factor` (smart_resize).
    """

    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: float | None = VIDEO_TOTAL_PIXELS
    factor: int = IMAGE_FACTOR

    def target_size(self, height: int, width: int, n_frames: int) -> tuple[int, int]:
        """(height, width) the frames of a clip of `n_frames` sampled frames are resized to."""
        max_pixels: float = self.max_pixels
        if self.total_pixels is not None:
            budget = self.total_pixels / max(n_frames, 1) * FRAME_FACTOR
            max_pixels = max(min(self.max_pixels, budget), int(self.min_pixels * MIN_PIXELS_SLACK))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)


#: qwen-omni-utils defaults for video files.
QWEN_OMNI_UTILS_VIDEO = FrameResize()
#: The paper's edited copy (VIDEO_MAX_PIXELS = 128 x 28 x 28): 360x640 clips become 224x420 before the processor.
PAPER_VIDEO = FrameResize(max_pixels=PAPER_VIDEO_MAX_PIXELS)
#: qwen-omni-utils `fetch_image` defaults, applied per image of a frame list.
QWEN_OMNI_UTILS_FRAME_LIST = FrameResize(IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS, total_pixels=None)


# ---------------------------------------------------------------------------------------------------- helpers
def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: float = IMAGE_MIN_PIXELS,
                 max_pixels: float = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """qwen-omni-utils `smart_resize`: sides multiples of `factor`, area within [min, max], aspect ratio kept.

    (transformers' copy differs only in not flooring the rounded sides at `factor`.)
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_nframes(total_frames: int, video_fps: float, fps: float = DEFAULT_FPS,
                  min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES) -> int:
    """qwen-omni-utils `smart_nframes` (fps mode): frames to sample from a clip of `total_frames` at `video_fps`.

    `total / video_fps * fps`, clamped to [min_frames, min(max_frames, total)] and floored to a multiple of
    FRAME_FACTOR. Raises ValueError when fewer than FRAME_FACTOR frames can be taken.
    """
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"nframes should be in [{FRAME_FACTOR}, {total_frames}], got {n}")
    return n


def sample_indices(total_frames: int, n_frames: int) -> list[int]:
    """Frame indices qwen-omni-utils reads: `torch.linspace(0, total - 1, n).round()` (float32, half to even)."""
    import torch

    return torch.linspace(0, total_frames - 1, n_frames).round().long().tolist()


def _describe_array(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {tuple(x.shape)}"
    return type(x).__name__


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file")
    if not p.is_file():
        raise MediaError(f"{p}: not a file")
    return p


def _import(module: str, extra: str = "media") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MediaError(f"{module} is not installed (pip install 'hooked-av[{extra}]')") from None


def _unreadable(p: Path, err: BaseException, what: str = "unreadable") -> MediaError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MediaError(f"{p}: {what} ({type(err).__name__}: {detail})")


# ---------------------------------------------------------------------------------------------------- audio
def _to_mono(data: np.ndarray) -> Float32[np.ndarray, " samples"]:
    """Average channels ([samples, channels] -> [samples]), as librosa's `to_mono`."""
    return np.ascontiguousarray(data.mean(axis=1) if data.ndim == 2 else data, dtype=np.float32)


def resample(waveform: Float32[np.ndarray, " samples"], rate: int, target: int = DEFAULT_SAMPLE_RATE,
             ) -> Float32[np.ndarray, " resampled"]:
    """Resample a mono waveform with FFmpeg's swresample (PyAV `AudioResampler`)."""
    if rate == target:
        return waveform.astype(np.float32, copy=False)
    av = _import("av")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    parts: list[np.ndarray] = []
    for start in range(0, len(waveform), RESAMPLE_BLOCK):
        block = np.ascontiguousarray(waveform[start:start + RESAMPLE_BLOCK], dtype=np.float32)[None]
        frame = av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _read_soundfile(p: Path, sample_rate: int) -> Float32[np.ndarray, " samples"]:
    sf = _import("soundfile")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile errors carry no stable class across versions
        raise _unreadable(p, err) from None
    return resample(_to_mono(data), int(rate), sample_rate)


def _open_container(p: Path) -> Any:
    """A PyAV container of `p`, or a MediaError naming the file (never FFmpeg's traceback)."""
    av = _import("av")
    try:
        return av.open(str(p))
    except Exception as err:
        raise _unreadable(p, err) from None


def _decode_audio_pyav(p: Path, sample_rate: int) -> Float32[np.ndarray, " samples"]:
    """First audio stream of any container FFmpeg reads, resampled per channel, then channels averaged."""
    av = _import("av")
    container = _open_container(p)
    with container:
        if not container.streams.audio:
            raise MediaError(f"{p}: no audio stream")
        resampler = None
        parts: list[np.ndarray] = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                if resampler is None:
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sample_rate)
                parts.extend(f.to_ndarray() for f in resampler.resample(frame))
            if resampler is not None:
                parts.extend(f.to_ndarray() for f in resampler.resample(None))
        except MediaError:
            raise
        except Exception as err:
            raise _unreadable(p, err, "audio stream could not be decoded") from None
    if not parts:
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(np.concatenate(parts, axis=1).mean(axis=0), dtype=np.float32)


def load_audio(path: str | os.PathLike[str], sample_rate: int = DEFAULT_SAMPLE_RATE,
               ) -> Float32[np.ndarray, " samples"]:
    """Mono float32 waveform at `sample_rate` from an audio file or the audio track of a video.

    wav/flac/ogg/aiff are read with soundfile (PyAV if libsndfile cannot); anything else with PyAV.
    Raises MediaError: missing file, unreadable file, no audio stream, empty audio.
    """
    p = _existing_file(path)
    if p.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            wav = _read_soundfile(p, sample_rate)
        except MediaError as sf_error:
            try:
                wav = _decode_audio_pyav(p, sample_rate)
            except MediaError:
                raise sf_error from None
    else:
        wav = _decode_audio_pyav(p, sample_rate)
    if wav.size == 0:
        raise MediaError(f"{p}: the audio stream is empty")
    return wav


# ---------------------------------------------------------------------------------------------------- video
def _probe_video_stream(p: Path) -> None:
    """Fail early, with the path, when FFmpeg cannot open the file or it has no video stream."""
    with _open_container(p) as container:
        if not container.streams.video:
            raise MediaError(f"{p}: no video stream")


def _read_all_frames_pyav(p: Path) -> tuple[UInt8[np.ndarray, "time height width 3"], float]:
    av = _import("av")
    with av.open(str(p)) as container:
        stream = container.streams.video[0]
        try:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        except Exception as err:
            raise _unreadable(p, err, "video stream could not be decoded") from None
        rate = stream.average_rate or stream.guessed_rate
    if not frames:
        raise MediaError(f"{p}: the video stream has no frames")
    return np.stack(frames), float(rate) if rate else DEFAULT_FPS


#: A frame-sampling rule: (frames in the source, its average frame rate) -> indices of the frames to read.
FrameSampler = Callable[[int, float], Sequence[int]]


def _sample_video_file(p: Path, choose: FrameSampler,
                       ) -> tuple[UInt8[np.ndarray, "time height width 3"], list[int], int, float]:
    """Decode the frames `choose(total, video_fps)` picks (decord, or PyAV when decord is not installed)."""
    _probe_video_stream(p)
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        try:
            reader = decord.VideoReader(str(p), ctx=decord.cpu(0))
            total, video_fps = len(reader), float(reader.get_avg_fps())
        except Exception as err:
            raise _unreadable(p, err) from None
        idx = _checked_indices(p, choose, total, video_fps)
        try:
            batch = reader.get_batch(idx)
        except Exception as err:
            raise _unreadable(p, err, "frames could not be decoded") from None
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        return np.ascontiguousarray(frames, dtype=np.uint8), idx, total, video_fps
    all_frames, video_fps = _read_all_frames_pyav(p)
    total = len(all_frames)
    idx = _checked_indices(p, choose, total, video_fps)
    return all_frames[idx], idx, total, video_fps


def _checked_indices(p: Path, choose: FrameSampler, total: int, video_fps: float) -> list[int]:
    idx = [int(i) for i in choose(total, video_fps)]
    if not idx:
        raise MediaError(f"{p}: {total} frame(s) in the video; the frame sampling rule picks none")
    bad = [i for i in idx if not 0 <= i < total]
    if bad:
        raise MediaError(f"{p}: frame indices {bad[:4]} are outside the video's {total} frames")
    return idx


def _qwen_omni_utils_sampler(p: Path, fps: float, min_frames: int, max_frames: int) -> FrameSampler:
    """qwen-omni-utils' rule (`smart_nframes` frames at `sample_indices`), with its errors naming `p`."""

    def choose(total: int, video_fps: float) -> list[int]:
        return sample_indices(total, _nframes_or_error(p, total, video_fps, fps, min_frames, max_frames))

    return choose


def _nframes_or_error(p: Path, total: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> int:
    try:
        return smart_nframes(total, video_fps, fps, min_frames, max_frames)
    except ValueError:
        raise MediaError(f"{p}: {total} frame(s) in the video; at least {FRAME_FACTOR} are needed") from None


def _resize_frames(frames: UInt8[np.ndarray, "time height width 3"], size: tuple[int, int],
                   ) -> UInt8[np.ndarray, "time h2 w2 3"]:
    """Bicubic resize of every frame to (height, width) with PIL (uint8 in, uint8 out)."""
    from PIL import Image

    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames])


def _read_image_rgb(p: Path) -> Any:
    """A PIL image in RGB; transparent images are composed on white, as qwen-omni-utils' `to_rgb` does."""
    from PIL import Image

    try:
        image = Image.open(p)
        image.load()
    except Exception as err:
        raise _unreadable(p, err) from None
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _read_frame_list(paths: Sequence[str | os.PathLike[str]], resize: FrameResize | None, pad: bool = True,
                     ) -> UInt8[np.ndarray, "time height width 3"]:
    from PIL import Image

    if not paths:
        raise MediaError("empty frame list")
    images = []
    for path in paths:
        p = _existing_file(path)
        image = _read_image_rgb(p)
        if resize is not None:
            h, w = resize.target_size(image.height, image.width, 1)
            if (image.height, image.width) != (h, w):
                image = image.resize((w, h), Image.Resampling.BICUBIC)
        images.append((p, np.asarray(image, dtype=np.uint8)))
    first_path, first = images[0]
    for p, img in images[1:]:
        if img.shape != first.shape:
            raise MediaError(f"{p}: frame size {img.shape[1]}x{img.shape[0]} differs from {first_path} "
                             f"({first.shape[1]}x{first.shape[0]}); pass resize= or resize the frames")
    frames = [img for _, img in images]
    if pad:
        frames += [frames[-1]] * (-len(frames) % FRAME_FACTOR)
    return np.stack(frames)


def load_video_frames(
    path_or_frame_list: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    fps: float = DEFAULT_FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    resize: FrameResize | None = None,
    frame_sampler: FrameSampler | None = None,
) -> VideoFrames:
    """Frames of a video file sampled at `fps`, or the images of a frame list, as uint8 [T, H, W, 3].

    Video files: `smart_nframes` frames at `linspace(0, n - 1, nframes).round()` (qwen-omni-utils); the returned
    `fps` is the effective `nframes / n * video_fps`. Frame lists: images in order, padded to an even count by
    repeating the last one; `fps` is taken as given. `resize` applies qwen-omni-utils' pre-processor resize
    (None keeps the native size). `frame_sampler(total, video_fps)` replaces qwen-omni-utils' rule by another
    model family's (the indices of the frames to keep; `fps`, `min_frames` and `max_frames` are then unused): a
    frame list counts as a video of its images at `fps`, without the even padding, and the returned `fps` is again
    `kept / total * video_fps`, so `len(frames) / fps` is the source's duration. Raises MediaError naming the file
    and the problem.
    """
    if isinstance(path_or_frame_list, (str, os.PathLike)):
        p = _existing_file(path_or_frame_list)
        choose = frame_sampler or _qwen_omni_utils_sampler(p, fps, min_frames, max_frames)
        frames, idx, total, video_fps = _sample_video_file(p, choose)
        if resize is not None:
            frames = _resize_frames(frames, resize.target_size(frames.shape[1], frames.shape[2], len(frames)))
        sample_fps = len(idx) / max(total, 1) * video_fps
        return VideoFrames(frames, sample_fps, str(p), tuple(idx), video_fps, total)
    paths = list(path_or_frame_list)
    if not paths:
        raise MediaError("empty frame list")
    frames = _read_frame_list(paths, resize, pad=frame_sampler is None)
    if frame_sampler is None:
        return VideoFrames(frames, float(fps), str(paths[0]), None, None, len(paths))
    idx = _checked_indices(Path(paths[0]), frame_sampler, len(frames), float(fps))
    return VideoFrames(frames[idx], len(idx) / len(frames) * float(fps), str(paths[0]), tuple(idx), float(fps),
                       len(paths))


def load_av(
    video: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    audio: str | os.PathLike[str] | None = None,
    fps: float = DEFAULT_FPS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    resize: FrameResize | None = None,
    frame_sampler: FrameSampler | None = None,
) -> RawAV:
    """A RawAV from a video (file or frame list) and its audio: `audio` if given, else the video file's own track.

    A frame list has no audio track, so it needs `audio`. `frame_sampler`: another family's frame-sampling rule
    (see `load_video_frames`). Raises MediaError (e.g. "<path>: no audio stream").
    """
    frames = load_video_frames(video, fps=fps, resize=resize, frame_sampler=frame_sampler)
    if audio is None:
        if not isinstance(video, (str, os.PathLike)):
            raise MediaError(f"{frames.source}: a frame list has no audio track; pass audio=")
        audio = video
    waveform = load_audio(audio, sample_rate=sample_rate)
    return RawAV(waveform=waveform, frames=frames.frames, sample_rate=sample_rate, fps=frames.fps,
                 video_source=frames.source, audio_source=str(Path(audio)))
