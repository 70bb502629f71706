"""Hallucination probes (AVHBench) and the evaluation of decoding-time mitigation methods on them.

Items follow AVHBench's schema, `{video_id, task, text, label}` with label "Yes" / "No"; tasks: "AV Hallucination
(Video)" (is the object visible?), "AV Hallucination (Audio)" (is it making sound?), their unimodal-input variants
"(Video_only)" / "(Audio_only)", "AV Matching", and "AV Captioning" (label = a reference caption). A model's
answer is read teacher-forced: "Yes" when P(Yes) > P(No) at the answer position (candidates with and without a
leading space). Metrics with "Yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio.

The mitigation harness (`run_mitigation`, `write_mitigation_report`, CLI `hooked-av mitigate`) runs the methods of
`hooked_av.recipes.mitigate` over a probe file: yes/no judgments (metrics above, per task too), open-ended
captions scored CHAIR-style for object hallucination (objects mentioned but absent, per caption and per object,
against a vocabulary of object words), and optionally the 20-way VGGSound multiple choice as a no-harm check;
every metric with a seeded percentile-bootstrap 95 % CI; a table (Markdown + JSON) and a plot of each metric
against the method's strength (alpha / beta / guidance strength). Records are resumable (`records.RecordStore`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hooked_av.recipes import amplify, mitigate, scoring

YES, NO = "Yes", "No"


@dataclass(frozen=True)
class BinaryMetrics:
    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def binary_metrics(pred: Sequence[str], gold: Sequence[str]) -> BinaryMetrics:
    """AVHBench judgment metrics, positive = "Yes". Undefined ratios (no predicted / no gold positives) are NaN."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    bad = sorted({x for x in (*pred, *gold) if x not in (YES, NO)})
    if bad:
        raise ValueError(f"answers must be {YES!r} or {NO!r}, got {bad[:3]}")
    tp = sum(p == YES and g == YES for p, g in zip(pred, gold))
    fp = sum(p == YES and g == NO for p, g in zip(pred, gold))
    fn = sum(p == NO and g == YES for p, g in zip(pred, gold))
    n = len(pred)
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
    return BinaryMetrics(n, (tp + tn) / n if n else math.nan, precision, recall, f1, (tp + fp) / n if n else math.nan)


def cross_modal_sinks(model: Any, inputs: Any, k_divide: int = 2) -> list[int]:
    """Audio and video global sinks read more by the other modality (threshold rule), for one sample."""
    return mitigate.find_sink_sets(model, inputs, k_divide=k_divide, rule="threshold").cross_modal


def answer_yes_no(model: Any, inputs: Any, yes: scoring.AnswerCandidates, no: scoring.AnswerCandidates) -> str:
    p = scoring.score(model, inputs, {YES: yes, NO: no})
    return YES if float(p[YES][0]) > float(p[NO][0]) else NO


def evaluate_probes(
    model: Any,
    items: Sequence[Mapping[str, Any]],
    inputs_of: Callable[[Mapping[str, Any]], Any],
    yes: scoring.AnswerCandidates,
    no: scoring.AnswerCandidates,
    alphas: Sequence[float] = (0.0,),
    layers: Sequence[int] | None = None,
    keys_of: Callable[[Any], list[int]] | None = None,
) -> dict[str, Any]:
    """Metrics per alpha (0 = no amplification) and per task, amplifying attention to `keys_of(inputs)`
    (default: the sample's cross-modal sinks) for the text queries and the answer."""
    keys_of = keys_of or (lambda x: cross_modal_sinks(model, x))
    preds: dict[float, list[str]] = {a: [] for a in alphas}
    gold, tasks = [], []
    for item in tqdm(items, desc="probes"):
        inputs = inputs_of(item)
        keys = keys_of(inputs) if any(a > 0 for a in alphas) else []
        mm = model.modality_map(inputs)
        for a in alphas:
            if a > 0 and keys:
                with amplify.amplified_attention(model, keys, mm, alpha=a, layers=layers):
                    preds[a].append(answer_yes_no(model, inputs, yes, no))
            else:
                preds[a].append(answer_yes_no(model, inputs, yes, no))
        gold.append(item["label"])
        tasks.append(item["task"])
    out: dict[str, Any] = {"alphas": list(alphas), "n": len(gold), "overall": {}, "by_task": {}}
    for a in alphas:
        out["overall"][str(a)] = binary_metrics(preds[a], gold).to_dict()
        out["by_task"][str(a)] = {
            t: binary_metrics([p for p, tt in zip(preds[a], tasks) if tt == t],
                              [g for g, tt in zip(gold, tasks) if tt == t]).to_dict()
            for t in sorted(set(tasks))
        }
    return out


# ================================================================================================ AVHBench files
#: AVHBench's media layout (the official find_audio_path: videos -> audios, .mp4 -> .wav; METHOD.md §12)
AVHBENCH_VIDEO_DIR, AVHBENCH_AUDIO_DIR = "videos", "audios"
VIDEO_SUFFIX, AUDIO_SUFFIX = ".mp4", ".wav"
JUDGMENT, CAPTION = "judgment", "caption"
CAPTION_TASK = "AV Captioning"


@dataclass(frozen=True)
class TaskSpec:
    """kind: "judgment" (yes/no) or "caption"; inputs: what the model gets ("av"; "audio" = black frames,
    "video" = zeroed audio: AVHBench's unimodal-input variants, made at the raw input as the paper's §2.4)."""

    kind: str
    inputs: str


AVHBENCH_TASKS: dict[str, TaskSpec] = {
    "AV Hallucination (Video)": TaskSpec(JUDGMENT, "av"),
    "AV Hallucination (Audio)": TaskSpec(JUDGMENT, "av"),
    "AV Hallucination (Video_only)": TaskSpec(JUDGMENT, "video"),
    "AV Hallucination (Audio_only)": TaskSpec(JUDGMENT, "audio"),
    "AV Matching": TaskSpec(JUDGMENT, "av"),
    CAPTION_TASK: TaskSpec(CAPTION, "av"),
}


@dataclass(frozen=True)
class ProbeItem:
    """One question of a probe file, with its media resolved.

    id: the item's "id" when the file has one (avsynth), else "<index in file>_<video_id>" (AVHBench has none).
    video / audio: media paths (audio None: the video file's own track); None when no media root was given.
    objects: for captions, the objects present (given by the file and/or found in the reference caption).
    """

    id: str
    video_id: str
    task: str
    text: str
    label: str
    kind: str
    inputs: str
    video: Path | None = None
    audio: Path | None = None
    objects: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """An item left out of a run and why (unknown task, missing media, malformed entry, undecodable media)."""

    id: str
    video_id: str
    task: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class ProbeSet:
    items: list[ProbeItem]
    skipped: list[Skipped]
    source: str

    def of_kind(self, kind: str) -> list[ProbeItem]:
        return [it for it in self.items if it.kind == kind]

    def prefixed(self, prefix: str) -> "ProbeSet":
        """The same set with `prefix` before every id (to merge files whose ids may collide)."""
        return ProbeSet([dataclasses.replace(it, id=prefix + it.id) for it in self.items],
                        [dataclasses.replace(s, id=prefix + s.id) for s in self.skipped], self.source)


class _Skip(Exception):
    """Internal: an entry is recorded as skipped with this reason."""


def _read_json_list(path: Path) -> list[Any]:
    from .datasets import DatasetError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot read a JSON list ({e})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def _media(raw: Mapping[str, Any], video_id: str, root: Path | None) -> tuple[Path | None, Path | None]:
    """(video, audio) of an entry: its own "video"/"audio" paths (avsynth) or the AVHBench layout under `root`.
    A missing AVHBench audio file falls back to the video's own track; any other missing file skips the entry."""
    if root is None:
        return None, None
    video = root / raw["video"] if raw.get("video") else root / AVHBENCH_VIDEO_DIR / f"{video_id}{VIDEO_SUFFIX}"
    if not video.is_file():
        raise _Skip(f"video file {video} does not exist")
    if raw.get("audio"):
        audio = root / raw["audio"]
        if not audio.is_file():
            raise _Skip(f"audio file {audio} does not exist")
        return video, audio
    audio = root / AVHBENCH_AUDIO_DIR / f"{video_id}{AUDIO_SUFFIX}"
    return video, audio if audio.is_file() else None


def _parse_entry(raw: Any, index: int, root: Path | None) -> ProbeItem:
    """One entry: AVHBench `{video_id, task, text, label}` (optionally with id / video / audio, as avsynth's
    yes/no files) or an avsynth caption entry `{video_id, prompt, caption, sound_objects, visual_objects, ...}`."""
    if not isinstance(raw, Mapping):
        raise _Skip(f"expected an object, got {type(raw).__name__}")
    video_id = str(raw.get("video_id", ""))
    if not video_id:
        raise _Skip("no 'video_id'")
    if "task" not in raw and "caption" in raw:  # avsynth caption entry
        raw = {**raw, "task": CAPTION_TASK, "text": raw.get("prompt"), "label": raw["caption"],
               "objects": [*raw.get("sound_objects", []), *raw.get("visual_objects", [])]}
    task = raw.get("task")
    if task not in AVHBENCH_TASKS:
        raise _Skip(f"unknown task {task!r} (known: {', '.join(AVHBENCH_TASKS)})")
    spec = AVHBENCH_TASKS[task]
    text, label = raw.get("text"), raw.get("label")
    if not isinstance(text, str) or not text.strip():
        raise _Skip("no question 'text'")
    if spec.kind == JUDGMENT and label not in (YES, NO):
        raise _Skip(f"label must be {YES!r} or {NO!r}, got {label!r}")
    if spec.kind == CAPTION and not isinstance(label, str):
        raise _Skip(f"a caption item needs its reference caption as 'label', got {label!r}")
    video, audio = _media(raw, video_id, root)
    item_id = str(raw["id"]) if raw.get("id") is not None else f"{index:05d}_{video_id}"
    objects = tuple(str(o) for o in raw.get("objects", []))
    return ProbeItem(item_id, video_id, task, text, label, spec.kind, spec.inputs, video, audio, objects)


def load_avhbench(
    path: str | Path,
    media_root: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    video_ids: Iterable[str] | None = None,
) -> ProbeSet:
    """Read an AVHBench question file (`qa_final_single_filtered.json`) or an avsynth yes/no or caption file.

    media_root: folder holding `videos/<video_id>.mp4` and `audios/<video_id>.wav` (AVHBench; the audio falls
        back to the video's own track) or the entries' own relative "video"/"audio" paths (avsynth). None: media
        are neither resolved nor checked (metrics-only use).
    tasks: keep only these tasks (unknown names are an error); video_ids: keep only the entries of these clips
        (entries that are not objects are dropped too); limit: the first `limit` entries kept.
    An entry with an unknown task, a malformed field or missing media is not fatal: it is returned in `skipped`
    with the reason, and the rest load. A file that cannot be read is a DatasetError.
    """
    from .datasets import DatasetError

    path = Path(path)
    if tasks is not None:
        unknown = [t for t in tasks if t not in AVHBENCH_TASKS]
        if unknown:
            raise DatasetError(f"unknown task {unknown[0]!r}; known: {', '.join(AVHBENCH_TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    root = None if media_root is None else Path(media_root)
    entries = list(enumerate(_read_json_list(path)))
    if tasks is not None:
        entries = [(i, e) for i, e in entries if not isinstance(e, Mapping) or e.get("task", CAPTION_TASK) in tasks]
    if video_ids is not None:
        wanted = {str(v) for v in video_ids}
        entries = [(i, e) for i, e in entries if isinstance(e, Mapping) and str(e.get("video_id", "")) in wanted]
    items, skipped, seen = [], [], set()
    for index, raw in entries[:limit]:
        try:
            item = _parse_entry(raw, index, root)
            if item.id in seen:
                raise _Skip(f"duplicate id {item.id!r}")
        except _Skip as why:
            get = raw.get if isinstance(raw, Mapping) else (lambda k, d=None: d)
            vid = str(get("video_id", ""))
            skipped.append(Skipped(str(get("id") or f"{index:05d}_{vid}"), vid, str(get("task", "")), str(why)))
            continue
        seen.add(item.id)
        items.append(item)
    return ProbeSet(items, skipped, str(path))


#: ids of a second (caption) file's items get this prefix when merged with a yes/no file (their ids may repeat)
CAPTIONS_PREFIX = "captions:"
MATCH_TASK = "AV Matching"


def disagreeing_clips(probes: ProbeSet) -> list[str]:
    """The clips whose audio and video disagree: those whose "AV Matching" question is labelled "No" (the main
    sound is not what is on screen, or nothing is), in file order. Clips without that question are not counted."""
    out: list[str] = []
    for it in probes.items:
        if it.task == MATCH_TASK and it.label == NO and it.video_id not in out:
            out.append(it.video_id)
    return out


def conflict_probes(
    yesno: str | Path,
    captions: str | Path | None = None,
    media_root: str | Path | None = None,
    max_probes: int | None = None,
    max_captions: int | None = None,
) -> ProbeSet:
    """The probe set of the clips where audio and video disagree (`disagreeing_clips`): the questions of those
    clips in `yesno` (AVHBench-format, e.g. avsynth's `<split>_yesno.json`: objects seen and heard, including the
    object heard but not seen and the reverse, and AV matching), the first `max_probes` of them, then the first
    `max_captions` caption items of the same clips in `captions` (ids prefixed `CAPTIONS_PREFIX`). The clips are
    chosen from the labels alone, so an item with missing media is reported in `skipped` instead of silently
    changing the set; the counts take prefixes in file order, so a larger count extends a smaller one."""
    clips = disagreeing_clips(load_avhbench(yesno))
    judged = load_avhbench(yesno, media_root, limit=max_probes, video_ids=clips)
    source = f"{judged.source} (clips where audio and video disagree)"
    if captions is None:
        return ProbeSet(judged.items, judged.skipped, source)
    described = load_avhbench(captions, media_root, limit=max_captions, video_ids=clips).prefixed(CAPTIONS_PREFIX)
    return ProbeSet(judged.items + described.items, judged.skipped + described.skipped,
                    f"{source} + {described.source}")


# ============================================================================================ object hallucination
#: extra surface words for the avsynth nouns (hand-made; a plural is added to every noun automatically)
AVSYNTH_SYNONYMS: dict[str, tuple[str, ...]] = {
    "cow": ("cattle", "bull", "calf"), "rooster": ("chicken", "hen", "cock"), "dog": ("puppy",),
    "cat": ("kitten",), "drum kit": ("drums", "drum set"), "telephone": ("phone",), "violin": ("fiddle",),
}
_PLURAL_ES = ("s", "sh", "ch", "x", "z")


def _plural(phrase: str) -> str:
    return phrase + ("es" if phrase.endswith(_PLURAL_ES) else "s")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@dataclass(frozen=True)
class ObjectVocabulary:
    """Object words: a lower-case phrase (one or more words) -> its canonical object."""

    phrases: Mapping[str, str]

    def __post_init__(self) -> None:
        bad = [p for p in self.phrases if " ".join(_words(p)) != p]
        if bad:
            raise ValueError(f"vocabulary phrases must be lower-case words separated by single spaces: {bad[:3]}")

    @classmethod
    def from_nouns(cls, nouns: Iterable[str],
                   synonyms: Mapping[str, Sequence[str]] | None = None) -> "ObjectVocabulary":
        """Each noun (and its plural) maps to itself; `synonyms[noun]` words (and plurals) map to the noun."""
        phrases: dict[str, str] = {}
        for noun in nouns:
            canon = " ".join(_words(noun))
            for p in (canon, *(" ".join(_words(s)) for s in (synonyms or {}).get(noun, ()))):
                phrases.setdefault(p, canon)
                phrases.setdefault(_plural(p), canon)
        return cls(phrases)

    @classmethod
    def avsynth(cls) -> "ObjectVocabulary":
        """The nouns of avsynth's 20 classes (`analyses.avsynth.CLASSES`) with `AVSYNTH_SYNONYMS`."""
        from .avsynth import CLASSES

        return cls.from_nouns([c.noun for c in CLASSES], AVSYNTH_SYNONYMS)

    @property
    def objects(self) -> set[str]:
        return set(self.phrases.values())

    def mentions(self, text: str) -> list[str]:
        """Canonical objects mentioned in `text`, unique, in order of first mention (longest phrase first, so
        "drum kit" is one mention, not "drum" + "kit")."""
        words = _words(text)
        longest = max((len(p.split()) for p in self.phrases), default=0)
        found: list[str] = []
        i = 0
        while i < len(words):
            for n in range(min(longest, len(words) - i), 0, -1):
                canon = self.phrases.get(" ".join(words[i:i + n]))
                if canon is not None:
                    if canon not in found:
                        found.append(canon)
                    i += n
                    break
            else:
                i += 1
        return found

    def canonical(self, names: Iterable[str]) -> list[str]:
        """Canonical objects of ground-truth names (nouns, class names such as "dog barking", or captions)."""
        out: list[str] = []
        for name in names:
            for obj in self.mentions(name):
                if obj not in out:
                    out.append(obj)
        return out


@dataclass(frozen=True)
class CaptionHallucination:
    """Objects a caption mentions, those not present (hallucinated), and the present ones."""

    mentioned: tuple[str, ...]
    hallucinated: tuple[str, ...]
    ground_truth: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in asdict(self).items()}


def caption_hallucination(caption: str, ground_truth: Iterable[str], vocab: ObjectVocabulary) -> CaptionHallucination:
    """CHAIR-style scoring of one caption: the vocabulary objects it mentions that are not in `ground_truth`."""
    gt = vocab.canonical(ground_truth)
    mentioned = vocab.mentions(caption)
    return CaptionHallucination(tuple(mentioned), tuple(o for o in mentioned if o not in gt), tuple(gt))


@dataclass(frozen=True)
class ChairMetrics:
    """CHAIR_s = captions with >= 1 hallucinated object / captions; CHAIR_i = hallucinated / mentioned objects
    (unique per caption); coverage = present objects mentioned / present objects. NaN when undefined."""

    n_captions: int
    chair_s: float
    chair_i: float
    coverage: float
    n_mentioned: int
    n_hallucinated: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def chair_metrics(scores: Sequence[CaptionHallucination]) -> ChairMetrics:
    n = len(scores)
    mentioned = sum(len(s.mentioned) for s in scores)
    halluc = sum(len(s.hallucinated) for s in scores)
    present = sum(len(s.ground_truth) for s in scores)
    covered = sum(len(set(s.mentioned) & set(s.ground_truth)) for s in scores)
    return ChairMetrics(n, sum(bool(s.hallucinated) for s in scores) / n if n else math.nan,
                        halluc / mentioned if mentioned else math.nan, covered / present if present else math.nan,
                        mentioned, halluc)


# ================================================================================================== bootstrap CIs
DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95
JUDGMENT_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
CHAIR_METRICS = ("chair_s", "chair_i", "coverage")


@dataclass(frozen=True)
class Estimate:
    """A metric with its percentile-bootstrap interval (resampling items with replacement, seeded)."""

    value: float
    low: float
    high: float
    n: int
    level: float
    seed: int
    n_boot: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] item indices drawn with `np.random.default_rng(seed)` (the same seed, the same draws)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), int)


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite draws (resamples where the metric is undefined are dropped)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ok = draws[np.isfinite(draws)]
    if ok.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def judgment_cis(pred: Sequence[str], gold: Sequence[str], n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                 level: float = DEFAULT_LEVEL) -> dict[str, Estimate]:
    """Every `binary_metrics` metric with a paired bootstrap CI (each resample recomputes all of them)."""
    point = binary_metrics(pred, gold).to_dict()
    draws = _judgment_draws(pred, gold, bootstrap_indices(len(pred), n_boot, seed))
    return {m: Estimate(point[m], *_interval(draws[m], level), len(pred), level, seed, n_boot)
            for m in JUDGMENT_METRICS}


def _judgment_draws(pred: Sequence[str], gold: Sequence[str], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every judgment metric on each resample `idx[b]` of the items."""
    p = np.array([x == YES for x in pred], dtype=bool)
    g = np.array([x == YES for x in gold], dtype=bool)
    P, G = p[idx], g[idx]
    tp, fp, fn = (P & G).sum(1), (P & ~G).sum(1), (~P & G).sum(1)
    n = max(len(p), 1)
    prec, rec = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": (P == G).sum(1) / n, "precision": prec, "recall": rec,
            "f1": _ratio(2 * prec * rec, prec + rec), "yes_ratio": P.sum(1) / n}


def chair_cis(scores: Sequence[CaptionHallucination], n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
              level: float = DEFAULT_LEVEL) -> dict[str, Estimate]:
    """CHAIR_s, CHAIR_i and coverage with a bootstrap CI over captions."""
    point = chair_metrics(scores).to_dict()
    draws = _chair_draws(scores, bootstrap_indices(len(scores), n_boot, seed))
    return {m: Estimate(point[m], *_interval(draws[m], level), len(scores), level, seed, n_boot) for m in CHAIR_METRICS}


def _chair_draws(scores: Sequence[CaptionHallucination], idx: np.ndarray) -> dict[str, np.ndarray]:
    """CHAIR_s, CHAIR_i and coverage on each resample `idx[b]` of the captions."""
    mentioned = np.array([len(s.mentioned) for s in scores])
    halluc = np.array([len(s.hallucinated) for s in scores])
    present = np.array([len(s.ground_truth) for s in scores])
    covered = np.array([len(set(s.mentioned) & set(s.ground_truth)) for s in scores])
    return {"chair_s": (halluc[idx] > 0).mean(1) if len(scores) else np.full(len(idx), np.nan),
            "chair_i": _ratio(halluc[idx].sum(1), mentioned[idx].sum(1)),
            "coverage": _ratio(covered[idx].sum(1), present[idx].sum(1))}


def paired_differences(
    draws_of: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    base_draws_of: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    n: int,
    metrics: Sequence[str],
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Estimate]:
    """method - baseline for each metric over the same n items, with a paired percentile-bootstrap CI: both are
    recomputed on the same resamples (`draws_of(idx)`; row 0 of `idx` is the identity, giving the point value)."""
    idx = np.vstack([np.arange(n)[None, :], bootstrap_indices(n, n_boot, seed)])
    a, b = draws_of(idx), base_draws_of(idx)
    return {m: Estimate(float(a[m][0] - b[m][0]), *_interval(a[m][1:] - b[m][1:], level), n, level, seed, n_boot)
            for m in metrics}


def accuracy_ci(correct: Sequence[bool], n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                level: float = DEFAULT_LEVEL) -> Estimate:
    """Accuracy of a list of hits with a bootstrap CI (the 20-way no-harm check)."""
    c = np.asarray(correct, dtype=float)
    value = float(c.mean()) if c.size else math.nan
    draws = c[bootstrap_indices(c.size, n_boot, seed)].mean(1) if c.size else np.full(n_boot, np.nan)
    return Estimate(value, *_interval(draws, level), int(c.size), level, seed, n_boot)


# ================================================================================================ the mitigation run
MITIGATION_DIR = "mitigation"
RECORDS_FILE = "records.jsonl"
TABLE_MD, TABLE_JSON, PLOT_PNG = "mitigation_table.md", "mitigation_table.json", "mitigation_vs_strength.png"
#: how a negative for contrastive decoding removes a modality, and how a task's unimodal input is made (§2.4)
DROP_CORRUPTION = {"audio": "zero_audio", "video": "black_frames"}
INPUT_CORRUPTION: dict[str, str | None] = {"av": None, "audio": "black_frames", "video": "zero_audio"}
MC_PREFIX = "mc:"
SKIP, MC = "skip", "mc"


@dataclass(frozen=True)
class MitigationSettings:
    """Everything besides the methods that shapes a run's records (stored in settings.json; resumes must match).

    k_divide / split_rule: how the sink sets are found (`mitigate.find_sink_sets`; official guidance: 3).
    max_new_tokens: caption length. cost_tokens / cost_items: a greedy generation of exactly `cost_tokens`
    tokens per method on the first `cost_items` yes/no items, to measure the cost per generated token (0: off).
    prompt_suffix: appended to every question (e.g. " Answer yes or no."; AVHBench asks the bare question).
    """

    seed: int = 0
    n_boot: int = DEFAULT_N_BOOT
    level: float = DEFAULT_LEVEL
    k_divide: int = mitigate.OFFICIAL_GUIDANCE_K_DIVIDE
    split_rule: str = "official"
    max_new_tokens: int = 32
    cost_tokens: int = 4
    cost_items: int = 2
    prompt_suffix: str = ""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.cost_tokens < 0 or self.cost_items < 0 or self.n_boot < 1:
            raise ValueError("max_new_tokens and n_boot must be >= 1, cost_tokens and cost_items >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def item_seed(seed: int, item_id: str) -> int:
    """A per-item seed (for the random token-set control), stable across runs and platforms."""
    return zlib.crc32(f"{seed}:{item_id}".encode())


def _requirements(methods: Sequence[mitigate.Method]) -> tuple[bool, set[str]]:
    """(do the methods need sink sets, which modality-dropped negatives they need)."""
    need_sinks = any(isinstance(m, (mitigate.Amplify, mitigate.Guidance)) for m in methods)
    drops: set[str] = set()
    for m in methods:
        if isinstance(m, mitigate.Contrastive):
            drops |= {"audio", "video"} if m.drop == "both" else {m.drop}
    return need_sinks, drops


def prepare_sample(rt: Any, video: Any, audio: Any, inputs_kind: str, prompt: str,
                   methods: Sequence[mitigate.Method], settings: MitigationSettings,
                   seed: int) -> mitigate.MitigationSample:
    """Load the clip, restrict it to the task's input modality, process it with `prompt`, and add what the
    methods need: negatives with a modality removed (contrastive) and the sink sets (amplify, guidance)."""
    from hooked_av import corrupt, media

    raw = media.load_av(str(video), audio=str(audio) if audio is not None else None)
    if INPUT_CORRUPTION[inputs_kind] is not None:
        raw = corrupt.corrupt(raw, INPUT_CORRUPTION[inputs_kind])
    inputs = rt.process(raw, prompt)
    need_sinks, drops = _requirements(methods)
    negatives = {}
    for d in sorted(drops):
        negatives[d] = rt.process(corrupt.corrupt(raw, DROP_CORRUPTION[d]), prompt)
        corrupt.check_same_layout(inputs, negatives[d])
    sink_sets = (mitigate.find_sink_sets(rt.model, inputs, settings.k_divide, settings.split_rule)
                 if need_sinks else None)
    sample = mitigate.MitigationSample(inputs, negatives, sink_sets, seed)
    for which in ("inputs", *sorted(drops)):  # the towers run here, once, outside the methods' timings
        sample.embeddings(rt.model, which)
    return sample


def _preparation_errors() -> tuple[type[BaseException], ...]:
    """Errors of one item's media that skip the item instead of stopping the run."""
    from hooked_av.inputs import LayoutError
    from hooked_av.media import MediaError

    return (MediaError, LayoutError, OSError)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _judge(rt: Any, methods: Sequence[mitigate.Method], sample: mitigate.MitigationSample,
           yes: scoring.AnswerCandidates, no: scoring.AnswerCandidates, cost_tokens: int) -> dict[str, Any]:
    out = {}
    for m in methods:
        scores, seconds = _timed(lambda: m.scores(rt.model, sample))
        p_yes, p_no = (float(scoring.candidate_prob(scores[0], c)) for c in (yes, no))
        out[m.key] = {"p_yes": p_yes, "p_no": p_no, "pred": YES if p_yes > p_no else NO, "seconds": seconds}
        if cost_tokens:
            gen = m.generate(rt.model, sample, max_new_tokens=cost_tokens, stop_at_eos=False)
            out[m.key]["cost"] = gen.cost.to_dict()
    return out


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Token ids to text, without special tokens when the tokenizer supports it."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    except TypeError:
        return tokenizer.decode(list(ids)).strip()


def _describe(rt: Any, methods: Sequence[mitigate.Method], sample: mitigate.MitigationSample,
              ground_truth: Sequence[str], vocab: ObjectVocabulary, max_new_tokens: int) -> dict[str, Any]:
    out = {}
    eos = rt.model.eos_ids()
    for m in methods:
        gen = m.generate(rt.model, sample, max_new_tokens=max_new_tokens)
        ids = [t for t in gen.new_tokens[0, : int(gen.n_steps[0])].tolist() if t not in eos]
        text = decode_text(rt.tokenizer, ids)
        out[m.key] = {"text": text, **caption_hallucination(text, ground_truth, vocab).to_dict(),
                      "cost": gen.cost.to_dict()}
    return out


def _choose(rt: Any, methods: Sequence[mitigate.Method], sample: mitigate.MitigationSample,
            choices: Mapping[str, scoring.AnswerCandidates], label: str) -> dict[str, Any]:
    out = {}
    for m in methods:
        scores, seconds = _timed(lambda: m.scores(rt.model, sample))
        probs = {letter: float(scoring.candidate_prob(scores[0], c)) for letter, c in choices.items()}
        pred = max(probs, key=probs.get)
        out[m.key] = {"pred": pred, "correct": pred == label, "seconds": seconds}
    return out


def _skip_record(s: Skipped) -> dict[str, Any]:
    return {"kind": SKIP, **s.to_dict()}


def run_mitigation(
    rt: Any,
    probes: ProbeSet,
    methods: Sequence[mitigate.Method],
    out: str | Path,
    settings: MitigationSettings = MitigationSettings(),
    mc_samples: Sequence[Any] = (),
    run_info: Mapping[str, Any] | None = None,
    resume: bool = True,
    vocab: ObjectVocabulary | None = None,
    progress: bool = True,
) -> Path:
    """Run `methods` on every probe (yes/no scoring; captions generated and scored) and on `mc_samples`
    (official MC samples, `datasets.load_vggsound_mc`: 20-way accuracy), one JSON line per item in
    `out/mitigation/records.jsonl`; resumes where it stopped. `rt`: model, tokenizer and `process(raw, prompt)`
    (an `analyses.runtime.Runtime`). Items skipped by the loader or whose media fail are recorded as skips."""
    from .datasets import official_prompt
    from .records import RecordStore, write_settings

    if not methods:
        raise ValueError("no methods to run")
    keys = [m.key for m in methods]
    if len(set(keys)) != len(keys):
        raise ValueError(f"methods must differ: {keys}")
    folder = Path(out) / MITIGATION_DIR
    vocab = vocab or ObjectVocabulary.avsynth()
    write_settings(folder, {"run": dict(run_info or {}), "methods": [m.to_dict() for m in methods],
                            **settings.to_dict(), "probes": probes.source, "n_probes": len(probes.items),
                            "n_mc": len(mc_samples), "vocabulary": sorted(vocab.objects)}, resume=resume)
    store = RecordStore(folder / RECORDS_FILE, resume=resume)
    for s in probes.skipped:
        if s.id not in store:
            store.append(_skip_record(s))
    yes, no = (scoring.AnswerCandidates.from_tokenizer(rt.tokenizer, w) for w in (YES, NO))
    judged = 0
    for item in tqdm(probes.items, desc="mitigation", disable=not progress):
        is_costed = item.kind == JUDGMENT and judged < settings.cost_items
        judged += item.kind == JUDGMENT
        if item.id in store:
            continue
        store.append(_probe_record(rt, item, methods, settings, vocab, yes, no, is_costed))
    for s in tqdm(mc_samples, desc="20-way", disable=not progress):
        rid = MC_PREFIX + s.sample_id
        if rid in store:
            continue
        choices = {L: scoring.AnswerCandidates.from_tokenizer(rt.tokenizer, L) for L in s.choices}
        video = list(map(str, s.video)) if isinstance(s.video, tuple) else s.video
        base = {"id": rid, "video_id": s.sample_id, "task": "20-way MC"}
        try:
            sample = prepare_sample(rt, video, s.audio, "av", official_prompt(s.choices, 1), methods, settings,
                                    item_seed(settings.seed, rid))
        except _preparation_errors() as e:
            store.append({"kind": SKIP, **base, "reason": str(e)})
            continue
        store.append({**base, "kind": MC, "label": s.label, "methods": _choose(rt, methods, sample, choices, s.label)})
    return store.path


def _probe_record(rt: Any, item: ProbeItem, methods: Sequence[mitigate.Method], settings: MitigationSettings,
                  vocab: ObjectVocabulary, yes: scoring.AnswerCandidates, no: scoring.AnswerCandidates,
                  costed: bool) -> dict[str, Any]:
    base = {"id": item.id, "video_id": item.video_id, "task": item.task}
    if item.video is None:
        return {"kind": SKIP, **base, "reason": "no media root was given, so the item has no video"}
    seed = item_seed(settings.seed, item.id)
    try:
        sample, prep = _timed(lambda: prepare_sample(rt, item.video, item.audio, item.inputs,
                                                     item.text + settings.prompt_suffix, methods, settings, seed))
    except _preparation_errors() as e:
        return {"kind": SKIP, **base, "reason": str(e)}
    record = {**base, "kind": item.kind, "label": item.label, "seed": seed, "prep_seconds": prep,
              "sinks": sample.sinks.to_dict() if sample.sinks is not None else None}
    if item.kind == JUDGMENT:
        record["methods"] = _judge(rt, methods, sample, yes, no, settings.cost_tokens if costed else 0)
    else:
        truth = [*item.objects, item.label]  # given objects plus those of the reference caption (CHAIR's rule)
        record["objects"] = vocab.canonical(truth)
        record["methods"] = _describe(rt, methods, sample, truth, vocab, settings.max_new_tokens)
    return record


# ========================================================================================== summary and report
def _family(key: str) -> str:
    return key.rsplit("@", 1)[0]


def _cost(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
    """Seconds per scored item, and per generated token / decoder passes per token over every generation; the
    same over the timed fixed-length generations only (`cost_tokens` tokens on the first `cost_items` yes/no
    items: the same items and token counts for every method, so the comparable measure of cost)."""
    scored = [r["methods"][key]["seconds"] for r in records if r["kind"] in (JUDGMENT, MC)]
    costs = [r["methods"][key]["cost"] for r in records if "cost" in r["methods"][key]]
    fixed = [r["methods"][key]["cost"] for r in records if r["kind"] == JUDGMENT and "cost" in r["methods"][key]]
    tokens, fixed_tokens = sum(c["n_tokens"] for c in costs), sum(c["n_tokens"] for c in fixed)
    return {"seconds_per_item": float(np.mean(scored)) if scored else math.nan,
            "seconds_per_token": sum(c["seconds"] for c in costs) / tokens if tokens else math.nan,
            "passes_per_token": sum(c["passes"] for c in costs) / tokens if tokens else math.nan,
            "n_generated_tokens": tokens,
            "timed_seconds_per_token": sum(c["seconds"] for c in fixed) / fixed_tokens if fixed_tokens else math.nan,
            "timed_passes_per_token": sum(c["passes"] for c in fixed) / fixed_tokens if fixed_tokens else math.nan,
            "n_timed_tokens": fixed_tokens}


def _relative_cost(cost: Mapping[str, float], plain: Mapping[str, float]) -> dict[str, float]:
    """Seconds and passes per generated token relative to plain decoding, from the timed fixed-length generations
    (every generation when there are none)."""
    timed = "timed_" if cost["n_timed_tokens"] and plain["n_timed_tokens"] else ""

    def ratio(name: str) -> float:
        a, b = cost[timed + name], plain[timed + name]
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan

    return {"seconds_per_token_vs_plain": ratio("seconds_per_token"),
            "passes_per_token_vs_plain": ratio("passes_per_token"), "vs_plain_from": timed.rstrip("_") or "all"}


def _versus(key: str, base: str, records: Sequence[Mapping[str, Any]], n_boot: int, seed: int,
            level: float) -> dict[str, dict[str, float]]:
    """Method `key` minus method `base` on every judgment and CHAIR metric over the same items, with paired
    bootstrap CIs (`paired_differences`)."""
    out: dict[str, dict[str, float]] = {}
    judged = [r for r in records if r["kind"] == JUDGMENT]
    if judged:
        gold = [r["label"] for r in judged]

        def judgments(k: str) -> Callable[[np.ndarray], Mapping[str, np.ndarray]]:
            pred = [r["methods"][k]["pred"] for r in judged]
            return lambda idx: _judgment_draws(pred, gold, idx)

        diffs = paired_differences(judgments(key), judgments(base), len(judged), JUDGMENT_METRICS, n_boot, seed, level)
        out.update({m: e.to_dict() for m, e in diffs.items()})
    captions = [r for r in records if r["kind"] == CAPTION]
    if captions:
        def chair(k: str) -> Callable[[np.ndarray], Mapping[str, np.ndarray]]:
            scores = [_caption_score(r, k) for r in captions]
            return lambda idx: _chair_draws(scores, idx)

        diffs = paired_differences(chair(key), chair(base), len(captions), CHAIR_METRICS, n_boot, seed, level)
        out.update({m: e.to_dict() for m, e in diffs.items()})
    return out


def _caption_score(record: Mapping[str, Any], key: str) -> CaptionHallucination:
    m = record["methods"][key]
    return CaptionHallucination(tuple(m["mentioned"]), tuple(m["hallucinated"]), tuple(m["ground_truth"]))


def _method_row(method: mitigate.Method, records: Sequence[Mapping[str, Any]], n_boot: int, seed: int,
                level: float) -> dict[str, Any]:
    key = method.key
    judged = [r for r in records if r["kind"] == JUDGMENT]
    captions = [r for r in records if r["kind"] == CAPTION]
    mcs = [r for r in records if r["kind"] == MC]
    row: dict[str, Any] = {"method": key, "family": _family(key), "knob_name": method.knob_name,
                           "knob": method.knob, "n_judgments": len(judged), "n_captions": len(captions),
                           "n_mc": len(mcs), "spec": method.to_dict()}
    if judged:
        pred, gold = [r["methods"][key]["pred"] for r in judged], [r["label"] for r in judged]
        row["judgment"] = {m: e.to_dict() for m, e in judgment_cis(pred, gold, n_boot, seed, level).items()}
        tasks = sorted({r["task"] for r in judged})
        row["by_task"] = {t: binary_metrics([p for p, r in zip(pred, judged) if r["task"] == t],
                                            [g for g, r in zip(gold, judged) if r["task"] == t]).to_dict()
                          for t in tasks}
    if captions:
        scores = [_caption_score(r, key) for r in captions]
        row["chair"] = {m: e.to_dict() for m, e in chair_cis(scores, n_boot, seed, level).items()}
    if mcs:
        row["mc_accuracy"] = accuracy_ci([r["methods"][key]["correct"] for r in mcs], n_boot, seed, level).to_dict()
    row["cost"] = _cost(records, key)
    return row


def summarize_mitigation(out: str | Path) -> dict[str, Any]:
    """Per method: judgment metrics (overall with bootstrap CIs, and per task), CHAIR, 20-way accuracy, costs;
    plus the skipped items. When the run has the plain method, every other row also has `vs_plain` (the method
    minus plain on each judgment and CHAIR metric, paired bootstrap CI) and its cost per generated token relative
    to plain (`cost["seconds_per_token_vs_plain"]`, `cost["passes_per_token_vs_plain"]`). The bootstrap seed,
    draws and level are the run's settings (recorded)."""
    from .records import RecordStore

    folder = Path(out) / MITIGATION_DIR
    settings_path = folder / "settings.json"
    if not settings_path.is_file():
        raise FileNotFoundError(f"{settings_path}: no mitigation run in {out} (run `hooked-av mitigate` first)")
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    records = RecordStore(folder / RECORDS_FILE).read()
    done = [r for r in records if r["kind"] != SKIP]
    methods = [mitigate.method_from_dict(d) for d in settings["methods"]]
    boot = (settings["n_boot"], settings["seed"], settings["level"])
    rows = [_method_row(m, done, *boot) for m in methods]
    plain = next((r for m, r in zip(methods, rows) if isinstance(m, mitigate.Plain)), None)
    for row in rows if plain is not None else ():
        row["cost"].update(_relative_cost(row["cost"], plain["cost"]))
        if row is not plain:
            row["vs_plain"] = _versus(row["method"], plain["method"], done, *boot)
    return {"seed": settings["seed"], "n_boot": settings["n_boot"], "level": settings["level"],
            "n_records": len(done), "skipped": [r for r in records if r["kind"] == SKIP], "rows": rows,
            "settings": settings}


def _fmt(est: Mapping[str, float] | None, digits: int = 3) -> str:
    if not est or not math.isfinite(est["value"]):
        return "\u2013"
    ci = "" if not math.isfinite(est["low"]) else f" [{est['low']:.{digits - 1}f}, {est['high']:.{digits - 1}f}]"
    return f"{est['value']:.{digits}f}{ci}"


def _num(x: float, scale: float = 1.0, digits: int = 1) -> str:
    return "\u2013" if not math.isfinite(x) else f"{x * scale:.{digits}f}"


def mitigation_table_markdown(summary: Mapping[str, Any]) -> str:
    """One row per method: judgment metrics, CHAIR, 20-way accuracy (value [95 % CI]) and costs (with the time
    per generated token relative to plain decoding when the run has plain); then, with plain, the difference
    of each method from plain (`difference_table_markdown`)."""
    head = ["method", "n", "accuracy", "precision", "recall", "F1", "yes-ratio", "CHAIR_s", "CHAIR_i",
            "20-way acc", "ms/item", "ms/token", "passes/token", "time/token vs plain"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in summary["rows"]:
        j, c, cost = r.get("judgment", {}), r.get("chair", {}), r["cost"]
        relative = cost.get("seconds_per_token_vs_plain", math.nan)
        cells = [r["method"], str(r["n_judgments"] + r["n_captions"] + r["n_mc"]),
                 *(_fmt(j.get(m)) for m in JUDGMENT_METRICS), _fmt(c.get("chair_s")), _fmt(c.get("chair_i")),
                 _fmt(r.get("mc_accuracy")), _num(cost["seconds_per_item"], 1e3), _num(cost["seconds_per_token"], 1e3),
                 _num(cost["passes_per_token"], digits=2), "\u2013" if not math.isfinite(relative) else f"{relative:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Bootstrap {summary['level']:.0%} CIs over items, {summary['n_boot']} draws, seed {summary['seed']}.",
             "ms/token and passes/token: over every generation (captions and timed generations); time/token vs "
             "plain: wall time per generated token relative to plain decoding, over the timed fixed-length "
             "generations (the same items and token counts for every method; prefill included).",
             f"{len(summary['skipped'])} items skipped (see {TABLE_JSON})."]
    text = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    if any("vs_plain" in r for r in summary["rows"]):
        text += "\n" + difference_table_markdown(summary)
    return text


#: (metric, better when the difference is positive) for the verdicts of `mitigation_verdicts`
VERDICT_METRICS: tuple[tuple[str, bool], ...] = (("accuracy", True), ("f1", True), ("chair_s", False),
                                                 ("chair_i", False))


#: metrics with no better side (a bias, not a quality): a resolved shift is reported beside the verdict
SHIFT_METRICS: tuple[str, ...] = ("yes_ratio",)


def mitigation_verdicts(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method (rows with `vs_plain`): "helps" when some metric's paired CI against plain lies entirely on the
    better side (accuracy / F1 up, CHAIR down) and none on the worse side, "hurts" for the reverse, "mixed" for
    both, "no resolved difference" otherwise; with the metrics that decided it, and `shifted`: the metrics without
    a better side (yes-ratio) whose CI excludes 0, with the direction ("yes_ratio down")."""
    out: dict[str, dict[str, Any]] = {}
    for r in summary["rows"]:
        if "vs_plain" not in r:
            continue
        better, worse = [], []
        for m, up in VERDICT_METRICS:
            e = r["vs_plain"].get(m)
            if not e or not (math.isfinite(e["low"]) and math.isfinite(e["high"])):
                continue
            if e["low"] > 0 or e["high"] < 0:
                (better if (e["low"] > 0) == up else worse).append(m)
        verdict = ("mixed" if better and worse else "helps" if better else "hurts" if worse
                   else "no resolved difference")
        shifted = [f"{m} {'up' if e['low'] > 0 else 'down'}" for m in SHIFT_METRICS
                   if (e := r["vs_plain"].get(m)) and (e["low"] > 0 or e["high"] < 0)]
        out[r["method"]] = {"verdict": verdict, "better": better, "worse": worse, "shifted": shifted}
    return out


DIFFERENCE_METRICS: tuple[tuple[str, str], ...] = (("accuracy", "accuracy"), ("f1", "F1"), ("yes_ratio", "yes-ratio"),
                                                   ("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"))


def difference_table_markdown(summary: Mapping[str, Any]) -> str:
    """Each method minus plain (paired bootstrap CI over the same items): accuracy, F1, yes-ratio, CHAIR_s,
    CHAIR_i; and the passes per generated token relative to plain."""
    head = ["method", *(label for _, label in DIFFERENCE_METRICS), "passes/token vs plain"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in summary["rows"]:
        if "vs_plain" not in r:
            continue
        passes = r["cost"].get("passes_per_token_vs_plain", math.nan)
        cells = [r["method"], *(_signed(r["vs_plain"].get(m)) for m, _ in DIFFERENCE_METRICS),
                 "\u2013" if not math.isfinite(passes) else f"{passes:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return ("Difference from plain decoding (method - plain on the same items; paired bootstrap "
            f"{summary['level']:.0%} CI, {summary['n_boot']} draws, seed {summary['seed']}; a CI that excludes 0 "
            "marks a difference these items resolve):\n\n" + "\n".join(lines) + "\n")


def _signed(est: Mapping[str, float] | None, digits: int = 3) -> str:
    if not est or not math.isfinite(est["value"]):
        return "\u2013"
    ci = "" if not math.isfinite(est["low"]) else f" [{est['low']:+.{digits - 1}f}, {est['high']:+.{digits - 1}f}]"
    return f"{est['value']:+.{digits}f}{ci}"


PLOT_METRICS: tuple[tuple[str, str, str], ...] = (
    *(("judgment", m, m.replace("_", "-")) for m in JUDGMENT_METRICS),
    ("chair", "chair_s", "CHAIR_s"), ("chair", "chair_i", "CHAIR_i"), ("mc", "mc_accuracy", "20-way accuracy"),
)
PLOT_COLUMNS = 4
PANEL_SCALE = 0.7  # of report.FIGSIZE_PANEL's width: four panels per row stay readable


def _metric(row: Mapping[str, Any], group: str, name: str) -> Mapping[str, float] | None:
    return row.get("mc_accuracy") if group == "mc" else row.get(group, {}).get(name)


def plot_mitigation(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Each metric against the method's strength (alpha, beta, guidance strength), one line per method family
    starting from the plain model at 0, with the bootstrap CIs as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .report import DPI, FIGSIZE_PANEL, save_figure

    rows = summary["rows"]
    metrics = [m for m in PLOT_METRICS if any(_metric(r, m[0], m[1]) for r in rows)]
    if not metrics:
        raise ValueError("nothing to plot: the run has no finished item")
    n_rows = math.ceil(len(metrics) / PLOT_COLUMNS)
    n_cols = min(PLOT_COLUMNS, len(metrics))
    fig = Figure(figsize=(FIGSIZE_PANEL[0] * n_cols * PANEL_SCALE, FIGSIZE_PANEL[1] * n_rows), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    plain = [r for r in rows if r["family"] == "plain"]
    families = sorted({r["family"] for r in rows} - {"plain"})
    for ax, (group, name, label) in zip(axes, metrics):
        for fam in families:
            pts = sorted(([(0.0, _metric(p, group, name)) for p in plain] +
                          [(r["knob"], _metric(r, group, name)) for r in rows if r["family"] == fam]),
                         key=lambda kv: kv[0])
            pts = [(x, e) for x, e in pts if e and math.isfinite(e["value"])]
            if not pts:
                continue
            xs, ys = [x for x, _ in pts], [e["value"] for _, e in pts]
            err = [[max(0.0, e["value"] - e["low"]) if math.isfinite(e["low"]) else 0.0 for _, e in pts],
                   [max(0.0, e["high"] - e["value"]) if math.isfinite(e["high"]) else 0.0 for _, e in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=fam)
        ax.set_title(label)
        ax.set_xlabel("strength (alpha / beta / guidance)")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if families:
        axes[0].legend(fontsize="small")
    return save_figure(fig, path)


def write_mitigation_report(out: str | Path) -> dict[str, Path]:
    """The table (Markdown and JSON) and the plot of a mitigation run, in `out/mitigation/`."""
    from .records import atomic_write_text

    summary = summarize_mitigation(out)
    folder = Path(out) / MITIGATION_DIR
    paths = {"table_md": atomic_write_text(folder / TABLE_MD, mitigation_table_markdown(summary)),
             "table_json": atomic_write_text(folder / TABLE_JSON, json.dumps(summary, indent=2) + "\n")}
    if summary["n_records"]:
        paths["plot"] = plot_mitigation(summary, folder / PLOT_PNG)
    return paths
