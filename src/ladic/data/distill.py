"""Sequence-level knowledge distillation: a teacher captioner's captions as training targets.

Not in the LaDiC paper. Non-autoregressive generators trained on human captions face several
different sentences for one image (the "multimodality problem", Gu et al. 2018); trained on one
teacher caption per image (Kim & Rush 2016) they face one. ``distill_records`` replaces (or
extends) every training image's references with the teacher's caption of that image, cached on disk
by teacher weights, decoding settings and image list, so the teacher runs once per dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ladic.data.captions import CaptionRecord
from ladic.image_io import ImageInput


def _teacher_key(folder: Path, num_beams: int, image_ids: Sequence[str], mbr_candidates: int = 1) -> str:
    h = hashlib.sha1()
    for name in ("config.json", "model.safetensors"):
        h.update((folder / name).read_bytes())
    h.update(json.dumps([num_beams, list(image_ids)] + ([mbr_candidates] if mbr_candidates > 1 else [])).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def teacher_captions(
    teacher_path: str | Path,
    image_ids: Sequence[str],
    images: Sequence[ImageInput],
    image_tokens: torch.Tensor | None = None,
    image_encoder_name: str | None = None,
    num_beams: int = 3,
    mbr_candidates: int = 1,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """The teacher's caption of every image, one string per image.

    Args:
        teacher_path: a model folder (the AR baseline or a LaDiC model), loaded with ``ladic.models.load_model``.
        image_ids: the images' ids (part of the cache key); images: paths or PIL images, aligned with them.
        image_tokens: (N, N_img, D_img) cached tokens of those images by ``image_encoder_name``; used when the
            teacher has the same (frozen) image encoder, otherwise the teacher encodes ``images`` itself.
        num_beams: beam width of an AR teacher (a LaDiC teacher ignores it and samples with its defaults, seed 0).
        mbr_candidates: a LaDiC teacher's MBR candidates per image (its full sampler's MBR choice; 1 = off).
    """
    from ladic.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
    from ladic.models import load_model

    folder = Path(teacher_path)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"distill_from {folder}: not a model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"teacher-{_teacher_key(folder, num_beams, image_ids, mbr_candidates)}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
    teacher = load_model(folder)
    same = image_tokens is not None and teacher.image_encoder.pretrained and teacher.image_encoder.name == image_encoder_name
    inputs = image_tokens.float() if same else list(images)
    beams = {"num_beams": num_beams} if teacher.model_type == "ar" else {"mbr_candidates": mbr_candidates}
    caps = teacher.generate(inputs, batch_size=batch_size, progress=progress, seed=0, **beams).captions
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(caps))
        tmp.replace(cache)
    return caps


def distill_records(records: Sequence[CaptionRecord], captions: Sequence[str], keep_references: bool) -> list[CaptionRecord]:
    """Records whose captions are ``[teacher caption]`` (followed by the human ones if ``keep_references``)."""
    if len(captions) != len(records):
        raise ValueError(f"{len(captions)} teacher captions for {len(records)} images")
    return [
        CaptionRecord(r.image_id, r.image_path, [c] + (list(r.captions) if keep_references else []), r.split)
        for r, c in zip(records, captions)
    ]


__all__ = ["teacher_captions", "distill_records"]
