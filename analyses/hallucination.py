"""Yes/no hallucination probes (AVHBench wording) and the effect of attention amplification on them.

Items follow AVHBench's schema, `{video_id, task, text, label}` with label "Yes" / "No"; tasks: "AV Hallucination
(Video)" (is the object visible?), "AV Hallucination (Audio)" (is it making sound?), "AV Matching". A model's
answer is read teacher-forced: "Yes" when P(Yes) > P(No) at the answer position (candidates with and without a
leading space). Metrics with "Yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from hooked_av.recipes import amplify, roles, scoring, sinks

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
    av = model.as_inputs(inputs)
    is_sink = sinks.layer_sinks(sinks.sink_values(model, av)[:, 0], model.cfg.sinks.tau)
    g = sinks.global_sinks(is_sink, av.modality_map, k_divide=k_divide)
    if not g.video and not g.audio:
        return []
    r = roles.modality_attention(model, av, g.video + g.audio)
    _, cross_video = roles.split_roles(r, dominant="audio", rule="threshold")
    _, cross_audio = roles.split_roles(r, dominant="video", rule="threshold")
    return sorted(cross_video + cross_audio)


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


