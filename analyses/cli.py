"""`hooked-av` command line: the paper's studies on any model of the zoo.

    hooked-av dominance --model qwen2.5-omni-7b --checkpoint DIR --data people_case_2.json --media-root M --out runs/x
    hooked-av trace     --model qwen2.5-omni-7b --checkpoint DIR --data people_case_2.json --media-root M --out runs/x
    hooked-av report    --out runs/x
    hooked-av calibrate --model DIR --data LIST --media-root M --out runs/cal
    hooked-av official-ie --stage2 before_attn_layer0_window50people.json
    hooked-av mitigate  --model DIR --probes qa_final_single_filtered.json --media-root AVHBench --out runs/m \
                        --methods plain,amplify,contrastive,guidance --alphas 0.2,0.5 --betas 1 --strengths 0.5
    hooked-av compare   --runs qwen7b=runs/x vs2=runs/y --out runs/cmp   (trace runs of the same study, one per model)
    hooked-av trace ... --ray HEAD:6379 --device cuda    (dominance too: one actor per GPU; --ray-local N on a laptop)

Runs append one JSON line per sample and resume where they stopped; settings and seeds are in settings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _ints(text: str) -> tuple[int, ...]:
    """"2,3,4" or "0-27" or "6-27,3"."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return tuple(out)


def _floats(text: str) -> tuple[float, ...]:
    """"0.2,0.5,1"."""
    return tuple(float(part) for part in text.split(",") if part)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (qwen2.5-omni-7b, ...), checkpoint dir, or 'tiny'")
    p.add_argument("--checkpoint", help="local HF checkpoint directory for a preset")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", type=_device_map, default=None,
                   help="one model over several devices (accelerate): auto, balanced, sequential, or a JSON "
                        "{module: device} object or file, e.g. '{\"\": 0}'")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where modules mapped to 'disk' go")
    p.add_argument("--sink-dims", type=_ints, default=None, help="override the preset's sink dims, e.g. 458,2570")
    p.add_argument("--tau", type=float, default=None, help="override the preset's sink threshold")


def _device_map(text: str) -> Any:
    """--device-map: a strategy name, a JSON object, or a JSON file holding one."""
    from hooked_av.dispatch import STRATEGIES

    if text in STRATEGIES:
        return text
    path = Path(text)
    try:
        value = json.loads(path.read_text(encoding="utf-8") if path.is_file() else text)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"expected {', '.join(STRATEGIES)}, a JSON object or a JSON file ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a device map is a JSON object {module name: device}")
    return value


def _ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray", "run the per-sample work on a Ray cluster (pip install 'hooked-av[ray]'): one "
                                    "actor per GPU holding the model, samples sharded by id, merged and resumable")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="a running cluster: HOST:6379 (ray start --head), ray://HOST:10001, or no value for the "
                        "one started on this machine (RAY_ADDRESS)")
    g.add_argument("--ray-local", type=int, default=None, metavar="N",
                   help="start a local Ray instance with N CPUs for this run (N actors on CPU)")
    g.add_argument("--actors", type=int, default=None,
                   help="model copies (default: one per GPU, or per CPU with --device cpu)")
    g.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each actor holds (default: 1 with --device cuda, else 0; 2+ with --device-map)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0)
    g.add_argument("--shards", type=int, default=None, help="shard files (default: 4 per actor)")
    g.add_argument("--max-restarts", type=int, default=3,
                   help="times Ray restarts a dead actor and retries its shard (then the shard goes elsewhere)")
    g.add_argument("--keep-shards", action="store_true", help="keep the per-shard JSONL files after merging")


def _on_ray(args: argparse.Namespace) -> bool:
    if args.ray is not None and args.ray_local is not None:
        raise ValueError("pass --ray ADDRESS or --ray-local N, not both")
    return args.ray is not None or args.ray_local is not None


def _ray_options(args: argparse.Namespace) -> Any:
    from .distributed import RayOptions

    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if str(args.device).startswith("cuda") else 0.0
    return RayOptions(address=args.ray, local_cpus=args.ray_local, actors=args.actors, gpus_per_actor=gpus,
                      cpus_per_actor=args.cpus_per_actor, shards=args.shards, max_restarts=args.max_restarts,
                      max_task_retries=args.max_restarts, keep_shards=args.keep_shards,
                      fault_file=os.environ.get("HOOKED_AV_RAY_FAULT_FILE"))


def _run_on_ray(args: argparse.Namespace, job: Any, ids: Any) -> Path:
    """Run a study job over `ids` on Ray (`distributed.run_sharded`); the merged records' path."""
    from .distributed import run_sharded

    done = run_sharded(job, ids, args.out, _ray_options(args), resume=not args.no_resume)
    print(f"Ray: {done.summary()}")
    return done.path


def _ray_load(command: str, argv: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """What each Ray actor loads for a `dominance` / `trace` command line: (model, source, run info), exactly as
    the single-process command does."""
    args = argparse.Namespace(**argv)
    rt = _runtime(args)
    source, _ = _source(args, rt)
    return rt.model, source, (_trace_info(args, rt) if command == "trace" else _run_info(args, rt))


def _ray_job(command: str, study: str, args: argparse.Namespace, settings: Any, **kw: Any) -> Any:
    import functools

    from .distributed import StudyJob

    return StudyJob(study, settings, functools.partial(_ray_load, command, dict(vars(args))), **kw)


def _listed(args: argparse.Namespace) -> list[Any]:
    """The sample list of a command line (without loading a model)."""
    from .datasets import load_vggsound_mc

    samples = load_vggsound_mc(args.data, media_root=args.media_root, step=args.data_step)
    return samples[: args.limit] if args.limit is not None else samples


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="official VGGSound multiple-choice sample list (JSON)")
    p.add_argument("--media-root", default=None, help="folder the list's media paths are relative to")
    p.add_argument("--data-step", type=int, default=1, choices=(1, 2), help="which official list format it is")
    p.add_argument("--prompt-step", type=int, default=1, choices=(1, 2),
                   help="official prompt used for every run (1: single newline, 2: blank line before 'Respond')")
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="teacher_forced", choices=("teacher_forced", "official"),
                   help="answer probability: teacher-forced first token, or official max over generated steps")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="generation length in official mode (the official scripts use 1024)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-av", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo on the embedded default model")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--clips", type=int, default=None, help="held-out clips to generate (default 150)")
    demo.add_argument("--max-traced", type=int, default=None, help="dominant samples traced per group (default 15)")
    demo.add_argument("--max-mitigation-probes", "--max-probes", dest="max_mitigation_probes", type=int, default=None,
                      help="mitigation stage: yes/no questions of the clips where audio and video disagree (default 24)")
    demo.add_argument("--max-mitigation-captions", type=int, default=None,
                      help="mitigation stage: captions of those clips (default 3)")
    demo.add_argument("--caption-tokens", type=int, default=None, help="max new tokens of a caption (default 12)")
    sub.add_parser("hooks", help="list the uniform hook names of the tiny demo model")

    dom = sub.add_parser("dominance", help="unimodal-dominance filtering (a / v / av runs)")
    _model_args(dom), _data_args(dom), _ray_args(dom)

    tr = sub.add_parser("trace", help="indirect effects of restoring token subsets (Table 1)")
    _model_args(tr), _data_args(tr), _ray_args(tr)
    tr.add_argument("--dominance", default="run", choices=("run", "list"),
                    help="'run': the dominance study's records in --out; 'list': the letters stored in --data "
                         "(step 1: av/a/v; step 2: correct_pred/corrupt_pred with --dominant)")
    tr.add_argument("--dominant", choices=("audio", "video"), default=None,
                    help="with a step-2 list: which modality dominates every sample (people: audio, sports: video)")
    tr.add_argument("--min-audio-chunks", type=int, default=None,
                    help="skip samples whose audio spans fewer 2-s chunks (official video-dominant script: 5)")
    tr.add_argument("--site", default="before_attn", choices=("before_attn", "kv", "resid_pre", "attn_out", "mlp_out"))
    tr.add_argument("--layers", type=_ints, default=None, help="layers to patch, e.g. 0-27 (default: all)")
    tr.add_argument("--n-divs", type=_ints, default=(2, 3, 4), help="N of K = int(T/N), e.g. 2,3,4")
    tr.add_argument("--split-rule", default="official", choices=("official", "threshold"))
    tr.add_argument("--batch-size", type=int, default=None,
                    help="patched copies per decoder pass (default: 1 on CPU, 8 on GPU)")
    tr.add_argument("--object-blocks", default=None, help="official important_seconds JSON (audio object tokens)")
    tr.add_argument("--strict-level", default="high", choices=("high", "very_high"))
    tr.add_argument("--history", action="store_true", help="also write official history JSON files")

    rep = sub.add_parser("report", help="tables and plots of the runs in --out")
    rep.add_argument("--out", required=True)
    rep.add_argument("--ci", default="t", choices=("t", "bootstrap"))

    cal = sub.add_parser("calibrate", help="find sink dims and tau for a model without known constants")
    _model_args(cal), _data_args(cal)
    cal.add_argument("--n-dims", type=int, default=2)
    cal.add_argument("--tau-rule", default="midpoint", choices=("midpoint", "scaled", "gap"))

    exp = sub.add_parser("export-official", help="a trace run's subset as official stage-2 JSONL")
    exp.add_argument("--out", required=True, help="the run folder (holding tracing/)")
    exp.add_argument("--subset", default="cross_modal_sink")
    exp.add_argument("--n-div", type=int, default=2, help="N of the subset (ignored for all / object)")
    exp.add_argument("--file", required=True, help="where to write the stage-2 JSONL")

    oie = sub.add_parser("official-ie", help="IE_clean / IE_corrupt of official stage-2 records (causal_effect.py)")
    oie.add_argument("--stage2", required=True, nargs="+")
    oie.add_argument("--threshold", type=int, default=None)

    _mitigate_args(sub.add_parser("mitigate", help="hallucination mitigation methods on AVHBench-format probes"))

    cmp = sub.add_parser("compare", help="the same study across models: one IE table and one figure")
    cmp.add_argument("--runs", required=True, nargs="+",
                     help="one trace run folder per model, as LABEL=FOLDER (or FOLDER: its name is the label)")
    cmp.add_argument("--out", required=True, help="where compare.md / compare.csv / compare.png go")
    cmp.add_argument("--ci", default="t", choices=("t", "bootstrap"))
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cmp.add_argument("--allow-mismatch", action="store_true",
                     help="compare runs whose study settings differ (the differences go in the table header)")
    return parser


def _mitigate_args(p: argparse.ArgumentParser) -> None:
    from hooked_av.recipes import amplify, mitigate

    _model_args(p)
    p.add_argument("--probes", required=True,
                   help="AVHBench question file (qa_final_single_filtered.json) or an avsynth yes/no / captions file")
    p.add_argument("--media-root", default=None,
                   help="folder with videos/<id>.mp4 and audios/<id>.wav (AVHBench) or the files' relative paths")
    p.add_argument("--captions", default=None, help="a second file of caption items (e.g. avsynth test_captions.json)")
    p.add_argument("--mc-data", default=None, help="official VGGSound MC list for the 20-way no-harm check")
    p.add_argument("--mc-limit", type=int, default=None, help="first N multiple-choice samples only")
    p.add_argument("--tasks", type=_names, default=None, help="comma-separated AVHBench task names to keep")
    p.add_argument("--limit", type=int, default=None, help="first N probes only (per file)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="model seed (tiny), random token sets and bootstrap")
    p.add_argument("--methods", type=_names, default=("plain", "amplify", "contrastive", "guidance"),
                   help="comma-separated: plain, amplify, contrastive, guidance")
    p.add_argument("--alphas", type=_floats, default=(amplify.OFFICIAL_ALPHA,), help="amplification alphas")
    p.add_argument("--tokens", type=_names, default=("cross_modal",),
                   help=f"token sets to amplify: {','.join(mitigate.TOKEN_SETS)}")
    p.add_argument("--layers", type=_ints, default=None, help="amplified layers (default: the official l > 5)")
    p.add_argument("--queries", default="text", choices=amplify.QUERY_ROWS, help="amplified query rows")
    p.add_argument("--head-rule", default="none", choices=("none", *mitigate.GRANULARITIES),
                   help="also amplify only heads / layers chosen from sink-role statistics")
    p.add_argument("--min-mass", type=float, default=mitigate.VAR_MIN_MASS)
    p.add_argument("--min-share", type=float, default=mitigate.OFFICIAL_ADAPTIVE_THRESHOLD)
    p.add_argument("--top-k", type=int, default=None, help="head rule: the top K heads instead of --min-mass")
    p.add_argument("--betas", type=_floats, default=(mitigate.VCD_BETA,), help="contrastive weights")
    p.add_argument("--drop", default="video", choices=mitigate.DROPS, help="modality removed in the negative")
    p.add_argument("--plausibility", type=float, default=mitigate.VCD_PLAUSIBILITY)
    p.add_argument("--strengths", type=_floats, default=(mitigate.OFFICIAL_GUIDANCE_STRENGTH,),
                   help="guidance strengths (the official base 0.5)")
    p.add_argument("--guidance-first-step", default="adaptive", choices=mitigate.FIRST_STEPS,
                   help="'official' fixes s = 0 on the first token (yes/no answers then equal plain)")
    p.add_argument("--k-divide", type=int, default=mitigate.OFFICIAL_GUIDANCE_K_DIVIDE)
    p.add_argument("--split-rule", default="official", choices=("official", "threshold"))
    p.add_argument("--max-new-tokens", type=int, default=32, help="caption length")
    p.add_argument("--cost-tokens", type=int, default=4, help="tokens generated per method to time (0: off)")
    p.add_argument("--cost-items", type=int, default=2, help="yes/no items whose generation is timed")
    p.add_argument("--prompt-suffix", default="", help="appended to every question")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws of the CIs")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")


def _source(args: argparse.Namespace, rt: Any) -> Any:
    from .datasets import load_vggsound_mc
    from .sources import VGGSoundSource, load_object_blocks

    samples = load_vggsound_mc(args.data, media_root=args.media_root, step=args.data_step)
    if args.limit is not None:
        samples = samples[: args.limit]
    blocks = load_object_blocks(args.object_blocks) if getattr(args, "object_blocks", None) else None
    return VGGSoundSource(samples, rt.process, rt.tokenizer, prompt_step=args.prompt_step, object_blocks=blocks,
                          strict_level=getattr(args, "strict_level", "high"), model=rt.model, load=rt.load), samples


def _run_info(args: argparse.Namespace, rt: Any) -> dict[str, Any]:
    return {**rt.info, "data": str(Path(args.data).resolve()), "data_step": args.data_step,
            "prompt_step": args.prompt_step, "limit": args.limit}


def _runtime(args: argparse.Namespace) -> Any:
    from .runtime import load_runtime

    return load_runtime(args.model, args.checkpoint, args.dtype, args.device, seed=args.seed,
                        sink_dims=args.sink_dims, tau=args.tau, device_map=getattr(args, "device_map", None),
                        offload_folder=getattr(args, "offload_folder", None))


def cmd_dominance(args: argparse.Namespace) -> int:
    from .dominance import DominanceSettings, run_dominance
    from .records import RecordStore

    settings = DominanceSettings(mode=args.mode, seed=args.seed, max_new_tokens=args.max_new_tokens)
    if _on_ray(args):
        ids = list(dict.fromkeys(s.sample_id for s in _listed(args)))
        path = _run_on_ray(args, _ray_job("dominance", "dominance", args, settings), ids)
    else:
        rt = _runtime(args)
        source, _ = _source(args, rt)
        path = run_dominance(rt.model, source, args.out, settings,
                             run_info=_run_info(args, rt), resume=not args.no_resume)
    recs = RecordStore(path).read()
    counts = {d: sum(r["dominant"] == d for r in recs) for d in ("audio", "video", None)}
    print(f"{path}: {len(recs)} samples; audio-dominant {counts['audio']}, video-dominant {counts['video']}, "
          f"neither {counts[None]}")
    return 0


def _stored_dominance(args: argparse.Namespace, s: Any) -> dict[str, Any]:
    """A dominance record from the letters stored in an official list."""
    from .dominance import dominance_of
    from .study import CORRUPTED_CONDITION

    if args.data_step == 2:
        if args.dominant is None:
            raise ValueError("a step-2 list does not say which modality dominates: pass --dominant audio|video")
        if s.correct_pred is None or s.corrupt_pred is None:
            raise ValueError(f"{args.data}: sample {s.sample_id} has no stored correct_pred/corrupt_pred")
        pred = {"av": s.correct_pred, CORRUPTED_CONDITION[args.dominant]: s.corrupt_pred}
        return {"id": s.sample_id, "pred": pred, "dominant": args.dominant}
    pred = {"av": s.av, "a": s.a, "v": s.v}
    if None in pred.values():
        raise ValueError(f"{args.data}: sample {s.sample_id} has no stored av/a/v letters (use --dominance run)")
    return {"id": s.sample_id, "pred": pred, "dominant": dominance_of(pred)}


def _dominance_records(args: argparse.Namespace, samples: list[Any]) -> list[dict[str, Any]]:
    """What `trace` traces: dominance records from the list's stored letters or from the dominance run."""
    from .dominance import RECORDS_FILE
    from .records import RecordStore

    if args.dominance == "list":
        return [_stored_dominance(args, s) for s in samples]
    path = Path(args.out) / "dominance" / RECORDS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `hooked-av dominance` first, or pass --dominance list")
    return RecordStore(path).read()


def _trace_settings(args: argparse.Namespace) -> Any:
    from .tracing import TraceSettings

    return TraceSettings(site=args.site, layers=args.layers, n_divs=tuple(args.n_divs),
                         split_rule=args.split_rule, mode=args.mode, seed=args.seed, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, min_audio_chunks=args.min_audio_chunks)


def _trace_info(args: argparse.Namespace, rt: Any) -> dict[str, Any]:
    return {**_run_info(args, rt), "dominance_source": args.dominance, "dominant": args.dominant,
            "object_blocks": args.object_blocks, "strict_level": args.strict_level}


def cmd_trace(args: argparse.Namespace) -> int:
    from .records import RecordStore
    from .tracing import run_tracing, to_trace, write_report

    history = Path(args.out) / "history" if args.history else None
    if _on_ray(args):
        job = _ray_job("trace", "tracing", args, _trace_settings(args),
                       history_dir=str(history.resolve()) if history else None)
        path = _run_on_ray(args, job, to_trace(_dominance_records(args, _listed(args))))
    else:
        rt = _runtime(args)
        source, samples = _source(args, rt)
        path = run_tracing(rt.model, source, _dominance_records(args, samples), args.out, _trace_settings(args),
                           run_info=_trace_info(args, rt), resume=not args.no_resume, history_dir=history)
    paths = write_report(args.out, seed=args.seed)
    print(f"{path}: {len(RecordStore(path).read())} samples traced")
    print(paths["table_md"].read_text(encoding="utf-8"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .tracing import write_report

    paths = write_report(args.out, ci_method=args.ci)
    print(paths["table_md"].read_text(encoding="utf-8"))
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hooked_av.recipes.sinks import calibrate_sinks

    from .records import atomic_write_text

    rt = _runtime(args)
    from .datasets import official_prompt

    _, listed = _source(args, rt)
    samples = (rt.process(rt.load(str(s.video), audio=str(s.audio)), official_prompt(s.choices, args.prompt_step))
               for s in listed)  # the clean clips only: calibration needs no corrupted conditions
    cal = calibrate_sinks(rt.model, samples, n_dims=args.n_dims, tau_rule=args.tau_rule)
    result = {**cal.to_dict(), "run": _run_info(args, rt)}
    path = atomic_write_text(Path(args.out) / "calibration.json", json.dumps(result, indent=2) + "\n")
    print(f"sink dims {list(cal.sinks.dims)}, tau {cal.sinks.tau:.3f} ({args.tau_rule}); "
          f"midpoint {cal.tau_midpoint:.3f}, scaled {cal.tau_scaled:.3f}, gap {cal.tau_gap:.3f}; max possible {cal.max_possible:.1f} -> {path}")
    return 0


def cmd_export_official(args: argparse.Namespace) -> int:
    from .official import write_jsonl
    from .records import RecordStore
    from .tracing import RECORDS_FILE, SUBSETS_WITH_N, to_stage2

    n_div = args.n_div if args.subset in SUBSETS_WITH_N else None
    records = to_stage2(RecordStore(Path(args.out) / "tracing" / RECORDS_FILE).read(), args.subset, n_div)
    if not records:
        raise ValueError(f"{args.out}: no traced sample has the subset {args.subset!r} (N={n_div})")
    write_jsonl(args.file, records)
    print(f"{args.file}: {len(records)} stage-2 records ({args.subset}, N={n_div})")
    return 0


def cmd_official_ie(args: argparse.Namespace) -> int:
    from .official import ie_summary, read_stage2

    for f in args.stage2:
        r = ie_summary(read_stage2(f), threshold=args.threshold)
        print(f"{f}: IE_clean {r.ie_clean:.2f}  IE_corrupt {r.ie_corrupt:.2f}  (n {r.n}, "
              f"mean layerlist_len {r.mean_layerlist_len:.1f})")
    return 0


def mitigation_methods(args: argparse.Namespace) -> list[Any]:
    """The methods of a `mitigate` command line: plain; amplify per token set x alpha (and head-selected
    variants with --head-rule); contrastive per beta; guidance per strength."""
    from hooked_av.recipes import mitigate

    known = ("plain", "amplify", "contrastive", "guidance")
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; known: {', '.join(known)}")
    out: list[Any] = []
    layers = tuple(args.layers) if args.layers else None
    if "plain" in args.methods:
        out.append(mitigate.Plain())
    if "amplify" in args.methods:
        rules = [None]
        if args.head_rule != "none":
            rules.append(mitigate.HeadRule(args.min_mass, args.min_share, args.head_rule, args.top_k))
        out += [mitigate.Amplify(alpha=a, tokens=t, layers=layers, queries=args.queries, head_rule=r)
                for t in args.tokens for r in rules for a in args.alphas]
    if "contrastive" in args.methods:
        out += [mitigate.Contrastive(beta=b, drop=args.drop, plausibility=args.plausibility) for b in args.betas]
    if "guidance" in args.methods:
        out += [mitigate.Guidance(strength=s, first_step=args.guidance_first_step) for s in args.strengths]
    return out


#: ids of the --captions file's items get this prefix (its ids may repeat the probe file's)
CAPTIONS_PREFIX = "captions:"


def cmd_mitigate(args: argparse.Namespace) -> int:
    from .datasets import load_vggsound_mc
    from .hallucination import (MitigationSettings, ProbeSet, load_avhbench, mitigation_table_markdown,
                                run_mitigation, summarize_mitigation, write_mitigation_report)

    methods = mitigation_methods(args)
    probes = load_avhbench(args.probes, args.media_root, tasks=args.tasks, limit=args.limit)
    if args.captions:
        extra = load_avhbench(args.captions, args.media_root, limit=args.limit).prefixed(CAPTIONS_PREFIX)
        probes = ProbeSet(probes.items + extra.items, probes.skipped + extra.skipped, f"{probes.source}+{extra.source}")
    mc = load_vggsound_mc(args.mc_data, media_root=args.media_root)[: args.mc_limit] if args.mc_data else []
    settings = MitigationSettings(seed=args.seed, n_boot=args.n_boot, k_divide=args.k_divide,
                                  split_rule=args.split_rule, max_new_tokens=args.max_new_tokens,
                                  cost_tokens=args.cost_tokens, cost_items=args.cost_items,
                                  prompt_suffix=args.prompt_suffix)
    rt = _runtime(args)
    info = {**rt.info, "probes": str(Path(args.probes).resolve()), "captions": args.captions,
            "mc_data": args.mc_data, "media_root": args.media_root, "tasks": args.tasks, "limit": args.limit,
            "mc_limit": args.mc_limit}
    path = run_mitigation(rt, probes, methods, args.out, settings, mc, run_info=info, resume=not args.no_resume)
    paths = write_mitigation_report(args.out)
    summary = summarize_mitigation(args.out)
    print(f"{path}: {summary['n_records']} items done, {len(summary['skipped'])} skipped")
    print(mitigation_table_markdown(summary))
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import write_comparison

    runs: dict[str, str] = {}
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        label, folder = (label, folder) if sep else (Path(spec).name, spec)
        if not label or not folder or label in runs:
            raise ValueError(f"--runs {spec!r}: give LABEL=FOLDER with a unique, non-empty label")
        runs[label] = folder
    paths = write_comparison(runs, args.out, ci_method=args.ci, seed=args.seed, allow_mismatch=args.allow_mismatch)
    print(paths["table_md"].read_text(encoding="utf-8"))
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


#: errors that come from the user's input: printed as one line, exit status 2
def _user_errors() -> tuple[type[BaseException], ...]:
    from hooked_av.checkpoint import CheckpointError
    from hooked_av.hook_names import UnknownHookNameError
    from hooked_av.inputs import LayoutError
    from hooked_av.media import MediaError

    from .datasets import DatasetError
    from .distributed import ActorsLostError, RayUnavailableError
    from .objects import ObjectMaskError
    from .official import OfficialFormatError
    from .records import RunSettingsError

    return (CheckpointError, UnknownHookNameError, LayoutError, MediaError, DatasetError, ObjectMaskError,
            OfficialFormatError, RunSettingsError, FileNotFoundError, ValueError, RayUnavailableError,
            ActorsLostError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "hooks"):
        from analyses import demo as demo_mod

        if args.command == "hooks":
            return demo_mod.list_hooks()
        knobs = {k: v for k, v in (("n_clips", args.clips), ("max_traced", args.max_traced),
                                   ("max_mitigation_probes", args.max_mitigation_probes),
                                   ("max_mitigation_captions", args.max_mitigation_captions),
                                   ("caption_tokens", args.caption_tokens)) if v is not None}
        return demo_mod.run(out=args.out, seed=args.seed, **knobs)
    commands = {"dominance": cmd_dominance, "trace": cmd_trace, "report": cmd_report, "calibrate": cmd_calibrate,
                "official-ie": cmd_official_ie, "export-official": cmd_export_official, "mitigate": cmd_mitigate,
                "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except _user_errors() as e:
        if os.environ.get("HOOKED_AV_DEBUG"):
            raise
        print(f"hooked-av {args.command}: error: {e}  (HOOKED_AV_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
