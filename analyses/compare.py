"""The same study across models: one indirect-effect table and one figure for several models of the zoo.

Each model's study is a tracing run in its own folder (`<run>/tracing/tracing.jsonl` and `settings.json`, as
`hooked-av trace` or `analyses.tracing.run_tracing` write them). The hook names are uniform, so the recipes run
unchanged on every model; this module lines the results up:

* `check_same_study`: the runs must share the study settings (`STUDY_KEYS`: site, N values, split rule, scoring,
  seed, subsets, data ...); model-specific entries (model, checkpoint, dtype, sinks, layer count) may differ.
* `compare_ie_cells`: IE_clean / IE_corrupt mean and CI per model x dominance group x token subset x N.
* `sinks_by_depth`: the mean number of sink tokens per layer (per modality), against the relative depth
  l / (L - 1), so models of 3, 28 or 36 layers share an axis.
* `write_comparison`: `compare.md` / `compare.csv` (the table) and `compare.png` (IE_clean by subset per model;
  video and audio sink counts per layer against relative depth), written atomically.
* `run_comparison`: the dominance and tracing studies for several in-process models with their own sample
  sources (the same settings for all), then `write_comparison`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .records import RecordStore, atomic_write_text
from .report import DOMINANT, IECell, _new_figure, _rows, format_ci, row_label, save_figure
from .tracing import RECORDS_FILE, TraceSettings, ie_cells, traced

#: settings that define the study; runs compared with each other must agree on them (when present)
STUDY_KEYS: tuple[str, ...] = ("site", "n_divs", "split_rule", "mode", "seed", "subsets", "max_new_tokens",
                               "min_audio_chunks", "data", "data_step", "prompt_step", "limit", "dominance_source")
SINK_MODALITIES: tuple[str, ...] = ("video", "audio")
COMPARE_MD, COMPARE_CSV, COMPARE_PNG = "compare.md", "compare.csv", "compare.png"


class CompareError(ValueError):
    """Runs that cannot be compared (missing, empty, or not the same study)."""


def load_run(folder: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, settings) of the tracing run in `folder` (the folder given to `hooked-av trace --out`)."""
    tracing = Path(folder) / "tracing"
    path, settings = tracing / RECORDS_FILE, tracing / "settings.json"
    if not path.is_file() or not settings.is_file():
        raise CompareError(f"{folder}: no tracing run there (expected {path} and {settings}; run hooked-av trace "
                           "first)")
    records = RecordStore(path).read()
    if not traced(records):
        raise CompareError(f"{path}: no traced samples")
    return records, json.loads(settings.read_text(encoding="utf-8"))


def check_same_study(settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The study settings on which the runs disagree ("key: label=value, ..."); empty when they are the same
    study. A key absent from a run is not compared."""
    out = []
    for key in STUDY_KEYS:
        values = {label: s[key] for label, s in settings.items() if key in s}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out.append(f"{key}: " + ", ".join(f"{label}={value!r}" for label, value in values.items()))
    return out


def compare_ie_cells(runs: Mapping[str, Sequence[Mapping[str, Any]]], ci_method: str = "t",
                     seed: int = 0) -> dict[str, list[IECell]]:
    """Per model: the IE cells (dominance group x subset x N) of its traced samples."""
    return {label: ie_cells(records, method=ci_method, seed=seed) for label, records in runs.items()}


def pooled_ie_clean(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int | None], float]:
    """Mean IE_clean per (subset, N) over every traced sample of a run, both dominance groups pooled."""
    sums: dict[tuple[str, int | None], list[float]] = {}
    for rec in traced(records):
        for cell in rec["cells"]:
            sums.setdefault((cell["subset"], cell["n_div"]), []).append(cell["ie_clean"])
    return {key: float(np.mean(v)) for key, v in sums.items()}


def sinks_by_depth(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per modality: (relative depth l / (L - 1) of each layer, mean sink count at that layer over the samples)."""
    with_sinks = [r for r in traced(records) if r.get("sinks", {}).get("per_layer")]
    out: dict[str, tuple[list[float], list[float]]] = {}
    if not with_sinks:
        return out
    for modality in ("video", "audio", "text"):
        counts = np.asarray([r["sinks"]["per_layer"][modality] for r in with_sinks], dtype=float)
        n_layers = counts.shape[1]
        depth = np.linspace(0.0, 1.0, n_layers) if n_layers > 1 else np.zeros(1)
        out[modality] = (depth.tolist(), counts.mean(0).tolist())
    return out


def comparison_markdown(cells: Mapping[str, Sequence[IECell]], header: str = "") -> str:
    """One table per dominance group: rows = token subset x N, columns = IE_clean, IE_corrupt (mean ± CI, pp) and
    n for each model."""
    labels = list(cells)
    index = {(label, c.subset, c.n_div, c.dominant): c for label, cs in cells.items() for c in cs}
    rows = _rows([c for cs in cells.values() for c in cs])
    lines = [header] if header else []
    for dom in DOMINANT:
        present = [(s, n) for s, n in rows if any((label, s, n, dom) in index for label in labels)]
        lines.append(f"## {dom.capitalize()}-dominant samples\n")
        if not present:
            lines.append("(no samples)\n")
            continue
        head = ["Tokens"] + [f"{label} {what}" for label in labels for what in ("IE_clean", "IE_corrupt", "n")]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "|".join(["---:"] * (len(head) - 1)) + "|")
        for s, n in present:
            row = [row_label(s, n)]
            for label in labels:
                c = index.get((label, s, n, dom))
                row += ["\u2013"] * 3 if c is None else [format_ci(c.ie_clean), format_ci(c.ie_corrupt),
                                                          str(c.ie_clean.n)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append("IE in percentage points, mean \u00b1 half-width of the confidence interval; n = samples.")
    return "\n".join(lines) + "\n"


def comparison_csv(cells: Mapping[str, Sequence[IECell]]) -> str:
    """The same cells, one line per model x dominance group x subset x N, with exact interval bounds."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = ["mean", "low", "high", "n", "method", "level", "seed"]
    writer.writerow(["model", "dominant", "subset", "label", "n_div"]
                    + [f"ie_{kind}_{f}" for kind in ("clean", "corrupt") for f in fields])
    for label, cs in cells.items():
        for c in cs:
            values = [getattr(ci, f) for ci in (c.ie_clean, c.ie_corrupt) for f in fields]
            writer.writerow([label, c.dominant, c.subset, row_label(c.subset, c.n_div),
                             "" if c.n_div is None else c.n_div] + ["" if v is None else v for v in values])
    return out.getvalue()


def plot_comparison(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Three panels: IE_clean by token subset per model (bars, both dominance groups pooled); the mean number of
    video and of audio sink tokens per layer against relative depth, one line per model."""
    fig, axes = _new_figure(1 + len(SINK_MODALITIES))
    pooled = {label: pooled_ie_clean(records) for label, records in runs.items()}
    keys = [k for k in _rows([]) if any(k in p for p in pooled.values())]
    keys += sorted({k for p in pooled.values() for k in p if k not in keys}, key=lambda k: (k[0], k[1] or 0))
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(keys))
    ax = axes[0]
    for i, (label, values) in enumerate(pooled.items()):
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, [values.get(k, np.nan) for k in keys], width, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [row_label(s, n) for s, n in keys], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("IE_clean (percentage points)")
    ax.set_title("Indirect effect by token subset")
    ax.legend(title="model", fontsize=8)
    for ax, modality in zip(axes[1:], SINK_MODALITIES):
        for label, records in runs.items():
            series = sinks_by_depth(records).get(modality)
            if series is not None:
                ax.plot(series[0], series[1], marker="o", markersize=3, label=label)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("relative depth l / (L - 1) (layer input)")
        ax.set_ylabel("sink tokens per sample (count)")
        ax.set_title(f"{modality.capitalize()} sink tokens per layer")
        ax.legend(title="model", fontsize=8)
    fig.suptitle("The same study across models")
    return save_figure(fig, path)


def write_comparison(runs: Mapping[str, str | Path], out: str | Path, ci_method: str = "t", seed: int = 0,
                     allow_mismatch: bool = False) -> dict[str, Path]:
    """Table and figure of several models' tracing runs (label -> run folder) in `out`. Runs of different studies
    are refused (CompareError listing the differences) unless `allow_mismatch`, which records them in the table
    header instead."""
    if len(runs) < 1:
        raise CompareError("no runs to compare")
    loaded = {label: load_run(folder) for label, folder in runs.items()}
    records = {label: r for label, (r, _) in loaded.items()}
    settings = {label: s for label, (_, s) in loaded.items()}
    mismatch = check_same_study(settings)
    if mismatch and not allow_mismatch:
        raise CompareError("the runs are not the same study: " + "; ".join(mismatch)
                           + " (pass --allow-mismatch to compare them anyway)")
    cells = compare_ie_cells(records, ci_method=ci_method, seed=seed)
    models = ", ".join(f"{label} ({len(traced(records[label]))} samples, {settings[label].get('n_layers', '?')} "
                       f"layers, {settings[label].get('model', '?')})" for label in records)
    header = (f"# The same study across models\n\nModels: {models}. Site {_first(settings, 'site')}, scoring "
              f"{_first(settings, 'mode')}, split {_first(settings, 'split_rule')}, seed {_first(settings, 'seed')}; "
              f"95% CI, {ci_method}.\n")
    if mismatch:
        header += "\n**Not the same study** (compared anyway): " + "; ".join(mismatch) + "\n"
    out = Path(out)
    return {
        "table_md": atomic_write_text(out / COMPARE_MD, comparison_markdown(cells, header)),
        "table_csv": atomic_write_text(out / COMPARE_CSV, comparison_csv(cells)),
        "figure": plot_comparison(records, out / COMPARE_PNG),
    }


def _first(settings: Mapping[str, Mapping[str, Any]], key: str) -> Any:
    return next((s[key] for s in settings.values() if key in s), "?")


def run_comparison(
    studies: Mapping[str, tuple[Any, Any]],
    out: str | Path,
    settings: TraceSettings = TraceSettings(),
    dominance: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    run_info: Mapping[str, Any] | None = None,
    resume: bool = True,
    ci_method: str = "t",
) -> dict[str, Path]:
    """The same study on several models: label -> (HookedAVModel, SampleSource over that model's inputs).

    Each model gets `out/<label>/` (dominance records, unless `dominance[label]` gives them, then the tracing
    records, resumable), all with the same `settings`; then the comparison goes to `out/`."""
    from .dominance import DominanceSettings, run_dominance
    from .tracing import run_tracing

    folders = {}
    for label, (model, source) in studies.items():
        folder = Path(out) / label
        info = {**(run_info or {}), "model": label, "model_family": model.cfg.model_family,
                "n_layers": model.cfg.n_layers, "sinks": model.cfg.sinks.to_dict()}
        if dominance is not None and label in dominance:
            dom = list(dominance[label])
        else:
            path = run_dominance(model, source, folder,
                                 DominanceSettings(mode=settings.mode, seed=settings.seed,
                                                   max_new_tokens=settings.max_new_tokens),
                                 run_info=info, resume=resume)
            dom = RecordStore(path).read()
        run_tracing(model, source, dom, folder, settings, run_info=info, resume=resume)
        folders[label] = folder
    return write_comparison(folders, out, ci_method=ci_method, seed=settings.seed)
