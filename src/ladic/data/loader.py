"""What feeds the training loop: a DataLoader over one of three datasets, all indexed by batches of caption rows.

- ``PlannedRows``: cached features, the small set in RAM (``FeatureSet``; the CPU Flickr8k workflow) or a ``ladic
  features`` folder (``ladic.data.shards.ShardedFeatures``).
- ``OnlineRecords``: captions of a caption file, images decoded and preprocessed in the workers; the frozen
  encoders run inside the training step (``TrainConfig.image_features = "online"``).
- ``OnlineStream``: the same for streaming sources (webdataset shards, JSONL/CSV pairs), units shuffled per epoch.

``StepBatches`` gives the map-style datasets their rows: the global batch of step s is the s-th run of a seeded
permutation per epoch (computed once per epoch), split into accumulation micro-batches, each rank taking its slice.
Every item carries the rows' positions in the global batch, from which the per-row noise is drawn
(``row_draws``): one process and N processes, with or without accumulation, see the same batch and the same noise.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ladic.data.sources import BadSamples, CaptionSource, decode_sample_image


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of ``n`` rows for ``epoch`` (the same on every rank)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@dataclass(frozen=True)
class BatchPlan:
    """One micro-batch of one rank: its step, micro index, caption rows and their positions in the global batch."""

    step: int
    micro: int
    rows: tuple[int, ...]
    positions: tuple[int, ...]


class StepBatches(torch.utils.data.Sampler):
    """``BatchPlan``s for steps ``start``..``stop - 1`` (``accum`` micro-batches per step) of this rank."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1,
                 accum: int = 1) -> None:
        if batch_size % (world * accum):
            raise ValueError(f"batch_size {batch_size} is not divisible by {world} processes x {accum} accumulation steps")
        self.n, self.batch, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world, self.accum = rank, world, accum

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[BatchPlan]:
        per_epoch = max(self.n // self.batch, 1)
        micro = self.batch // self.accum
        local = micro // self.world
        epoch, order = None, None
        for step in range(self.start, self.stop):
            e, i = divmod(step, per_epoch)
            if e != epoch:
                epoch, order = e, epoch_order(self.n, self.seed, e)
            rows = order[i * self.batch : (i + 1) * self.batch]
            for m in range(self.accum):
                lo = m * micro + self.rank * local
                yield BatchPlan(step, m, tuple(rows[lo : lo + local].tolist()), tuple(range(lo, lo + local)))


def row_draws(model, seed: int, step: int, positions: Sequence[int]) -> dict[str, torch.Tensor]:
    """The training randomness of the rows at ``positions`` of step ``step``'s global batch, each row from its own
    generator seeded by (seed, step, position): a rank draws only its rows, and any split of the batch over ranks
    or accumulation steps draws the same numbers."""
    if not positions:
        return model.draw_training_noise(0)
    parts = [model.draw_training_noise(1, torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_019 + p))
             for p in positions]
    return {k: torch.cat([d[k] for d in parts]) for k in parts[0]}


class PlannedRows(torch.utils.data.Dataset):
    """Cached features indexed by ``BatchPlan``s: a ``FeatureSet`` (in RAM) or ``ShardedFeatures`` (on disk), both
    read by ``read(rows)``."""

    def __init__(self, features) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, plan: BatchPlan) -> dict:
        return {**self.features.read(plan.rows), "plan": plan}


def _online_batch(samples: Sequence, rows_caption: Sequence[str], preprocess, tokenize, draft_size: int | None,
                  bad: BadSamples) -> dict:
    """Decode + preprocess the images and tokenize the captions of one batch; undecodable images drop their row."""
    from ladic.image_io import ImageLoadError

    images, captions, keep = [], [], []
    for j, (s, c) in enumerate(zip(samples, rows_caption)):
        try:
            images.append(decode_sample_image(s, draft_size))
        except ImageLoadError as e:
            bad.skip(s.key, e.reason)
            continue
        captions.append(c)
        keep.append(j)
    if not keep:
        return {"pixels": torch.zeros(0), "ids": torch.zeros(0, dtype=torch.long), "keep": keep, "bad": bad}
    tok = tokenize(captions)
    return {"pixels": preprocess(images), "ids": tok["input_ids"], "attention_mask": tok["attention_mask"], "keep": keep,
            "bad": bad}


class OnlineRecords(torch.utils.data.Dataset):
    """Captions of a caption file (Karpathy, BLIP, COCO, Flickr8k) as rows; the workers decode (Pillow draft mode)
    and preprocess the images and tokenize the captions. Indexed by ``BatchPlan``s."""

    def __init__(self, records: Sequence, preprocess, tokenize, draft_size: int | None) -> None:
        from ladic.data.sources import Sample

        self.samples = [Sample(r.image_id, r.image_path, list(r.captions)) for r in records]
        self.rows = [(i, c) for i, s in enumerate(self.samples) for c in s.captions]
        self.preprocess, self.tokenize, self.draft_size = preprocess, tokenize, draft_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, plan: BatchPlan) -> dict:
        rows = [self.rows[r] for r in plan.rows]
        bad = BadSamples()
        bad.seen = len(rows)
        out = _online_batch([self.samples[i] for i, _ in rows], [c for _, c in rows], self.preprocess, self.tokenize,
                            self.draft_size, bad)
        kept = [plan.positions[j] for j in out["keep"]]
        out["image_index"] = torch.tensor([rows[j][0] for j in out["keep"]], dtype=torch.long)
        out["plan"] = BatchPlan(plan.step, plan.micro, tuple(plan.rows[j] for j in out["keep"]), tuple(kept))
        return out


class OnlineStream(torch.utils.data.IterableDataset):
    """A streaming source (webdataset shards, JSONL/CSV pairs) for online training: each epoch the units are shuffled
    (seeded, the same order on every rank), rank r takes every world-th unit and worker w every num_workers-th of
    those (with ``resample``: as many units drawn with replacement, per rank and worker); rows pass a shuffle buffer and leave as batches of ``local`` rows. Unlike the map-style datasets, the
    batches depend on the number of ranks and workers (as in any webdataset pipeline)."""

    def __init__(self, source: CaptionSource, preprocess, tokenize, draft_size: int | None, local: int, seed: int,
                 rank: int = 0, world: int = 1, start_step: int = 0, buffer: int = 1000, resample: bool = False) -> None:
        self.source, self.preprocess, self.tokenize, self.draft_size = source, preprocess, tokenize, draft_size
        self.local, self.seed, self.rank, self.world, self.start_step, self.buffer = local, seed, rank, world, start_step, buffer
        self.resample = resample  # each rank and worker draws units with replacement (webdataset's resampled=True)
        self.units = source.units()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.seed * 7_777 + self.rank * 131 + wid)
        epoch, step = 0, self.start_step + wid
        while True:
            order = list(range(len(self.units)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            mine = order[self.rank :: self.world][wid::nw]
            if self.resample:
                mine = rng.choices(order, k=max(len(mine), 1))
            pool: list = []
            bad = BadSamples()
            for u in mine:
                for s in self.source.read(self.units[u], bad):
                    pool.extend((s, c) for c in s.captions)
                    while len(pool) >= self.buffer + self.local:
                        yield self._batch([pool.pop(rng.randrange(len(pool))) for _ in range(self.local)], step, bad)
                        step += nw
                        bad = BadSamples()
            while len(pool) >= self.local:
                yield self._batch([pool.pop(rng.randrange(len(pool))) for _ in range(self.local)], step, bad)
                step += nw
                bad = BadSamples()
            epoch += 1

    def _batch(self, rows: list, step: int, bad: BadSamples) -> dict:
        bad.seen += len(rows)
        out = _online_batch([s for s, _ in rows], [c for _, c in rows], self.preprocess, self.tokenize, self.draft_size, bad)
        positions = tuple(self.rank * self.local + j for j in out["keep"])
        out["image_index"] = torch.zeros(len(out["keep"]), dtype=torch.long)
        out["plan"] = BatchPlan(step, 0, (), positions)
        return out


__all__ = ["epoch_order", "BatchPlan", "StepBatches", "row_draws", "PlannedRows", "OnlineRecords", "OnlineStream"]
