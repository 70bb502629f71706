"""scripts/evaluate_organism.py: the held-out clips it measures are the ones its result records (seed, count)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from analyses import avsynth

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate_organism.py"


def write_meta(data: Path, seed: int, n_test: int) -> None:
    path = data / avsynth.TASK_DIR / "meta.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"generator": "analyses.avsynth", "format_version": 1, "seed": seed,
                                "splits": {"train": {"n": 0}, "val": {"n": 0}, "test": {"n": n_test}}}))


@pytest.mark.parametrize("extra, message", [
    (["--seed", "7"], "holds 600 test clips of seed 1, not 600 of seed 7"),
    (["--clips", "20"], "holds 600 test clips of seed 1, not 20 of seed 1"),
])
def test_clips_of_another_seed_or_count_are_named(tmp_path, extra, message):
    out = tmp_path / "eval"
    write_meta(out / "data", seed=1, n_test=600)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--no-install", *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "evaluation.json").exists()


def test_a_generation_cut_off_is_generated_afresh(tmp_path, monkeypatch, stop_at):
    """Clips without the generator's last record (meta.json) are generated again with the asked seed and count,
    not measured as they are."""
    from conftest import Stopped

    spec = importlib.util.spec_from_file_location("evaluate_organism_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    stop_at(avsynth, "generate")
    out = tmp_path / "eval"
    (out / "data" / avsynth.TASK_DIR).mkdir(parents=True)
    (out / "data" / avsynth.TASK_DIR / "test_mc.json").write_text("[]")  # cut off before meta.json
    monkeypatch.setattr(sys, "argv", ["evaluate_organism.py", "--out", str(out), "--no-install", "--seed", "5",
                                      "--clips", "30"])
    with pytest.raises(Stopped):
        script.main()
    assert [(name, kw["seed"], kw["n_test"]) for name, kw in stop_at.calls] == [("generate", 5, 30)]
