"""``ladic eval``: metrics for a COCO results file, or for a model captioning a dataset split."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ladic.metrics import MetricsResult, coco_metrics, load_references_json, load_results_json


def feature_cache_dir() -> str:
    return str(Path(os.environ.get("LADIC_CACHE") or Path.home() / ".cache" / "ladic") / "features")


def caption_split(
    model, records, *, sampling: dict[str, Any], batch_size: int = 64, progress: bool = True
) -> tuple[dict[str, str], float]:
    """Caption ``records`` (image tokens from the feature cache). Returns ({image_id: caption}, seconds of decoding).
    ``sampling["rerank_with"]`` may name the reranking AR model (a folder or "shipped"; loaded before the clock)."""
    from ladic.data.features import build_features

    feats = build_features(model, records, feature_cache_dir(), progress=progress)
    if isinstance(sampling.get("rerank_with"), (str, Path)):
        from ladic.baselines.ar import load_reranker

        sampling = {**sampling, "rerank_with": load_reranker(sampling["rerank_with"], model.device)}
    t0 = time.perf_counter()
    caps = model.generate(feats.images.float(), batch_size=batch_size, progress=progress, **sampling).captions
    return dict(zip(feats.image_ids, caps)), time.perf_counter() - t0


@torch.no_grad()
def denoising_accuracy(
    model, feats, timesteps: tuple[int, ...] = (300, 600, 900), seed: int = 0, batch_size: int = 256
) -> dict[int, float]:
    """Word-token accuracy of one denoiser call on x_t ~ q(x_t | x0) for the first reference of each image.

    ``feats`` is a ``FeatureSet`` (image tokens + text-encoder states). For each t in ``timesteps``: x0 is the
    regularised latent (B, L, D), x_t = sqrt(ab_t) x0 + F sqrt(1 - ab_t) eps (one noise draw per caption,
    shared by all t), x0_hat = f(x_t, v, t) with the image and no self-conditioning, and the decoded tokens are
    compared with the reference at its word positions ([CLS]/[SEP]/[PAD] excluded). Unlike captions sampled
    from pure noise, this separates models at short training budgets. Returns {t: accuracy}.
    """
    model.eval()
    device = model.device
    first = torch.searchsorted(feats.caption_image, torch.arange(len(feats.image_ids)))  # captions are grouped by image
    gen = torch.Generator().manual_seed(seed)
    correct = dict.fromkeys(timesteps, 0)
    total = 0
    for start in range(0, len(first), batch_size):
        sel = first[start : start + batch_size]
        ids = feats.ids[sel].long().to(device)
        x0 = model.text.regularize(feats.hidden[sel].to(device), ids)
        image = model.image_tokens(feats.images[feats.caption_image[sel]].float().to(device))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        for t, n in restored_words(model, image, x0, ids, noise, timesteps).items():
            correct[t] += n
        total += int((~model.text.special_mask(ids)).sum())
    return {t: correct[t] / max(total, 1) for t in timesteps}


@torch.no_grad()
def restored_words(model, image: torch.Tensor, x0: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
                   timesteps: tuple[int, ...]) -> dict[int, int]:
    """For each t: how many word tokens of ``ids`` (B, L) one conditional denoiser call restores from
    x_t = q_sample(x0 (B, L, D), t, ``noise``), with image tokens (B, N, D_img) and no self-conditioning (a
    length-conditioned model is told the reference's length, as in training)."""
    ctx = model.diffuser.image_context(image)
    if model.config.length_conditioning:
        ctx = model.diffuser.add_length(ctx, model.caption_lengths(ids))
    kv = model.diffuser.image_kv(ctx)
    words = ~model.text.special_mask(ids)
    out = {}
    for t in timesteps:
        tt = torch.full((len(ids),), t, dtype=torch.long, device=x0.device)
        x0_hat = model.diffuser(model.diffusion.q_sample(x0, tt, noise), tt, torch.zeros_like(x0), kv)
        out[t] = int(((model.text.token_ids(model.text.logits(x0_hat).argmax(-1)) == ids) & words).sum())
    return out


AUXILIARIES = ("is", "are")


def infill_probe(caption: str, kind: str) -> int | None:
    """Index of the word to blank in ``caption`` for the infilling probe, or None when it has none.

    ``kind="verb"``: the main verb in Flickr-style "<subject> is/are <verb>ing" (the first word ending in
    "ing" right after "is"/"are"); ``kind="noun"``: the subject's head noun, the word before that "is"/"are".
    A fixed, documented heuristic (no tagger installs offline): "a black dog is running" -> noun "dog", verb
    "running".
    """
    if kind not in ("noun", "verb"):
        raise ValueError(f"unknown probe kind {kind!r}; use 'noun' or 'verb'")
    words = caption.split()
    for i in range(2, len(words)):
        if words[i].endswith("ing") and len(words[i]) > 4 and words[i - 1] in AUXILIARIES:
            return i if kind == "verb" else i - 2
    return None


@torch.no_grad()
def infill_accuracy(model, feats, kind: str, batch_size: int = 64, **sampling: Any) -> dict[str, Any]:
    """Blank one word of each image's first reference and ask ``model`` (LaDiC) to fill it back.

    ``feats`` is a ``FeatureSet``; images whose first reference has no probe word (``infill_probe``) or whose
    word is not a single word piece (one blank = one token) are skipped. Returns {"accuracy": share of blanks
    filled with exactly the removed word, "n": images probed, "examples": a few (template, filled, word)}.
    """
    tok = model.text.tokenizer
    first = torch.searchsorted(feats.caption_image, torch.arange(len(feats.image_ids)))
    refs = model.text.ids_to_text(feats.ids[first], collapse_repeats=False)
    rows, templates, answers = [], [], []
    for row, ref in enumerate(refs):
        i = infill_probe(ref, kind)
        words = ref.split()
        if i is None or len(tok.encode(words[i], add_special_tokens=False)) != 1:
            continue
        rows.append(row)
        answers.append(words[i])
        templates.append(" ".join(words[:i] + ["___"] + words[i + 1 :]))
    if not rows:
        return {"accuracy": None, "n": 0, "examples": []}
    images = feats.images[torch.tensor(rows)].float()
    filled = model.generate(images, template=templates, batch_size=batch_size, **sampling).captions
    hits = [f.split()[t.split().index("___")] == a if len(f.split()) == len(t.split()) else False
            for f, t, a in zip(filled, templates, answers)]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits),
            "examples": [(t, f, a) for t, f, a in list(zip(templates, filled, answers))[:5]]}


def evaluate_model(
    model_path: str | None, split: str = "val", limit: int | None = None, references: str | None = None,
    image_root: str | None = None, sampling: dict[str, Any] | None = None,
    config_overrides: dict[str, Any] | None = None, **metric_kw: Any,
) -> tuple[MetricsResult, dict[str, str]]:
    """Caption a split of Flickr8k (default) or of a Karpathy/BLIP JSON and score it. ``config_overrides``
    replace sampling settings of the model's config (``ladic.config.SAMPLING_KEYS``)."""
    from ladic.data.captions import load_captions, load_flickr8k
    from ladic.models import load_model

    sampling = dict(sampling or {})
    model = load_model(model_path)
    if config_overrides:
        model.config = model.config.replace(**config_overrides)
    if references is None:
        records = load_flickr8k(split)
    else:
        if image_root is None:
            raise ValueError("--image-root is required with --references when captioning")
        records = load_captions(references, image_root, split)
    records = records[:limit] if limit else records
    results, seconds = caption_split(model, records, sampling=sampling)
    refs = {r.image_id: r.captions for r in records}
    images = {r.image_id: r.image_path for r in records}
    res = coco_metrics(results, refs, images=images, **metric_kw)
    desc = ", ".join(f"{k}={v}" for k, v in {**sampling, **(config_overrides or {})}.items() if v is not None)
    res.settings += (f"; model={model_path or 'shipped default'} ({type(model).__name__}); split={split}; "
                     f"images={len(records)}; sampling: {desc or 'model defaults'}; decode_s={seconds:.1f}")
    return res, results


def caption_statistics(captions: list[str]) -> dict[str, float | None]:
    """Dangling endings, broken word pairs and OOV words of ``captions`` (``ladic.bench.text_stats``), against the
    Flickr8k train captions (broken pairs and OOV words None where Flickr8k is not found), and the share the shipped
    fluency check calls not fluent (``ladic.fluency``; calibrated against a blind editor, docs/experiments/fluency.md)."""
    from ladic.bench.text_stats import caption_stats, training_text
    from ladic.data.captions import load_flickr8k
    from ladic.fluency import not_fluent_share

    try:
        train = training_text(c for r in load_flickr8k("train") for c in r.captions)
    except FileNotFoundError:
        train = None
    return {**caption_stats(captions, train), "not_fluent_share": not_fluent_share(captions)}


def parse_sampling_overrides(items: list[str]) -> dict[str, Any]:
    """``["clamp=false", "sampling_noise_factor=1"]`` -> {key: value} (values as JSON where they parse);
    ValueError for a malformed item or a key that is not a sampling setting."""
    from ladic.config import SAMPLING_KEYS

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not KEY=VALUE")
        if key not in SAMPLING_KEYS:
            raise ValueError(f"--set {key}: not a sampling setting; use one of {', '.join(SAMPLING_KEYS)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def evaluate_cli(args: argparse.Namespace) -> int:
    metric_kw = dict(spice_dir=args.spice_dir, clip_model=args.clip_model,
                     bert_score_model=None if args.no_bert_score else "minilm")
    try:
        overrides = parse_sampling_overrides(getattr(args, "set", None) or [])
        if overrides and args.results:
            raise ValueError("--set changes how a model samples; it does not apply to --results")
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
                            back_and_refine=args.back_and_refine, mbr_candidates=args.mbr, select=args.select, seed=args.seed,
                            length=args.length, clamp=args.clamp, mbr_lengths=args.mbr_lengths)
            if args.rerank:
                sampling["rerank_with"] = args.rerank_model
            res, results = evaluate_model(args.model, args.split, args.limit, args.references, args.image_root,
                                          sampling, overrides, **metric_kw)
            if args.save_results:
                Path(args.save_results).write_text(json.dumps([{"image_id": k, "caption": v} for k, v in results.items()], indent=1))
    except FileNotFoundError as e:
        print(f"error: {e.filename}: file not found" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = res.to_json()
    out.pop("per_image", None)
    out["caption_stats"] = caption_statistics(list(results.values()))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
