"""Install a finished training run as the committed organism: its final deltas, its sink constants (with the val
accuracies they were calibrated beside) and, optionally, the held-out evaluation of its candidate checkpoint, into
`model_zoo/organism_deltas/`; `scripts/build_organism.py` (run by `make demo` / `make test`) then reassembles
`.assets/organism` from them.

    .venv/bin/python scripts/train_organism.py --out runs/orgH ... --no-install
    .venv/bin/python scripts/evaluate_organism.py --organism runs/orgH/trained --out runs/eval_H --no-install
    .venv/bin/python scripts/install_organism.py runs/orgH --evaluation runs/eval_H

The evaluation must have been measured on this run's deltas (its `organism.deltas_sha256`) and sink constants;
anything else is refused before a file is written, as is a run trained with another `--seed` than the one
`build_organism.py` assembles with (`model_zoo.organism.BUILD_SEED`: the new token embeddings, outside the deltas,
come from it). A run with another vision depth installs when its deltas
record that tower (`model_zoo.organism.DELTAS_VISION_KEY`): `build_organism.py` assembles the tower they record.
Without `--evaluation` a stale `evaluation.json` in the destination is removed (it would describe other deltas).
`train_organism.py` without `--no-install` calls the same `install`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DELTAS_DIR = ROOT / "model_zoo" / "organism_deltas"


class InstallError(ValueError):
    """A run or evaluation that cannot be installed; the message names the file and field."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InstallError(f"{what}: no file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InstallError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InstallError(f"{what}: {path} holds a {type(data).__name__}, expected an object")
    return data


def run_deltas(run: Path, result: dict[str, Any]) -> Path:
    """The run's final deltas: the refinement stage's when it ran, else the task stage's."""
    config = result.get("config")
    if not isinstance(config, dict):
        raise InstallError(f"{run / 'result.json'}: no 'config' object")
    stage = "refine" if config.get("refine_steps") else "train"
    path = run / stage / "deltas.safetensors"
    if not path.is_file():
        raise InstallError(f"{run}: config.refine_steps={config.get('refine_steps')} puts the final deltas at "
                           f"{path}, which does not exist")
    depth = config.get("vision_depth")
    if depth is not None:  # build_organism.py assembles the tower the deltas record: it must be this one
        from model_zoo.organism import DELTAS_VISION_KEY, VISION_DEFAULTS, deltas_vision

        try:
            recorded = deltas_vision(path)
        except ValueError as e:
            raise InstallError(f"cannot read the deltas' vision-tower record: {e}") from None
        if recorded is None:
            raise InstallError(f"{path}: the run trained a vision tower of depth {depth}, but the deltas record no "
                               f"tower (no {DELTAS_VISION_KEY!r} metadata), so they would be assembled with the "
                               f"default one")
        if recorded.get("depth", VISION_DEFAULTS["depth"]) != depth:
            raise InstallError(f"{path}: records vision depth {recorded.get('depth', VISION_DEFAULTS['depth'])}, "
                               f"but {run / 'result.json'} has config.vision_depth {depth}")
    return path


def install(run: str | os.PathLike, evaluation: str | os.PathLike | None = None,
            dest: str | os.PathLike = DELTAS_DIR) -> Path:
    """Check everything, then copy the run's deltas, write `sinks.json` ({calibration, val}) and the evaluation (or
    drop a stale one) into `dest`, each file replaced atomically. Returns the installed deltas' path."""
    run, dest = Path(run), Path(dest)
    result = _read_json(run / "result.json", "training run")
    for field in ("calibration", "val"):
        if not isinstance(result.get(field), dict):
            raise InstallError(f"{run / 'result.json'}: no {field!r} object (did the run finish?)")
    if not isinstance(result["calibration"].get("sinks"), dict):
        raise InstallError(f"{run / 'result.json'}: calibration has no 'sinks' object")
    from analyses.records import atomic_write_text
    from model_zoo.organism import BUILD_SEED, file_sha256

    deltas = run_deltas(run, result)
    seed = result["config"].get("seed", BUILD_SEED)
    if seed != BUILD_SEED:
        raise InstallError(f"{run / 'result.json'}: config.seed={seed}, but build_organism.py assembles with seed "
                           f"{BUILD_SEED} (the new token embeddings, which are not in the deltas, come from it)")
    digest = file_sha256(deltas)
    eval_text = None
    if evaluation is not None:
        path = Path(evaluation)
        path = path / "evaluation.json" if path.is_dir() else path
        ev = _read_json(path, "evaluation")
        measured = (ev.get("organism") or {}).get("deltas_sha256")
        if measured is None:
            raise InstallError(f"{path}: no organism.deltas_sha256 (an evaluation from before it was recorded); "
                               f"re-run scripts/evaluate_organism.py --organism {run / 'trained'} --no-install")
        if measured != digest:
            raise InstallError(f"{path}: measured deltas sha256 {measured[:12]}..., but {deltas} has "
                               f"{digest[:12]}... (an evaluation of other deltas)")
        if ev.get("sinks") != result["calibration"]["sinks"]:
            raise InstallError(f"{path}: sinks {ev.get('sinks')} differ from the run's calibration "
                               f"{result['calibration']['sinks']}")
        eval_text = json.dumps(ev, indent=2) + "\n"
    sinks_text = json.dumps({**result["calibration"], "val": result["val"]}, indent=2, default=str)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".deltas.safetensors.tmp-{os.getpid()}"
    shutil.copyfile(deltas, tmp)
    os.replace(tmp, dest / "deltas.safetensors")
    atomic_write_text(dest / "sinks.json", sinks_text)
    if eval_text is None:
        (dest / "evaluation.json").unlink(missing_ok=True)
    else:
        atomic_write_text(dest / "evaluation.json", eval_text)
    return dest / "deltas.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished scripts/train_organism.py --out folder (with result.json)")
    ap.add_argument("--evaluation", default=None,
                    help="scripts/evaluate_organism.py --out folder (or its evaluation.json) of <run>/trained")
    ap.add_argument("--dest", default=str(DELTAS_DIR))
    args = ap.parse_args()
    from model_zoo.organism import file_sha256

    try:
        path = install(args.run, args.evaluation, args.dest)
    except InstallError as e:
        sys.exit(f"install_organism: {e}")
    print(f"installed {path} (sha256 {file_sha256(path)[:12]}...); run scripts/build_organism.py to reassemble "
          f".assets/organism")


if __name__ == "__main__":
    main()
