"""Set-up step: assemble the organism checkpoint in `.assets/organism` from the SmolLM2 GGUF (in `.assets`) and the
committed trained deltas and sink constants (`model_zoo/organism_deltas/`). Idempotent: rebuilt only when the
deltas or constants changed. Without committed deltas the towers are the seeded random ones (and say so).

    .venv/bin/python scripts/build_organism.py [--out .assets/organism]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DELTAS_DIR = ROOT / "model_zoo" / "organism_deltas"


def fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("deltas.safetensors", "sinks.json"):
        p = DELTAS_DIR / name
        h.update(p.read_bytes() if p.exists() else b"-")
    h.update((ROOT / "model_zoo" / "organism.py").read_bytes())
    return h.hexdigest()


def sinks_from_file() -> object | None:
    from hooked_av import SinkConstants

    p = DELTAS_DIR / "sinks.json"
    if not p.exists():
        return None
    s = json.loads(p.read_text())["sinks"]
    return SinkConstants(**{**s, "dims": tuple(s["dims"])})


def main() -> None:
    from model_zoo import organism

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".assets" / "organism"))
    out = Path(ap.parse_args().out)
    stamp = out / "BUILD"
    fp = fingerprint()
    if stamp.exists() and stamp.read_text().strip() == fp:
        print(f"organism up to date in {out}")
        return
    deltas = DELTAS_DIR / "deltas.safetensors"
    organism.assemble(out, seed=organism.BUILD_SEED, deltas=deltas if deltas.exists() else None,
                      sinks=sinks_from_file(), overwrite=True)
    stamp.write_text(fp + "\n")
    print(f"organism assembled in {out} ({'trained deltas' if deltas.exists() else 'UNTRAINED towers'})")


if __name__ == "__main__":
    main()
