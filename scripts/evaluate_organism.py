"""Measure the organism against its targets on a held-out avsynth split (seed != training seed):
20-way accuracy with audio + video, audio only and video only; the paper's dominance filter counts; sinks per
layer among audio / video / text tokens. Writes `<out>/evaluation.json` and, unless --no-install (a candidate
checkpoint), `model_zoo/organism_deltas/evaluation.json` (committed beside the deltas), and prints it. The result
names the checkpoint and the sha256 of the deltas it was built from (what scripts/install_organism.py checks).

    .venv/bin/python scripts/evaluate_organism.py [--clips 600] [--limit N] [--out runs/organism_eval]
        [--organism .assets/organism] [--no-install]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIP_SECONDS = 6
SINK_CLIPS = 20


def main() -> None:
    from analyses import avsynth
    from analyses.datasets import load_vggsound_mc
    from analyses.dominance import DominanceSettings, run_dominance
    from analyses.records import RecordStore, atomic_write_text
    from analyses.runtime import load_runtime
    from analyses.sources import VGGSoundSource
    from hooked_av.recipes import sinks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N of the generated clips")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "organism_eval"))
    ap.add_argument("--organism", default=str(ROOT / ".assets" / "organism"))
    ap.add_argument("--no-install", action="store_true",
                    help="write the result only to <out>/evaluation.json (evaluating a candidate checkpoint)")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    try:
        meta = avsynth.recorded_meta(data)
    except ValueError as e:
        ap.error(str(e))
    if meta is not None:  # the clips already there must be the ones asked for: the result records seed and count
        held = (meta["seed"], meta.get("splits", {}).get("test", {}).get("n"))
        if held != (args.seed, args.clips):
            ap.error(f"{data}/avsynth holds {held[1]} test clips of seed {held[0]}, not {args.clips} of seed "
                     f"{args.seed} (pass those, or another --out)")
    else:  # none, or a generation cut off before its last record: generate them afresh
        avsynth.generate(data, n_train=0, n_val=0, n_test=args.clips, seed=args.seed, duration=CLIP_SECONDS)
    rt = load_runtime(args.organism, seed=0)
    samples = load_vggsound_mc(data / "avsynth" / "test_mc.json", media_root=data)[:args.limit]
    source = VGGSoundSource(samples, rt.process, rt.tokenizer)
    path = run_dominance(rt.model, source, out, DominanceSettings(seed=0), run_info=rt.info)
    recs = RecordStore(path).read()
    truth = {t["id"]: t for t in json.loads((data / "avsynth" / "test_truth.json").read_text())}
    n = len(recs)
    acc = {c: sum(r["pred"][c] == r["label"] for r in recs) / n for c in ("av", "a", "v")}
    by_condition: dict[str, dict[str, float]] = {}
    for cond in sorted({t["condition"] for t in truth.values()}):
        rs = [r for r in recs if truth[r["id"]]["condition"] == cond]
        by_condition[cond] = {"n": len(rs), **{c: sum(r["pred"][c] == r["label"] for r in rs) / len(rs)
                                               for c in ("av", "a", "v")},
                              "audio_dominant": sum(r["dominant"] == "audio" for r in rs),
                              "video_dominant": sum(r["dominant"] == "video" for r in rs)}
    per_layer = {m: [0.0] * rt.model.cfg.n_layers for m in ("audio", "video", "text")}
    for s in samples[:SINK_CLIPS]:
        x = source.prepare(s.sample_id).inputs["av"]
        mm = rt.model.modality_map(x)
        is_sink = sinks.layer_sinks(sinks.sink_values(rt.model, x)[:, 0], rt.model.cfg.sinks.tau)
        for m in per_layer:
            for layer, c in enumerate((is_sink & mm.mask(m)[0]).sum(1).tolist()):
                per_layer[m][layer] += c / SINK_CLIPS
    built = json.loads((Path(args.organism) / "config.json").read_text())["hooked_av"]["organism"]
    result = {
        "organism": {"path": str(args.organism), "deltas_sha256": built.get("deltas_sha256")},
        "clips": n, "seed": args.seed, "chance": 1 / 20, "accuracy": acc,
        "dominance": {d: sum(r["dominant"] == d for r in recs) for d in ("audio", "video")},
        "by_condition": by_condition, "sinks": rt.model.cfg.sinks.to_dict(),
        "mean_sinks_per_layer": {m: [round(v, 2) for v in vals] for m, vals in per_layer.items()},
        "sink_clips": min(SINK_CLIPS, len(samples)),
    }
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(out / "evaluation.json", text)
    if not args.no_install:
        atomic_write_text(ROOT / "model_zoo" / "organism_deltas" / "evaluation.json", text)
    print(text)


if __name__ == "__main__":
    main()
