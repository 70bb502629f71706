"""Resumable per-sample JSONL records and the settings manifest of a run.

A study writes one JSON line per sample (all of that sample's results together), flushed and fsynced, so a run
killed midway leaves whole lines plus at most one truncated last line. `RecordStore` drops that tail on
opening, skips the samples already written, and refuses to mix runs: the settings of the run (seed, model,
every option) live in `settings.json` beside the records and must match on resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hooked_av.files import atomic_write_text  # noqa: F401  (the analyses' writers import it from here)


class RunSettingsError(ValueError):
    """The output folder holds a run made with other settings."""


def write_settings(out: str | os.PathLike[str], settings: Mapping[str, Any], resume: bool = True) -> Path:
    """Record the run's settings in `out/settings.json`; on resume, require identical settings."""
    path = Path(out) / "settings.json"
    settings = json.loads(json.dumps(settings))  # normalise tuples etc. as they will be read back
    if path.exists() and resume:
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise RunSettingsError(
                f"{path}: this folder holds a run with other settings ({len(diff)} differ; first {k!r}: "
                f"{old.get(k)!r} there vs {settings.get(k)!r} now). Use another --out, or --no-resume to overwrite."
            )
        return path
    return atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


class RecordStore:
    """Append-only JSONL of per-sample records keyed by `key` (default "id")."""

    def __init__(self, path: str | os.PathLike[str], key: str = "id", resume: bool = True):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not resume:
            self.path.unlink()
        self.repaired = self._drop_truncated_tail()
        self.done: set[str] = {str(r[self.key]) for r in self.read()}

    def _drop_truncated_tail(self) -> bool:
        if not self.path.exists():
            return False
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        cut = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(cut)
        return True

    def read(self) -> list[dict[str, Any]]:
        return list(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path} line {n}: not valid JSON ({e.msg})") from None

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self.done

    def extend(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append several records with one write and one fsync (e.g. merging shards)."""
        ids = [str(r[self.key]) for r in records]
        seen = set(self.done)
        for sid in ids:
            if sid in seen:
                raise ValueError(f"{self.path}: a record for {self.key}={sid!r} is already there")
            seen.add(sid)
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done.update(ids)

    def append(self, record: Mapping[str, Any]) -> None:
        sid = str(record[self.key])
        if sid in self.done:
            raise ValueError(f"{self.path}: a record for {self.key}={sid!r} is already there")
        line = json.dumps(record, ensure_ascii=False, allow_nan=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(sid)
