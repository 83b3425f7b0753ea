"""Sharded feature cache (``ladic features``): image tokens and text-encoder hidden states, one safetensors file per
source unit, each written by the rank that owns the unit, never gathered.

Layout of a features folder::

    spec.json                  what the features are (encoder, its weights' hash, preprocessing, text side, source)
    shard-000000.safetensors   images (n_img, N, D) | hidden (n_cap, L, D_txt) | ids (n_cap, L) int32
                               | caption_image (n_cap,) int32 (row in this shard's images); metadata: keys, captions, bad
    ...
    manifest.json              written once every unit is done: shard names and their image / caption counts

A shard appears atomically (written under a temporary name, then renamed), so a killed run resumes by skipping the
shards already there. Training reads the shards memory-mapped (``ShardedFeatures``): resident memory does not grow
with the set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ladic.data.sources import BadSamples, CaptionSource, DataError, decode_sample_image
from ladic.image_encoders import encoder_weights_key

SPEC = "spec.json"
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(unit: int) -> str:
    return f"shard-{unit:06d}.safetensors"


def feature_spec(model, source: CaptionSource, dtype: str, draft: bool) -> dict:
    """Everything the features depend on; a folder whose ``spec.json`` differs is refused, not mixed."""
    enc, cfg = model.image_encoder, model.config
    return json.loads(json.dumps({"image_encoder": enc.name, "encoder_weights": encoder_weights_key(enc), "image_size": enc.image_size,
            "draft": draft, "num_tokens": enc.num_tokens, "image_dim": enc.dim, "text_backbone": cfg.text_backbone,
            "split_layer": cfg.split_layer, "max_length": cfg.max_length, "dtype": dtype,
                       "source": source.describe()}))  # (as read back from spec.json: lists, not tuples)


@dataclass
class FeatureWriteResult:
    written: int  # shards this rank wrote
    already: int  # shards found done (resume)
    bad: BadSamples


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_spec(out: Path, spec: dict) -> None:
    path = out / SPEC
    if path.is_file():
        old = json.loads(path.read_text())
        if old != spec:
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise DataError(f"{out} holds features of another setting ({', '.join(diff)} differ); "
                            f"use another folder or delete it")
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.replace(path)


@torch.no_grad()
def encode_unit(model, samples: list, dtype: torch.dtype, batch_size: int, draft_size: int | None,
                bad: BadSamples) -> dict[str, torch.Tensor] | None:
    """One unit's samples -> the shard's tensors; undecodable images are skipped into ``bad``."""
    from ladic.image_io import ImageLoadError

    enc, text = model.image_encoder, model.text
    device = next(model.parameters()).device
    images, keys, captions = [], [], []
    for s in samples:
        try:
            images.append(decode_sample_image(s, draft_size))
        except ImageLoadError as e:
            bad.skip(s.key, e.reason)
            continue
        keys.append(s.key)
        captions.append(s.captions)
    if not keys:
        return None
    tokens = torch.cat([enc(enc.preprocess(images[i : i + batch_size]).to(device)).to(dtype).cpu()
                        for i in range(0, len(images), batch_size)])
    flat = [c for cs in captions for c in cs]
    hidden, ids = [], []
    for i in range(0, len(flat), 256):
        tok = text.tokenize(flat[i : i + 256])
        hidden.append(text.encode_hidden(tok["input_ids"], tok["attention_mask"]).to(dtype).cpu())
        ids.append(tok["input_ids"].to(torch.int32).cpu())
    caption_image = torch.tensor([i for i, cs in enumerate(captions) for _ in cs], dtype=torch.int32)
    return {"images": tokens, "hidden": torch.cat(hidden), "ids": torch.cat(ids), "caption_image": caption_image,
            "_keys": keys, "_captions": captions}


def write_features(model, source: CaptionSource, out: str | Path, *, dtype: str = "float16", batch_size: int = 64,
                   draft: bool = True, max_bad_share: float = 0.01, progress: bool = True) -> FeatureWriteResult:
    """Encode ``source`` into ``out`` (see the module doc). Under torchrun each rank takes every world-th unit and
    writes its shards itself; units whose shard exists are skipped (resume). Rank 0 writes ``manifest.json`` once
    every shard exists (after a barrier). Raises ``DataError`` past ``max_bad_share`` skipped samples."""
    import torch.distributed as dist

    if dtype not in STORAGE_DTYPES:
        raise DataError(f"unknown storage dtype {dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    out = Path(out)
    rank, world = _dist()
    units = source.units()
    spec = feature_spec(model, source, dtype, draft)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _check_spec(out, spec)
    if world > 1:
        dist.barrier()
    if rank:
        _check_spec(out, spec)
    mine = list(range(rank, len(units), world))
    bad = BadSamples(max_share=max_bad_share)
    written = already = 0
    draft_size = model.image_encoder.image_size if draft else None
    for u in tqdm(mine, desc=f"features (rank {rank})" if world > 1 else "features", disable=not progress, unit="shard"):
        path = out / shard_name(u)
        if path.is_file():
            already += 1
            continue
        shard_bad = BadSamples(max_share=max_bad_share)
        samples = list(source.read(units[u], shard_bad))
        tensors = encode_unit(model, samples, STORAGE_DTYPES[dtype], batch_size, draft_size, shard_bad)
        meta = {"keys": json.dumps(tensors.pop("_keys") if tensors else []),
                "captions": json.dumps(tensors.pop("_captions") if tensors else []),
                "bad": json.dumps({"seen": shard_bad.seen, "skipped": shard_bad.skipped, "examples": shard_bad.examples})}
        bad.merge(shard_bad)
        bad.check()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in (tensors or {}).items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        written += 1
        del tensors, samples
        _release_freed_memory()
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_manifest(out, len(units), max_bad_share)
    return FeatureWriteResult(written, already, bad)


def _release_freed_memory() -> None:
    """Hand the memory a finished shard freed back to the OS: glibc keeps freed buffers, and without this the
    resident size of a long extraction creeps up shard by shard (measured: 624 -> 717 MB over 50 shards)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def write_manifest(out: Path, num_units: int, max_bad_share: float = 1.0) -> dict:
    """Read every shard's header (not its tensors) into ``manifest.json``; checks the skipped share over the set."""
    shards, bad = [], BadSamples(max_share=max_bad_share)
    for u in range(num_units):
        path = out / shard_name(u)
        if not path.is_file():
            raise DataError(f"{path} is missing; rerun ladic features to finish the folder")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n_img = f.get_slice("images").get_shape()[0] if "images" in f.keys() else 0
            n_cap = f.get_slice("ids").get_shape()[0] if "ids" in f.keys() else 0
        b = json.loads(meta.get("bad", "{}"))
        bad.merge(BadSamples(seen=b.get("seen", 0), skipped=b.get("skipped", 0), examples=b.get("examples", [])))
        shards.append({"file": path.name, "images": n_img, "captions": n_cap})
    bad.check(min_seen=0)
    manifest = {"shards": shards, "images": sum(s["images"] for s in shards),
                "captions": sum(s["captions"] for s in shards), "skipped": bad.skipped, "seen": bad.seen,
                "skipped_examples": bad.examples}
    tmp = out / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


class ShardedFeatures(torch.utils.data.Dataset):
    """A features folder as a dataset of captions. ``ds[rows]`` (a list of caption indices) -> {"images": (B, N, D)
    float32, "hidden": (B, L, D_txt), "ids": (B, L) int64, "image_index": (B,) global image index}.

    Each batch opens the shards it needs, copies its rows out and closes them again: a shard stays memory-mapped
    only while it is read, so the pages a long run has touched do not pile up in the process's resident memory
    (a cached handle would keep the whole set resident by the end of an epoch)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).is_file():
            raise DataError(f"{self.folder}: no {MANIFEST} (not a finished `ladic features` folder)")
        self.spec = json.loads((self.folder / SPEC).read_text())
        manifest = json.loads((self.folder / MANIFEST).read_text())
        self.shards = [s for s in manifest["shards"] if s["captions"]]
        counts = torch.tensor([s["captions"] for s in self.shards], dtype=torch.long)
        self.cap_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        img = torch.tensor([s["images"] for s in self.shards], dtype=torch.long)
        self.img_start = torch.cat([torch.zeros(1, dtype=torch.long), img.cumsum(0)])
        self.num_images = int(self.img_start[-1])
        self._caption_image: dict[int, torch.Tensor] = {}  # shard -> (n_cap,) image row of each caption (small)

    def __len__(self) -> int:
        return int(self.cap_start[-1])

    def _open(self, s: int):
        return safe_open(str(self.folder / self.shards[s]["file"]), framework="pt")

    def check_model(self, model) -> None:
        """Raise ``DataError`` unless the features were made by ``model``'s encoder and text side."""
        enc, cfg = model.image_encoder, model.config
        want = {"image_encoder": enc.name, "encoder_weights": encoder_weights_key(enc), "text_backbone": cfg.text_backbone,
                "split_layer": cfg.split_layer, "max_length": cfg.max_length}
        diff = [k for k, v in want.items() if self.spec.get(k) != v]
        if diff:
            raise DataError(f"{self.folder}: features of another model ({', '.join(f'{k} {self.spec.get(k)!r} != {want[k]!r}' for k in diff)})")

    def __getitem__(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.read(rows)

    def read(self, rows: Sequence[int], images: bool = True) -> dict[str, torch.Tensor]:
        """The rows' tensors (``__getitem__``); ``images=False`` skips the image tokens."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        shard = torch.searchsorted(self.cap_start, rows_t, right=True) - 1
        n = len(rows_t)
        tokens: list = [None] * n
        hidden: list = [None] * n
        ids: list = [None] * n
        image_index = torch.empty(n, dtype=torch.long)
        for s in shard.unique().tolist():
            with self._open(s) as f:
                if s not in self._caption_image:
                    self._caption_image[s] = f.get_tensor("caption_image").long().clone()
                img_sl, hid_sl, ids_sl = f.get_slice("images"), f.get_slice("hidden"), f.get_slice("ids")
                for j in (shard == s).nonzero().flatten().tolist():
                    local = int(rows_t[j]) - int(self.cap_start[s])
                    img = int(self._caption_image[s][local])
                    # (copies: a slice may be a view that keeps the whole mapped shard resident)
                    hidden[j], ids[j] = hid_sl[local : local + 1].clone(), ids_sl[local : local + 1].clone()
                    if images:
                        tokens[j] = img_sl[img : img + 1].clone()
                    image_index[j] = int(self.img_start[s]) + img
        out = {"hidden": torch.cat(hidden), "ids": torch.cat(ids).long(), "image_index": image_index}
        return {"images": torch.cat(tokens).float(), **out} if images else out

    def token_stats(self, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, V) every word-piece id the captions use (for ``restrict_vocab``) and (L + 1,) counts of caption lengths
        with [CLS]/[SEP] (for ``trained_length_p99``), read shard by shard: the ids only, never all at once."""
        seen: set[int] = set()
        lengths = torch.zeros(self.spec["max_length"] + 1, dtype=torch.long)
        for s in range(len(self.shards)):
            with self._open(s) as f:
                ids = f.get_tensor("ids").clone()
            seen.update(ids.unique().tolist())
            lengths += torch.bincount((ids != pad_id).sum(1), minlength=lengths.numel())
        return torch.tensor(sorted(seen), dtype=torch.long)[None], lengths


__all__ = ["ShardedFeatures", "write_features", "write_manifest", "feature_spec", "MANIFEST", "SPEC",
           "STORAGE_DTYPES"]
