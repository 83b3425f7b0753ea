"""Saving and loading captioners: ``config.json`` + ``model.safetensors`` (no pickles).

Both the LaDiC model and the autoregressive baseline share a text space (tokenizer, frozen BERT,
trainable LM head) and an image encoder; only their trainable core differs. ``Captioner`` holds what
they share: which weights a checkpoint stores, and how a folder is written and read back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ladic import __version__
from ladic.config import LaDiCConfig
from ladic.image_encoders import EncoderLoadError, GridPooledEncoder, ImageEncoder, build_image_encoder
from ladic.image_io import ImageInput, load_image
from ladic.text_space import TextSpace

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VOCAB_KEY = "text.lm_head.vocab_ids"  # the restricted output vocabulary, when there is one

C = TypeVar("C", bound="Captioner")


def shipped_model_path(name: str) -> Path:
    """The folder of a model shipped inside the package, ``src/ladic/assets/<name>``."""
    return Path(__file__).resolve().parent / "assets" / name


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, or does not match its config."""


class Captioner(nn.Module):
    """Base of the captioners: the text space and image encoder of ``config``; subclasses set ``model_type``,
    build their trainable core and name it in ``core_modules``."""

    model_type: str = "ladic"

    def __init__(self, config: LaDiCConfig, image_encoder: ImageEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.text = TextSpace(
            config.text_backbone, config.split_layer, config.max_length,
            reassign_special=config.special_token_latent == "zero", normalize=config.normalize_latents,
            decoder_num_layers=config.decoder_num_layers, output_vocab_size=config.output_vocab_size,
        )
        if image_encoder is None:
            image_encoder = build_image_encoder(config.image_encoder, **config.image_encoder_options)
            if config.image_token_grid:
                try:
                    image_encoder = GridPooledEncoder(image_encoder, config.image_token_grid)
                except ValueError as e:  # (not a CLS + square patch grid, or a grid finer than the patches)
                    raise EncoderLoadError(f"image_token_grid {config.image_token_grid}: {e}") from None
        self.image_encoder = image_encoder

    def restrict_output_vocab(self, token_ids: torch.Tensor) -> None:
        """Let the LM head score only ``token_ids`` (plus the special tokens), e.g. the ids of the training
        captions: decoding then skips the other word pieces' logits. Stored with ``save_pretrained``."""
        self.text.set_output_vocab(token_ids)
        self.config = self.config.replace(output_vocab_size=self.text.output_vocab_size)

    def core_modules(self) -> dict[str, nn.Module]:
        """Prefix -> module of the model's own trainable network (e.g. ``{"diffuser": ...}``)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.text.latent_mean.device

    def load_images(self, images: Sequence[ImageInput]) -> list:
        """Any supported inputs -> RGB PIL images; raises ``ImageLoadError`` naming the first bad one."""
        return [load_image(im) for im in images]

    def image_tokens(self, image_inputs: torch.Tensor) -> torch.Tensor:
        """Feature-cache entries -> image tokens (B, N_img, D_img): cached tokens of a pretrained (frozen) encoder
        pass through; pixels (B, 3, H, W) of a trainable encoder are encoded here."""
        return image_inputs if self.image_encoder.pretrained else self.image_encoder(image_inputs)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the core, the LM head, and the image encoder only when it is not pretrained."""
        sd = {f"{name}.{k}": v for name, mod in self.core_modules().items() for k, v in mod.state_dict().items()}
        sd.update({f"text.lm_head.{k}": v for k, v in self.text.trainable_state_dict().items()})
        if not self.image_encoder.pretrained:
            sd.update({f"image_encoder.{k}": v for k, v in self.image_encoder.state_dict().items()})
        return sd

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], source: str = "state dict",
                                  missing_ok: bool = False) -> list[str]:
        """Load what ``trainable_state_dict`` returns, with a clear error on any mismatch. A restricted output
        vocabulary in ``sd`` (``text.lm_head.vocab_ids``) is adopted with its size. ``missing_ok``: weights that
        ``sd`` lacks (modules the source model did not have) keep their initialisation. Returns those names."""
        vocab = sd.get(VOCAB_KEY)
        if vocab is not None and vocab.numel() != self.text.output_vocab_size:
            self.text.lm_head.vocab_ids = vocab.long().to(self.device)
            self.config = self.config.replace(output_vocab_size=vocab.numel())
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
        if (missing and not missing_ok) or unexpected or wrong:
            parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                     f"shape mismatch {wrong[:3]}" if wrong else ""]
            raise CheckpointError(f"{source}: weights do not match the config ({'; '.join(p for p in parts if p)})")
        self.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
        return missing

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` (model type, config, latent statistics, backbone references) and ``model.safetensors``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
              for k, v in self.trainable_state_dict().items()}
        save_file(sd, str(path / WEIGHTS_NAME), metadata={"format": "pt", "ladic_version": __version__, "model_type": self.model_type})
        meta = {
            "model_type": self.model_type,
            "ladic_version": __version__,
            "config": self.config.to_dict(),
            "latent_stats": {"mean": self.text.latent_mean.tolist(), "std": self.text.latent_std.tolist()},
        }
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=1))

    def load_folder_weights(self, path: str | Path, missing_ok: bool = False) -> list[str]:
        """Load a saved folder's trainable weights and latent statistics into this model (same model type and
        architecture, else ``CheckpointError``); the frozen backbones are not rebuilt. ``missing_ok``: this model
        may have modules the folder lacks (they keep their initialisation; their names are returned)."""
        _, stats, sd = read_model_folder(Path(path), self.model_type)
        return self._load_state(sd, stats, str(path), missing_ok)

    def _load_state(self, sd: dict[str, torch.Tensor], stats: dict[str, list[float]], source: str,
                    missing_ok: bool = False) -> list[str]:
        missing = self.load_trainable_state_dict(sd, source=source, missing_ok=missing_ok)
        self.text.latent_mean.copy_(torch.tensor(stats["mean"]))
        self.text.latent_std.copy_(torch.tensor(stats["std"]))
        return missing

    @classmethod
    def _from_folder(cls: type[C], path: str | Path, device: str | torch.device) -> C:
        """Load a model folder, or a Hugging Face Hub id (``"org/name"``) that is not a local path."""
        path = resolve_model_path(path)
        config, stats, sd = read_model_folder(path, cls.model_type)
        model = cls(config)
        model._load_state(sd, stats, str(path))
        return model.to(device).eval()


def _hub_failure(exc: Exception) -> str:
    """One short reason why the Hub could not provide a model."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(exc, RepositoryNotFoundError):
        return "no such Hub repository, or it is private"
    if isinstance(exc, LocalEntryNotFoundError):
        offline = " and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else " and the Hub cannot be reached"
        return f"not in the local Hugging Face cache{offline}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:160]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model folder as is; otherwise a Hugging Face Hub id (``"org/name"``) resolved through
    ``huggingface_hub.snapshot_download`` (the local cache first; ``HF_HUB_OFFLINE`` and ``HF_HOME`` are
    honoured). A valid Hub id that is neither raises ``CheckpointError`` with a one-line message naming both."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name_or_path)
    if path.exists():
        return path
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise CheckpointError(f"{name_or_path}: no such local model folder") from None  # and not a Hub id
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*.md"]))
    except Exception as e:  # the Hub client raises many error types (validation, HTTP, offline, cache)
        raise CheckpointError(
            f"{name_or_path}: no such local model folder, and not a model on the Hugging Face Hub ({_hub_failure(e)})"
        ) from e


def read_model_folder(path: Path, model_type: str) -> tuple[LaDiCConfig, dict[str, list[float]], dict[str, torch.Tensor]]:
    """A folder written by ``save_pretrained`` -> (config, latent stats, trainable weights), checked to hold a
    ``model_type`` model; any damage or mismatch raises ``CheckpointError``."""
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: not a LaDiC checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
        kind = meta.get("model_type", "ladic")
        config = LaDiCConfig.from_dict(meta["config"])
        stats = meta["latent_stats"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: corrupt or incompatible config ({e})") from e
    if kind != model_type:
        raise CheckpointError(f"{path}: model_type is {kind!r}, not {model_type!r} (use ladic.models.load_model)")
    try:
        sd = load_file(str(path / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises several error types for damaged files
        raise CheckpointError(f"{path / WEIGHTS_NAME}: corrupt weights file ({e})") from e
    return config, stats, sd
