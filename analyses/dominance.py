"""Unimodal-dominance filtering: which modality decides the answer of each sample.

Each sample is scored in three conditions (clean "av", audio only "a", video only "v"); the prediction of a
condition is the choice letter of highest probability (teacher-forced by default). Audio-dominant:
pred_av == pred_a != pred_v; video-dominant: pred_av == pred_v != pred_a (correctness is not required, as in the
paper). One JSONL record per sample, resumable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hooked_av.recipes import scoring

from .records import RecordStore, write_settings
from .study import CONDITIONS, PreparedSample, SampleSource

RECORDS_FILE = "dominance.jsonl"


@dataclass(frozen=True)
class DominanceSettings:
    mode: scoring.ScoreMode = "teacher_forced"
    max_new_tokens: int = scoring.OFFICIAL_MAX_NEW_TOKENS  # official mode only
    seed: int = 0


def dominance_of(pred: Mapping[str, str]) -> str | None:
    """"audio", "video" or None from the three predictions."""
    if pred["av"] == pred["a"] != pred["v"]:
        return "audio"
    if pred["av"] == pred["v"] != pred["a"]:
        return "video"
    return None


def score_conditions(model: Any, sample: PreparedSample, settings: DominanceSettings) -> dict[str, dict[str, float]]:
    """P(letter) for every choice letter in every condition."""
    out = {}
    for cond in CONDITIONS:
        probs = scoring.score(model, sample.inputs[cond], dict(sample.choices), mode=settings.mode,
                              max_new_tokens=settings.max_new_tokens)
        out[cond] = {letter: float(p[0]) for letter, p in probs.items()}
    return out


def dominance_record(model: Any, sample: PreparedSample, settings: DominanceSettings) -> dict[str, Any]:
    sample.check_layouts(model)
    probs = score_conditions(model, sample, settings)
    pred = {c: max(probs[c], key=probs[c].get) for c in CONDITIONS}
    return {"id": sample.id, "label": sample.label, "pred": pred, "probs": probs,
            "dominant": dominance_of(pred), "correct_av": (pred["av"] == sample.label) if sample.label else None,
            **({"meta": sample.meta} if sample.meta else {})}


def run_dominance(
    model: Any,
    source: SampleSource,
    out: str | Path,
    settings: DominanceSettings = DominanceSettings(),
    run_info: Mapping[str, Any] | None = None,
    resume: bool = True,
) -> Path:
    """Score every sample not yet in `out/dominance.jsonl` and append its record."""
    out = Path(out)
    write_settings(out / "dominance", {"study": "dominance", **asdict(settings), **(run_info or {})}, resume)
    store = RecordStore(out / "dominance" / RECORDS_FILE, resume=resume)
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        for sample_id in tqdm(source.ids(), desc="dominance"):
            if sample_id in store:
                continue
            store.append(dominance_record(model, source.prepare(sample_id), settings))
    return store.path
