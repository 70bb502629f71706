"""Paired comparison of two organism evaluations on the same held-out clips: is a candidate checkpoint better?

Both folders are `scripts/evaluate_organism.py --out` folders of the same split (same seed and clip count): each
holds `dominance/dominance.jsonl` (per-clip predictions with audio + video, audio only, video only) and the
split's ground truth (`data/avsynth/test_truth.json`). For every condition of the split and overall, the table
gives both accuracies and the candidate's gain with a paired bootstrap interval (the clips are resampled, both
runs together).

    .venv/bin/python scripts/compare_evaluations.py BASELINE CANDIDATE [--n-boot 2000] [--seed 0] [--out F.md]

The same seed gives the same intervals; the seed and resample count are written with the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("av", "a", "v")
LEVEL = 0.95


class EvaluationError(ValueError):
    """An evaluation folder is missing a file or does not match the other one."""


def load_evaluation(folder: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Per-clip records by id, and each clip's condition, of one evaluation folder."""
    from analyses.records import RecordStore

    folder = Path(folder)
    records, truth = folder / "dominance" / "dominance.jsonl", folder / "data" / "avsynth" / "test_truth.json"
    for path in (records, truth):
        if not path.exists():
            raise EvaluationError(f"{path} is missing: {folder} is not an evaluate_organism.py --out folder")
    recs = {str(r["id"]): r for r in RecordStore(records).read()}
    conditions = {str(t["id"]): t["condition"] for t in json.loads(truth.read_text())}
    for r in recs.values():
        missing = [k for k in ("pred", "label") if k not in r] or [c for c in RUNS if c not in r["pred"]]
        if missing:
            raise EvaluationError(f"{records}: record {r['id']!r} lacks {missing}")
    return recs, conditions


def paired_gain(base: np.ndarray, cand: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Accuracy of cand minus base (0/1 hits per clip) and its paired percentile-bootstrap interval."""
    from analyses.hallucination import paired_differences

    hits = lambda h: lambda idx: {"accuracy": h.astype(float)[idx].mean(1)}  # noqa: E731
    est = paired_differences(hits(cand), hits(base), len(cand), ["accuracy"], n_boot, seed, LEVEL)["accuracy"]
    return est.value, est.low, est.high


def compare(baseline: str | Path, candidate: str | Path, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy per run (AV / audio only / video only), overall and per condition, of both evaluations, with the
    candidate's paired gain; dominance counts of both."""
    (base, cond_b), (cand, cond_c) = load_evaluation(baseline), load_evaluation(candidate)
    if set(base) != set(cand):
        raise EvaluationError(f"the evaluations cover different clips: {baseline} has {len(base)}, {candidate} "
                              f"{len(cand)}, {len(set(base) ^ set(cand))} differ (same --seed and --clips?)")
    ids = sorted(base)
    for i in ids:
        if base[i]["label"] != cand[i]["label"] or cond_b.get(i) != cond_c.get(i):
            raise EvaluationError(f"clip {i!r} differs between {baseline} and {candidate} (label or condition): "
                                  "not the same split")
    groups = {"all": ids}
    for c in sorted({cond_b[i] for i in ids}):
        groups[c] = [i for i in ids if cond_b[i] == c]
    rows = []
    for name, members in groups.items():
        for run in RUNS:
            b = np.array([base[i]["pred"][run] == base[i]["label"] for i in members])
            c = np.array([cand[i]["pred"][run] == cand[i]["label"] for i in members])
            gain, lo, hi = paired_gain(b, c, n_boot, seed)
            rows.append({"group": name, "run": run, "n": len(members), "baseline": float(b.mean()),
                         "candidate": float(c.mean()), "gain": gain, "ci": [lo, hi]})
    dominance = {label: {d: sum(r.get("dominant") == d for r in recs.values()) for d in ("audio", "video")}
                 for label, recs in (("baseline", base), ("candidate", cand))}
    return {"baseline": str(baseline), "candidate": str(candidate), "clips": len(ids), "n_boot": n_boot,
            "seed": seed, "level": LEVEL, "rows": rows, "dominance": dominance}


def to_markdown(result: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"Baseline `{result['baseline']}` against candidate `{result['candidate']}`: {result['clips']} clips; "
             f"paired bootstrap {int(100 * result['level'])}% CI ({result['n_boot']} resamples, seed "
             f"{result['seed']}).", "",
             "| group | n | run | baseline % | candidate % | gain pp [CI] |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["ci"]
        lines.append(f"| {r['group']} | {r['n']} | {r['run']} | {pct(r['baseline'])} | {pct(r['candidate'])} | "
                     f"{100 * r['gain']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    d = result["dominance"]
    lines += ["", f"Dominant clips (audio / video): baseline {d['baseline']['audio']} / {d['baseline']['video']}, "
                  f"candidate {d['candidate']['audio']} / {d['candidate']['video']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from analyses.records import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline")
    ap.add_argument("candidate")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the table here (and the numbers beside it as .json)")
    args = ap.parse_args()
    try:
        result = compare(args.baseline, args.candidate, args.n_boot, args.seed)
    except ValueError as e:  # EvaluationError included
        ap.error(str(e))
    text = to_markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, text)
        atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
