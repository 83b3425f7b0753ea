"""``ladic bench ablations``: paper Table 5 variants trained with one short budget, then scored on val."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ladic.bench.quality import QUALITY_METRICS, CaptionMemo, require_java
from ladic.bench.report import fmt_score, jsonable, markdown_header, md_table


@dataclass(frozen=True)
class Ablation:
    """One variant: what to train (or reuse) and how to sample from it."""

    name: str
    description: str
    model: dict[str, Any] | None  # LaDiCConfig overrides to train with; None = reuse "full"
    sampling: dict[str, Any] = field(default_factory=dict, hash=False)


RESTORE_TIMESTEPS = (300, 600, 900)

ABLATIONS = (
    Ablation("full", "full model", {}),
    Ablation("no_caption_loss", "no caption loss (caption_loss_weight=0)", {"caption_loss_weight": 0.0}),
    Ablation("no_norm_reassign", "no normalisation / special-token reassignment "
             "(normalize_latents=False, special_token_latent=none)",
             {"normalize_latents": False, "special_token_latent": "none"}),
    Ablation("prepend_image", "image as a prepended [CLS] token, no cross-attention (image_conditioning=prepend)",
             {"image_conditioning": "prepend"}),
    Ablation("no_back_and_refine", "full model, Back&Refine off at inference", None, {"back_and_refine": False}),
    Ablation("dinov2_encoder", "image encoder DINOv2-S (257 tokens) instead of EfficientNet-Lite0 (49)",
             {"image_encoder": "dinov2-s"}),
)


def ablation_train_config(name: str, overrides: dict[str, Any], work_dir: Path, *, preset_name: str = "small",
                          max_steps: int = 400, train_images: int = 2000, batch_size: int = 64,
                          progress: bool = False):
    from ladic.train import TrainConfig

    return TrainConfig(
        preset=preset_name, model=dict(overrides), data="flickr8k", train_images=train_images, max_steps=max_steps,
        batch_size=batch_size, val_images=0, eval_every=0, save_every=max(min(100, max_steps), 1),
        out_dir=str(work_dir / name), progress=progress, log_every=max(min(50, max_steps), 1),
    )


def _last_log(out: Path) -> dict[str, Any]:
    last: dict[str, Any] = {}
    log = out / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                last = rec
    return last


def run_ablations(
    records, work_dir: Path, *, ablations: Sequence[Ablation] = ABLATIONS, preset_name: str = "small",
    max_steps: int = 400, train_images: int = 2000, batch_size: int = 64, eval_steps: int = 5,
    caption_batch: int = 64, progress: bool = False, train_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each variant (skipped when ``<work_dir>/<name>/final`` exists; resumed from its checkpoint
    otherwise), then caption ``records`` with ``eval_steps`` steps and score with ``coco_metrics``."""
    from ladic.data.features import build_features
    from ladic.evaluate import denoising_accuracy, feature_cache_dir
    from ladic.metrics import coco_metrics
    from ladic.models import load_model

    require_java()
    if train_fn is None:
        from ladic.train import train as train_fn  # noqa: N811
    work_dir = Path(work_dir)
    trained: dict[str, dict[str, Any]] = {}
    for ab in ablations:
        if ab.model is None:
            continue
        out = work_dir / ab.name
        tc = ablation_train_config(ab.name, ab.model, work_dir, preset_name=preset_name, max_steps=max_steps,
                                   train_images=train_images, batch_size=batch_size, progress=progress)
        skipped = (out / "final" / "config.json").is_file()
        t0 = time.perf_counter()
        if skipped:
            log(f"ablation {ab.name}: {out / 'final'} exists, not training")
        else:
            log(f"ablation {ab.name}: training {max_steps} steps into {out}")
            train_fn(tc, resume=True)
        trained[ab.name] = {"dir": str(out / "final"), "skipped_training": skipped,
                            "train_wall_s_this_run": None if skipped else time.perf_counter() - t0,
                            "train_config": {k: jsonable(v) if not isinstance(v, dict) else v
                                             for k, v in vars(tc).items()},
                            "last_log": _last_log(out)}
    refs = {r.image_id: r.captions for r in records}
    memo = CaptionMemo()
    restore: dict[str, dict[int, float]] = {}
    rows = []
    for ab in ablations:
        src = ab.name if ab.model is not None else "full"
        if src not in trained:
            raise ValueError(f"ablation {ab.name} evaluates the 'full' model, which is not in this run")
        model = load_model(trained[src]["dir"])
        if src not in restore:
            feats = build_features(model, records, feature_cache_dir(), progress=progress)
            restore[src] = denoising_accuracy(model, feats, RESTORE_TIMESTEPS)
        sampling = {"num_inference_steps": eval_steps, "seed": 0, **ab.sampling}
        results, seconds = memo.get(model, records, sampling, caption_batch, progress)
        res = coco_metrics(results, refs, bert_score_model=None)
        scores = {m: res.scores.get(m) for m in QUALITY_METRICS}
        info = trained[src]
        rows.append({"name": ab.name, "description": ab.description, "model_overrides": ab.model or {},
                     "trained_as": src, "sampling": sampling, "images": len(records), "scores": scores,
                     "restore_accuracy": restore[src],
                     "decode_s": seconds, "final_train_loss": info["last_log"].get("loss"),
                     "final_caption_loss": info["last_log"].get("caption"),
                     "train_elapsed_s": info["last_log"].get("elapsed_s"), "model_dir": info["dir"],
                     "skipped_training": info["skipped_training"]})
        log(f"ablation {ab.name:20s} " + " ".join(f"{m}={fmt_score(v)}" for m, v in scores.items()))
    return {"rows": rows, "trained": trained}


def ablations_markdown(result: dict[str, Any], notes: list[str], meta: dict[str, Any]) -> str:
    parts = [markdown_header("LaDiC benchmark: ablations (paper Table 5, short CPU budget)", meta)]
    parts += [f"- {n}" for n in notes] + [""]
    table = [[r["description"]] + [fmt_score(r["scores"][m]) for m in QUALITY_METRICS]
             + [fmt_score(r["restore_accuracy"][t]) for t in RESTORE_TIMESTEPS]
             + ["-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}", f"{r['decode_s']:.2f}"]
             for r in result["rows"]]
    restore = [f"restore % t={t}" for t in RESTORE_TIMESTEPS]
    parts += [md_table(["variant"] + list(QUALITY_METRICS) + restore + ["final train loss", "decode s"], table), ""]
    parts += ["restore % t: word tokens of the first reference recovered by one denoiser call from x_t ~ q(x_t | x0) "
              "with the image (`ladic.evaluate.denoising_accuracy`); it separates variants whose sampled captions "
              "are still near zero at a short budget.", ""]
    return "\n".join(parts)
