"""A synthetic image-caption set for the scale benchmarks and tests (issue 29): procedural scenes
(``ladic.data.scenes``) written as JPEG files + a JSONL pairs file, and as webdataset tar shards. Generated on
demand, never committed."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tqdm.auto import tqdm


def write_synthetic_pairs(out: str | Path, n: int, *, size: int = 32, per_shard: int = 1000, seed: int = 0,
                          formats: tuple[str, ...] = ("jsonl", "webdataset"), progress: bool = False) -> dict[str, str]:
    """Write ``n`` scenes of ``size`` px under ``out``: ``images/<k>/<i>.jpg`` + ``pairs.jsonl`` ({"image", "caption"})
    and/or ``wds/train-<k>.tar`` (``<i>.jpg`` + ``<i>.txt``, ``per_shard`` samples per tar). Returns the data specs
    (``{"jsonl": path, "image_root": folder, "webdataset": brace pattern}``)."""
    import random

    import webdataset as wds

    from ladic.data.scenes import make_scene

    out = Path(out)
    specs: dict[str, str] = {}
    jsonl = tar = None
    if "jsonl" in formats:
        (out / "images").mkdir(parents=True, exist_ok=True)
        jsonl = (out / "pairs.jsonl").open("w")
        specs.update(jsonl=str(out / "pairs.jsonl"), image_root=str(out / "images"))
    shards = (n + per_shard - 1) // per_shard
    if "webdataset" in formats:
        (out / "wds").mkdir(parents=True, exist_ok=True)
        specs["webdataset"] = str(out / "wds" / f"train-{{{0:06d}..{shards - 1:06d}}}.tar")
    for i in tqdm(range(n), desc="synthetic pairs", disable=not progress):
        k = i // per_shard
        scene = make_scene(random.Random(f"{seed}:{i}"), size=size, max_objects=1)
        buf = io.BytesIO()
        scene.image.save(buf, format="JPEG", quality=90)
        caption = scene.captions[0]
        if jsonl is not None:
            name = f"{k:06d}/{i:08d}.jpg"
            if i % per_shard == 0:
                (out / "images" / f"{k:06d}").mkdir(exist_ok=True)
            (out / "images" / name).write_bytes(buf.getvalue())
            jsonl.write(json.dumps({"image": name, "caption": caption}) + "\n")
        if "webdataset" in formats:
            if i % per_shard == 0:
                if tar is not None:
                    tar.close()
                tar = wds.TarWriter(str(out / "wds" / f"train-{k:06d}.tar"))
            tar.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption})
    if jsonl is not None:
        jsonl.close()
    if tar is not None:
        tar.close()
    return specs


__all__ = ["write_synthetic_pairs"]


def write_random_paper_backbones(out: str | Path, image_size: int = 384) -> dict[str, str]:
    """Randomly initialised folders of the paper preset's shapes (Table 7): a bert-base-uncased text side (12 x 768,
    MiniLM's uncased word-piece tokenizer, the same 30,522 pieces) and a BLIP ViT-B/16 vision tower at
    ``image_size`` px (384: 577 tokens x 768). Returns {"text_backbone": folder, "image_encoder": "hf:<folder>"}."""
    from transformers import BertConfig, BertModel, BlipImageProcessorPil, BlipVisionConfig, BlipVisionModel

    from ladic.text_space import resolve_text_backbone

    out = Path(out)
    bert, blip = out / "bert-base-random", out / "blip-vit-b-random"
    if not (bert / "config.json").is_file():
        from transformers import AutoTokenizer

        BertModel(BertConfig()).save_pretrained(bert)
        AutoTokenizer.from_pretrained(resolve_text_backbone("minilm-l6")).save_pretrained(bert)
    if not (blip / "config.json").is_file():
        BlipVisionModel(BlipVisionConfig(image_size=image_size)).save_pretrained(blip)
        BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(blip)
    return {"text_backbone": str(bert), "image_encoder": f"hf:{blip}"}
