"""``ladic eval``: metrics for a COCO results file, or for a model captioning a dataset split."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ladic.metrics import MetricsResult, coco_metrics, load_references_json, load_results_json


def feature_cache_dir() -> str:
    return str(Path(os.environ.get("LADIC_CACHE") or Path.home() / ".cache" / "ladic") / "features")


def caption_split(
    model, records, *, sampling: dict[str, Any], batch_size: int = 64, progress: bool = True
) -> tuple[dict[str, str], float]:
    """Caption ``records`` (image tokens from the feature cache). Returns ({image_id: caption}, seconds of decoding)."""
    from ladic.data.features import build_features

    feats = build_features(model, records, feature_cache_dir(), progress=progress)
    t0 = time.perf_counter()
    caps = model.generate(feats.images.float(), batch_size=batch_size, progress=progress, **sampling).captions
    return dict(zip(feats.image_ids, caps)), time.perf_counter() - t0


def evaluate_model(
    model_path: str | None, split: str = "val", limit: int | None = None, references: str | None = None,
    image_root: str | None = None, sampling: dict[str, Any] | None = None, **metric_kw: Any,
) -> tuple[MetricsResult, dict[str, str]]:
    """Caption a split of Flickr8k (default) or of a Karpathy/BLIP JSON and score it."""
    from ladic.data.captions import load_flickr8k, load_karpathy
    from ladic.models import load_model

    sampling = dict(sampling or {})
    model = load_model(model_path)
    if references is None:
        records = load_flickr8k(split)
    else:
        if image_root is None:
            raise ValueError("--image-root is required with --references when captioning")
        records = load_karpathy(references, image_root, split)
    records = records[:limit] if limit else records
    results, seconds = caption_split(model, records, sampling=sampling)
    refs = {r.image_id: r.captions for r in records}
    images = {r.image_id: r.image_path for r in records}
    res = coco_metrics(results, refs, images=images, **metric_kw)
    desc = ", ".join(f"{k}={v}" for k, v in sampling.items() if v is not None)
    res.settings += (f"; model={model_path or 'shipped default'} ({type(model).__name__}); split={split}; "
                     f"images={len(records)}; sampling: {desc or 'model defaults'}; decode_s={seconds:.1f}")
    return res, results


def evaluate_cli(args: argparse.Namespace) -> int:
    metric_kw = dict(spice_dir=args.spice_dir, clip_model=args.clip_model,
                     bert_score_model=None if args.no_bert_score else "minilm")
    try:
        if args.results:
            results = load_results_json(args.results)
            if args.references:
                refs = load_references_json(args.references, split=args.split)
            else:
                from ladic.data.captions import load_flickr8k

                refs = {r.image_id: r.captions for r in load_flickr8k(args.split)}
            res = coco_metrics(results, refs, **metric_kw)
            res.settings += f"; results={args.results}"
        else:
            sampling = dict(num_inference_steps=args.steps, guidance_scale=args.guidance,
                            back_and_refine=args.back_and_refine, mbr_candidates=args.mbr, seed=args.seed,
                            length=args.length, clamp=args.clamp)
            res, results = evaluate_model(args.model, args.split, args.limit, args.references, args.image_root,
                                          sampling, **metric_kw)
            if args.save_results:
                Path(args.save_results).write_text(json.dumps([{"image_id": k, "caption": v} for k, v in results.items()], indent=1))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = res.to_json()
    out.pop("per_image", None)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
