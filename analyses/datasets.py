"""VGGSound multiple-choice samples in the official format of the paper (`json_files/causal_tracing/step{1,2}/*.json`).

Each official sample list is a JSON list of 2-message conversations `[system, user]`; the user message holds the video
(an mp4 path or a list of JPEG frame paths), the prompt text, and extra keys: `label` (letter), `label_name`,
`choices` (letter -> VGGSound class), and the stored predictions (`av`, `a`, `v` in step 1; `correct_pred`,
`corrupt_pred` plus four word probabilities in step 2). Audio is not in the JSON: it is derived from the video path by
the official `find_audio_path` rule (`official_audio_path`).

`load_vggsound_mc` validates every sample and reports problems as `DatasetError("<file> sample <i>: ...")`;
`official_prompt` rebuilds the prompt byte for byte; `conversation` turns a sample into chat-template messages.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_HEADER = "Classify the sounding object into one of the categories below:\n\n"
PROMPT_FOOTER = "Respond ONLY with a single label letter (A\u2013{last})."  # en dash U+2013, as in the official files
STEPS = (1, 2)
PREDICTION_KEYS = ("av", "a", "v", "correct_pred", "corrupt_pred")
WORD_PROB_KEYS = (
    "correct_correct_word_prob",
    "correct_corrupt_word_prob",
    "corrupt_correct_word_prob",
    "corrupt_corrupt_word_prob",
)
# Official media layout (relative to the directory the official scripts run in).
VGGSOUND_AUDIO_DIR = "vggsound_with_mask/audio"
AUDIO_SUFFIX = ".wav"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DatasetError(ValueError):
    """A sample list is malformed; the message names the file, the sample index and the field."""


def official_prompt(choices: Mapping[str, str], step: int = 1) -> str:
    """The official 20-way MC prompt for `choices` (letter -> class name, in letter order).

    Step 1 (`infer_with_prob.py`) puts "Respond ONLY ..." on the line right after the last option; step 2
    (`output2input_*.py`, `build_prompt`) leaves an empty line before it. The letter range in the footer is "A–<last>"
    (A–T for the official 20 choices).
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if not choices:
        raise ValueError("choices is empty")
    options = "\n".join(f"{letter}. {name}" for letter, name in choices.items())
    separator = "\n" if step == 1 else "\n\n"
    return PROMPT_HEADER + options + separator + PROMPT_FOOTER.format(last=list(choices)[-1])


def official_audio_path(video: str | Sequence[str]) -> str:
    """Relative audio path of a video by the official `find_audio_path` rule (`utils/utils_common.py`).

    - list of frames, or a single `sam2_mask_black` frame: `vggsound_with_mask/audio/<parent folder of frame>.wav`;
    - AVHBench mp4: `.mp4 -> .wav`, `videos -> audios`;
    - other mp4 (VGGSound): `.mp4 -> .wav`, `video -> audio`;
    - anything else: the same path with a `.wav` suffix (official also tries `.mp3` first, if it exists).

    Unlike the official `str.replace`, the `video -> audio` substitution is applied to the directory part only, so a
    clip id containing "video" is kept intact. No existence check (see `load_vggsound_mc(check_media=True)`).
    """
    if not isinstance(video, str):
        return f"{VGGSOUND_AUDIO_DIR}/{posixpath.basename(posixpath.dirname(video[0]))}{AUDIO_SUFFIX}"
    if "vggsound" in video and "sam2_mask_black" in video:
        return f"{VGGSOUND_AUDIO_DIR}/{posixpath.basename(posixpath.dirname(video))}{AUDIO_SUFFIX}"
    folder, name = posixpath.split(video)
    stem = posixpath.splitext(name)[0]
    if "AVHBench" in video:
        folder = folder.replace("videos", "audios")
    elif "vggsound" in video:
        folder = folder.replace("video", "audio")
    return posixpath.join(folder, stem + AUDIO_SUFFIX)


def official_sample_id(video: str | Sequence[str]) -> str:
    """Official sample id: the parent folder of the first frame for frame lists, the file stem for a video file."""
    if isinstance(video, str):
        return posixpath.splitext(posixpath.basename(video))[0]
    return posixpath.basename(posixpath.dirname(video[0]))


def parse_answer_letter(text: str | None, choices: Mapping[str, str]) -> str | None:
    """The answer letter a generated text starts with, or None.

    The official stored predictions are raw generations: mostly a bare letter, but also "C.", "C\\n", "C. people
    whistling" or "C\\nHuman: ..." (22/349 `av` in people_case_2.json). A leading choice letter not followed by
    another letter counts as the answer; anything else is None.
    """
    if text is None:
        return None
    match = re.match(r"\s*([A-Za-z])(?![A-Za-z])", text)
    if match is None or match.group(1) not in choices:
        return None
    return match.group(1)


@dataclass(frozen=True)
class MCSample:
    """One multiple-choice sample.

    Attributes:
        sample_id: official id (`<ytid>_<start>`): parent folder of the first frame, or the mp4 stem.
        video: the mp4 path, or the tuple of frame paths, joined to the media root when one was given.
        audio: audio path by the official rule (`official_audio_path`), joined to the media root.
        label: ground-truth letter; label_name: its class name (`choices[label]`).
        choices: letter -> VGGSound class name, ordered A, B, ...
        prompt: the prompt text stored in the file.
        av, a, v: stored joint / audio-only / video-only predictions as letters (None if absent or not a letter).
        correct_pred, corrupt_pred: step-2 clean and corrupted predictions as letters (None if absent).
        predictions_raw: the stored prediction strings verbatim (they are raw generations, see `parse_answer_letter`).
        word_probs: step-2 stored probabilities (`correct_correct_word_prob`, ...).
        conversation_raw: the sample exactly as read from the file (not in the repr).
        source: "<file name> sample <index>", for messages (not compared: the same sample read from two files is equal).
    """

    sample_id: str
    video: Path | tuple[Path, ...]
    audio: Path
    label: str
    label_name: str
    choices: dict[str, str]
    prompt: str
    av: str | None = None
    a: str | None = None
    v: str | None = None
    correct_pred: str | None = None
    corrupt_pred: str | None = None
    predictions_raw: dict[str, str] = field(default_factory=dict)
    word_probs: dict[str, float] = field(default_factory=dict)
    conversation_raw: list[dict[str, Any]] = field(default_factory=list, repr=False)
    source: str = field(default="", compare=False)

    def letter_of(self, name: str) -> str:
        """Letter of class `name` among this sample's choices."""
        for letter, choice in self.choices.items():
            if choice == name:
                return letter
        raise KeyError(f"{self.source or self.sample_id}: {name!r} is not one of the choices")

    def name_of(self, letter: str) -> str:
        """Class name of choice `letter`."""
        if letter not in self.choices:
            raise KeyError(f"{self.source or self.sample_id}: {letter!r} is not a choice letter ({self.letters})")
        return self.choices[letter]

    @property
    def letters(self) -> str:
        """The choice letters in order, e.g. "ABCDEFGHIJKLMNOPQRST"."""
        return "".join(self.choices)

    @property
    def is_frames(self) -> bool:
        """True when the video is a list of frames (the official "people" subset), False for a video file."""
        return isinstance(self.video, tuple)

    @property
    def dominance(self) -> str | None:
        """"audio" if av == a != v, "video" if av == v != a (stored step-1 letters, METHOD.md §2.3), else None."""
        if self.av is None:
            return None
        if self.av == self.a and self.av != self.v:
            return "audio"
        if self.av == self.v and self.av != self.a:
            return "video"
        return None


def conversation(sample: MCSample, prompt: str | None = None, *, audio: bool = False) -> list[dict[str, Any]]:
    """Chat messages for `sample` in the transformers / qwen-omni-utils format.

    System "You are a helpful assistant." (as the official code, not Qwen's default system prompt); user = the video
    (path string, or list of frame path strings) followed by `prompt` (default: the stored prompt). With `audio=True`
    an explicit `{"type": "audio"}` block with the official audio path follows the video, for processors that do not
    extract audio from the video themselves (frame lists have no audio track).
    """
    video: str | list[str] = [str(p) for p in sample.video] if isinstance(sample.video, tuple) else str(sample.video)
    content: list[dict[str, Any]] = [{"type": "video", "video": video}]
    if audio:
        content.append({"type": "audio", "audio": str(sample.audio)})
    content.append({"type": "text", "text": sample.prompt if prompt is None else prompt})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def load_vggsound_mc(
    path: str | Path,
    media_root: str | Path | None = None,
    step: int = 1,
    *,
    check_prompt: bool = True,
    check_media: bool = False,
) -> list[MCSample]:
    """Read an official VGGSound MC sample list (step 1 or step 2) and validate it.

    Args:
        path: the JSON file (a list of `[system, user]` conversations).
        media_root: directory the stored relative media paths are resolved against (the official scripts ran from the
            directory holding `vggsound_with_mask/`); None keeps them as stored.
        step: 1 or 2; selects the expected prompt (step 2 has an empty line before "Respond").
        check_prompt: require the stored prompt to equal `official_prompt(choices, step)`.
        check_media: require every frame / video file and the audio file to exist.

    Raises:
        DatasetError: "<file> sample <i>: <what is wrong>" for the first invalid sample.
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise DatasetError(f"{path.name}: not valid JSON ({err.msg} at {where})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path.name}: expected a JSON list of conversations, got {type(data).__name__}")
    root = None if media_root is None else Path(media_root)
    samples: list[MCSample] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        where = f"{path.name} sample {index}"
        sample = _parse_sample(raw, where, root, step, check_prompt)
        if sample.sample_id in seen:
            first = seen[sample.sample_id]
            raise DatasetError(f"{where}: duplicate sample id {sample.sample_id!r} (also sample {first})")
        seen[sample.sample_id] = index
        if check_media:
            frames = sample.video if isinstance(sample.video, tuple) else (sample.video,)
            for media in (*frames, sample.audio):
                if not media.is_file():
                    raise DatasetError(f"{where}: media file {media} does not exist")
        samples.append(sample)
    return samples


def _parse_sample(raw: Any, where: str, root: Path | None, step: int, check_prompt: bool) -> MCSample:
    """Validate one conversation and build its `MCSample`; every problem is a `DatasetError` naming `where`."""
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise DatasetError(f"{where}: expected a list of messages, got {type(raw).__name__}")
    users = [m for m in raw if m.get("role") == "user"]
    if len(users) != 1:
        raise DatasetError(f"{where}: expected exactly one 'user' message, found {len(users)}")
    user = users[0]
    content = user.get("content")
    if not isinstance(content, list) or not all(isinstance(c, dict) for c in content):
        raise DatasetError(f"{where}: 'content' of the user message must be a list of blocks")
    videos = [c.get("video") for c in content if c.get("type") == "video"]
    texts = [c.get("text") for c in content if c.get("type") == "text"]
    if len(videos) != 1 or len(texts) != 1:
        raise DatasetError(f"{where}: expected one video and one text block, found {len(videos)} and {len(texts)}")
    video, prompt = videos[0], texts[0]
    frames_ok = isinstance(video, list) and video and all(isinstance(f, str) and f for f in video)
    if not (isinstance(video, str) and video) and not frames_ok:
        raise DatasetError(f"{where}: 'video' must be a path or a non-empty list of frame paths, got {video!r:.80}")
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: the text block holds {type(prompt).__name__}, expected the prompt string")

    choices = user.get("choices")
    if not isinstance(choices, dict) or not choices:
        raise DatasetError(f"{where}: 'choices' must be a non-empty dict letter -> class name")
    expected = list(_LETTERS[: len(choices)])
    if list(choices) != expected:
        got = "".join(map(str, choices))
        raise DatasetError(f"{where}: 'choices' keys must be {''.join(expected)} in order, got {got}")
    bad = [k for k, name in choices.items() if not isinstance(name, str) or not name]
    if bad:
        raise DatasetError(f"{where}: 'choices' {bad[0]!r} is not a class name: {choices[bad[0]]!r}")
    if len(set(choices.values())) != len(choices):
        raise DatasetError(f"{where}: 'choices' repeats a class name")

    label, label_name = user.get("label"), user.get("label_name")
    if label not in choices:
        raise DatasetError(f"{where}: 'label' {label!r} is not a choice letter ({''.join(choices)})")
    if label_name not in choices.values():
        raise DatasetError(f"{where}: 'label_name' {label_name!r} is not one of the choices")
    if choices[label] != label_name:
        raise DatasetError(f"{where}: 'label' {label!r} is {choices[label]!r} but 'label_name' is {label_name!r}")

    if check_prompt:
        official = official_prompt(choices, step)
        if prompt != official:
            other = STEPS[1 - STEPS.index(step)]
            is_other = prompt == official_prompt(choices, other)
            hint = f" (it is the step-{other} prompt: pass step={other})" if is_other else ""
            at = next((i for i, (x, y) in enumerate(zip(prompt, official)) if x != y), min(len(prompt), len(official)))
            raise DatasetError(
                f"{where}: prompt text differs from official_prompt(choices, step={step}) at character {at}{hint}"
            )

    raw_preds: dict[str, str] = {}
    for key in PREDICTION_KEYS:
        if key in user:
            if not isinstance(user[key], str):
                raise DatasetError(f"{where}: {key!r} must be a string, got {user[key]!r:.80}")
            raw_preds[key] = user[key]
    probs: dict[str, float] = {}
    for key in WORD_PROB_KEYS:
        if key in user:
            value = user[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DatasetError(f"{where}: {key!r} must be a probability in [0, 1], got {value!r:.80}")
            probs[key] = float(value)
    letters = {k: parse_answer_letter(raw_preds.get(k), choices) for k in PREDICTION_KEYS}

    def resolve(p: str) -> Path:
        return Path(p) if root is None else root / p

    media: Path | tuple[Path, ...] = tuple(resolve(f) for f in video) if isinstance(video, list) else resolve(video)
    return MCSample(
        sample_id=official_sample_id(video),
        video=media,
        audio=resolve(official_audio_path(video)),
        label=label,
        label_name=label_name,
        choices=dict(choices),
        prompt=prompt,
        **letters,
        predictions_raw=raw_preds,
        word_probs=probs,
        conversation_raw=raw,
        source=where,
    )
