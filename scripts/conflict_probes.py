"""Select the yes/no probes of the clips whose audio and video disagree, for `hooked-av mitigate`.

A clip disagrees when its AV Matching probe (AVHBench's "Is the audio matching the video?") is answered "No". The
first `--clips` such clips, in the order of `<data>/avsynth/<split>_yesno.json`, give every probe of theirs (all
tasks). The README's mitigation table on 86 probes is `--clips 16` over the held-out evaluation's data (seed 1).

    .venv/bin/python scripts/conflict_probes.py runs/organism_eval/data --clips 16 --out runs/conflict_probes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def conflict_probes(probes: list[dict], clips: int) -> list[dict]:
    """The probes of the first `clips` clips (in probe order) whose AV Matching probe is labelled "No"."""
    from analyses.avsynth import TASK_MATCH

    order: list[str] = []
    for p in probes:
        if p["video_id"] not in order:
            order.append(p["video_id"])
    conflicting = {p["video_id"] for p in probes if p["task"] == TASK_MATCH and p["label"] == "No"}
    chosen = set([v for v in order if v in conflicting][:clips])
    return [p for p in probes if p["video_id"] in chosen]


def main() -> None:
    from analyses.records import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a generated avsynth folder's parent (e.g. runs/organism_eval/data)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    path = Path(args.data) / "avsynth" / f"{args.split}_yesno.json"
    if not path.is_file():
        ap.error(f"no yes/no probes at {path} (generate the split first, e.g. with scripts/evaluate_organism.py)")
    if args.clips < 1:
        ap.error(f"--clips must be >= 1, got {args.clips}")
    probes = json.loads(path.read_text())
    missing = [k for k in ("video_id", "task", "label") if probes and k not in probes[0]]
    if missing:
        ap.error(f"{path}: probes lack the field(s) {missing}")
    chosen = conflict_probes(probes, args.clips)
    clips = len({p["video_id"] for p in chosen})
    if clips < args.clips:
        ap.error(f"{path}: only {clips} clip(s) have an AV Matching probe answered 'No', asked for {args.clips}")
    atomic_write_text(Path(args.out), json.dumps(chosen, indent=1))
    print(f"{len(chosen)} probes of {clips} conflicting clips -> {args.out}")


if __name__ == "__main__":
    main()
