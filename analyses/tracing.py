"""The indirect-effect study (the paper's Table 1): restore token subsets of the non-dominant modality inside the
corrupted run and measure how much of the clean answer comes back.

For each dominant sample (from `dominance.jsonl`): the corrupted run silences the dominant modality at the raw
input (audio-dominant: zeroed audio; video-dominant: black frames); the base tokens are those of the other
modality. Subsets of base positions (official `--replace_mode` names):
  all; object (when the sample knows where the object is); and for each N in `n_divs`: sink (base tokens among
  the global sinks with K = int(T/N)), random_sink_num (seeded random base tokens, as many as sink),
  cross_modal_sink and uni_modal_sink (the split of the sinks by their MDS, `split_rule`).
Each subset is restored at `site` over `layers` (official: before_attn at every layer) and scored with the same
prompt as the corrupted run (one prompt for all runs; the official code mixes two, METHOD.md §8). One JSONL line
per sample holds every subset's probabilities and indirect effects; a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hooked_av.recipes import fast_patching, patching, roles, scoring, sinks

from .records import RecordStore, write_settings
from .study import BASE_MODALITY, CORRUPTED_CONDITION, PreparedSample, SampleSource

RECORDS_FILE = "tracing.jsonl"
SUBSETS_WITH_N = ("sink", "random_sink_num", "random_sink_num_half", "cross_modal_sink", "uni_modal_sink")


@dataclass(frozen=True)
class TraceSettings:
    site: str = "before_attn"
    layers: tuple[int, ...] | None = None  # None = every layer (official)
    n_divs: tuple[int, ...] = (2, 3, 4)
    split_rule: str = "official"
    mode: scoring.ScoreMode = "teacher_forced"
    seed: int = 0
    batch_size: int | None = None  # patched copies per decoder pass (None: 1 on CPU, 8 on GPU)
    max_new_tokens: int = scoring.OFFICIAL_MAX_NEW_TOKENS  # official scoring mode only
    subsets: tuple[str, ...] = ("all", "object", *SUBSETS_WITH_N)
    #: skip samples whose audio spans fewer 2-s chunks (the official video-dominant script uses 5); None = keep all
    min_audio_chunks: int | None = None


@dataclass
class SampleSinks:
    """Sink statistics of the clean run kept in the record (small: counts and the base sinks' MDS)."""

    per_layer: dict[str, list[int]] = field(default_factory=dict)  # modality -> sink count per layer
    frequency: dict[str, list[int]] = field(default_factory=dict)  # modality -> #layers each ever-sink token is a sink
    global_base: dict[int, list[int]] = field(default_factory=dict)  # N -> base sinks in frequency order
    mean_mds: dict[int, float] = field(default_factory=dict)  # base sink position -> layer-mean MDS
    history: dict[int, dict[str, list[float]]] = field(default_factory=dict)


def random_subset(base: Sequence[int], size: int, seed: int, sample_id: str, n_div: int) -> list[int]:
    """`size` base positions drawn without replacement, seeded by (seed, sample id, N): the same seed gives the
    same subset in every run and on every machine."""
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode()), n_div])
    size = min(size, len(base))
    return sorted(int(p) for p in rng.choice(np.asarray(base), size=size, replace=False)) if size else []


def _require_sink_constants(model: Any) -> None:
    if model.cfg.sinks.tau is None or not model.cfg.sinks.dims:
        raise ValueError(f"{model.cfg.model_name} has no sink constants; calibrate them (hooked-av calibrate) "
                         "or load a preset that has them")


def sink_statistics(
    model: Any, clean: Any, base: str, n_divs: Sequence[int], values: torch.Tensor,
    roles_of: Callable[[list[int]], roles.SinkRoles],
) -> SampleSinks:
    """The record's sink statistics from the clean run's sink values [layer, pos] and a source of modality
    attention scores for chosen sinks (`ModalityAttentionRecorder.roles` on the same pass)."""
    mm = model.as_inputs(clean).modality_map
    is_sink = sinks.layer_sinks(values, model.cfg.sinks.tau)  # [layer, pos]
    out = SampleSinks()
    freq = is_sink.sum(0)
    for name in ("video", "audio", "text"):
        m = mm.mask(name)[0].to(is_sink.device)
        out.per_layer[name] = (is_sink & m[None]).sum(1).tolist()
        out.frequency[name] = freq[m & (freq > 0)].tolist()
    widest: list[int] = []
    for n in sorted(n_divs, reverse=True):  # the smallest N has the most sinks: its roles cover the others
        g = sinks.global_sinks(is_sink, mm, k_divide=n)
        out.global_base[n] = g.of(base)
        widest = g.video + g.audio  # official history order: video sinks, then audio sinks
    if widest:
        r = roles_of(widest)
        keep = set(out.global_base[min(n_divs)])
        out.mean_mds = {p: float(v) for p, v in zip(r.positions, r.mean_mds.tolist()) if p in keep}
        out.history = r.history()
    return out


def sample_sinks(model: Any, clean: Any, base: str, n_divs: Sequence[int]) -> SampleSinks:
    """Sink statistics of one clean sample from one sdpa pass (sink values and the roles recorder together)."""
    _require_sink_constants(model)
    av = model.as_inputs(clean)
    values, rec = sinks.SinkRecorder(model), roles.ModalityAttentionRecorder(model, av)
    with torch.no_grad():
        model.run_with_hooks(av, return_type="none", fwd_hooks=values.hooks() + rec.hooks())
    return sink_statistics(model, av, base, n_divs, values.values()[:, 0], rec.roles)


def trace_sample(
    model: Any, sample: PreparedSample, dominant: str, o_clean: str, o_corrupt: str, settings: TraceSettings,
    fast: bool | None = None,
) -> tuple[dict[str, Any], SampleSinks]:
    """Every subset's restored probabilities and indirect effects for one dominant sample (the record), and the
    clean run's sink statistics (with the MDS history of the global sinks of the smallest N).

    One clean pass carries the scoring, the sink values (`hook_sink`), the roles recorder (MDS of sinks chosen
    after the pass) and, where needed, the capture of the patched site. With `fast` (default: teacher-forced
    scoring on a model without hooks attached) the corrupted and restored runs reuse that pass and compute only
    the positions that change (`recipes.fast_patching`); otherwise every restored run is a full decoder pass
    (`patching.patched_probs`), as the official scoring mode needs. Both give the same numbers to float rounding.
    """
    sample.check_layouts(model)
    base = BASE_MODALITY[dominant]
    clean = model.as_inputs(sample.inputs["av"])
    corrupt = model.as_inputs(sample.inputs[CORRUPTED_CONDITION[dominant]])
    base_positions = clean.modality_map.positions(base).tolist()
    for name, letter in (("o_clean", o_clean), ("o_corrupt", o_corrupt)):
        if letter not in sample.choices:
            raise ValueError(f"sample {sample.id}: {name} {letter!r} is not one of the choices {list(sample.choices)}")
    letters = dict(sample.choices)  # every letter is scored: the restored run's prediction comes for free
    needs_sinks = any(s in settings.subsets for s in SUBSETS_WITH_N)
    if needs_sinks:
        _require_sink_constants(model)
    objects = (sorted(sample.object_positions[base]) if "object" in settings.subsets and sample.object_positions
               and sample.object_positions.get(base) else [])
    if fast is None:
        fast = settings.mode == "teacher_forced" and not any(hp.has_hooks() for hp in model.hook_points())
    if fast and settings.mode != "teacher_forced":
        raise ValueError("the fast path scores teacher-forced; the official mode generates (fast=False)")
    layers = list(settings.layers) if settings.layers is not None else None
    all_layers = layers if layers is not None else list(range(model.cfg.n_layers))

    # the one clean pass and its recorders
    sink_rec = sinks.SinkRecorder(model) if needs_sinks else None
    roles_rec = roles.ModalityAttentionRecorder(model, clean) if needs_sinks else None
    need_capture = not fast or fast_patching.drop_layer(settings.site, all_layers, model.cfg.n_layers) > 0
    act_rec = (patching.ActivationRecorder(model, sorted(set(base_positions) | set(objects)), settings.site,  # type: ignore[arg-type]
                                           layers) if need_capture else None)
    hooks = [*(sink_rec.hooks() if sink_rec else []), *(roles_rec.hooks() if roles_rec else []),
             *(act_rec.hooks() if act_rec else [])]
    if fast:
        clean_run = fast_patching.clean_pass(model, clean, hooks)
        corrupt_run = fast_patching.corrupt_pass(model, clean_run, corrupt)
        runs = {c: {L: scoring.candidate_prob(r.last_logits, a) for L, a in letters.items()}
                for c, r in (("clean", clean_run), ("corrupt", corrupt_run))}
    else:
        with model.hooks(fwd_hooks=hooks):
            runs = {"clean": scoring.score(model, clean, letters, mode=settings.mode,
                                           max_new_tokens=settings.max_new_tokens)}
        runs["corrupt"] = scoring.score(model, corrupt, letters, mode=settings.mode,
                                        max_new_tokens=settings.max_new_tokens)
    p_clean = {L: float(p[0]) for L, p in runs["clean"].items()}
    p_corrupt = {L: float(p[0]) for L, p in runs["corrupt"].items()}

    st = (sink_statistics(model, clean, base, settings.n_divs, sink_rec.values()[:, 0], roles_rec.roles)
          if sink_rec and roles_rec else SampleSinks())
    subsets: list[tuple[str, int | None, list[int]]] = []
    if "all" in settings.subsets:
        subsets.append(("all", None, base_positions))
    if objects:
        subsets.append(("object", None, objects))
    for n in settings.n_divs if needs_sinks else ():
        sink_set = st.global_base[n]
        uni, cross = roles.split_sinks(sink_set, [st.mean_mds[p] for p in sink_set], dominant,
                                       rule=settings.split_rule)  # type: ignore[arg-type]
        chosen = {"sink": sorted(sink_set),
                  "random_sink_num": random_subset(base_positions, len(sink_set), settings.seed, sample.id, n),
                  "random_sink_num_half": random_subset(base_positions, len(sink_set) // 2, settings.seed + 1,
                                                        sample.id, n),
                  "cross_modal_sink": sorted(cross), "uni_modal_sink": sorted(uni)}
        subsets += [(name, n, chosen[name]) for name in SUBSETS_WITH_N if name in settings.subsets]

    positions = [s for _, _, s in subsets]
    captured = act_rec.activations() if act_rec else None
    if fast:
        logits = fast_patching.restored_logits(model, clean_run, corrupt_run, positions, settings.site,  # type: ignore[arg-type]
                                               layers, captured, settings.batch_size)
        restored = {L: scoring.candidate_prob(logits, a) for L, a in letters.items()}
    else:
        restored = patching.patched_probs(model, captured, corrupt, positions, letters, mode=settings.mode,  # type: ignore[arg-type]
                                          batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)
    cells = []
    for i, (name, n, positions) in enumerate(subsets):
        ie = patching.indirect_effect(p_corrupt[o_clean], float(restored[o_clean][i]),
                                      p_corrupt[o_corrupt], float(restored[o_corrupt][i]))
        pred = max(letters, key=lambda L: float(restored[L][i]))
        cells.append({"subset": name, "n_div": n, "size": len(positions), "positions": positions,
                      "restored_pred": pred, **asdict(ie)})
    return {
        "id": sample.id, "dominant": dominant, "base": base, "o_clean": o_clean, "o_corrupt": o_corrupt,
        "label": sample.label, "n_base": len(base_positions), "seq_len": clean.input_ids.shape[1],
        "n_layers_patched": len(settings.layers) if settings.layers is not None else model.cfg.n_layers,
        "p_clean": {"clean": p_clean[o_clean], "corrupt": p_clean[o_corrupt]},
        "pred_clean": max(p_clean, key=p_clean.get), "pred_corrupt": max(p_corrupt, key=p_corrupt.get),
        "object_note": sample.meta.get("object_error"),
        "video": sample.meta.get("video"), "audio_path": sample.meta.get("audio"),
        "label_name": sample.meta.get("label_name"),
        "cells": cells,
        "sinks": {"per_layer": st.per_layer, "frequency": st.frequency,
                  "global_base": {str(k): v for k, v in st.global_base.items()},
                  "mean_mds": {str(k): v for k, v in st.mean_mds.items()}},
    }, st


def run_tracing(
    model: Any,
    source: SampleSource,
    dominance_records: Sequence[Mapping[str, Any]],
    out: str | Path,
    settings: TraceSettings = TraceSettings(),
    run_info: Mapping[str, Any] | None = None,
    resume: bool = True,
    history_dir: str | Path | None = None,
) -> Path:
    """Trace every dominant sample not yet in `out/tracing/tracing.jsonl`.

    `history_dir`, when given, also receives each sample's MDS history in the official layout
    (`k_divde_<N>/<id>_history.json`, N = the smallest of `n_divs`).
    """
    out = Path(out)
    write_settings(out / "tracing", {"study": "tracing", **asdict(settings), **(run_info or {})}, resume)
    store = RecordStore(out / "tracing" / RECORDS_FILE, resume=resume)
    torch.manual_seed(settings.seed)
    for rec in tqdm(to_trace(dominance_records), desc="tracing"):
        if rec["id"] in store:
            continue
        store.append(trace_record(model, source, rec, settings, history_dir))
    return store.path


def to_trace(dominance_records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The dominance records of the samples a tracing run traces (audio- or video-dominant), in order."""
    return [r for r in dominance_records if r.get("dominant") in ("audio", "video")]


def trace_record(
    model: Any, source: SampleSource, rec: Mapping[str, Any], settings: TraceSettings,
    history_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The tracing record of one dominant sample (or its skip record), from its dominance record; the per-sample
    work of `run_tracing`, also run by the Ray actors of `analyses.distributed`."""
    dominant = rec["dominant"]
    sample = source.prepare(rec["id"])
    reason = skip_reason(model, sample, settings)
    if reason:
        return {"id": sample.id, "dominant": dominant, "skipped": reason}
    record, st = trace_sample(model, sample, dominant, rec["pred"]["av"],
                              rec["pred"][CORRUPTED_CONDITION[dominant]], settings)
    if history_dir is not None and st.history:
        from . import official

        history = {p: official.SinkHistory(**h) for p, h in st.history.items()}
        official.write_history(official.history_path(history_dir, sample.id, min(settings.n_divs)), history)
    return record


def to_stage2(records: Sequence[Mapping[str, Any]], subset: str, n_div: int | None) -> list[Any]:
    """The traced samples' results for one subset as official stage-2 records (METHOD §7.7), so the official
    tooling (`official.ie_from_records`, causal_effect.py) reads them. ids are the records' order; the
    `correct_*` probabilities come from this run's clean scoring and `layerlist_len` = layers x |S|."""
    from .official import Stage2Record

    out = []
    for rec in traced(records):
        cell = next((c for c in rec["cells"] if c["subset"] == subset and c["n_div"] == n_div), None)
        if cell is None:
            continue
        out.append(Stage2Record(
            id=len(out), video=rec.get("video") or rec["id"], audio_path=rec.get("audio_path") or "unknown_audio",
            label=rec.get("label"), label_name=rec.get("label_name"), correct_pred=rec["o_clean"],
            corrupt_pred=rec["o_corrupt"], restored_pred=cell["restored_pred"],
            correct_correct_word_prob=rec["p_clean"]["clean"], correct_corrupt_word_prob=rec["p_clean"]["corrupt"],
            corrupt_correct_word_prob=cell["p_corrupt_clean"], corrupt_corrupt_word_prob=cell["p_corrupt_corrupt"],
            restored_correct_word_prob=cell["p_restored_clean"], restored_corrupt_word_prob=cell["p_restored_corrupt"],
            layerlist_len=rec["n_layers_patched"] * cell["size"],
        ))
    return out


def skip_reason(model: Any, sample: PreparedSample, settings: TraceSettings) -> str | None:
    """Why a sample is left out of the study (recorded as such, so a resumed run does not retry it), or None."""
    if settings.min_audio_chunks is not None:
        mm = model.modality_map(sample.inputs["av"])
        chunks = int(mm.chunk[0][mm.mask("audio")[0]].unique().numel())
        if chunks < settings.min_audio_chunks:
            return f"audio spans {chunks} chunks < min_audio_chunks {settings.min_audio_chunks}"
    return None


def traced(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of traced samples (without the skipped ones)."""
    return [r for r in records if "skipped" not in r]


def ie_cells(records: Sequence[Mapping[str, Any]], method: str = "t", seed: int = 0) -> list[Any]:
    """Mean and 95% CI of IE_clean and IE_corrupt per (dominant, subset, N) over the traced samples."""
    from .report import IECell
    from .stats import mean_ci

    groups: dict[tuple[str, str, int | None], dict[str, list[float]]] = {}
    for rec in traced(records):
        for cell in rec["cells"]:
            g = groups.setdefault((rec["dominant"], cell["subset"], cell["n_div"]), {"clean": [], "corrupt": []})
            g["clean"].append(cell["ie_clean"])
            g["corrupt"].append(cell["ie_corrupt"])
    return [IECell(subset=s, n_div=n, dominant=d,  # type: ignore[arg-type]
                   ie_clean=mean_ci(v["clean"], method=method, seed=seed),  # type: ignore[arg-type]
                   ie_corrupt=mean_ci(v["corrupt"], method=method, seed=seed))  # type: ignore[arg-type]
            for (d, s, n), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))]


def write_report(out: str | Path, ci_method: str = "t", seed: int = 0) -> dict[str, Path]:
    """Tables and plots of a tracing run (`out/tracing/`): ie_table.md / .csv, ie_bars.png, sinks_per_layer.png,
    sink_frequency.png, mds.png. Every file is written atomically; returns their paths."""
    from . import report
    from .records import atomic_write_text

    folder = Path(out) / "tracing"
    all_records = RecordStore(folder / RECORDS_FILE).read()
    records = traced(all_records)
    if not all_records:
        raise ValueError(f"{folder / RECORDS_FILE}: no tracing records to report")
    settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    cells = ie_cells(records, method=ci_method, seed=seed)
    skipped = len(all_records) - len(records)
    header = (f"# Indirect effects ({len(records)} samples, {skipped} skipped; site {settings['site']}, layers "
              f"{settings['layers'] or 'all'}, scoring {settings['mode']}, split {settings['split_rule']}, "
              f"seed {settings['seed']}; 95% CI, {ci_method})\n\n")
    paths = {
        "table_md": atomic_write_text(folder / "ie_table.md", header + report.ie_table_markdown(cells) + "\n"),
        "table_csv": atomic_write_text(folder / "ie_table.csv", report.ie_table_csv(cells)),
        "ie_bars": report.plot_ie_bars(cells, folder / "ie_bars.png"),
    }
    with_sinks = [r for r in records if r["sinks"]["per_layer"]]
    if with_sinks:
        n_layers = len(with_sinks[0]["sinks"]["per_layer"]["video"])
        mean_per_layer = {m: [float(np.mean([r["sinks"]["per_layer"][m][layer] for r in with_sinks]))
                              for layer in range(n_layers)] for m in ("video", "audio", "text")}
        paths["sinks_per_layer"] = report.plot_sinks_per_layer(mean_per_layer, folder / "sinks_per_layer.png")
        freqs = {m: [f for r in with_sinks for f in r["sinks"]["frequency"][m]] for m in ("video", "audio", "text")}
        paths["sink_frequency"] = report.plot_sink_frequency_histogram(freqs, folder / "sink_frequency.png")
        mds = {f"{base} sinks ({'audio' if base == 'video' else 'video'}-dominant)":
               [v for r in with_sinks if r["base"] == base for v in r["sinks"]["mean_mds"].values()]
               for base in ("video", "audio")}
        paths["mds"] = report.plot_mds_distributions(mds, folder / "mds.png")
    return paths
