"""Sweeps on Ray (analyses/distributed.py): shards, fingerprints and clear errors without Ray; then, on a local
Ray instance with 2 CPUs, the CLI's dominance and tracing runs merged from the shards equal the single-process
runs exactly, a killed actor's samples are redone elsewhere, a rerun skips what is done, and a shard of another
run is refused."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from analyses.cli import main
from analyses.distributed import (
    RayOptions, RayUnavailableError, ShardMismatchError, ShardStore, StudyJob, check_reachable, connect, fingerprint,
    import_ray, read_shard, run_sharded, shard_name, shard_of,
)
from test_cli import _common, make_dataset

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"study": "tracing", "model": "tiny", "seed": 0, "n_divs": [2]}


# ------------------------------------------------------------------------------------------------ without Ray
def test_shards_are_stable_and_cover_every_sample():
    ids = [f"clip_{i:06d}" for i in range(200)]
    first = [shard_of(i, 7) for i in ids]
    assert first == [shard_of(i, 7) for i in ids]  # the same on every machine and run (crc32, not hash())
    assert set(first) == set(range(7))
    assert shard_of("clip_000000", 1) == 0
    assert shard_name(3, 16) == "shard-0003-of-0016.jsonl"


def test_fingerprint_depends_on_every_setting():
    assert fingerprint(SETTINGS) == fingerprint(dict(reversed(list(SETTINGS.items()))))
    assert fingerprint(SETTINGS) == fingerprint({**SETTINGS, "n_divs": (2,)})  # as read back from JSON
    assert fingerprint(SETTINGS) != fingerprint({**SETTINGS, "seed": 1})


def test_a_shard_of_another_run_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "shards" / shard_name(0, 2)
    path.parent.mkdir()
    store = ShardStore(path, SETTINGS)
    store.append({"id": "a", "x": 1})
    store.append({"id": "b", "x": 2})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "x"')  # a record cut by a killed actor
    assert [r["id"] for r in read_shard(path, SETTINGS)] == ["a", "b"]
    other = {**SETTINGS, "seed": 1}
    with pytest.raises(ShardMismatchError) as e:
        read_shard(path, other)
    msg = str(e.value)
    assert str(path) in msg and fingerprint(SETTINGS) in msg and fingerprint(other) in msg and "'seed'" in msg
    plain = tmp_path / "shards" / shard_name(1, 2)
    plain.write_text('{"id": "a"}\n')
    with pytest.raises(ShardMismatchError, match="not a shard file"):
        read_shard(plain, SETTINGS)


def test_an_unreachable_cluster_fails_in_seconds_with_a_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(RayUnavailableError, match=r"cannot reach a Ray cluster at '127\.0\.0\.1:9'"):
        check_reachable("127.0.0.1:9", timeout=2.0)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(RayUnavailableError, match="port 'x6379' is not a number"):
        check_reachable("head:x6379")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r"hooked-av\[ray\]"):
        import_ray()


def test_the_core_does_not_import_ray():
    code = ("import sys, hooked_av, model_zoo, analyses.cli, analyses.tracing, analyses.pipeline; "
            "from hooked_av import HookedAVModel; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_reports_an_unreachable_address_in_one_line(tmp_path, capsys):
    root, lst, _ = make_dataset(tmp_path / "data")
    assert main(["dominance", *_common(root, lst, tmp_path / "out"), "--ray", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach a Ray cluster at '127.0.0.1:9'" in err[0]


# ------------------------------------------------------------------------------------------------ on local Ray
@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance with 2 CPUs for the module (the CLI and run_sharded keep an existing connection);
    its workers can import this test folder's modules."""
    pytest.importorskip("ray", reason="Ray is an optional extra (make test installs it)")
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray, started = connect(None, local_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": path}})
    assert started
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("vggsound"))


def _single_thread_main(args):
    """A single-process CLI run with one torch thread: a Ray actor with 1 CPU computes with one thread
    (OMP_NUM_THREADS=1), and the same thread count makes the floats bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


def test_dominance_and_tracing_on_ray_equal_the_single_process_run(ray_local, data, tmp_path, capsys):
    root, lst, _ = data
    single, sharded = tmp_path / "single", tmp_path / "ray"
    trace = ["--dominance", "list", "--n-divs", "2,4"]  # the stored letters: 2 traceable clips
    assert _single_thread_main(["dominance", *_common(root, lst, single)]) == 0
    assert _single_thread_main(["trace", *_common(root, lst, single), *trace]) == 0
    capsys.readouterr()
    ray = ["--ray-local", "2", "--shards", "3"]
    assert main(["dominance", *_common(root, lst, sharded), *ray]) == 0
    assert "Ray: 3 processed on 2 actor(s) in " in capsys.readouterr().out
    assert main(["trace", *_common(root, lst, sharded), *trace, *ray]) == 0
    out = capsys.readouterr().out
    assert "processed on 2 actor(s)" in out
    for study in ("dominance", "tracing"):
        assert _lines(sharded / study / f"{study}.jsonl") == _lines(single / study / f"{study}.jsonl")
        assert json.loads((sharded / study / "settings.json").read_text()) == \
            json.loads((single / study / "settings.json").read_text())
        assert not (sharded / study / "shards").exists()  # merged, then removed
    assert (sharded / "tracing" / "ie_table.md").read_text() == (single / "tracing" / "ie_table.md").read_text()

    # a rerun skips every finished sample; a single-process rerun accepts the Ray run's folder and vice versa
    assert main(["trace", *_common(root, lst, sharded), *trace, *ray]) == 0
    assert "Ray: 0 processed on" in capsys.readouterr().out
    assert _single_thread_main(["trace", *_common(root, lst, sharded), *trace]) == 0
    assert _lines(sharded / "tracing" / "tracing.jsonl") == _lines(single / "tracing" / "tracing.jsonl")


def test_a_killed_actor_has_its_samples_redone_and_nothing_is_duplicated(ray_local, data, tmp_path, capsys,
                                                                         monkeypatch):
    root, lst, _ = data
    assert _single_thread_main(["dominance", *_common(root, lst, tmp_path / "single")]) == 0
    fault = tmp_path / "fault"
    fault.write_text("die after the next sample\n")
    monkeypatch.setenv("HOOKED_AV_RAY_FAULT_FILE", str(fault))
    capsys.readouterr()
    assert main(["dominance", *_common(root, lst, tmp_path / "ray"), "--ray-local", "2", "--shards", "2"]) == 0
    out = capsys.readouterr().out
    assert not fault.exists()  # an actor found it and died abruptly (os._exit) after a sample
    assert "1 actor restart(s)" in out or "1 actor(s) lost" in out, out
    assert _lines(tmp_path / "ray" / "dominance" / "dominance.jsonl") == \
        _lines(tmp_path / "single" / "dominance" / "dominance.jsonl")


def test_a_shard_of_another_run_in_the_folder_is_refused(ray_local, data, tmp_path, capsys):
    root, lst, _ = data
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["dominance", *_common(root, lst, a), "--ray-local", "2", "--keep-shards"]) == 0
    kept = sorted((a / "dominance" / "shards").glob("shard-*.jsonl"))
    assert kept, "--keep-shards keeps the shard files"
    assert _single_thread_main(["dominance", *_common(root, lst, b), "--seed", "3"]) == 0
    stray = b / "dominance" / "shards" / kept[0].name
    stray.parent.mkdir()
    stray.write_bytes(kept[0].read_bytes())
    capsys.readouterr()
    # refused before any model loads, naming the file and both runs (one line, no traceback)
    assert main(["dominance", *_common(root, lst, b), "--seed", "3", "--ray-local", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(stray) in err[0] and "written by another run" in err[0], err
    assert "seed 0" in err[0] and "seed 3" in err[0]


def _double(model, source, item, job):
    """A study's own per-sample work (module-level, so Ray can ship it)."""
    return {"id": item["id"], "twice": 2 * item["x"], "seed": job.settings["seed"]}


def _nothing_to_load():
    return None, None, {"model": "none"}


def test_run_sharded_resumes_a_killed_driver_from_its_shard_files(ray_local, tmp_path):
    items = [{"id": f"s{i:03d}", "x": i} for i in range(10)]
    job = StudyJob("double", {"seed": 7}, load=_nothing_to_load, process=_double)
    settings = job.run_settings({"model": "none"})
    folder = tmp_path / "double"
    (folder / "shards").mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(settings))
    n_shards = 4
    for it in items[:3]:  # what a killed driver's actors had finished
        ShardStore(folder / "shards" / shard_name(shard_of(it["id"], n_shards), n_shards), settings).append(
            _double(None, None, it, job))
    done = run_sharded(job, items, tmp_path, RayOptions(actors=2, shards=n_shards, progress=False))
    assert (done.items, done.already_done, done.processed, done.actors) == (10, 3, 7, 2)
    rows = [json.loads(x) for x in _lines(done.path)]
    assert [r["id"] for r in rows] == [it["id"] for it in items]  # in the order of the work list, once each
    assert [r["twice"] for r in rows] == [2 * i for i in range(10)]
    with pytest.raises(ValueError, match="duplicate sample id"):
        run_sharded(job, items + items[:1], tmp_path, RayOptions(actors=2, progress=False))
