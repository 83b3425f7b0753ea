"""Feature cache: the frozen image encoder and the frozen text encoder run once per dataset.

Image tokens (fp16) and text-encoder hidden states (fp16, before normalisation, so that new latent
statistics do not invalidate the cache) are stored as safetensors under ``cache_dir``, keyed by
backbone, preprocessing and the exact list of inputs. An epoch then costs only the diffuser.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ladic.data.captions import CaptionRecord
from ladic.image_encoders import GridPooledEncoder
from ladic.image_io import load_image
from ladic.text_space import TextSpace


@dataclass
class FeatureSet:
    """A dataset in tensors. Captions index into images through ``caption_image``."""

    images: torch.Tensor  # (N_img, N_tok, D_img) fp16 image tokens, or (N_img, 3, H, W) pixels for a trainable encoder
    hidden: torch.Tensor  # (N_cap, L, D_txt) fp16 text-encoder hidden states
    ids: torch.Tensor  # (N_cap, L) token ids
    caption_image: torch.Tensor  # (N_cap,) image index of each caption
    image_ids: list[str]
    references: dict[str, list[str]]  # image id -> reference captions

    def __len__(self) -> int:
        return self.ids.shape[0]

    def read(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Caption rows -> {"images": (B, N, D) float32, "hidden", "ids" int64, "image_index" (B,)}, as
        ``ShardedFeatures.read``."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        image_index = self.caption_image[rows_t]
        return {"images": self.images[image_index].float(), "hidden": self.hidden[rows_t], "ids": self.ids[rows_t].long(),
                "image_index": image_index}


def _key(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_and_gather(run, n: int):
    """``run(indices)`` on this rank's share of ``range(n)`` (every world-th item) and all ranks get all n results,
    in order: a list, or a tensor with one row per item. Without torch.distributed, or with fewer items than ranks
    (no rank runs on nothing): ``run(range(n))``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not 1 < dist.get_world_size() <= n:
        return run(list(range(n)))
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, run(list(range(rank, n, world))))
    if isinstance(parts[0], torch.Tensor):
        out = parts[0].new_empty((n, *parts[0].shape[1:]))
    else:
        out = [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def _cached(path: Path | None, compute, progress: bool) -> dict[str, torch.Tensor]:
    if path is not None and path.is_file():
        return load_file(str(path))
    out = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # under torchrun every rank writes the same file
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
        tmp.replace(path)
    return out


def image_encoder_of(model):
    """The image encoder of a captioner, or ``model`` itself when it is an encoder."""
    return model.image_encoder if hasattr(model, "image_encoder") else model


def encode_images(model, images: Sequence[str | Image.Image], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images -> (N, N_tok, D) fp16 tokens through the frozen encoder (pixels (N, 3, H, W) if it is trainable)."""
    enc = image_encoder_of(model)
    chunks = []
    for i in tqdm(range(0, len(images), batch_size), desc=f"image features ({enc.name})", disable=not progress):
        pil = [load_image(im) for im in images[i : i + batch_size]]
        if enc.pretrained:
            chunks.append(enc.encode(pil).half().cpu())
        else:
            chunks.append(enc.preprocess(pil).cpu())
    return torch.cat(chunks)


def encode_texts(text: TextSpace, captions: Sequence[str], batch_size: int = 256, progress: bool = False) -> dict[str, torch.Tensor]:
    """Captions -> {"hidden": (N, L, D) fp16, "ids": (N, L)} through the frozen lower half of BERT."""
    hidden, ids = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(captions), batch_size), desc="text features", disable=not progress):
            tok = text.tokenize(captions[i : i + batch_size])
            hidden.append(text.encode_hidden(tok["input_ids"], tok["attention_mask"]).half().cpu())
            ids.append(tok["input_ids"].cpu())
    return {"hidden": torch.cat(hidden), "ids": torch.cat(ids)}


def build_image_features(model, records: Sequence[CaptionRecord], cache_dir: str | Path | None = None,
                         images: Sequence[Image.Image] | None = None, *, batch_size: int = 64,
                         progress: bool = False) -> torch.Tensor:
    """Image tokens (N_img, N_tok, D_img) of ``records`` (or of in-memory ``images``), cached like ``build_features``.
    ``model`` is a captioner or an image encoder."""
    enc = image_encoder_of(model)
    if isinstance(enc, GridPooledEncoder):  # pool the base encoder's (cached) tokens instead of re-running it
        base = build_image_features(enc.base, records, cache_dir, images, batch_size=batch_size, progress=progress)
        return torch.cat([enc.pool(chunk) for chunk in base.split(1024)])
    sources = list(images) if images is not None else [r.image_path for r in records]
    img_path = None
    if cache_dir is not None and images is None and enc.pretrained:
        key = _key(enc.name, getattr(enc, "cache_key", ""), sources)
        img_path = Path(cache_dir) / f"img-{enc.name.replace('/', '_').replace(':', '_')}-{key}.safetensors"

    def encode(idx: list[int]) -> torch.Tensor:  # under torchrun each rank encodes every world-th image
        return encode_images(enc, [sources[i] for i in idx], batch_size, progress)

    return _cached(img_path, lambda: {"images": shard_and_gather(encode, len(sources))}, progress)["images"]


def build_features(
    model,
    records: Sequence[CaptionRecord],
    cache_dir: str | Path | None = None,
    images: Sequence[Image.Image] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    image_tokens: torch.Tensor | None = None,
) -> FeatureSet:
    """Encode ``records`` (or in-memory ``images`` aligned with them) once, reusing the cache when it matches.

    In-memory images (procedural scenes) are never cached: they are cheap to regenerate. ``image_tokens``
    from ``build_image_features`` of the same records skips the image side.
    """
    cfg = model.config
    img = image_tokens if image_tokens is not None else build_image_features(model, records, cache_dir, images, batch_size=batch_size, progress=progress)
    captions = [c for r in records for c in r.captions]
    caption_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
    txt_path = None
    if cache_dir is not None:
        txt_path = Path(cache_dir) / f"txt-{_key(cfg.text_backbone, cfg.split_layer, cfg.max_length, captions)}.safetensors"
    txt = _cached(txt_path, lambda: encode_texts(model.text, captions, progress=progress), progress)
    return FeatureSet(
        images=img, hidden=txt["hidden"], ids=txt["ids"], caption_image=caption_image,
        image_ids=[r.image_id for r in records], references={r.image_id: list(r.captions) for r in records},
    )
