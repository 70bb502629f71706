"""Read and write the file formats of the official crossmodal-hub code, and reproduce two of its computations.

The paper "Probing Cross-modal Information Hubs in Audio-Visual LLMs" ships its code at
github.com/kaistmm/crossmodal-hub (read at HEAD 7e16842; described in docs/METHOD.md). Formats covered,
byte-compatible with what that code writes:

- stage-1 JSONL (``infer_with_prob.py``, METHOD §3.4): one :class:`Stage1Record` per line, answer probabilities of the
  clean (``av``) run or of a unimodal run (``v`` / ``a``). The files are named ``*.json`` but are JSONL.
- stage-2 JSONL (``causal_tracing_modality_sink*.py``, METHOD §7.7): one :class:`Stage2Record` per line, restored
  probabilities after patching a token subset.
- MDS history JSON (METHOD §5): ``{"<token position>": {"mds": [...], "v_score": [...], "a_score": [...]}}`` with one
  value per layer, written with ``json.dump(indent=4)`` at ``<root>/k_divde_<N>/<video_id>_history.json``
  (the ``divde`` typo is the official folder name, kept so the official stage-2 scripts find our files).

Computations reproduced exactly (same float operations, same order):

- :func:`ie_from_records` / :func:`ie_summary`: the indirect effects of ``preprocess/step2/causal_effect.py``
  (METHOD §8);
- :func:`split_sinks`: the unimodal / cross-modal median split of ``build_layerlist`` (METHOD §5 "Split");
- :func:`stage2_from_stage1` / :func:`stage2_from_stage1_runs`: the stage-1 -> stage-2 field mapping of
  ``preprocess/step1/output2input_{people,sports}.py`` (METHOD §6).

JSONL policy. Readers return every line (re-runs that appended duplicates are kept, as the official readers do) and
skip blank lines. A final line that is not valid JSON *and has no trailing newline* is what a killed run leaves; it is
dropped with a :class:`TruncatedLineWarning`. Any other invalid line, a missing or unexpected field, or a value of the
wrong type raises :class:`OfficialFormatError` naming file, line and field. :func:`append_jsonl` writes one complete,
flushed and fsynced line per call, and first repairs such a truncated tail, so a resumed run never glues a new record
onto half a line. :func:`write_jsonl` and :func:`write_history` replace the file atomically
(temp file + ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .records import atomic_write_text

__all__ = [
    "OfficialFormatError", "TruncatedLineWarning", "Stage1Record", "Stage2Record", "SinkHistory", "IEResult",
    "read_stage1", "read_stage2", "write_jsonl", "append_jsonl", "read_history", "write_history", "history_path",
    "official_video_id", "stage1_join_key", "ie_from_records", "ie_summary", "split_sinks", "stage2_from_stage1",
    "stage2_from_stage1_runs", "official_vggsound_layout",
]

HISTORY_DIR_PREFIX = "k_divde_"  # official folder name, typo included (infer_with_prob.py writes, stage 2 reads it)
HISTORY_SUFFIX = "_history.json"
HISTORY_INDENT = 4  # json.dump(history, f, indent=4)
HISTORY_FIELDS = ("mds", "v_score", "a_score")
# stage 2 writes content[0].get("audio", "unknown_audio") and the step-2 inputs have no audio entry
STAGE2_UNKNOWN_AUDIO = "unknown_audio"
IE_SCALE = 100.0  # causal_effect.py prints mean differences x100, i.e. percentage points
OFFICIAL_IE_THRESHOLD = 32256  # compute_means_and_layerlen default (= 28 * 1152); run_analysis passes None (no filter)
CLIP_Q_LOW, CLIP_Q_HIGH = 0.0, 1.0  # _clip_by_quantile bounds as called: keeps [min, max], i.e. a no-op
DOMINANT_MODALITIES = ("audio", "video")
SUBSET_DOMINANT = {"people": "audio", "sports": "video"}  # METHOD §2.3: people_case_2 / sports_case_1
# The corrupted run zeroes the dominant modality, so it is named after the modality it keeps (METHOD §2.3, §6):
# audio-dominant (people) -> the "v" run and letter, video-dominant (sports) -> the "a" run and letter.
_CORRUPT_RUN_LETTER = {"audio": "v", "video": "a"}
# default VGGSound layout of Qwen2.5-Omni with use_audio_in_video=True (METHOD §2.5)
VGGSOUND_PREFIX_TOKENS = 16
VGGSOUND_CHUNKS = 5
VGGSOUND_VIDEO_PER_CHUNK = 288  # 2 temporal grids x 9x16 merged patches
VGGSOUND_AUDIO_PER_CHUNK = 50  # 25 tokens/s x 2 s per chunk


class OfficialFormatError(ValueError):
    """A file does not follow the official format; the message names the file, the line (or key) and the field."""


class TruncatedLineWarning(UserWarning):
    """A JSONL file ends in an unterminated, unparsable line (a killed run); that line was ignored."""


# ----------------------------------------------------------------------------------------------------------------------
# field checks


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_video(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, list) and len(x) > 0 and all(isinstance(p, str) for p in x))


def _is_choices(x: Any) -> bool:
    return x is None or (isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items()))


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


_Check = tuple[Callable[[Any], bool], str]
_STR: _Check = (lambda x: isinstance(x, str), "a string")
_OPT_STR: _Check = (_opt(lambda x: isinstance(x, str)), "a string or null")
_INT: _Check = (_is_int, "an integer")
_NUM: _Check = (_is_num, "a number")
_OPT_NUM: _Check = (_opt(_is_num), "a number or null")
_VIDEO: _Check = (_is_video, "a path or a non-empty list of frame paths")
_CHOICES: _Check = (_is_choices, "an object of letter -> class name, or null")


def _validate(raw: Any, spec: Mapping[str, _Check], where: str, optional: frozenset[str] = frozenset()) -> None:
    if not isinstance(raw, dict):
        raise OfficialFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in spec if k not in raw and k not in optional]
    if missing:
        raise OfficialFormatError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                                  + ", ".join(repr(k) for k in missing))
    extra = [k for k in raw if k not in spec]
    if extra:
        raise OfficialFormatError(f"{where}: unexpected field{'s' if len(extra) > 1 else ''} "
                                  + ", ".join(repr(k) for k in extra))
    for key, (check, wanted) in spec.items():
        if key in raw and not check(raw[key]):
            value = repr(raw[key])
            value = value if len(value) <= 40 else value[:37] + "..."
            raise OfficialFormatError(f"{where}: field {key!r} must be {wanted}, got {type(raw[key]).__name__} {value}")


# ----------------------------------------------------------------------------------------------------------------------
# records


@dataclass
class Stage1Record:
    """One line of a stage-1 JSONL (METHOD §3.4); fields in the official key order.

    ``video`` is the folder id for ``av`` runs on frame lists, else the original mp4 path or frame list. The three
    letters come from the input JSON (not from this run's output); ``*_prob`` is this run's probability of that letter.
    """

    id: int
    video: str | list[str]
    audio_path: str
    label: str | None
    label_name: str | None
    choices: dict[str, str] | None
    text: str | None
    text_output: str
    av: str
    av_prob: float
    v: str
    v_prob: float
    a: str
    a_prob: float

    @classmethod
    def from_dict(cls, raw: Any, where: str = "stage-1 record") -> Stage1Record:
        """Validate a parsed JSON object; ``where`` prefixes error messages (e.g. ``"file.json line 3"``)."""
        _validate(raw, _STAGE1_SPEC, where)
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Stage2Record:
    """One line of a stage-2 JSONL (METHOD §7.7); fields in the official key order.

    The four ``correct_*/corrupt_*`` probabilities are copied from stage 1 (hence nullable: stage 2 reads them with
    ``.get``); ``restored_*`` are measured on the patched run. ``layerlist_len`` = number of (position, layer) pairs
    patched (28 x |S|); it is ``None`` when the line has no such key (older runs), and is then omitted on writing.
    """

    id: int
    video: str | list[str]
    audio_path: str
    label: str | None
    label_name: str | None
    correct_pred: str | None
    corrupt_pred: str | None
    restored_pred: str
    correct_correct_word_prob: float | None
    correct_corrupt_word_prob: float | None
    corrupt_correct_word_prob: float | None
    corrupt_corrupt_word_prob: float | None
    restored_correct_word_prob: float
    restored_corrupt_word_prob: float
    layerlist_len: int | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "stage-2 record") -> Stage2Record:
        """Validate a parsed JSON object; ``where`` prefixes error messages (e.g. ``"file.json line 3"``)."""
        _validate(raw, _STAGE2_SPEC, where, optional=frozenset({"layerlist_len"}))
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["layerlist_len"] is None:
            del out["layerlist_len"]
        return out


_STAGE1_SPEC: dict[str, _Check] = {
    "id": _INT, "video": _VIDEO, "audio_path": _STR, "label": _OPT_STR, "label_name": _OPT_STR, "choices": _CHOICES,
    "text": _OPT_STR, "text_output": _STR, "av": _STR, "av_prob": _NUM, "v": _STR, "v_prob": _NUM, "a": _STR,
    "a_prob": _NUM,
}
_STAGE2_SPEC: dict[str, _Check] = {
    "id": _INT, "video": _VIDEO, "audio_path": _STR, "label": _OPT_STR, "label_name": _OPT_STR,
    "correct_pred": _OPT_STR, "corrupt_pred": _OPT_STR, "restored_pred": _STR,
    "correct_correct_word_prob": _OPT_NUM, "correct_corrupt_word_prob": _OPT_NUM,
    "corrupt_correct_word_prob": _OPT_NUM, "corrupt_corrupt_word_prob": _OPT_NUM,
    "restored_correct_word_prob": _NUM, "restored_corrupt_word_prob": _NUM, "layerlist_len": _INT,
}
assert tuple(_STAGE1_SPEC) == tuple(f.name for f in dataclasses.fields(Stage1Record))
assert tuple(_STAGE2_SPEC) == tuple(f.name for f in dataclasses.fields(Stage2Record))


# ----------------------------------------------------------------------------------------------------------------------
# JSONL IO


def _iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """Yield ``("<name> line <n>", parsed object)`` per non-blank line, applying the truncated-tail policy."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    terminated = lines[-1] == b""  # file ends with "\n" (or is empty)
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path.name} line {lineno}"
        unterminated_tail = lineno == len(lines) and not terminated
        try:
            text = raw.decode("utf-8")
            if not text.strip():
                continue
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if unterminated_tail:
                warnings.warn(f"{where}: ignoring a truncated last line without newline ({len(raw)} bytes; "
                              "a killed run?)", TruncatedLineWarning, stacklevel=3)
                return
            reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise OfficialFormatError(f"{where}: invalid JSON ({reason})") from None
        yield where, obj


def read_stage1(path: str | os.PathLike[str]) -> list[Stage1Record]:
    """All records of a stage-1 JSONL file, in file order (see the module docstring for the error policy)."""
    return [Stage1Record.from_dict(obj, where) for where, obj in _iter_jsonl(path)]


def read_stage2(path: str | os.PathLike[str]) -> list[Stage2Record]:
    """All records of a stage-2 JSONL file, in file order (see the module docstring for the error policy)."""
    return [Stage2Record.from_dict(obj, where) for where, obj in _iter_jsonl(path)]


_Record = Stage1Record | Stage2Record | Mapping[str, Any]


def _json_line(record: _Record, where: str) -> str:
    """The official line format: ``json.dumps(record, ensure_ascii=False) + "\\n"``. Mappings are written unchecked."""
    obj = record.to_dict() if isinstance(record, (Stage1Record, Stage2Record)) else dict(record)
    try:
        return json.dumps(obj, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise OfficialFormatError(f"{where}: cannot be written as JSON ({e})") from None


def write_jsonl(path: str | os.PathLike[str], records: Iterable[_Record]) -> None:
    """Replace ``path`` atomically with one official-format line per record (dataclass records or plain dicts)."""
    path = Path(path)
    text = "".join(_json_line(r, f"{path.name} record {i}") for i, r in enumerate(records))
    atomic_write_text(path, text)


def append_jsonl(path: str | os.PathLike[str], record: _Record) -> None:
    """Append one complete line (flushed and fsynced), as the official scripts do per sample, for resumable runs.

    If the file ends without a newline (a run killed mid-write), the unterminated tail is first repaired: a tail that
    parses as JSON gets its newline, an unparsable one is cut off with a :class:`TruncatedLineWarning`.
    """
    path = Path(path)
    line = _json_line(record, f"{path.name} appended record")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                cut = data.rfind(b"\n") + 1
                try:
                    json.loads(data[cut:].decode("utf-8"))
                    f.write(b"\n")
                except (UnicodeDecodeError, json.JSONDecodeError):
                    warnings.warn(f"{path.name}: dropping a truncated last line ({size - cut} bytes) before appending",
                                  TruncatedLineWarning, stacklevel=2)
                    f.truncate(cut)
        f.seek(0, os.SEEK_END)
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------------
# MDS history


@dataclass
class SinkHistory:
    """Per-layer statistics of one global sink token (METHOD §5): MDS in [-1, 1] and the mean attention it receives
    from later video (``v_score``) and audio (``a_score``) queries, one value per LLM layer."""

    mds: list[float]
    v_score: list[float]
    a_score: list[float]

    def mean_mds(self) -> float:
        """``nanmean`` over layers, the ranking key of the official split."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> nan, as in the official code
            return float(np.nanmean(self.mds))


def history_path(root: str | os.PathLike[str], video_id: str, k_divide: int) -> Path:
    """``<root>/k_divde_<N>/<video_id>_history.json`` with ``root`` = ``<save>/av/history``.

    The official folder name's typo ``divde`` is kept on purpose: the official stage-2 scripts look for it."""
    return Path(root) / f"{HISTORY_DIR_PREFIX}{k_divide}" / f"{video_id}{HISTORY_SUFFIX}"


def official_video_id(video: str | Sequence[str]) -> str:
    """The id used in history file names: the folder of the first frame for frame lists, else the file stem
    (``basename.split('.')[0]``, as the official scripts do)."""
    if isinstance(video, str):
        return os.path.basename(video).split(".")[0]
    if not video:
        raise ValueError("video frame list is empty")
    return os.path.basename(os.path.dirname(video[0]))


def read_history(path: str | os.PathLike[str]) -> dict[int, SinkHistory]:
    """Token position -> :class:`SinkHistory`, in the file's key order (visual sinks, then audio sinks)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise OfficialFormatError(f"{path.name} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError:
        raise OfficialFormatError(f"{path.name}: not UTF-8") from None
    if not isinstance(obj, dict):
        raise OfficialFormatError(f"{path.name}: expected a JSON object of token position -> stats, "
                                  f"got {type(obj).__name__}")
    out: dict[int, SinkHistory] = {}
    for key, entry in obj.items():
        where = f"{path.name} key {key!r}"
        if not (key.isascii() and key.isdigit()):
            raise OfficialFormatError(f"{where}: keys must be token positions (decimal integers)")
        _validate(entry, {name: (_is_num_list, "a list of numbers") for name in HISTORY_FIELDS}, where)
        lengths = {len(entry[name]) for name in HISTORY_FIELDS}
        if len(lengths) != 1:
            raise OfficialFormatError(f"{where}: fields {', '.join(HISTORY_FIELDS)} have different lengths "
                                      f"{[len(entry[n]) for n in HISTORY_FIELDS]}")
        out[int(key)] = SinkHistory(**{name: entry[name] for name in HISTORY_FIELDS})
    return out


def _is_num_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_num(v) for v in x)


def write_history(path: str | os.PathLike[str], history: Mapping[int, SinkHistory]) -> None:
    """Write the official layout (``json.dump(indent=4)``, string keys in the given order, no trailing newline)
    atomically; reading an official file and writing it back reproduces it byte for byte."""
    payload: dict[str, dict[str, list[float]]] = {}
    for pos, entry in history.items():
        if not _is_int(pos):
            raise TypeError(f"history keys must be int token positions, got {pos!r}")
        payload[str(pos)] = {name: list(getattr(entry, name)) for name in HISTORY_FIELDS}
    atomic_write_text(Path(path), json.dumps(payload, indent=HISTORY_INDENT))


# ----------------------------------------------------------------------------------------------------------------------
# computations


def _check_dominant(dominant: str) -> str:
    if dominant not in DOMINANT_MODALITIES:
        raise ValueError(f"dominant must be one of {DOMINANT_MODALITIES} (people -> 'audio', sports -> 'video'), "
                         f"got {dominant!r}")
    return dominant


def split_sinks(history: Mapping[int, SinkHistory], base_positions: Iterable[int],
                dominant: str) -> tuple[list[int], list[int]]:
    """(unimodal, cross_modal) sink positions exactly as the official ``build_layerlist``.

    ``base_positions`` are the non-dominant modality's token positions (video for audio-dominant samples, audio for
    video-dominant ones). History keys in the base are taken in history order, stably sorted by layer-mean MDS
    (descending if ``dominant == "audio"``, ascending if ``"video"``), and split at ``n // 2``: the first half is
    unimodal, the second (one longer when n is odd) cross-modal. A relative median split, not a sign rule.
    """
    from hooked_av.recipes.roles import split_sinks as split_ranked

    base = {int(p) for p in base_positions}
    scored = [(int(pos), entry.mean_mds()) for pos, entry in history.items() if int(pos) in base]
    return split_ranked([p for p, _ in scored], [m for _, m in scored], _check_dominant(dominant), rule="official")


@dataclass(frozen=True)
class IEResult:
    """What causal_effect.py reports: IEs in percentage points, samples used, mean ``layerlist_len``."""

    ie_clean: float
    ie_corrupt: float
    n: int
    mean_layerlist_len: float


def _official_clip(values: list[float]) -> list[float]:
    """``_clip_by_quantile(q_low=0, q_high=1)``: keep values within [min, max] (a no-op unless NaN is present, in which
    case nothing survives and the raw list is used)."""
    arr = np.asarray(values, dtype=np.float64)
    lo, hi = np.quantile(arr, [CLIP_Q_LOW, CLIP_Q_HIGH])
    kept = arr[(arr >= lo) & (arr <= hi)].tolist()
    return kept if kept else values


def ie_summary(records: Iterable[Stage2Record | Mapping[str, Any]], threshold: int | None = None) -> IEResult:
    """The official indirect effects with their sample count and mean ``layerlist_len`` (METHOD §8).

    Uses records whose four probabilities are all present and that have a ``layerlist_len`` (and, if ``threshold`` is
    not None, ``layerlist_len < threshold``); ``IE_clean = 100 * mean(restored_correct - corrupt_correct)``,
    ``IE_corrupt = 100 * mean(corrupt_corrupt - restored_corrupt)``. The official analysis passes ``threshold=None``.
    """
    d_clean: list[float] = []
    d_corrupt: list[float] = []
    lengths: list[int] = []
    for rec in records:
        item = rec.to_dict() if isinstance(rec, Stage2Record) else rec
        rcp, ccp = item.get("restored_correct_word_prob"), item.get("corrupt_correct_word_prob")
        ccp2, rcp2 = item.get("corrupt_corrupt_word_prob"), item.get("restored_corrupt_word_prob")
        if rcp is None or ccp is None or ccp2 is None or rcp2 is None:
            continue
        ll = item.get("layerlist_len")
        if ll is None or (threshold is not None and not ll < threshold):
            continue
        lengths.append(ll)
        d_clean.append(rcp - ccp)
        d_corrupt.append(ccp2 - rcp2)
    if not d_clean:
        raise ValueError("no stage-2 record has all four probabilities and a layerlist_len"
                         + ("" if threshold is None else f" < {threshold}"))
    clean, corrupt = _official_clip(d_clean), _official_clip(d_corrupt)
    return IEResult(ie_clean=IE_SCALE * (sum(clean) / len(clean)), ie_corrupt=IE_SCALE * (sum(corrupt) / len(corrupt)),
                    n=len(d_clean), mean_layerlist_len=float(np.mean(lengths)))


def ie_from_records(records: Iterable[Stage2Record | Mapping[str, Any]],
                    threshold: int | None = None) -> tuple[float, float]:
    """``(IE_clean, IE_corrupt)`` in percentage points, exactly as causal_effect.py; see :func:`ie_summary`."""
    result = ie_summary(records, threshold)
    return result.ie_clean, result.ie_corrupt


def stage1_join_key(video: str | Sequence[str]) -> str:
    """The key the official conversion joins runs on: the folder of the first frame for frame lists, else the string
    itself (``load_jsonl_as_video_dict``), so an ``av`` record's folder id meets the ``v`` run's frame list."""
    if isinstance(video, str):
        return video
    return official_video_id(video)


def _as_stage1(record: Stage1Record | Mapping[str, Any], what: str) -> Stage1Record:
    return record if isinstance(record, Stage1Record) else Stage1Record.from_dict(record, what)


def stage2_from_stage1(av_record: Stage1Record | Mapping[str, Any], corrupt_record: Stage1Record | Mapping[str, Any],
                       dominant: str, index: int | None = None) -> dict[str, Any]:
    """The stage-2 fields known before patching, from the clean ``av`` run and the corrupted run (METHOD §6): the
    ``v`` run (audio zeroed) for ``dominant="audio"``, the ``a`` run (video zeroed) for ``dominant="video"``.

    Returns a dict with the :class:`Stage2Record` keys minus ``restored_*`` and ``layerlist_len``. ``corrupt_pred`` is
    the corrupt run's generated ``text_output`` while its probabilities refer to the input-JSON letter (official
    inconsistency, kept). ``id`` is ``index`` (the stage-2 list position) or else the av record's id. For
    audio-dominant samples the video comes from the corrupt run (the frame list), otherwise from the av run.
    """
    letter = _CORRUPT_RUN_LETTER[_check_dominant(dominant)]
    av, corrupt = _as_stage1(av_record, "av record"), _as_stage1(corrupt_record, "corrupt record")
    if stage1_join_key(av.video) != stage1_join_key(corrupt.video):
        raise ValueError(f"av record (video {stage1_join_key(av.video)!r}) and corrupt record "
                         f"(video {stage1_join_key(corrupt.video)!r}) are different samples")
    return {
        "id": av.id if index is None else index,
        "video": corrupt.video if dominant == "audio" else av.video,
        "audio_path": STAGE2_UNKNOWN_AUDIO,
        "label": av.label,
        "label_name": av.label_name,
        "correct_pred": av.av,
        "corrupt_pred": corrupt.text_output,
        "correct_correct_word_prob": av.av_prob,
        "correct_corrupt_word_prob": getattr(av, f"{letter}_prob"),
        "corrupt_correct_word_prob": corrupt.av_prob,
        "corrupt_corrupt_word_prob": getattr(corrupt, f"{letter}_prob"),
    }


def stage2_from_stage1_runs(av_records: Iterable[Stage1Record | Mapping[str, Any]],
                            corrupt_records: Iterable[Stage1Record | Mapping[str, Any]],
                            dominant: str) -> list[dict[str, Any]]:
    """Convert whole runs as output2input_*.py: av records in order, each joined with the *first* corrupt record of
    the same sample (:func:`stage1_join_key`); ``id`` = position in the result (stage 2 enumerates its input list)."""
    first: dict[str, Stage1Record] = {}
    for rec in corrupt_records:
        rec = _as_stage1(rec, "corrupt record")
        first.setdefault(stage1_join_key(rec.video), rec)
    out = []
    for i, rec in enumerate(av_records):
        rec = _as_stage1(rec, "av record")
        key = stage1_join_key(rec.video)
        if key not in first:
            raise ValueError(f"no corrupt-run record for video {key!r} (av record id {rec.id})")
        out.append(stage2_from_stage1(rec, first[key], dominant, index=i))
    return out


def official_vggsound_layout(n_video_per_chunk: int = VGGSOUND_VIDEO_PER_CHUNK, n_chunks: int = VGGSOUND_CHUNKS,
                             audio_per_chunk: int = VGGSOUND_AUDIO_PER_CHUNK,
                             prefix: int = VGGSOUND_PREFIX_TOKENS) -> tuple[list[int], list[int]]:
    """(video positions, audio positions) of a VGGSound clip in the official Qwen2.5-Omni prompt (METHOD §2.5):
    ``prefix`` tokens, then ``n_chunks`` x [video block][audio block]. Reconstructed from the released history files;
    use ``n_video_per_chunk=280`` for ``-OEJFMpQ-ko_000159``. The base positions of :func:`split_sinks`."""
    video: list[int] = []
    audio: list[int] = []
    start = prefix
    for _ in range(n_chunks):
        video.extend(range(start, start + n_video_per_chunk))
        start += n_video_per_chunk
        audio.extend(range(start, start + audio_per_chunk))
        start += audio_per_chunk
    return video, audio
