"""scripts/conflict_probes.py: the probes of the clips whose AV Matching answer is "No", for `hooked-av mitigate`."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "conflict_probes.py"


def _script():
    spec = importlib.util.spec_from_file_location("conflict_probes_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe(clip: str, task: str, label: str) -> dict:
    return {"id": f"{clip}_{task}", "video_id": clip, "task": task, "label": label}


PROBES = [_probe("c0", "AV Matching", "Yes"), _probe("c0", "AV Hallucination (Video)", "No"),
          _probe("c1", "AV Hallucination (Audio)", "Yes"), _probe("c1", "AV Matching", "No"),
          _probe("c2", "AV Matching", "No"), _probe("c2", "AV Hallucination (Video)", "Yes"),
          _probe("c3", "AV Matching", "No")]


def test_conflict_probes_keeps_every_probe_of_the_first_conflicting_clips():
    chosen = _script().conflict_probes(PROBES, 2)
    assert [p["id"] for p in chosen] == ["c1_AV Hallucination (Audio)", "c1_AV Matching", "c2_AV Matching",
                                         "c2_AV Hallucination (Video)"]


def test_conflict_probes_cli_writes_the_selection_and_names_bad_input(tmp_path):
    (tmp_path / "data" / "avsynth").mkdir(parents=True)
    (tmp_path / "data" / "avsynth" / "test_yesno.json").write_text(json.dumps(PROBES))
    out = tmp_path / "probes.json"
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True, text=True, timeout=120)
    proc = run(str(tmp_path / "data"), "--clips", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {p["video_id"] for p in json.loads(out.read_text())} == {"c1", "c2", "c3"}
    proc = run(str(tmp_path / "data"), "--clips", "4", "--out", str(tmp_path / "more.json"))
    assert proc.returncode == 2 and "only 3 clip(s)" in proc.stderr and not (tmp_path / "more.json").exists()
    proc = run(str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "no yes/no probes at" in proc.stderr and "Traceback" not in proc.stderr
