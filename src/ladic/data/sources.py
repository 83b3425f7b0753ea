"""Streaming caption sources for training at scale: samples read unit by unit, never the whole set at once.

A source is split into *units* (a webdataset tar shard, a run of ``shard_size`` lines of a JSONL/CSV pairs file, or
a run of ``shard_size`` images of a caption JSON) so that ``ladic features`` can give each rank its own units and
resume unit by unit, and online training can shuffle units per epoch. Bad samples (an image that cannot be decoded,
an empty or non-text caption) are skipped and counted by ``BadSamples``, which stops the run past a share.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ladic.data.captions import CAPTION_COLUMNS, IMAGE_COLUMNS, CaptionRecord, _image_id_from_name, pre_caption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")  # a webdataset sample's image, first present wins


class DataError(ValueError):
    """The data cannot be used: a missing source, or more bad samples than the allowed share."""


@dataclass
class Sample:
    """One image with its captions. ``image`` is a file path or the encoded image bytes (webdataset)."""

    key: str
    image: str | bytes
    captions: list[str]


@dataclass
class BadSamples:
    """Skipped samples: counted, the first few named; ``check`` raises ``DataError`` past ``max_share``."""

    max_share: float = 0.01
    seen: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, key: str, reason: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{key} ({reason})")

    def merge(self, other: "BadSamples") -> None:
        self.seen += other.seen
        self.skipped += other.skipped
        self.examples += other.examples[: 5 - len(self.examples)]

    def summary(self) -> str:
        named = "; ".join(self.examples)
        return f"skipped {self.skipped} of {self.seen} samples" + (f": {named}{' ...' if self.skipped > 5 else ''}" if named else "")

    def check(self, min_seen: int = 200) -> None:
        """Raise once at least ``min_seen`` samples were seen (or at the end, with ``min_seen=0``) and the skipped
        share is over ``max_share``."""
        if self.seen >= max(min_seen, 1) and self.skipped > self.max_share * self.seen:
            raise DataError(f"{self.summary()}; that is over max_bad_share = {self.max_share:g} "
                            f"(raise it to go on, or fix the data)")


def is_webdataset(spec: str) -> bool:
    """A webdataset shard list: tar files, brace-expanded (``shards/train-{000000..000099}.tar``)."""
    return spec.endswith(".tar") or spec.endswith(".tar}") or ".tar::" in spec or spec.endswith(".tgz")


def expand_shards(spec: str) -> list[str]:
    """``a-{000..009}.tar::b-{0..3}.tar`` -> the tar paths, in order. Raises ``DataError`` for a missing local file."""
    from braceexpand import braceexpand

    urls = [u for part in spec.split("::") for u in braceexpand(part)]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} webdataset shards not found, e.g. {missing[0]}")
    return urls


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else ""


def webdataset_sample(raw: dict, image_key: str | None = None, caption_key: str | None = None) -> tuple[str, bytes | None, list[str]]:
    """A raw webdataset sample (extension -> bytes) -> (key, image bytes or None, raw captions). The caption is the
    ``txt`` member, else the ``caption``/``text`` field of the ``json`` member (``caption_key`` overrides either)."""
    key = str(raw.get("__key__", "?"))
    image = raw.get(image_key) if image_key else next((raw[e] for e in IMAGE_EXTENSIONS if e in raw), None)
    if caption_key and caption_key in raw:
        captions = [_text(raw[caption_key])]
    elif "txt" in raw:
        captions = [_text(raw["txt"])]
    elif "json" in raw:
        try:
            meta = json.loads(_text(raw["json"]))
        except json.JSONDecodeError:
            meta = {}
        value = next((meta[c] for c in ((caption_key,) if caption_key else CAPTION_COLUMNS) if c in meta), "") if isinstance(meta, dict) else ""
        captions = value if isinstance(value, list) else [value]
        captions = [c if isinstance(c, str) else "" for c in captions]
    else:
        captions = []
    return key, image, captions


class CaptionSource:
    """A caption source in units. ``units()`` are picklable descriptors; ``read(unit, bad)`` yields its samples
    and counts the bad ones in ``bad``.

    ``data``: a webdataset shard list (``is_webdataset``), a ``.jsonl``/``.csv`` pairs file (streamed, rows of the
    same image in a row grouped), a caption JSON (Karpathy, BLIP or COCO; ``split`` taken), or ``flickr8k``.
    """

    def __init__(self, data: str, image_root: str | None = None, split: str = "train", shard_size: int = 1000,
                 image_column: str | None = None, caption_column: str | None = None, max_words: int = 50) -> None:
        self.data, self.image_root, self.split = data, image_root, split
        self.shard_size, self.image_column, self.caption_column, self.max_words = shard_size, image_column, caption_column, max_words
        self.kind = ("webdataset" if is_webdataset(data) else "pairs" if Path(data).suffix.lower() in (".jsonl", ".csv")
                     else "flickr8k" if data == "flickr8k" else "records")
        if self.kind in ("pairs", "records") and not Path(data).is_file():
            raise DataError(f"caption file not found: {data}")
        if self.kind in ("pairs", "records") and image_root is None:
            raise DataError(f"image_root is required with the caption file {data}")
        self._records: list[CaptionRecord] | None = None

    def describe(self) -> dict:
        """What identifies the source's content (part of a feature cache's key)."""
        d: dict = {"data": self.data, "split": self.split, "shard_size": self.shard_size, "kind": self.kind}
        paths = expand_shards(self.data) if self.kind == "webdataset" else [] if self.kind == "flickr8k" else [self.data]
        d["files"] = [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in paths if Path(p).is_file()]
        return d

    def records(self) -> list[CaptionRecord]:
        if self._records is None:
            from ladic.data.captions import load_captions, load_flickr8k

            self._records = (load_flickr8k(self.split) if self.kind == "flickr8k"
                             else load_captions(self.data, self.image_root, self.split, self.max_words))
        return self._records

    def units(self) -> list:
        if self.kind == "webdataset":
            return expand_shards(self.data)
        if self.kind == "pairs":
            return self._pair_offsets()
        n = len(self.records())
        return [(i, min(i + self.shard_size, n)) for i in range(0, n, self.shard_size)]

    def read(self, unit, bad: BadSamples) -> Iterator[Sample]:
        if self.kind == "webdataset":
            yield from self._read_tar(unit, bad)
        elif self.kind == "pairs":
            yield from self._read_pairs(unit, bad)
        else:
            for r in self.records()[unit[0] : unit[1]]:
                bad.seen += 1
                yield Sample(r.image_id, r.image_path, list(r.captions))

    def __iter__(self) -> Iterator[Sample]:
        bad = BadSamples(max_share=1.0)
        for unit in self.units():
            yield from self.read(unit, bad)

    # ------------------------------------------------------------------ webdataset
    def _read_tar(self, url: str, bad: BadSamples) -> Iterator[Sample]:
        import webdataset as wds

        samples = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        for raw in samples:
            key, image, raw_caps = webdataset_sample(raw, self.image_column, self.caption_column)
            bad.seen += 1
            captions = [c for c in (pre_caption(c, self.max_words) for c in raw_caps) if c]
            if image is None:
                bad.skip(f"{url}:{key}", "no image member")
            elif not captions:
                bad.skip(f"{url}:{key}", "no text caption")
            else:
                yield Sample(key, image, captions)

    # ------------------------------------------------------------------ JSONL / CSV pairs
    def _lines(self, start: int) -> Iterator[tuple[int, str]]:
        """(offset after the line, line) from byte ``start``."""
        with open(self.data, "rb") as f:
            f.seek(start)
            pos = start
            for raw in f:
                pos += len(raw)
                yield pos, raw.decode("utf-8", errors="replace")

    def _rows(self, start: int, header: list[str] | None) -> Iterator[tuple[int, dict | None]]:
        """(offset after the row, row or None if unreadable) from byte ``start`` (a row boundary)."""
        lines = self._lines(start)
        if Path(self.data).suffix.lower() == ".csv":
            last = [start]

            def text() -> Iterator[str]:
                for pos, line in lines:
                    last[0] = pos
                    yield line

            reader = csv.reader(text())
            for values in reader:
                if header is None:
                    header = values
                    yield last[0], None
                    continue
                yield last[0], dict(zip(header, values))
        else:
            for pos, line in lines:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield pos, row if isinstance(row, dict) else None

    def _header(self) -> list[str] | None:
        if Path(self.data).suffix.lower() != ".csv":
            return None
        with open(self.data, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])

    def _pair_offsets(self) -> list[tuple[int, int]]:
        """Units of ``shard_size`` rows as (start byte, end byte), in one pass over the file."""
        units, start, count = [], None, 0
        for pos, row in self._rows(0, None):
            if start is None:
                start = 0 if Path(self.data).suffix.lower() != ".csv" else pos
                if Path(self.data).suffix.lower() == ".csv":  # the header row opens no unit
                    continue
            count += 1
            if count == self.shard_size:
                units.append((start, pos))
                start, count = pos, 0
        if count:
            units.append((start, os.path.getsize(self.data)))
        return units

    def _columns(self, row: dict) -> tuple[str, str]:
        image = self.image_column or next((c for c in IMAGE_COLUMNS if c in row), None)
        caption = self.caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
        if image not in row or caption not in row:
            raise DataError(f"{self.data}: no image column ({self.image_column or ', '.join(IMAGE_COLUMNS)}) or caption "
                            f"column ({self.caption_column or ', '.join(CAPTION_COLUMNS)}); its columns: "
                            f"{', '.join(sorted(row))}")
        return image, caption

    def _read_pairs(self, unit: tuple[int, int], bad: BadSamples) -> Iterator[Sample]:
        start, end = unit
        root = Path(self.image_root or ".")
        columns = None
        current: Sample | None = None
        for pos, row in self._rows(start, self._header()):
            if pos > end:
                break
            bad.seen += 1
            if row is None:
                bad.skip(f"{self.data}@{pos}", "not a JSON object")
                continue
            columns = columns or self._columns(row)
            image, caption = row.get(columns[0]), row.get(columns[1])
            cleaned = pre_caption(caption, self.max_words) if isinstance(caption, str) else ""
            if not isinstance(image, str) or not image or not cleaned:
                bad.skip(str(image) if isinstance(image, str) and image else f"{self.data}@{pos}", "no image or no text caption")
                continue
            name = f"{image}.jpg" if columns[0] == "key" else image
            if current is not None and current.image == str(root / name):
                current.captions.append(cleaned)
                continue
            if current is not None:
                yield current
            current = Sample(_image_id_from_name(name), str(root / name), [cleaned])
        if current is not None:
            yield current


def decode_sample_image(sample: Sample, draft_size: int | None = None):
    """The sample's RGB PIL image; raises ``ladic.image_io.ImageLoadError`` for a missing or corrupt image."""
    from ladic.image_io import load_image

    if isinstance(sample.image, bytes):
        return load_image(sample.image, name=sample.key, draft_size=draft_size)
    return load_image(sample.image, draft_size=draft_size)


__all__ = ["BadSamples", "CaptionSource", "DataError", "Sample", "decode_sample_image", "expand_shards",
           "is_webdataset", "webdataset_sample"]
