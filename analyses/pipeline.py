"""The whole study on one model and one dataset, as `make demo` runs it on the organism.

dominance filter -> accuracies -> IE tracing (sinks, roles, every subset and N) -> tables and plots ->
amplification of cross-modal sinks on the yes/no probes -> `report.md` and `summary.json` in the output folder.
Every stage appends resumable records, so a killed demo picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .records import RecordStore, atomic_write_text


@dataclass(frozen=True)
class StudyInputs:
    """Where the study's data is: an official-format MC list with its media root, the probes, the object blocks."""

    mc_list: str
    media_root: str
    probes: str | None = None
    object_blocks: str | None = None


@dataclass(frozen=True)
class StudySettings:
    seed: int = 0
    n_divs: tuple[int, ...] = (2, 3, 4)
    max_traced_per_group: int | None = None  # cap on dominant samples traced per group (time budget)
    alphas: tuple[float, ...] = (0.0, 0.2, 0.5)
    max_probes: int | None = None
    mode: str = "teacher_forced"


def _accuracies(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    with_label = [r for r in records if r.get("label")]
    n = len(with_label)
    return {c: (sum(r["pred"][c] == r["label"] for r in with_label) / n if n else float("nan"))
            for c in ("av", "a", "v")} | {"n": n}


def run_study(rt: Any, data: StudyInputs, out: str | Path, settings: StudySettings = StudySettings()) -> dict:
    """Run every stage; returns the summary (also written to `out/summary.json`)."""
    from . import hallucination
    from .datasets import load_vggsound_mc
    from .dominance import DominanceSettings, run_dominance
    from .sources import VGGSoundSource, load_object_blocks
    from .tracing import TraceSettings, ie_cells, run_tracing, traced, write_report

    t0 = time.perf_counter()
    out = Path(out)
    info = {**rt.info, "data": asdict(data), "study": asdict(settings)}
    samples = load_vggsound_mc(data.mc_list, media_root=data.media_root)
    blocks = load_object_blocks(data.object_blocks) if data.object_blocks else None
    source = VGGSoundSource(samples, rt.process, rt.tokenizer, object_blocks=blocks, model=rt.model)
    dom_path = run_dominance(rt.model, source, out, DominanceSettings(mode=settings.mode, seed=settings.seed),
                             run_info=info)
    dom = RecordStore(dom_path).read()
    counts = {d: sum(r["dominant"] == d for r in dom) for d in ("audio", "video")}
    chosen = []
    for d in ("audio", "video"):
        group = [r for r in dom if r["dominant"] == d]
        chosen += group[: settings.max_traced_per_group] if settings.max_traced_per_group else group
    trace_path = run_tracing(rt.model, source, chosen, out,
                             TraceSettings(n_divs=settings.n_divs, seed=settings.seed, mode=settings.mode),
                             run_info=info, history_dir=out / "history")
    records = traced(RecordStore(trace_path).read())
    paths = write_report(out, seed=settings.seed) if records else {}
    summary: dict[str, Any] = {
        "run": info, "accuracy": _accuracies(dom), "dominance": {**counts, "total": len(dom)},
        "sinks": rt.model.cfg.sinks.to_dict(),
        "ie_table": [{"subset": c.subset, "n_div": c.n_div, "dominant": c.dominant,
                      "ie_clean": asdict(c.ie_clean), "ie_corrupt": asdict(c.ie_corrupt)}
                     for c in ie_cells(records, seed=settings.seed)] if records else [],
        "sinks_per_layer": _mean_per_layer(records),
    }
    if data.probes:
        summary["hallucination"] = _probes(rt, data, settings, hallucination)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", render_report(summary, paths))
    return summary


def _mean_per_layer(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    if not records:
        return {}
    n_layers = len(records[0]["sinks"]["per_layer"].get("video", []))
    return {m: [round(sum(r["sinks"]["per_layer"][m][i] for r in records) / len(records), 2) for i in range(n_layers)]
            for m in ("video", "audio", "text")}


def _probes(rt: Any, data: StudyInputs, settings: StudySettings, hallucination: Any) -> dict[str, Any]:
    from hooked_av import media
    from hooked_av.recipes.scoring import AnswerCandidates

    items = json.loads(Path(data.probes).read_text(encoding="utf-8"))
    if settings.max_probes:
        items = items[: settings.max_probes]
    root = Path(data.media_root)

    def inputs_of(item: dict[str, Any]) -> Any:
        video = root / item["video"]
        raw = media.load_av(str(video), audio=str(root / item["audio"]) if item.get("audio") else None)
        return rt.process(raw, item["text"])

    yes, no = (AnswerCandidates.from_tokenizer(rt.tokenizer, w) for w in ("Yes", "No"))
    return hallucination.evaluate_probes(rt.model, items, inputs_of, yes, no, alphas=settings.alphas)


def render_report(summary: dict[str, Any], paths: dict[str, Path]) -> str:
    acc, dom = summary["accuracy"], summary["dominance"]
    lines = [f"# Study report: {summary['run'].get('model')}", "",
             f"Seed {summary['run']['study']['seed']}; {summary['seconds']} s.", "",
             "## Accuracy (20-way multiple choice)", "",
             "| run | accuracy |", "|---|---:|"]
    lines += [f"| {name} | {acc[c]:.3f} |" for c, name in (("av", "audio + video"), ("a", "audio only (black frames)"),
                                                              ("v", "video only (silent audio)"))]
    lines += ["", f"Dominance filter: {dom['audio']} audio-dominant, {dom['video']} video-dominant of {dom['total']}.",
              "", "## Sink constants", "", "```", json.dumps(summary["sinks"], indent=2), "```", ""]
    if "table_md" in paths:
        lines += ["## Indirect effects", "", Path(paths["table_md"]).read_text(encoding="utf-8"), ""]
        lines += [f"![{k}]({Path(p).relative_to(Path(paths['table_md']).parents[1])})"
                  for k, p in paths.items() if str(p).endswith(".png")]
    if "hallucination" in summary:
        h = summary["hallucination"]
        lines += ["", "## Yes/no probes with amplification of cross-modal sinks", "",
                  "| alpha | accuracy | precision | recall | F1 | yes-ratio |", "|---:|---:|---:|---:|---:|---:|"]
        for a, m in h["overall"].items():
            lines.append(f"| {a} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} "
                         f"| {m['yes_ratio']:.3f} |")
    return "\n".join(lines) + "\n"
