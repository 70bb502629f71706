"""Throughput of a sweep on a local Ray instance against the single-process run, measured side by side.

The same `hooked-av dominance` command line (three forward passes and a short greedy answer per clip: AV, audio
only, video only) over the same offline clips, once in one process and once with `--ray-local N` (N actors of
one CPU each, samples sharded by id). Printed: wall time and clips/s of each; the Ray run's fixed cost (starting
Ray and loading the model in every actor), measured as a rerun with nothing left to do; its clips/s after that
cost; the ratios; and whether the two runs gave the same predictions.

On a laptop this measures the overhead, not a speed-up: one process already uses every core for its matrix
products (torch threads = cores), and N actors with one thread each share the same cores. The gain of Ray is on
a cluster, where each actor has a GPU of its own.

    .venv/bin/python benchmarks/ray_throughput.py [--model DIR] [--clips 24] [--actors 2]

Writes benchmarks/results/ray_throughput.json (with the settings, the seed and the machine's core count).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> float:
    from analyses.cli import main

    t0 = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"hooked-av {' '.join(argv)} failed")
    return time.perf_counter() - t0


def predictions(out: Path) -> list[tuple[str, dict]]:
    rows = [json.loads(x) for x in (out / "dominance" / "dominance.jsonl").read_text().splitlines()]
    return [(r["id"], r["pred"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / ".assets" / "organism"), help="a preset or checkpoint folder")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=6, help="clip length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_ray"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ray_throughput.json"))
    args = ap.parse_args()
    from analyses import avsynth

    work = Path(args.work)
    data = work / "data"
    mc = data / "avsynth" / "val_mc.json"
    if not mc.exists():
        avsynth.generate(data, n_train=0, n_val=args.clips, n_test=0, seed=args.seed, duration=args.seconds)
    common = ["--model", args.model, "--data", str(mc), "--media-root", str(data), "--seed", str(args.seed),
              "--no-resume"]
    single = run(["dominance", *common, "--out", str(work / "single")])
    ray = run(["dominance", *common, "--out", str(work / "ray"), "--ray-local", str(args.actors)])
    common.remove("--no-resume")  # a rerun: Ray starts and every actor loads the model, then finds nothing to do
    fixed = run(["dominance", *common, "--out", str(work / "ray"), "--ray-local", str(args.actors)])
    same = predictions(work / "single") == predictions(work / "ray")
    n = args.clips
    result = {
        "model": args.model, "clips": n, "clip_seconds": args.seconds, "actors": args.actors, "seed": args.seed,
        "cores": os.cpu_count(), "torch_threads_single": torch.get_num_threads(),
        "single_s": round(single, 2), "ray_s": round(ray, 2), "ray_fixed_s": round(fixed, 2),
        "single_clips_per_s": round(n / single, 4), "ray_clips_per_s": round(n / ray, 4),
        "ray_clips_per_s_after_fixed": round(n / max(ray - fixed, 1e-9), 4),
        "ratio_ray_over_single": round(single / ray, 3),
        "ratio_after_fixed": round(single / max(ray - fixed, 1e-9), 3), "same_predictions": same,
    }
    print(f"\n{n} clips of {args.seconds} s, model {args.model}, {os.cpu_count()} cores")
    print(f"{'run':<34}{'seconds':>10}{'clips/s':>10}")
    print(f"{'single process':<34}{single:>10.1f}{n / single:>10.3f}")
    print(f"{f'local Ray, {args.actors} actors':<34}{ray:>10.1f}{n / ray:>10.3f}")
    print(f"{'  of which fixed (start + load)':<34}{fixed:>10.1f}")
    print(f"{'  after the fixed cost':<34}{ray - fixed:>10.1f}{n / max(ray - fixed, 1e-9):>10.3f}")
    print(f"throughput ratio Ray / single: {single / ray:.2f}x overall, {result['ratio_after_fixed']:.2f}x after "
          f"the fixed cost; same predictions: {same}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
