"""Model-type dispatch: ``"ladic"`` (the latent diffusion captioner) or ``"ar"`` (the autoregressive baseline).

API:
    MODEL_TYPES                      -> ("ladic", "ar")
    model_class(model_type)          -> LaDiC or ARCaptioner (ValueError for an unknown type)
    checkpoint_model_type(path)      -> the "model_type" of a saved folder's config.json ("ladic" if absent)
    load_model(path=None, device)    -> LaDiC or ARCaptioner loaded with its own ``from_pretrained``
                                        (a folder or a Hub id "org/name"; None: the shipped LaDiC model)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODEL_TYPES = ("ladic", "ar")


def model_class(model_type: str) -> type:
    """The class that implements ``model_type``."""
    if model_type == "ladic":
        from ladic.captioner import LaDiC

        return LaDiC
    if model_type == "ar":
        from ladic.baselines.ar import ARCaptioner

        return ARCaptioner
    raise ValueError(f"unknown model_type {model_type!r}; choose from {', '.join(MODEL_TYPES)}")


def checkpoint_model_type(path: str | Path) -> str:
    """Read ``model_type`` from ``<path>/config.json``; folders written before it existed are LaDiC."""
    from ladic.captioner import CONFIG_NAME, CheckpointError

    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        if (Path(path) / "onnx_config.json").is_file():
            raise CheckpointError(f"{path}: an ONNX export, not a model folder; caption with it through --runtime onnx")
        raise CheckpointError(f"{path}: not a model folder (needs {CONFIG_NAME})")
    try:
        meta = json.loads(cfg.read_text())
        kind = meta.get("model_type", "ladic")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{cfg}: corrupt config ({e})") from e
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"{cfg}: unknown model_type {kind!r}; choose from {', '.join(MODEL_TYPES)}")
    return kind


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load any saved model folder or Hugging Face Hub id (LaDiC or AR baseline) by its config's ``model_type``."""
    if path is None:
        return model_class("ladic").from_pretrained(None, device=device)
    from ladic.checkpoint import resolve_model_path

    path = resolve_model_path(path)
    return model_class(checkpoint_model_type(path)).from_pretrained(path, device=device)


__all__ = ["MODEL_TYPES", "model_class", "checkpoint_model_type", "load_model"]
