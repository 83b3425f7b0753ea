"""Caption a photo collection of any size: list -> decode -> resize -> encode -> caption, in batches.

Decoding (JPEGs at a reduced scale, Pillow's draft mode) and resizing to the encoder's input run in
``torch.utils.data.DataLoader`` worker processes; the model encodes and captions one batch at a time in
the main process, so memory does not grow with the collection. Results come back in input order, one
``PhotoResult`` per photo, as soon as their batch is done; a bad file gives a result with ``error`` set
and the stream goes on. Each photo's noise comes from its own generator (seed + a hash of its decoded
pixels, see ``photo_seed``), so batch size, order and sharding over processes cannot change a caption.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ladic.image_io import ImageInput, ImageLoadError, load_image
from ladic.photo_seed import pixel_key

# PIL images -> (B, 3, H, W) pixels, the encoder's own resize + normalisation
Preprocess = Callable[[Sequence[Image.Image]], torch.Tensor]


@dataclass(frozen=True)
class Photo:
    """One input: ``file`` names it in results and errors; ``source`` is what ``load_image`` reads."""

    image_id: str
    file: str
    source: ImageInput

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Photo":
        return cls(image_id=Path(path).stem, file=os.fsdecode(path), source=path)


def unique_image_ids(photos: Sequence[Photo]) -> list[Photo]:
    """``photos`` with unique ``image_id``s: a file stem shared by several files becomes the file's path relative to
    the folder the colliding files share, without its suffix ("a/x", "b/x"; with the suffix where that still
    collides: "x.jpg", "x.png"). Photos that do not collide keep their stem."""
    by_id: dict[str, list[int]] = {}
    for i, p in enumerate(photos):
        by_id.setdefault(p.image_id, []).append(i)
    out = list(photos)
    for idx in (ix for ix in by_id.values() if len(ix) > 1):
        paths = [Path(os.path.abspath(photos[i].file)) for i in idx]
        root = Path(os.path.commonpath([str(q.parent) for q in paths]))
        rel = [q.relative_to(root) for q in paths]
        names = [r.with_suffix("").as_posix() for r in rel]
        if len(set(names)) < len(names):
            names = [r.as_posix() for r in rel]
        for i, name in zip(idx, names):
            out[i] = Photo(name, photos[i].file, photos[i].source)
    return out


@dataclass
class PhotoResult:
    """The outcome for one photo: a caption, or ``error`` (the one-line ``'<file>: <reason>'``)."""

    index: int  # position in the input sequence
    photo: Photo
    caption: str | None = None
    error: str | None = None
    trajectory: list[str] | None = None  # the caption after every denoising iteration, when asked for

    def record(self) -> dict:
        """The results-file record ``{"image_id", "file", "caption"}`` (+ ``"trajectory"``)."""
        r = {"image_id": self.photo.image_id, "file": self.photo.file, "caption": self.caption}
        if self.trajectory is not None:
            r["trajectory"] = self.trajectory
        return r


@dataclass
class CollectionConfig:
    """How photos are fed to the model (the sampling settings go to ``generate``)."""

    batch_size: int = 16
    num_workers: int | None = None  # decoding processes; None: one per available core, at most 4; 0: in-process
    prefetch_batches: int = 2  # batches each worker prepares ahead
    draft: bool = True  # decode JPEGs at the smallest 1/2, 1/4, 1/8 scale still >= the encoder's input size


@dataclass
class PipelineStats:
    """Seconds spent in the main process per stage (decoding and resizing run in the workers meanwhile)."""

    waiting_for_photos: float = 0.0
    encoding: float = 0.0
    captioning: float = 0.0


@dataclass
class _Decoded:
    index: int
    pixels: torch.Tensor | None  # (3, H, W)
    key: str | None
    error: str | None


class PhotoDataset(Dataset):
    """Photo i -> its encoder-ready pixels (3, H, W) and content key, or the reason it cannot be read."""

    def __init__(self, photos: Sequence[Photo], preprocess: Preprocess, draft_size: int | None) -> None:
        self.photos, self.preprocess, self.draft_size = photos, preprocess, draft_size

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int) -> _Decoded:
        photo = self.photos[i]
        try:
            image = load_image(photo.source, name=photo.file, draft_size=self.draft_size)
        except ImageLoadError as e:
            return _Decoded(i, None, None, str(e))
        return _Decoded(i, self.preprocess([image])[0], pixel_key(image), None)


def default_num_workers() -> int:
    """One decoding process per core this process may run on, at most 4."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def photo_loader(photos: Sequence[Photo], preprocess: Preprocess, draft_size: int | None,
                 config: CollectionConfig) -> DataLoader:
    """A DataLoader yielding lists of decoded photos, in input order, ``config.batch_size`` at a time."""
    workers = default_num_workers() if config.num_workers is None else config.num_workers
    return DataLoader(
        PhotoDataset(photos, preprocess, draft_size), batch_size=config.batch_size, shuffle=False,
        num_workers=workers, collate_fn=list, prefetch_factor=config.prefetch_batches if workers else None,
    )


def shard(photos: Sequence[Photo], rank: int, world: int) -> list[Photo]:
    """Process ``rank`` of ``world`` takes every ``world``-th photo from ``rank`` (deterministic, balanced)."""
    return list(photos[rank::world])


def caption_batches(
    model,
    photos: Sequence[Photo | str | os.PathLike],
    *,
    config: CollectionConfig | None = None,
    stats: PipelineStats | None = None,
    **generate_kwargs,
) -> Iterator[list[PhotoResult]]:
    """Like ``caption_files``, one list per batch (for writers that flush per batch)."""
    config = config or CollectionConfig()
    stats = stats if stats is not None else PipelineStats()
    items = [p if isinstance(p, Photo) else Photo.from_path(p) for p in photos]
    if not items:
        return
    encoder = model.image_encoder
    loader = photo_loader(items, encoder.preprocess, encoder.image_size if config.draft else None, config)
    tick = time.perf_counter()
    for batch in loader:
        now = time.perf_counter()
        stats.waiting_for_photos += now - tick
        good = [d for d in batch if d.error is None]
        captions: dict[int, tuple[str, list[str] | None]] = {}
        if good:
            with torch.no_grad():
                feats = encoder(torch.stack([d.pixels for d in good]).to(model.device))
            tock = time.perf_counter()
            stats.encoding += tock - now
            out = model.generate(feats, keys=[d.key for d in good], batch_size=len(good), **generate_kwargs)
            stats.captioning += time.perf_counter() - tock
            trajectories = getattr(out, "trajectories", None) or [None] * len(good)
            captions = {d.index: (c, t) for d, c, t in zip(good, out.captions, trajectories)}
        results = []
        for d in batch:
            cap, traj = captions.get(d.index, (None, None))
            results.append(PhotoResult(d.index, items[d.index], caption=cap, error=d.error, trajectory=traj))
        yield results
        tick = time.perf_counter()


def caption_files(
    model,
    photos: Sequence[Photo | str | os.PathLike],
    *,
    config: CollectionConfig | None = None,
    stats: PipelineStats | None = None,
    **generate_kwargs,
) -> Iterator[PhotoResult]:
    """Caption ``photos`` (paths or ``Photo``s) with ``model`` (LaDiC or the AR baseline), yielding one
    ``PhotoResult`` per photo in input order as soon as its batch is done.

    ``generate_kwargs`` go to ``model.generate`` (``num_inference_steps``, ``seed``, ``mbr_candidates``,
    ``length``, ``return_trajectory`` ...). A photo's caption depends on the photo and the seed only.
    Memory is bounded by the batch size and ``config.prefetch_batches``, not by ``len(photos)``.
    """
    for batch in caption_batches(model, photos, config=config, stats=stats, **generate_kwargs):
        yield from batch


__all__ = [
    "Photo", "PhotoResult", "CollectionConfig", "PipelineStats", "PhotoDataset", "photo_loader", "shard",
    "caption_batches", "caption_files", "default_num_workers",
]
