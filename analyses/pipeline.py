"""The whole study on one model and one dataset, as `make demo` runs it on the organism.

dominance filter -> accuracies -> IE tracing (sinks, roles, every subset and N) -> tables and plots ->
hallucination mitigation on the clips where audio and video disagree (every method of `recipes.mitigate` on the
yes/no probes and captions, with bootstrap CIs, the plot against alpha and the cost per generated token relative to
plain decoding) -> `report.md` and `summary.json` in the output folder. Every stage appends resumable records, so a
killed demo picks up where it stopped.
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
    """Where the study's data is: an official-format MC list with its media root, the yes/no probes
    (AVHBench-format, e.g. avsynth's `<split>_yesno.json`) and captions (avsynth's `<split>_captions.json`), the
    object blocks."""

    mc_list: str
    media_root: str
    probes: str | None = None
    object_blocks: str | None = None
    captions: str | None = None


@dataclass(frozen=True)
class StudySettings:
    """The study's knobs. The mitigation stage (with `StudyInputs.probes`) runs `study_methods` on the yes/no
    probes and captions of the clips where audio and video disagree (`hallucination.conflict_probes`):

    alphas: amplification strengths (0 = plain decoding; every token set and the per-head rule at each alpha > 0).
    max_mitigation_probes / max_mitigation_captions: the first N yes/no questions / captions of those clips.
    caption_tokens: max new tokens of a caption. cost_tokens / cost_items: a timed greedy generation of exactly
    `cost_tokens` tokens per method on the first `cost_items` yes/no items (the cost per token against plain).
    contrastive_drops / betas: the AVCD-style negatives and weights; guidance_strengths: official guidance bases.
    amplify_layers: layers amplified (None: the official l > 5); n_boot: bootstrap draws of the CIs.
    """

    seed: int = 0
    n_divs: tuple[int, ...] = (2, 3, 4)
    max_traced_per_group: int | None = None  # cap on dominant samples traced per group (time budget)
    alphas: tuple[float, ...] = (0.0, 0.2, 0.5)
    max_mitigation_probes: int | None = None
    max_mitigation_captions: int | None = None
    caption_tokens: int = 12
    cost_tokens: int = 4
    cost_items: int = 2
    contrastive_drops: tuple[str, ...] = ("video", "audio")
    betas: tuple[float, ...] = (1.0,)
    guidance_strengths: tuple[float, ...] = (0.5,)
    amplify_layers: tuple[int, ...] | None = None
    n_boot: int = 1000
    mode: str = "teacher_forced"


def study_methods(settings: StudySettings) -> list[Any]:
    """Every mitigation method at the study's strengths: plain; amplification of each token set (cross-modal
    sinks, all sinks, unimodal sinks, the count-matched random control) and of cross-modal sinks in the heads chosen
    by the sink-role rule, at each alpha > 0; contrastive decoding per dropped modality and beta; the official
    guidance per strength, with the adaptive first step (the official first step leaves one-token answers plain)."""
    from hooked_av.recipes import mitigate

    alphas = [a for a in settings.alphas if a > 0]
    layers = settings.amplify_layers
    out: list[Any] = [mitigate.Plain()]
    out += [mitigate.Amplify(alpha=a, tokens=t, layers=layers) for t in mitigate.TOKEN_SETS for a in alphas]
    out += [mitigate.Amplify(alpha=a, layers=layers, head_rule=mitigate.HeadRule()) for a in alphas]
    out += [mitigate.Contrastive(beta=b, drop=d) for d in settings.contrastive_drops for b in settings.betas]
    out += [mitigate.Guidance(strength=g, first_step="adaptive", amplify_layers=layers)
            for g in settings.guidance_strengths]
    return out


def _accuracies(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    with_label = [r for r in records if r.get("label")]
    n = len(with_label)
    return {c: (sum(r["pred"][c] == r["label"] for r in with_label) / n if n else float("nan"))
            for c in ("av", "a", "v")} | {"n": n}


def run_study(rt: Any, data: StudyInputs, out: str | Path, settings: StudySettings = StudySettings()) -> dict:
    """Run every stage; returns the summary (also written to `out/summary.json`)."""
    from .datasets import load_vggsound_mc
    from .dominance import DominanceSettings, run_dominance
    from .sources import VGGSoundSource, load_object_blocks
    from .tracing import TraceSettings, ie_cells, run_tracing, traced, write_report

    t0 = time.perf_counter()
    out = Path(out)
    info = {**rt.info, "data": asdict(data), "study": asdict(settings)}
    samples = load_vggsound_mc(data.mc_list, media_root=data.media_root)
    blocks = load_object_blocks(data.object_blocks) if data.object_blocks else None
    source = VGGSoundSource(samples, rt.process, rt.tokenizer, object_blocks=blocks, model=rt.model, load=rt.load)
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
        summary["mitigation"] = _mitigation(rt, data, out, settings, info)
        summary["hallucination"] = _with_and_without_amplification(summary["mitigation"], settings.alphas)
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


def _mitigation(rt: Any, data: StudyInputs, out: Path, settings: StudySettings,
                info: dict[str, Any]) -> dict[str, Any]:
    """Every method on the clips where audio and video disagree (records in `out/mitigation`, resumable), then
    the table, the plot and the summary entry."""
    from . import hallucination as h

    t0 = time.perf_counter()
    probes = h.conflict_probes(data.probes, data.captions, data.media_root, settings.max_mitigation_probes,
                               settings.max_mitigation_captions)
    methods = study_methods(settings)
    ms = h.MitigationSettings(seed=settings.seed, n_boot=settings.n_boot, max_new_tokens=settings.caption_tokens,
                              cost_tokens=settings.cost_tokens, cost_items=settings.cost_items)
    h.run_mitigation(rt, probes, methods, out, ms, run_info=info)
    paths = h.write_mitigation_report(out)
    table = h.summarize_mitigation(out)
    keep = ("method", "family", "knob_name", "knob", "n_judgments", "n_captions", "n_mc", "judgment", "by_task",
            "chair", "vs_plain", "cost")
    return {"probes": probes.source, "clips": len({it.video_id for it in probes.items}),
            "n_judgments": sum(it.kind == h.JUDGMENT for it in probes.items),
            "n_captions": sum(it.kind == h.CAPTION for it in probes.items),
            "skipped": [{k: r[k] for k in ("id", "video_id", "task", "reason")} for r in table["skipped"]],
            "seed": table["seed"], "n_boot": table["n_boot"], "level": table["level"],
            "settings": {k: v for k, v in ms.to_dict().items() if k not in ("seed", "n_boot", "level")},
            "rows": [{k: r[k] for k in keep if k in r} for r in table["rows"]],
            "verdicts": h.mitigation_verdicts(table),
            "files": {k: str(Path(p).relative_to(out)) for k, p in paths.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def _with_and_without_amplification(mitigation: dict[str, Any], alphas: Sequence[float]) -> dict[str, Any]:
    """The yes/no metrics of plain decoding (alpha 0) and of amplifying the cross-modal sinks at each alpha, from
    the mitigation rows (point values; the CIs are in the mitigation entry)."""
    from hooked_av.recipes import mitigate

    keys = {a: "plain" if a == 0 else mitigate.Amplify(alpha=a).key for a in alphas}
    rows = {r["method"]: r for r in mitigation["rows"] if "judgment" in r}
    have = {a: rows[k] for a, k in keys.items() if k in rows}
    return {"alphas": list(have), "n": mitigation["n_judgments"], "methods": {str(a): keys[a] for a in have},
            "probes": mitigation["probes"],
            "overall": {str(a): {"n": r["judgment"]["accuracy"]["n"],
                                 **{m: e["value"] for m, e in r["judgment"].items()}} for a, r in have.items()},
            "by_task": {str(a): r["by_task"] for a, r in have.items()}}


def render_report(summary: dict[str, Any], paths: dict[str, Path]) -> str:
    acc, dom = summary["accuracy"], summary["dominance"]
    lines = [f"# Study report: {summary['run'].get('model')}", "",
             f"Seed {summary['run']['study']['seed']}; {summary['seconds']} s.", "",
             *(["**The organism is UNTRAINED** (no committed deltas): every number below checks the machinery "
                "and says nothing about a trained model.", ""] if summary["run"].get("organism_trained") is False
               else []),
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
    if "mitigation" in summary:
        lines += _mitigation_section(summary["mitigation"], summary.get("hallucination"))
    return "\n".join(lines) + "\n"


def _mitigation_section(m: dict[str, Any], amplification: dict[str, Any] | None) -> list[str]:
    from .hallucination import mitigation_table_markdown

    lines = ["", "## Hallucination mitigation on clips where audio and video disagree", "",
             f"{m['n_judgments']} yes/no questions and {m['n_captions']} captions (at most "
             f"{m['settings']['max_new_tokens']} new tokens) of the {m['clips']} clips whose AV Matching answer is "
             f"\"No\" ({m['probes']}); {len(m['skipped'])} skipped. Yes/no answers are read teacher-forced "
             "(P(Yes) > P(No)); captions are scored CHAIR-style against the objects heard and seen. Stage time "
             f"{m['seconds']} s (this run; a resumed run counts only what it did).", "",
             mitigation_table_markdown(m)]
    if "plot" in m["files"]:
        lines += [f"![mitigation against strength]({m['files']['plot']})", ""]
    if m.get("verdicts"):
        lines += ["Against plain decoding (verdict on accuracy, F1 and CHAIR; a resolved yes-ratio shift is named "
                  "beside it; paired CIs above):", ""]
        for method, v in m["verdicts"].items():
            why = ", ".join([*(f"{x} better" for x in v["better"]), *(f"{x} worse" for x in v["worse"]),
                             *v["shifted"]])
            lines.append(f"- {method}: {v['verdict']}" + (f" ({why})" if why else ""))
        lines.append("")
    if amplification:
        lines += ["Yes/no metrics with and without amplification of the cross-modal sinks (alpha 0 = plain):", "",
                  "| alpha | accuracy | precision | recall | F1 | yes-ratio |", "|---:|---:|---:|---:|---:|---:|"]
        for a, x in amplification["overall"].items():
            lines.append("| " + " | ".join([a, *(f"{x[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1",
                                                                       "yes_ratio"))]) + " |")
    return lines
