"""scripts/install_organism.py: a finished run (and its held-out evaluation) becomes the committed organism."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_organism.py"
SINKS = {"dims": [507], "tau": 20.5, "eps": 1e-06, "provenance": "calibrate_sinks(...)", "calibrated": True}


def _script():
    spec = importlib.util.spec_from_file_location("install_organism_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, refine_steps: int = 0, vision_depth=None) -> Path:
    run = tmp_path / "run"
    for stage, payload in (("train", b"task-stage deltas"), ("refine", b"refined deltas")):
        if stage == "train" or refine_steps:
            (run / stage).mkdir(parents=True)
            (run / stage / "deltas.safetensors").write_bytes(payload)
    result = {"val": {"acc_av": 0.9}, "config": {"refine_steps": refine_steps, "vision_depth": vision_depth},
              "calibration": {"sinks": SINKS, "tau_midpoint": 20.5}}
    (run / "result.json").write_text(json.dumps(result))
    return run


def _evaluation(tmp_path: Path, payload: bytes, sinks=SINKS) -> Path:
    ev = tmp_path / "eval"
    ev.mkdir()
    record = {"organism": {"path": "x/trained", "deltas_sha256": hashlib.sha256(payload).hexdigest()},
              "accuracy": {"av": 0.91}, "sinks": sinks}
    (ev / "evaluation.json").write_text(json.dumps(record))
    return ev


def test_install_copies_the_final_deltas_constants_and_matching_evaluation(tmp_path):
    mod = _script()
    dest = tmp_path / "deltas_dir"
    run = _run(tmp_path, refine_steps=500)
    path = mod.install(run, _evaluation(tmp_path, b"refined deltas"), dest)
    assert path.read_bytes() == b"refined deltas"  # the refinement stage's, not the task stage's
    sinks = json.loads((dest / "sinks.json").read_text())
    assert sinks == {"sinks": SINKS, "tau_midpoint": 20.5, "val": {"acc_av": 0.9}}
    assert json.loads((dest / "evaluation.json").read_text())["accuracy"] == {"av": 0.91}
    assert sorted(p.name for p in dest.iterdir()) == ["deltas.safetensors", "evaluation.json", "sinks.json"]


def test_install_without_evaluation_drops_a_stale_one(tmp_path):
    mod = _script()
    dest = tmp_path / "deltas_dir"
    dest.mkdir()
    (dest / "evaluation.json").write_text("{}")
    mod.install(_run(tmp_path), None, dest)
    assert (dest / "deltas.safetensors").read_bytes() == b"task-stage deltas"
    assert not (dest / "evaluation.json").exists()


@pytest.mark.parametrize("case, needle", [
    ("other deltas", "an evaluation of other deltas"),
    ("other sinks", "differ from the run's calibration"),
    ("no record", "no organism.deltas_sha256"),
    ("unfinished", "no 'calibration' object"),
    ("vision depth", "trained a vision tower of depth 4, but the deltas record no tower"),
    ("other depth", "records vision depth 3, but .*config.vision_depth 4"),
    ("other seed", r"config.seed=1, but build_organism.py assembles with seed 0"),
])
def test_install_refuses_a_mismatch_before_writing_anything(tmp_path, case, needle):
    mod = _script()
    dest = tmp_path / "deltas_dir"
    dest.mkdir()
    (dest / "deltas.safetensors").write_bytes(b"committed")
    run = _run(tmp_path, vision_depth=4 if case in ("vision depth", "other depth") else None)
    payload = b"other" if case == "other deltas" else b"task-stage deltas"
    if case in ("vision depth", "other depth"):  # real deltas files: without and with another recorded depth
        payload = _deltas_file(run / "train" / "deltas.safetensors", depth=3 if case == "other depth" else None)
    ev = _evaluation(tmp_path, payload, sinks={**SINKS, "tau": 3.0} if case == "other sinks" else SINKS)
    if case == "no record":
        record = json.loads((ev / "evaluation.json").read_text())
        del record["organism"]
        (ev / "evaluation.json").write_text(json.dumps(record))
    if case == "other seed":  # the run's new token embeddings are not the ones the build assembles
        result = json.loads((run / "result.json").read_text())
        result["config"]["seed"] = 1
        (run / "result.json").write_text(json.dumps(result))
    if case == "unfinished":
        result = json.loads((run / "result.json").read_text())
        del result["calibration"]
        (run / "result.json").write_text(json.dumps(result))
    with pytest.raises(mod.InstallError, match=needle):
        mod.install(run, ev, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["deltas.safetensors"]
    assert (dest / "deltas.safetensors").read_bytes() == b"committed"


def _deltas_file(path: Path, depth=None) -> bytes:
    """A safetensors deltas file with `depth` vision blocks, recording them when `depth` is given."""
    import torch
    from safetensors.torch import save_file

    from model_zoo.organism import DELTAS_VISION_KEY, vision_for_depth

    blocks = {f"vision_encoder.blocks.{i}.norm1.weight": torch.ones(2) for i in range(depth or 2)}
    save_file(blocks, str(path), metadata={DELTAS_VISION_KEY: json.dumps(vision_for_depth(depth))} if depth else None)
    return path.read_bytes()


def test_install_accepts_another_vision_depth_that_the_deltas_record(tmp_path):
    """A run with --vision-depth 4 installs when its deltas record that tower (build_organism.py reads it)."""
    from model_zoo.organism import deltas_vision

    mod = _script()
    run = _run(tmp_path, vision_depth=4)
    payload = _deltas_file(run / "train" / "deltas.safetensors", depth=4)
    path = mod.install(run, _evaluation(tmp_path, payload), tmp_path / "deltas_dir")
    assert path.read_bytes() == payload and deltas_vision(path)["depth"] == 4


def test_install_cli_names_a_missing_run_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope"), "--dest", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "training run: no file at" in proc.stderr and "result.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()
