"""scripts/compare_evaluations.py: the paired comparison of two held-out evaluations of the organism."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "scripts" / "compare_evaluations.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_evaluations_script", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_eval(folder: Path, hits: dict[str, list[bool]], conditions: list[str]) -> Path:
    """An evaluate_organism.py --out folder whose clip k is right in run r where hits[r][k]."""
    (folder / "data" / "avsynth").mkdir(parents=True)
    (folder / "dominance").mkdir()
    n = len(conditions)
    records = [{"id": f"c{k}", "label": "A",
                "pred": {r: "A" if hits[r][k] else "B" for r in ("av", "a", "v")},
                "dominant": "audio" if k % 3 == 0 else None} for k in range(n)]
    (folder / "dominance" / "dominance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "data" / "avsynth" / "test_truth.json").write_text(
        json.dumps([{"id": f"c{k}", "condition": conditions[k]} for k in range(n)]))
    return folder


def test_paired_gain_and_its_interval(script, tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    conditions = ["x" if k < 120 else "y" for k in range(n)]
    base = {r: list(rng.random(n) < 0.5) for r in ("av", "a", "v")}
    cand = {r: list(base[r]) for r in base}
    cand["av"] = [True if k < 60 else h for k, h in enumerate(base["av"])]  # the candidate fixes clips 0-59
    a, b = write_eval(tmp_path / "base", base, conditions), write_eval(tmp_path / "cand", cand, conditions)
    result = script.compare(a, b, n_boot=500, seed=3)
    rows = {(r["group"], r["run"]): r for r in result["rows"]}
    fixed = sum(not h for h in base["av"][:60])
    assert rows[("all", "av")]["gain"] == pytest.approx(fixed / n)
    assert rows[("x", "av")]["gain"] == pytest.approx(fixed / 120)
    assert rows[("y", "av")]["gain"] == 0 and rows[("y", "av")]["ci"] == [0, 0]
    lo, hi = rows[("all", "av")]["ci"]
    assert 0 < lo < fixed / n < hi
    assert rows[("all", "a")]["gain"] == 0 and rows[("all", "a")]["baseline"] == pytest.approx(np.mean(base["a"]))
    assert result["dominance"]["baseline"]["audio"] == len(range(0, n, 3))
    assert script.compare(a, b, n_boot=500, seed=3) == result  # the seed fixes the intervals
    assert "| all | 200 | av |" in script.to_markdown(result)


def test_mismatched_or_incomplete_folders_are_named(script, tmp_path):
    hits = {r: [True, False, True] for r in ("av", "a", "v")}
    a = write_eval(tmp_path / "a", hits, ["x", "x", "y"])
    b = write_eval(tmp_path / "b", {r: h[:2] for r, h in hits.items()}, ["x", "x"])
    with pytest.raises(script.EvaluationError, match="different clips"):
        script.compare(a, b)
    with pytest.raises(script.EvaluationError, match="dominance.jsonl is missing"):
        script.compare(a, tmp_path)
    c = write_eval(tmp_path / "c", hits, ["x", "y", "y"])
    with pytest.raises(script.EvaluationError, match="clip 'c1' differs"):
        script.compare(a, c)
