"""A study's per-sample work on a Ray cluster: one actor per GPU holding the model, samples sharded by id.

    job = StudyJob("tracing", TraceSettings(...), load=functools.partial(my_loader, ...))
    run_sharded(job, items, "runs/x", RayOptions(address="auto"))

Each actor calls `job.load()` once (the model, the sample source and the run's description, e.g. the CLI's model
loading) and then processes whole shards. A sample goes to shard `crc32(id) mod shards`; a shard's actor appends
one record per finished sample to its own JSONL under the run folder, flushed and fsynced. When every shard is
done, the shard records are merged by sample id, in the order of the sample list, into the file a single-process
run writes (`tracing/tracing.jsonl`, `dominance/dominance.jsonl`), beside the same `settings.json`; then the
shard files are removed. So the merged output is the single-process output, a Ray run can resume a
single-process run and vice versa, and `hooked-av report` reads either.

    <out>/<study>/settings.json                        the run's settings (model, every option, seed)
    <out>/<study>/shards/shard-0003-of-0016.jsonl      a header line with the run fingerprint, then records
    <out>/<study>/<study>.jsonl                        the merged records

Failures use Ray's own mechanisms: an actor that dies (a crash, a preempted node) is restarted by Ray up to
`max_restarts` times, on any node with room, reloading the model, and Ray retries its unfinished shard there
(`max_task_retries`); the retried shard skips the samples its file already holds. An actor that is gone for good
has its shard resubmitted to another live actor. A rerun (or resume after a killed driver) skips every sample in
the merged file or in a shard file. A shard file carries the run's fingerprint (a hash of the settings) in its
first line; a shard file of another run is refused with an error naming the file and both fingerprints.

On a multi-node cluster the run folder must be on storage every node sees (the actors write the shards and read
the media there), and every node needs the same environment (hooked-av installed, the checkpoints and data at
the same paths). Actors work in the driver's working directory when it exists on their node, so relative paths
behave as in a single-process run.

Ray is an optional extra (`pip install 'hooked-av[ray]'`): it is imported inside the functions here, and nothing
else in hooked-av imports this module except the CLI's `--ray` / `--ray-local` paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from .records import RecordStore, RunSettingsError, write_settings

SHARDS_DIR = "shards"
#: key of a shard file's first line (the header)
HEADER_KEY = "hooked_av_shard"
#: default shards per actor: enough that a slow or lost actor leaves little behind, few enough to stay cheap
SHARDS_PER_ACTOR = 4
#: seconds to wait for a TCP connection to a cluster address before calling it unreachable
CONNECT_TIMEOUT_S = 5.0
#: default ports of `ray start --head` (GCS) and of Ray Client
GCS_PORT, CLIENT_PORT = 6379, 10001


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster address cannot be reached."""


class ShardMismatchError(RunSettingsError):
    """A shard file written by another run (other model, settings or seed)."""


class ActorsLostError(RuntimeError):
    """Every actor died; the samples finished so far are kept in the shard files and a rerun resumes."""


# ------------------------------------------------------------------------------------------------ the job
@dataclass(frozen=True)
class StudyJob:
    """What every actor builds and runs.

    study: the run subfolder and record file stem ("tracing", "dominance", or your own study's name).
    settings: the study's settings dataclass (`TraceSettings`, `DominanceSettings`, ...): written to settings.json
        and part of the fingerprint; its `seed` (if any) seeds torch in each actor as in a single-process run.
    load: called once in each actor (must be picklable: a module-level function or a functools.partial of one):
        returns (model, sample source, run_info); run_info describes the loaded model as a single-process run's
        `run_info` does (it goes into settings.json and the fingerprint, so every actor must agree on it).
    process: (model, source, item, job) -> record, for a study other than the built-in "tracing" (items are
        dominance records) and "dominance" (items are sample ids).
    history_dir: tracing only: where the official MDS history JSON files go (as `run_tracing`'s history_dir).
    workdir: the driver's working directory; actors change to it when it exists on their node.
    """

    study: str
    settings: Any
    load: Callable[[], tuple[Any, Any, Mapping[str, Any]]]
    process: Callable[[Any, Any, Any, "StudyJob"], Mapping[str, Any]] | None = None
    history_dir: str | None = None
    workdir: str = field(default_factory=os.getcwd)

    @property
    def records_file(self) -> str:
        return f"{self.study}.jsonl"

    def run_settings(self, run_info: Mapping[str, Any]) -> dict[str, Any]:
        """The settings.json content: what a single-process run of the study writes."""
        settings = asdict(self.settings) if is_dataclass(self.settings) else dict(self.settings)
        return _normalised({"study": self.study, **settings, **run_info})


def item_id(item: Any) -> str:
    """A work item's sample id: the item itself (a string) or its "id"."""
    return str(item) if isinstance(item, str) else str(item["id"])


def process_item(model: Any, source: Any, item: Any, job: StudyJob) -> dict[str, Any]:
    """One item's record: the job's own `process`, or the built-in studies' per-sample work."""
    if job.process is not None:
        return dict(job.process(model, source, item, job))
    if job.study == "tracing":
        from .tracing import trace_record

        return trace_record(model, source, item, job.settings, job.history_dir)
    if job.study == "dominance":
        import torch

        from .dominance import dominance_record

        with torch.no_grad():
            return dominance_record(model, source.prepare(item_id(item)), job.settings)
    raise ValueError(f"study {job.study!r} has no built-in per-sample work: give StudyJob(process=...)")


# ------------------------------------------------------------------------------------------------ fingerprints
def _normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings))  # tuples -> lists etc., as read back from JSON


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short hash of a run's settings (model, every option, seed): equal settings, equal fingerprint."""
    text = json.dumps(_normalised(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _describe(settings: Mapping[str, Any]) -> str:
    keys = ("study", "model", "checkpoint", "seed")
    return ", ".join(f"{k} {settings.get(k)!r}" for k in keys if k in settings)


def _difference(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    diff = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if not diff:
        return ""
    k = diff[0]
    return f"; {len(diff)} setting(s) differ, first {k!r}: {theirs.get(k)!r} there vs {ours.get(k)!r} in this run"


def _mismatch(path: Path, header: Mapping[str, Any], settings: Mapping[str, Any]) -> ShardMismatchError:
    theirs = header.get("settings") or {}
    return ShardMismatchError(
        f"{path}: this shard file was written by another run (fingerprint {header.get('fingerprint')}: "
        f"{_describe(theirs)}); this run's fingerprint is {fingerprint(settings)} ({_describe(settings)})"
        f"{_difference(theirs, settings)}. Move the file out of {path.parent}, or use another --out."
    )


def shard_name(index: int, n_shards: int) -> str:
    return f"shard-{index:04d}-of-{n_shards:04d}.jsonl"


def shard_of(sample_id: str, n_shards: int) -> int:
    """The shard of a sample: crc32 of its id modulo the number of shards (the same on every machine)."""
    return zlib.crc32(sample_id.encode("utf-8")) % n_shards


class ShardStore(RecordStore):
    """A shard's JSONL: a header line {HEADER_KEY: {fingerprint, settings}} and then one record per sample.

    Opening an existing shard checks its header against `settings` (ShardMismatchError otherwise) and, like
    RecordStore, drops a truncated last line; a new or empty shard gets the header first.
    """

    def __init__(self, path: str | os.PathLike[str], settings: Mapping[str, Any]):
        self.settings = _normalised(settings)
        super().__init__(path, resume=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            header = {HEADER_KEY: {"fingerprint": fingerprint(self.settings), "settings": self.settings}}
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps(header, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lines = super().__iter__()
        header = next(lines, None)
        if header is None:
            return
        check_header(self.path, header, self.settings)
        yield from lines


def check_header(path: Path, header: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """A shard file's first line must be a header with this run's fingerprint."""
    if HEADER_KEY not in header:
        raise ShardMismatchError(f"{path}: not a shard file of hooked-av (its first line has no {HEADER_KEY!r} "
                                 f"header); this run's fingerprint is {fingerprint(settings)}. Move it out of "
                                 f"{path.parent}.")
    if header[HEADER_KEY].get("fingerprint") != fingerprint(settings):
        raise _mismatch(path, header[HEADER_KEY], settings)


def read_shard(path: str | os.PathLike[str], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of a shard file (checked header; a truncated last line is ignored, the file is not touched)."""
    path = Path(path)
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    if not lines:
        return []
    try:
        rows = [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    check_header(path, rows[0], _normalised(settings))
    return rows[1:]


def shard_files(folder: str | os.PathLike[str]) -> list[Path]:
    return sorted((Path(folder) / SHARDS_DIR).glob("shard-*.jsonl"))


def shard_records(folder: str | os.PathLike[str], settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """sample id -> record over every shard file of a study folder (the first record of an id wins)."""
    out: dict[str, dict[str, Any]] = {}
    for path in shard_files(folder):
        for rec in read_shard(path, settings):
            out.setdefault(str(rec["id"]), rec)
    return out


def merge_shards(
    folder: str | os.PathLike[str], records_file: str, settings: Mapping[str, Any], order: Sequence[str],
    keep_shards: bool = False,
) -> tuple[Path, int]:
    """Append the shard records not yet in `folder/records_file`, in the order of `order` (sample ids), and
    remove the shard files whose every record is then merged (unless `keep_shards`). Returns (path, records added).
    """
    folder = Path(folder)
    store = RecordStore(folder / records_file)
    found = shard_records(folder, settings)
    new = [found[i] for i in dict.fromkeys(order) if i in found and i not in store]
    store.extend(new)
    if not keep_shards:
        for path in shard_files(folder):
            if all(str(r["id"]) in store for r in read_shard(path, settings)):
                path.unlink()
        shards = folder / SHARDS_DIR
        if shards.is_dir() and not any(shards.iterdir()):
            shards.rmdir()
    return store.path, len(new)


# ------------------------------------------------------------------------------------------------ connecting
def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("Ray is not installed: pip install 'hooked-av[ray]' (or pip install ray)") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    rest, default = (address[len("ray://"):], CLIENT_PORT) if address.startswith("ray://") else (address, GCS_PORT)
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest.strip("[]"), default
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise RayUnavailableError(f"Ray address {address!r}: the port {port!r} is not a number (expected "
                                  f"HOST:{GCS_PORT} or ray://HOST:{CLIENT_PORT})") from None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the cluster address, so that a wrong address fails in seconds with a clear error
    (ray.init itself retries for minutes)."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RayUnavailableError(
            f"cannot reach a Ray cluster at {address!r} ({host}:{port}: {reason}). Start one with "
            f"`ray start --head` on the head node and pass its address (HOST:{GCS_PORT}, or ray://HOST:"
            f"{CLIENT_PORT} for Ray Client), or run a local instance with --ray-local N"
        ) from None


def connect(address: str | None = None, local_cpus: int | None = None,
            runtime_env: Mapping[str, Any] | None = None) -> tuple[Any, bool]:
    """Connect this process to Ray: `address` of a running cluster ("auto": the one `ray start` set up on this
    machine, or RAY_ADDRESS), or None to start a local instance with `local_cpus` CPUs. A process already
    connected (a notebook, the tests) keeps its connection. Returns (ray, whether this call started Ray)."""
    ray = import_ray()
    if address not in (None, "auto", "local"):
        check_reachable(address)
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = dict(runtime_env)
    try:
        if address in (None, "local"):
            _start_local(ray, local_cpus, kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise RayUnavailableError(f"cannot connect to a Ray cluster at {address!r}: {e}. Start one with "
                                  "`ray start --head`, pass its address, or use --ray-local N") from None
    return ray, True


#: attempts at starting a local instance: Ray gives its raylet a fixed 30 s to register, which a busy laptop
#: can miss; a second start usually makes it
LOCAL_START_ATTEMPTS = 3


def _start_local(ray: Any, local_cpus: int | None, kwargs: Mapping[str, Any]) -> None:
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=local_cpus, **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a slow start
            if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                raise
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ the actor
class StudyWorker:
    """The per-actor state: the loaded model and source. Wrapped with `ray.remote` at run time.

    A failure while loading is kept and raised by `hello` as an ordinary task error (so the driver reports the
    real cause, e.g. a missing checkpoint, instead of a dead actor). `fault_file` is a fault-injection hook for
    testing recovery: the first actor that finds the file removes it and exits abruptly after its next sample.
    """

    def __init__(self, job: StudyJob, fault_file: str | None = None):
        self.job = job
        self.fault_file = fault_file
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.error: BaseException | None = None
        try:
            if job.workdir and os.path.isdir(job.workdir):
                os.chdir(job.workdir)
            self.model, self.source, info = job.load()
            self.settings = job.run_settings(info)
            seed = getattr(job.settings, "seed", None)
            if seed is not None:
                import torch

                torch.manual_seed(seed)  # as a single-process run does before its loop
        except Exception as e:  # noqa: BLE001 - reported by hello()
            self.error = e

    def hello(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"settings": self.settings, "fingerprint": fingerprint(self.settings), "pid": self.pid,
                "host": self.host}

    def run_shard(self, path: str, settings: Mapping[str, Any], items: Sequence[Any]) -> dict[str, Any]:
        """Process a shard's items not yet in its file; returns counts and who did it."""
        if self.error is not None:
            raise self.error
        if fingerprint(self.settings) != fingerprint(settings):
            raise ShardMismatchError(f"the actor on {self.host} (pid {self.pid}) loaded another model or "
                                     f"environment: fingerprint {fingerprint(self.settings)} vs the run's "
                                     f"{fingerprint(settings)}{_difference(self.settings, settings)}")
        store = ShardStore(path, settings)
        t0, done = time.perf_counter(), 0
        for item in items:
            if item_id(item) in store:
                continue
            store.append(process_item(self.model, self.source, item, self.job))
            done += 1
            self._maybe_fail()
        return {"shard": Path(path).name, "processed": done, "items": len(items), "pid": self.pid,
                "host": self.host, "seconds": round(time.perf_counter() - t0, 3)}

    def _maybe_fail(self) -> None:
        if not self.fault_file:
            return
        try:
            os.unlink(self.fault_file)
        except FileNotFoundError:
            return
        os._exit(1)  # an abrupt death, as a crash or a preempted node


# ------------------------------------------------------------------------------------------------ the driver
@dataclass(frozen=True)
class RayOptions:
    """How a sharded run uses Ray.

    address: a running cluster ("auto", "HOST:6379", "ray://HOST:10001"), or None to start a local instance
        with `local_cpus` CPUs (a process already connected to Ray keeps its connection).
    actors: how many model copies; default: the cluster's GPUs / gpus_per_actor when gpus_per_actor > 0, else
        its CPUs / cpus_per_actor (never more than there are samples).
    gpus_per_actor, cpus_per_actor: Ray resources of each actor (gpus_per_actor 2 with a device_map puts one
        model over two GPUs).
    shards: shard files (default SHARDS_PER_ACTOR per actor, at most one per sample).
    max_restarts, max_task_retries: Ray's actor restarts and retries of a shard on the restarted actor.
    keep_shards: keep the shard files after merging.
    runtime_env: passed to ray.init when this call connects (e.g. env_vars, working_dir).
    fault_file: testing hook, see `StudyWorker`.
    progress: show a progress bar over samples.
    """

    address: str | None = None
    local_cpus: int | None = None
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    shards: int | None = None
    max_restarts: int = 3
    max_task_retries: int = 3
    keep_shards: bool = False
    runtime_env: Mapping[str, Any] | None = None
    fault_file: str | None = None
    progress: bool = True


@dataclass
class ShardedRun:
    """What a sharded run did."""

    path: Path  # the merged records
    items: int  # samples in the list
    already_done: int  # of them, done before this run (merged file or shard files)
    processed: int  # processed by the actors in this run
    actors: int
    shards: int
    restarted_actors: int = 0  # actors Ray restarted (a different process finished their shard)
    lost_actors: int = 0  # actors gone for good (their shards resubmitted elsewhere)
    resubmitted_shards: int = 0
    seconds: float = 0.0
    per_shard: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.processed} processed on {self.actors} actor(s) in {self.shards} shard(s), "
                f"{self.already_done} already done; {self.restarted_actors} actor restart(s), "
                f"{self.lost_actors} actor(s) lost, {self.resubmitted_shards} shard(s) resubmitted; "
                f"{self.seconds:.1f} s")


def _n_actors(ray: Any, options: RayOptions, n_items: int) -> int:
    if options.actors is not None:
        n = options.actors
    else:
        resources = ray.cluster_resources()
        if options.gpus_per_actor > 0:
            gpus = resources.get("GPU", 0)
            if gpus < options.gpus_per_actor:
                raise RayUnavailableError(f"the Ray cluster has {gpus:g} GPU(s) and each actor needs "
                                          f"{options.gpus_per_actor:g}: add GPU nodes, or run on CPUs "
                                          "(--device cpu)")
            n = int(gpus // options.gpus_per_actor)
        else:
            n = int(resources.get("CPU", 1) // max(options.cpus_per_actor, 1e-9))
    return max(1, min(n, max(n_items, 1)))


def _cause(ray: Any, e: BaseException) -> BaseException:
    """The user's exception behind a Ray task error (so the CLI can print it as one line)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def run_sharded(
    job: StudyJob,
    items: Sequence[Any],
    out: str | os.PathLike[str],
    options: RayOptions = RayOptions(),
    resume: bool = True,
) -> ShardedRun:
    """Run `job` over `items` (sample ids, or records with an "id") on Ray; the merged records end up in
    `out/<study>/<study>.jsonl` in the order of `items`, as a single-process run writes them."""
    t0 = time.perf_counter()
    folder = Path(out).resolve() / job.study
    ids = list(dict.fromkeys(item_id(i) for i in items))
    if len(ids) != len(items):
        raise ValueError(f"{len(items) - len(ids)} duplicate sample id(s) in the work list")
    if not resume:
        shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
        (folder / job.records_file).unlink(missing_ok=True)
    elif (folder / "settings.json").exists():  # a shard of another run is refused before any model loads
        shard_records(folder, json.loads((folder / "settings.json").read_text(encoding="utf-8")))

    ray, started = connect(options.address, options.local_cpus, options.runtime_env)
    try:
        return _run(ray, job, items, ids, folder, options, resume, t0)
    finally:
        if started:
            ray.shutdown()


def _run(ray: Any, job: StudyJob, items: Sequence[Any], ids: list[str], folder: Path, options: RayOptions,
         resume: bool, t0: float) -> ShardedRun:
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm.auto import tqdm

    n_actors = _n_actors(ray, options, len(items))
    remote = ray.remote(StudyWorker).options(
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor, max_restarts=options.max_restarts,
        max_task_retries=options.max_task_retries)
    actors = [remote.remote(job, options.fault_file) for _ in range(n_actors)]
    try:
        hellos = {}
        for a in actors:  # the models load in parallel; wait for each
            try:
                hellos[a] = ray.get(a.hello.remote())
            except RayTaskError as e:
                raise _cause(ray, e) from None
            except RayActorError:
                continue
        if not hellos:
            raise ActorsLostError(f"none of the {n_actors} actor(s) started (see the Ray logs)")
        first = next(iter(hellos.values()))
        settings = first["settings"]
        for h in hellos.values():
            if h["fingerprint"] != first["fingerprint"]:
                raise ShardMismatchError(
                    f"the actors loaded different models or environments: {h['host']} (pid {h['pid']}) has "
                    f"fingerprint {h['fingerprint']}, {first['host']} (pid {first['pid']}) has "
                    f"{first['fingerprint']}{_difference(h['settings'], settings)}")
        write_settings(folder, settings, resume)
        merged = RecordStore(folder / job.records_file, resume=True)
        done = set(merged.done) | set(shard_records(folder, settings))
        pending = [it for it, i in zip(items, ids) if i not in done]
        result = ShardedRun(path=merged.path, items=len(ids), already_done=len(ids) - len(pending), processed=0,
                            actors=len(hellos), shards=0)
        if pending:
            _schedule(ray, list(hellos), hellos, pending, folder, settings, options, result, RayActorError,
                      RayTaskError, tqdm)
    finally:
        for a in actors:
            ray.kill(a)
    result.path, _ = merge_shards(folder, job.records_file, settings, ids, keep_shards=options.keep_shards)
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


def _schedule(ray: Any, live: list[Any], hellos: dict[Any, dict[str, Any]], pending: list[Any], folder: Path,
              settings: Mapping[str, Any], options: RayOptions, result: ShardedRun, RayActorError: type,
              RayTaskError: type, tqdm: Any) -> None:
    """Give shards to free actors until all are done; a shard whose actor is gone goes back in the queue."""
    n_shards = max(1, min(options.shards or SHARDS_PER_ACTOR * len(live), len(pending)))
    by_shard: dict[int, list[Any]] = {}
    for it in pending:
        by_shard.setdefault(shard_of(item_id(it), n_shards), []).append(it)
    (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    queue = deque((str(folder / SHARDS_DIR / shard_name(k, n_shards)), by_shard[k]) for k in sorted(by_shard))
    result.shards = len(queue)
    free, running = list(live), {}
    restarted: set[Any] = set()
    bar = tqdm(total=len(pending), desc=f"{folder.name} on Ray", disable=not options.progress)
    try:
        while queue or running:
            while queue and free:
                actor, shard = free.pop(0), queue.popleft()
                running[actor.run_shard.remote(shard[0], settings, shard[1])] = (actor, shard)
            if not running:
                raise ActorsLostError(
                    f"every actor died ({result.lost_actors} lost); {len(queue)} shard(s) are unfinished. The "
                    f"samples done so far are kept in {folder / SHARDS_DIR}; rerun the same command to resume")
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(ref)
            try:
                stats = ray.get(ref)
            except RayTaskError as e:
                raise _cause(ray, e) from None
            except RayActorError:  # gone beyond Ray's restarts: the shard goes to another actor
                result.lost_actors += 1
                result.resubmitted_shards += 1
                queue.appendleft(shard)
                continue
            free.append(actor)
            if stats["pid"] != hellos[actor]["pid"]:
                restarted.add(actor)
            result.processed += stats["processed"]
            result.per_shard.append(stats)
            bar.update(len(shard[1]))
    finally:
        bar.close()
    result.restarted_actors = len(restarted)
