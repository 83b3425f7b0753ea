"""Caption results on disk: JSONL written batch by batch (survives kill -9, resumable), COCO results JSON,
and the per-process parts of a torchrun run merged in input order.

Records are ``{"image_id", "file", "caption"}`` dicts (plus ``"trajectory"`` when asked for); ``file``
identifies a photo. While a run is going on, results go to a JSONL *working file*: the output itself
for ``.jsonl`` in one process, else ``<out>.part-<rank>-of-<world>.jsonl``. Every batch is appended with
one write, flushed and fsynced, so a killed run loses at most the batch in flight; a torn last line is
dropped when the file is read back. ``finalize`` merges the parts into the output (atomically) and
removes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PART_GLOB = ".part-*-of-*.jsonl"


class ResultsFileError(ValueError):
    """An existing results file cannot be read back (damaged before its last line, or not a results list)."""


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Records of a JSONL file and the byte length of its complete lines.

    A last line without its newline or that does not parse (a write cut by a kill) is dropped;
    a damaged line before it raises ``ResultsFileError``.
    """
    lines = path.read_bytes().split(b"\n")
    lines.pop()  # after the last newline: b"", or a line cut by a kill
    records: list[dict] = []
    good = 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if i == len(lines) - 1:
                break
            raise ResultsFileError(f"{path}: line {i + 1} is not a JSON object; not resuming from a damaged file")
        records.append(record)
        good += len(line) + 1
    return records, good


def read_records(path: Path) -> list[dict]:
    """Records already in a results file (``.json``: a COCO results list; anything else: JSONL); [] if absent."""
    if not path.is_file():
        return []
    if path.suffix.lower() != ".json":
        return read_jsonl(path)[0]
    try:
        records = json.loads(path.read_text() or "[]")
    except ValueError as e:
        raise ResultsFileError(f"{path}: not a JSON results list ({e})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ResultsFileError(f"{path}: not a JSON results list")
    return records


def write_atomic(path: Path, records: Iterable[dict]) -> None:
    """Write records as JSONL or (``.json``) a COCO results list: to a temporary file, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        if path.suffix.lower() == ".json":
            json.dump(list(records), f, indent=1)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_records(sources: Iterable[Iterable[dict]], order: Mapping[str, int]) -> list[dict]:
    """Records of several files, one per photo (the first seen wins), sorted by ``order[file]``
    (records of files outside ``order`` first, in the order read)."""
    seen: dict[str, dict] = {}
    for records in sources:
        for r in records:
            seen.setdefault(r["file"], r)
    return sorted(seen.values(), key=lambda r: order.get(r["file"], -1))


def settings_path(out: Path) -> Path:
    """The sidecar that records the model and the caption-changing settings of the run that wrote ``out``."""
    return out.with_name(f"{out.name}.settings.json")


def has_results(out: Path) -> bool:
    """Whether ``out`` or a working file of an earlier run holds anything."""
    return (out.is_file() and out.stat().st_size > 0) or any(out.parent.glob(out.name + PART_GLOB))


def check_settings(out: Path, settings: Mapping, resume: bool) -> None:
    """Before a run writes ``out``: refuse to replace existing results unless ``resume`` (the caller handles an
    explicit overwrite by not calling this), and refuse to resume results written with other ``settings``."""
    if not resume:
        if has_results(out):
            raise ResultsFileError(f"{out} already holds results; --resume continues it, --overwrite replaces it")
        return
    sidecar = settings_path(out)
    if not sidecar.is_file():
        return  # written before settings were recorded, or nothing yet
    try:
        saved = json.loads(sidecar.read_text())
    except ValueError as e:
        raise ResultsFileError(f"{sidecar}: not readable ({e})") from e
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={settings.get(k)!r}" for k in differ)
        raise ResultsFileError(f"{out} was written with {was}; this run has {now}; not mixing two settings in one "
                               "file (use another --out, or --overwrite)")


def write_settings(out: Path, settings: Mapping) -> None:
    """Record ``settings`` beside ``out`` (atomically)."""
    path = settings_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(settings), indent=1, sort_keys=True))
    os.replace(tmp, path)


def part_path(out: Path, rank: int, world: int) -> Path:
    """The working file of process ``rank`` of ``world`` for the output ``out``."""
    return out.with_name(f"{out.name}.part-{rank}-of-{world}.jsonl")


@dataclass
class ResultsStore:
    """The results of one process of a run writing ``out``; see the module docstring."""

    out: Path
    rank: int = 0
    world: int = 1
    _leftovers: list[Path] = field(default_factory=list)
    _file: IO[bytes] | None = None

    @property
    def working(self) -> Path:
        if self.world == 1 and self.out.suffix.lower() == ".jsonl":
            return self.out
        return part_path(self.out, self.rank, self.world)

    def _parts(self) -> list[Path]:
        return sorted(self.out.parent.glob(self.out.name + PART_GLOB))

    def done(self, resume: bool) -> set[str]:
        """Files already captioned (in the output or in any working file left by an earlier run) when
        ``resume``; otherwise rank 0 removes working files left by earlier runs. Call before ``open``."""
        current = {part_path(self.out, r, self.world) for r in range(self.world)}
        self._leftovers = [p for p in self._parts() if p not in current]
        if not resume:
            if self.rank == 0:
                for p in self._leftovers:
                    p.unlink(missing_ok=True)
            self._leftovers = []
            return set()
        sources = [self.out, *self._parts()]
        return {r["file"] for p in dict.fromkeys(sources) for r in read_records(p)}

    def open(self, resume: bool) -> None:
        """Open the working file for appending: after its last complete line (``resume``) or emptied."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        keep = read_jsonl(self.working)[1] if resume and self.working.is_file() else 0
        self._file = open(self.working, "r+b" if keep else "wb")
        self._file.truncate(keep)
        self._file.seek(keep)

    def append(self, records: list[dict]) -> None:
        """Append one batch of records with one write, then flush and fsync."""
        if not records:
            return
        self._file.write("".join(json.dumps(r) + "\n" for r in records).encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finalize(self, order: Mapping[str, int], resume: bool) -> None:
        """Rank 0, after every process has closed its store: merge the output (when resuming or when it is
        the working file), this run's parts and earlier runs' leftovers in input order into ``out``."""
        parts = [part_path(self.out, r, self.world) for r in range(self.world)] + self._leftovers
        parts = [p for p in dict.fromkeys(parts) if p != self.out and p.is_file()]
        if not parts and self.working == self.out:
            return
        keep_out = resume or self.working == self.out
        sources = ([read_records(self.out)] if keep_out else []) + [read_jsonl(p)[0] for p in parts]
        write_atomic(self.out, merge_records(sources, order))
        for p in parts:
            p.unlink()


__all__ = [
    "settings_path", "has_results", "check_settings", "write_settings", "ResultsFileError", "ResultsStore", "read_jsonl", "read_records", "write_atomic", "merge_records", "part_path",
]
