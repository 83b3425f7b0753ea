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
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ladic.data.captions import CaptionRecord
from ladic.data.features import shard_and_gather
from ladic.image_io import ImageInput


def _teacher_key(folder: Path, num_beams: int, image_ids: Sequence[str], mbr_candidates: int = 1,
                 sampler: dict[str, Any] | None = None, candidates: bool = False) -> str:
    h = hashlib.sha1()
    for name in ("config.json", "model.safetensors"):
        h.update((folder / name).read_bytes())
    extra = ([mbr_candidates] if mbr_candidates > 1 else []) + ([sorted(sampler.items())] if sampler else [])
    extra += ["candidates"] if candidates else []
    h.update(json.dumps([num_beams, list(image_ids)] + extra).encode())
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
    sampler: dict[str, Any] | None = None,
    candidates: bool = False,
    chunk_size: int = 256,
) -> list[str] | list[list[str]]:
    """The teacher's caption of every image, one string per image (with ``candidates``: the list of all of a LaDiC
    teacher's ``mbr_candidates`` draws, or of an AR teacher's ``num_beams`` beams, per image instead of its choice,
    for ``select_by_references``).

    Args:
        teacher_path: a model folder (the AR baseline or a LaDiC model), loaded with ``ladic.models.load_model``.
        image_ids: the images' ids (part of the cache key); images: paths or PIL images, aligned with them.
        image_tokens: (N, N_img, D_img) cached tokens of those images by ``image_encoder_name``; used when the
            teacher has the same (frozen) image encoder, otherwise the teacher encodes ``images`` itself.
        num_beams: beam width of an AR teacher (a LaDiC teacher ignores it and samples with its defaults, seed 0).
        mbr_candidates: a LaDiC teacher's MBR candidates per image (its full sampler's MBR choice; 1 = off).
        sampler: overrides of a LaDiC teacher's sampler settings (e.g. ``{"guidance_scale": 0.0}``); part of the key.
        chunk_size: photos per saved chunk of a cached run (``teacher-<key>.parts/`` until the run completes).

    Under torchrun every rank captions every world-th image and all ranks receive all captions.
    """
    from ladic.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
    from ladic.models import checkpoint_model_type, load_model

    folder = Path(teacher_path)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"distill_from {folder}: not a model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    is_ar = checkpoint_model_type(folder) == "ar"
    if candidates and (num_beams if is_ar else mbr_candidates) < 2:
        raise ValueError("candidates needs mbr_candidates >= 2 (a LaDiC teacher) or num_beams >= 2 (an AR teacher)")
    if is_ar and sampler:
        raise ValueError("sampler overrides apply to a LaDiC teacher, not the AR baseline")
    cache = None
    if cache_dir is not None:
        key = _teacher_key(folder, num_beams, image_ids, mbr_candidates, sampler, candidates)
        cache = Path(cache_dir) / f"teacher-{key}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
    teacher = load_model(folder)
    same = image_tokens is not None and teacher.image_encoder.pretrained and teacher.image_encoder.name == image_encoder_name
    inputs = image_tokens.float() if same else list(images)
    if is_ar:
        kwargs: dict[str, Any] = {"num_beams": num_beams}
    else:  # the sampler overrides replace the teacher's sampling settings (ladic.config.SAMPLING_KEYS)
        kwargs = {"mbr_candidates": mbr_candidates}
        teacher.config = teacher.config.replace(**(sampler or {}))

    def run(idx: list[int]) -> list[str]:
        # the noise is drawn per photo (ladic.photo_seed): a caption does not depend on the rank or batch
        part = inputs[idx] if isinstance(inputs, torch.Tensor) else [inputs[i] for i in idx]
        out = teacher.generate(part, batch_size=batch_size, seed=0, **kwargs)
        return out.candidates if candidates else out.captions

    # Chunk by chunk, each chunk's captions saved as they come: an interrupted run (a teacher's 5 draws of 6,000
    # photos take over an hour on a CPU) resumes from its last finished chunk.
    parts = cache.with_suffix(".parts") if cache is not None else None
    n = len(image_ids)
    caps: list = []
    with tqdm(total=n, desc="teacher captions", disable=not progress) as bar:
        for start in range(0, n, chunk_size):
            part = parts / f"{start:07d}.json" if parts is not None else None
            if part is not None and part.is_file():
                chunk = json.loads(part.read_text())
            else:
                chunk = shard_and_gather(lambda idx: run([start + i for i in idx]), min(chunk_size, n - start))
                if part is not None:
                    _write_json(part, chunk)
            caps += chunk
            bar.update(len(chunk))
    if cache is not None:
        _write_json(cache, caps)
        shutil.rmtree(parts, ignore_errors=True)
    return caps


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write (under torchrun every rank writes the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def select_by_references(candidates: Sequence[Sequence[str]], records: Sequence[CaptionRecord]) -> list[str]:
    """Per image, the teacher candidate with the highest CIDEr-D (pycocoevalcap's ``Cider``, document frequencies
    over all images) against the image's human references: a target that keeps the teacher's style (one sentence
    the student can imitate) but agrees most with what people wrote. Candidates that end on a function word
    (``ends_on_function_word``) are chosen only when all of an image's candidates do. ``candidates`` (N, k)."""
    from ladic.data.captions import cider_table, ends_on_function_word

    if len(candidates) != len(records):
        raise ValueError(f"{len(candidates)} candidate lists for {len(records)} images")
    table = cider_table(candidates, lambda i, j: list(records[i].captions))
    out = []
    for cands, scores in zip(candidates, table):
        # complete endings rank above dangling ones, then CIDEr-D; the first candidate wins ties
        rank = [(not ends_on_function_word(c), s) for c, s in zip(cands, scores)]
        out.append(cands[max(range(len(cands)), key=rank.__getitem__)])
    return out


def replace_dangling(captions: Sequence[str], records: Sequence[CaptionRecord], mode: str) -> list[str]:
    """``mode="reference"``: each teacher caption that ends on a function word (``ends_on_function_word``) becomes
    the consensus human reference of its image (``consensus_index``); ``"keep"``: the captions unchanged."""
    from ladic.data.captions import consensus_index, ends_on_function_word

    if mode == "keep":
        return list(captions)
    if mode != "reference":
        raise ValueError(f"unknown distill_dangling {mode!r}; use 'keep' or 'reference'")
    bad = [i for i, c in enumerate(captions) if ends_on_function_word(c)]
    best = consensus_index([list(records[i].captions) for i in bad])
    out = list(captions)
    for i, k in zip(bad, best):
        out[i] = records[i].captions[k]
    return out


def distill_records(records: Sequence[CaptionRecord], captions: Sequence[str], keep_references: bool) -> list[CaptionRecord]:
    """Records whose captions are ``[teacher caption]`` (followed by the human ones if ``keep_references``)."""
    if len(captions) != len(records):
        raise ValueError(f"{len(captions)} teacher captions for {len(records)} images")
    return [
        CaptionRecord(r.image_id, r.image_path, [c] + (list(r.captions) if keep_references else []), r.split)
        for r, c in zip(records, captions)
    ]


__all__ = ["teacher_captions", "select_by_references", "replace_dangling", "distill_records"]
