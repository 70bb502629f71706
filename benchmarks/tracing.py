"""One sample's IE table (clean, corrupted, six subsets), the official way on transformers vs hooked-av, side by side.

A Qwen2.5-Omni thinker with random weights and a decoder sized for a CPU (default 8 layers, d_model 512, 8 heads,
2 key-value heads) on an audio-in-video clip laid out like the paper's (10 s: 1440 video + 250 audio tokens,
~130 prompt tokens, ~1.84k in all). Audio-dominant, as the paper's "people" set: the corrupted run has silent
audio, the restored subsets are video tokens. The table: all, sink, random_sink_num, random_sink_num_half,
cross_modal_sink, uni_modal_sink at N = 2, each restored at the attention input of every layer.

- (a) official-style (`official_style.py`, METHOD.md §3-§8): transformers, eager LLM attention; stage 1 = two
  `generate` calls with output_attentions and output_hidden_states (sinks from the hidden states, MDS from the
  maps); stage 2 = per subset a capturing clean `generate` and a restoring corrupted `generate`.
- (b) hooked-av: `analyses.tracing.trace_sample` (teacher-forced): one clean sdpa pass carrying scoring, sink
  values (hook_sink), the MDS recorder and the K/V cache; the corrupted pass and each restored run reuse its prefix
  and compute only the positions that change (`hooked_av.recipes.fast_patching`).
- the floor: (2 + 6) plain sdpa prefills of the hooked model (towers included).

Each measurement runs in a fresh process (same seed, so the same model and inputs), after a warm-up on a short clip.
Time is wall time; memory is the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs just
before the measured call): "growth" is the peak minus the resident size before the call (the working memory of the
pipeline; weights and inputs are already resident), "peak" the absolute peak. Both pipelines restore the same
subsets; the check line compares their indirect effects (official first generated step = teacher-forced).

    .venv/bin/python benchmarks/tracing.py                     # the table at the paper's length
    .venv/bin/python benchmarks/tracing.py --scaling 5,10,20,30,44 --plot benchmarks/results/tracing_scaling.png

With --scaling, ours runs in full at every length; the official pipeline in full up to --official-full seconds,
and above that up to --official-max seconds as its stage 1 plus one stage-2 pair, with the time of the other five
pairs added (each pair costs the same two generates whatever the subset); beyond --official-max, or where a
quadratic fit of its peaks so far predicts more than 80 % of the machine's available memory, its time and memory are
extrapolated from quadratic fits (marked so). The 24 GiB estimates fit the absolute peaks
(quadratic for the official pipeline, whose attention maps grow as T^2; linear for ours) and are extrapolations.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: sink constants for the random thinker: tau 2.3 on dims 1, 2 makes 800 of the 1440 video tokens global sinks at
#: N = 2 (the paper's clips: ~45-55 % of the A/V tokens)
SINK_DIMS, TAU = (1, 2), 2.3
SUBSETS = ("all", "sink", "random_sink_num", "random_sink_num_half", "cross_modal_sink", "uni_modal_sink")
LETTERS = {chr(ord("A") + i): (10 + i, 300 + i) for i in range(20)}
GIB = 2**30
MIB = 2**20


def _setup(args: dict[str, Any], seconds: int) -> tuple[Any, Any, dict, dict]:
    from common import clip_inputs, random_thinker
    from hooked_av import HookedAVModel, SinkConstants

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the towers (sdpa, like the official flash-attn ones) warn about output_attentions
    torch.set_num_threads(args["threads"])
    hf = random_thinker(args["layers"], args["d_model"], args["seed"])
    model = HookedAVModel.from_hf_model(hf, sinks=SinkConstants(dims=SINK_DIMS, tau=TAU))
    raw = clip_inputs(seconds, seed=args["seed"])
    silent = dict(raw, input_features=torch.zeros_like(raw["input_features"]))
    return hf, model, raw, silent


def _sample(raw: dict, silent: dict) -> Any:
    from analyses.study import PreparedSample
    from hooked_av.recipes.scoring import AnswerCandidates

    black = dict(raw, pixel_values_videos=torch.zeros_like(raw["pixel_values_videos"]))
    choices = {L: AnswerCandidates(L, ids) for L, ids in LETTERS.items()}
    return PreparedSample("bench", {"av": raw, "a": black, "v": silent}, choices, label="A")


def _ours(model: Any, sample: Any) -> Any:
    from analyses import tracing

    settings = tracing.TraceSettings(n_divs=(2,), subsets=("all", *tracing.SUBSETS_WITH_N), seed=0)
    return tracing.trace_sample(model, sample, "audio", "A", "B", settings)[0]


def _official(hf: Any, model: Any, raw: dict, silent: dict, answer_tokens: int, subsets: tuple[str, ...]) -> Any:
    import official_style

    modality = model.modality_map(raw).modality[0]
    return official_style.ie_table(hf, raw, silent, LETTERS, modality, "audio", SINK_DIMS, TAU, n_div=2, seed=0,
                                   answer_tokens=answer_tokens, subsets=subsets)


def _floor(model: Any, raw: dict, silent: dict, n: int) -> None:
    with torch.no_grad():
        model(raw, return_type="last_logits")
        for _ in range(n - 1):
            model(silent, return_type="last_logits")


def measure(kind: str, args: dict[str, Any], seconds: int) -> dict[str, Any]:
    """Build the model and inputs, warm up on a 2-s clip, then time one run of `kind` and its peak memory."""
    from common import peak_rss_bytes, reset_peak_rss, rss_bytes

    hf, model, raw, silent = _setup(args, seconds)
    _, _, wraw, wsilent = _setup(args, 2)
    if kind.startswith("official"):
        import official_style

        official_style.use_eager_llm(hf)
        subsets = SUBSETS if kind == "official" else ("all",)
        run = lambda r, s: _official(hf, model, r, s, args["answer_tokens"], subsets)  # noqa: E731
    elif kind == "ours":
        samples = {id(raw): _sample(raw, silent), id(wraw): _sample(wraw, wsilent)}  # built before the clock
        run = lambda r, s: _ours(model, samples[id(r)])  # noqa: E731
    elif kind == "floor":
        run = lambda r, s: _floor(model, r, s, 2 + len(SUBSETS))  # noqa: E731
    else:
        raise ValueError(kind)
    run(wraw, wsilent)
    reset_peak_rss()
    before = rss_bytes()
    t0 = time.perf_counter()
    result = run(raw, silent)
    elapsed = time.perf_counter() - t0
    peak = peak_rss_bytes()
    out: dict[str, Any] = {"kind": kind, "seconds": seconds, "tokens": int(raw["input_ids"].shape[1]),
                           "time": elapsed, "peak": peak, "growth": peak - before}
    if kind.startswith("official"):
        out.update(stages=result.times, subsets=result.subsets, p_corrupt_first=result.p_corrupt_first,
                   restored_first=result.restored_first)
        if kind == "official_stages":  # stage 1 + one pair measured; the other pairs cost the same
            pair = next(v for k, v in result.times.items() if k.startswith("stage 2"))
            out["time_measured"] = elapsed
            out["time"] = elapsed + (len(SUBSETS) - 1) * pair
    elif kind == "ours":
        out["cells"] = {c["subset"]: {"positions": c["positions"], "ie_clean": c["ie_clean"],
                                      "ie_corrupt": c["ie_corrupt"]} for c in result["cells"]}
        mm = model.modality_map(raw)
        out["counts"] = {m: int(mm.mask(m)[0].sum()) for m in ("video", "audio", "text")}
        out["work"] = decoder_work(mm, [c["positions"] for c in result["cells"]])
    return out


def decoder_work(mm: Any, subsets: list[list[int]]) -> dict[str, float]:
    """The rows ours puts through the decoder's linear layers, in prefills (T rows): the clean pass, the corrupted
    pass from c0 (the first audio token: the audio is silenced) and each restored run's [p0, T) minus S. With
    exact results no method can compute fewer rows, so this bounds what skipping rows can save."""
    from hooked_av.recipes.fast_patching import plan_run

    t = mm.seq_len
    c0 = int(mm.positions("audio")[0])
    runs = [plan_run(s, t, c0, drop=0) for s in subsets]
    return {"clean": 1.0, "corrupted": (t - c0) / t,
            "restored": sum(len(r.late) for r in runs if r is not None) / t}


def _child(queue: Any, kind: str, args: dict[str, Any], seconds: int) -> None:
    try:
        queue.put(measure(kind, args, seconds))
    except BaseException as e:  # report instead of hanging the parent
        queue.put({"kind": kind, "seconds": seconds, "error": f"{type(e).__name__}: {e}"})
        raise


def run_fresh(kind: str, args: dict[str, Any], seconds: int) -> dict[str, Any]:
    """`measure` in a fresh spawned process (no memory or allocator state shared with other measurements)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kind, args, seconds))
    proc.start()
    while True:  # a child killed (e.g. out of memory) sends nothing: do not wait for it forever
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{kind} at {seconds} s: the process died (exit code {proc.exitcode})") from None
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{kind} at {seconds} s failed: {result['error']}")
    return result


def compare(official: dict[str, Any], ours: dict[str, Any]) -> tuple[bool, float]:
    """Whether both restored the same subsets, and the largest |IE difference| (pp) over the subsets they share
    (official first generated step, which is the teacher-forced probability)."""
    same, worst = True, 0.0
    p0 = official["p_corrupt_first"]
    for name, cell in ours["cells"].items():
        if name not in official["subsets"]:
            continue
        if sorted(official["subsets"][name]) != sorted(cell["positions"]):
            same = False
            continue
        r = official["restored_first"][name]
        ie_clean, ie_corrupt = 100 * (r["A"] - p0["A"]), 100 * (p0["B"] - r["B"])
        worst = max(worst, abs(ie_clean - cell["ie_clean"]), abs(ie_corrupt - cell["ie_corrupt"]))
    return same, worst


def table(args: argparse.Namespace) -> dict[str, Any]:
    cfg = vars(args)
    off = run_fresh("official", cfg, args.seconds)
    ours = run_fresh("ours", cfg, args.seconds)
    floor = run_fresh("floor", cfg, args.seconds)
    c = ours["counts"]
    sizes = ", ".join(f"{k} {len(v['positions'])}" for k, v in ours["cells"].items())
    print(f"random Qwen2.5-Omni thinker: {args.layers} layers, d_model {args.d_model}, 8 heads / 2 kv heads; "
          f"{args.seconds}-s clip = {ours['tokens']} tokens ({c['video']} video, {c['audio']} audio, {c['text']} "
          f"text); torch threads {args.threads}; official generates {args.answer_tokens} tokens per call")
    print(f"subsets (video tokens restored at every layer): {sizes}")
    print(f"{'':42s} {'time':>9s} {'peak RSS growth':>16s} {'peak RSS':>10s}")
    for name, r in (("(a) official-style, transformers", off), ("(b) hooked-av trace_sample", ours),
                    (f"floor: {2 + len(SUBSETS)} plain sdpa prefills", floor)):
        print(f"{name:42s} {r['time']:8.1f}s {r['growth'] / MIB:12.0f} MiB {r['peak'] / MIB:6.0f} MiB")
    for stage, t in off["stages"].items():
        print(f"    official {stage:46s} {t:8.1f}s")
    print(f"time:   official / ours = {off['time'] / ours['time']:5.1f}x (target >= 10x); "
          f"ours / floor = {ours['time'] / floor['time']:4.2f}x (target <= 1.5x)")
    print(f"memory: official / ours = {off['growth'] / ours['growth']:5.1f}x less peak RSS growth (target >= 10x); "
          f"absolute peaks {off['peak'] / MIB:.0f} vs {ours['peak'] / MIB:.0f} MiB")
    w = ours["work"]
    units = sum(w.values())
    prefill = floor["time"] / (2 + len(SUBSETS))
    print(f"work:   ours computes {w['clean']:.2f} + {w['corrupted']:.2f} + {w['restored']:.2f} = {units:.2f} prefills "
          f"of rows (clean, corrupted from c0, restored runs); at {prefill:.2f} s per plain prefill that alone is "
          f"{units * prefill:.1f} s, so exact results cap official / ours at ~{off['time'] / (units * prefill):.1f}x here")
    same, worst = compare(off, ours)
    print(f"check:  same subsets restored: {'yes' if same else 'NO'}; max |IE ours - IE official (first step)| = "
          f"{worst:.2e} pp")
    return {"official": off, "ours": ours, "floor": floor}


def _fit_solve(tokens: list[float], values: list[float], degree: int, target: float) -> tuple[np.ndarray, float]:
    """Least-squares polynomial fit of values(tokens) and the token count where it reaches `target`."""
    coef = np.polyfit(tokens, values, degree)
    roots = np.roots(coef - np.r_[np.zeros(degree), target])
    real = [r.real for r in roots if abs(r.imag) < 1e-6 and r.real > 0]
    return coef, min(real) if real else float("nan")


def available_bytes() -> int:
    """MemAvailable of the machine."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fits(measured: list[dict[str, Any]], tokens: int, margin: float = 0.8) -> bool:
    """Whether the official pipeline's peak at `tokens`, predicted by a quadratic fit of the peaks measured so far,
    stays under `margin` of the machine's available memory (else it is extrapolated instead of run)."""
    if len(measured) < 3:
        return True
    coef = np.polyfit([r["tokens"] for r in measured], [r["peak"] for r in measured], 2)
    predicted = float(np.polyval(coef, tokens))
    if predicted > margin * available_bytes():
        print(f"official at {tokens} tokens: predicted peak {predicted / GIB:.1f} GiB > {margin:.0%} of the "
              f"{available_bytes() / GIB:.1f} GiB available: extrapolated, not run", flush=True)
        return False
    return True


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    cfg = vars(args)
    secs = [int(s) for s in args.scaling.split(",")]
    rows: dict[str, list[dict[str, Any]]] = {"ours": [], "official": []}
    for s in secs:
        rows["ours"].append(run_fresh("ours", cfg, s))
        if s <= args.official_full:
            rows["official"].append(run_fresh("official", cfg, s) | {"how": "measured"})
        elif s <= args.official_max and fits(rows["official"], rows["ours"][-1]["tokens"]):
            rows["official"].append(run_fresh("official_stages", cfg, s) | {"how": "stages"})
        r = rows["ours"][-1]
        line = f"{s:3d} s {r['tokens']:6d} tokens: ours {r['time']:7.1f} s {r['peak'] / MIB:7.0f} MiB peak"
        if rows["official"] and rows["official"][-1]["seconds"] == s:
            o = rows["official"][-1]
            line += (f"; official {o['time']:7.1f} s {o['peak'] / MIB:7.0f} MiB ({o['how']}); ratios: time "
                     f"{o['time'] / r['time']:4.1f}x, peak {o['peak'] / r['peak']:4.1f}x, peak growth "
                     f"{o['growth'] / r['growth']:4.1f}x")
        print(line, flush=True)
    measured = rows["official"]
    t_coef, _ = _fit_solve([r["tokens"] for r in measured], [r["time"] for r in measured], 2, 0)
    m_coef, off_24 = _fit_solve([r["tokens"] for r in measured], [r["peak"] for r in measured], 2, 24 * GIB)
    _, ours_24 = _fit_solve([r["tokens"] for r in rows["ours"]], [r["peak"] for r in rows["ours"]], 1, 24 * GIB)
    done = {r["seconds"] for r in measured}
    for r in rows["ours"]:
        if r["seconds"] not in done:
            rows["official"].append({"seconds": r["seconds"], "tokens": r["tokens"], "how": "extrapolated",
                                     "time": float(np.polyval(t_coef, r["tokens"])),
                                     "peak": float(np.polyval(m_coef, r["tokens"]))})
    rows["official"].sort(key=lambda r: r["tokens"])
    print(f"longest sequence in 24 GiB (fit of the absolute peak RSS, extrapolated): official ~{off_24:,.0f} tokens "
          f"(quadratic), hooked-av ~{ours_24:,.0f} tokens (linear)")
    result = {"rows": rows, "official_24gib_tokens": off_24, "ours_24gib_tokens": ours_24}
    if args.plot:
        plot(result, Path(args.plot), args)
    return result


def plot(result: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color, label in (("official", "tab:red", "official-style (transformers)"),
                               ("ours", "tab:blue", "hooked-av")):
        rows = result["rows"][name]
        for ax, key, scale in ((axes[0], "time", 1.0), (axes[1], "peak", 1 / GIB)):
            x = [r["tokens"] for r in rows]
            y = [r[key] * scale for r in rows]
            ax.plot(x, y, "-", color=color, label=label, alpha=0.6)
            for r, yy in zip(rows, y):
                how = r.get("how", "measured")
                ax.plot(r["tokens"], yy, "o" if how == "measured" else ("s" if how == "stages" else "x"),
                        color=color, mfc=color if how == "measured" else "none")
    axes[1].axhline(24, color="gray", ls=":", lw=1)
    axes[1].text(1000, 24 * 0.85, "24 GiB", color="gray", fontsize=8)
    for ax, title in ((axes[0], "wall time of one sample's IE table (s)"), (axes[1], "peak RSS (GiB)")):
        ax.set_xlabel("sequence length (tokens)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"random Qwen2.5-Omni thinker, {args.layers} layers x d_model {args.d_model}, {args.threads} CPU "
                 "threads; o measured, s stage 1 + one stage-2 pair measured, x extrapolated", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--seconds", type=int, default=10, help="clip length (10 s = ~1.84k tokens, as the paper's)")
    ap.add_argument("--answer-tokens", type=int, default=2, help="tokens per official generate call")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scaling", default="", help="comma-separated clip lengths in seconds (e.g. 5,10,20,30,44)")
    ap.add_argument("--official-full", type=int, default=10, help="longest clip for the full official run")
    ap.add_argument("--official-max", type=int, default=20, help="longest clip for the official stage run")
    ap.add_argument("--plot", default="", help="PNG path for the scaling plot")
    ap.add_argument("--json", default="", help="write every measurement to this JSON file")
    args = ap.parse_args()
    result = scaling(args) if args.scaling else table(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_compact(result), indent=1, default=str) + "\n")


def _compact(x: Any) -> Any:
    """The measurements with position lists replaced by their lengths (the JSON keeps numbers, not subsets)."""
    if isinstance(x, dict):
        return {k: _compact(v) for k, v in x.items()}
    if isinstance(x, list):
        if len(x) > 16 and all(isinstance(v, int) for v in x):
            return f"<{len(x)} positions>"
        return [_compact(v) for v in x]
    return x


if __name__ == "__main__":
    main()
