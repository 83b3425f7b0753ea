"""Training loop: one process or many (torchrun + DDP: gloo on CPU, NCCL on GPU), resumable, with EMA.

Every random draw of step s comes from generators seeded by (seed, s) and the data order of epoch e
from (seed, e), so a run killed at any point and resumed from its last checkpoint ends with the
same weights as an uninterrupted run, and a DDP run sees the same global batch and noise as one
process (each rank takes its slice of the global batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ladic.captioner import LaDiC
from ladic.config import LEGACY_DEFAULTS, REMOVED_MODEL_OPTIONS, LaDiCConfig, drop_removed, preset
from ladic.data.features import FeatureSet, build_features, build_image_features
from ladic.data.loader import epoch_order


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left intact."""


class ConfigError(ValueError):
    """A training config that cannot run: a missing file, an unknown or mistyped option, a value out of range."""


@dataclass
class TrainConfig:
    """A training run. Loaded from a JSON/TOML file and ``--set key=value`` overrides."""

    preset: str = "small"
    model_type: str = "ladic"  # "ladic" or "ar" (the autoregressive baseline, ladic.baselines.ar)
    init_from: str | None = None  # a model folder (e.g. the shipped model): start from its weights and latent stats
    model: dict[str, Any] = field(default_factory=dict)  # LaDiCConfig overrides
    data: str = "flickr8k"  # "flickr8k", "scenes", or a Karpathy/BLIP caption JSON
    image_root: str | None = None  # images of a caption file
    # Validation from another caption file (e.g. BLIP's coco_karpathy_val.json; its val_split, or all of a pairs
    # file); default: the val_split of ``data``.
    val_data: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_images: int | None = None  # use only the first N training images (short comparisons)
    num_scenes: int = 2000  # with data = "scenes"
    scene_size: int = 32
    scene_max_objects: int = 1
    scene_captions: int = 0  # paraphrases used per scene (0 = all; 1 = the canonical one)
    out_dir: str = "runs/ladic"
    cache_dir: str | None = None  # default: $LADIC_CACHE or ~/.cache/ladic/features
    batch_size: int = 64  # global batch, split over ranks
    max_steps: int = 2000
    lr: float = 5e-4
    optimizer: str = "adamw"  # "adamw" (paper) or "sgd" (plain SGD; used to check DDP gradient averaging)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    save_every: int = 500
    eval_every: int = 1000
    val_images: int = 200
    val_steps: int = 5
    seed: int = 0
    stats_captions: int = 20000  # captions used for the latent mean/std
    # Sequence-level knowledge distillation (not in the paper; see ladic.data.distill): a model folder, e.g. the
    # shipped AR baseline, whose caption of each training image becomes that image's training target.
    distill_from: str | None = None
    distill_beams: int = 3  # beam width of an AR teacher
    distill_mbr: int = 1  # MBR candidates of a LaDiC teacher (its full sampler + MBR: the few-step student's target)
    distill_sampler: dict[str, Any] = field(default_factory=dict)  # a LaDiC teacher's sampler overrides, e.g. w = 0
    # Which of a LaDiC teacher's distill_mbr draws (an AR teacher's distill_beams beams) becomes the target: "mbr" (the
    # teacher's own choice) or "references" (the candidate with the highest CIDEr-D against the photo's human
    # references; ladic.data.distill.select_by_references).
    distill_select: str = "mbr"
    # "reference": a teacher caption that ends on a function word ("... in front of a") is replaced by the image's
    # consensus human reference (see ``references``), so a student does not learn cut-off endings; "keep": as is.
    distill_dangling: str = "keep"
    distill_keep_references: bool = False  # train on the teacher caption and the human captions
    # Training references: "all" (every human caption) or "consensus" (one per image: the caption with the highest
    # CIDEr-D against the image's other captions, ladic.data.captions.consensus_index); not in the paper.
    references: str = "all"
    # The LM head scores only the word pieces of the training targets (+ specials) instead of all 30,522: the
    # output layer costs a fraction, and the vocabulary is saved with the model (LaDiCConfig.output_vocab_size).
    restrict_vocab: bool = False
    # Training at scale (ladic.data.loader / ladic.data.shards; README "Training at the paper's scale").
    # A `ladic features` folder: train from its memory-mapped shards instead of the in-RAM feature cache.
    features_dir: str | None = None
    # "cached": image tokens and text latents computed once (in RAM for a small set, or features_dir); "online":
    # DataLoader workers decode the photos and the frozen encoders run inside the training step (no disk cache).
    image_features: str = "cached"
    image_column: str | None = None  # the image / caption column of a JSONL/CSV pairs file, or member of a webdataset
    caption_column: str | None = None
    resample_shards: bool = False  # online from webdataset/pairs: draw shards with replacement (no epochs)
    max_bad_share: float = 0.01  # the run stops when more of the samples than this were skipped (corrupt, no caption)
    num_workers: int = 0  # DataLoader workers
    grad_accum: int = 1  # accumulation steps: the global batch_size is split into grad_accum micro-batches
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16", "fp16" (with GradScaler)
    tf32: bool = True  # TF32 matmuls on CUDA GPUs that have them
    compile: bool = False  # torch.compile the model's training step
    dist_timeout_s: int = 1800  # process-group timeout: a rank that waits longer than this fails instead of hanging
    keep_checkpoints: int = 1  # the last K checkpoints are kept (checkpoint = the latest, checkpoint-<step> the older)
    epochs: int | None = None  # with it, max_steps = epochs x (captions // batch_size)
    tensorboard: bool = False
    log_every: int = 50
    progress: bool = True
    fail_at_step: int = -1  # testing aid: force a NaN loss at this step

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        """The file's options, then ``key=value`` overrides (values parsed as JSON, else taken as strings); every
        option is checked (``check_train_config``). Raises ``ConfigError`` with one line."""
        d: dict[str, Any] = {}
        if path is not None:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
            try:
                if str(path).endswith(".toml"):
                    import tomllib

                    d = tomllib.loads(text)
                else:
                    d = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"{path}: not valid {'TOML' if str(path).endswith('.toml') else 'JSON'} ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: a config file holds one object of options")
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, value = item.split("=", 1)
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if key.startswith("model."):
                d.setdefault("model", {})[key[6:]] = parsed
            else:
                d[key] = parsed
        d = without_removed(d)
        _check_fields(cls, d, "training option")
        _check_fields(LaDiCConfig, d.get("model", {}), "model option", "model.")
        tc = cls(**d)
        check_train_config(tc)
        return tc

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainConfig:
        """The ``train_config.json`` of a training checkpoint, perhaps written before some options left the library
        (``without_removed``)."""
        return cls(**without_removed(d))


# Training options whose experiments lost and that left the library (``ladic.config.REMOVED_IN`` has them): name ->
# the no-op value they had by default.
REMOVED_TRAIN_OPTIONS: dict[str, Any] = {
    "distill_pool_from": None, "distill_pool_beams": 5, "distill_noise_prob": 0.0, "flip_augment": False,
    "reward_weight": 0.0, "reward_samples": 5, "reward_supervised_weight": 1.0, "reward_temperature": 1.0,
}


def without_removed(d: dict[str, Any]) -> dict[str, Any]:
    """A training config (and its ``model`` overrides) without the options that left the library, where they hold
    their no-op values; ``ConfigError`` naming the option otherwise (``ladic.config.drop_removed``)."""
    try:
        out = drop_removed(d, REMOVED_TRAIN_OPTIONS)
        if isinstance(out.get("model"), dict):
            out["model"] = drop_removed(out["model"], REMOVED_MODEL_OPTIONS, "model.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return out


# A field's annotation (a string under postponed evaluation) -> the JSON values it accepts; others are not checked.
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,),
    "tuple": (list, tuple),
}


def _check_fields(cls: type, d: Any, what: str, prefix: str = "") -> None:
    """Unknown keys (with the closest known name) and values of the wrong type, as one ``ConfigError`` line."""
    import difflib

    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be an object of options")
    fields = cls.__dataclass_fields__
    for key, value in d.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown {what} {prefix}{key}{hint}")
        kinds = [k.strip() for k in str(fields[key].type).split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _TYPES.get(k.split("[")[0], ()))
        bad_bool = isinstance(value, bool) and bool not in allowed
        if allowed and (bad_bool or not isinstance(value, allowed)):
            raise ConfigError(f"{prefix}{key} must be {' or '.join(kinds)}, got {value!r}")


_CHOICES = {
    "model_type": ("ladic", "ar"), "optimizer": ("adamw", "sgd"), "distill_select": ("mbr", "references"),
    "distill_dangling": ("keep", "reference"), "references": ("all", "consensus"), "image_features": ("cached", "online"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}
_AT_LEAST = {
    "batch_size": 1, "max_steps": 0, "save_every": 1, "eval_every": 0, "val_images": 0, "val_steps": 1, "log_every": 1,
    "stats_captions": 1, "distill_beams": 1, "distill_mbr": 1, "num_scenes": 1, "scene_size": 8, "scene_max_objects": 1,
    "scene_captions": 0, "train_images": 1, "num_workers": 0, "grad_accum": 1, "dist_timeout_s": 1, "keep_checkpoints": 1,
    "epochs": 1,
}


def check_train_config(tc: TrainConfig) -> None:
    """Values a run cannot use, as one ``ConfigError`` line, before anything loads."""
    from ladic.config import PRESETS, SAMPLING_KEYS

    if tc.preset not in PRESETS:
        raise ConfigError(f"unknown preset {tc.preset!r}; choose from {', '.join(PRESETS)}")
    for key, choices in _CHOICES.items():
        if getattr(tc, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {getattr(tc, key)!r}")
    for key, low in _AT_LEAST.items():
        value = getattr(tc, key)
        if value is not None and value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if not tc.lr > 0:
        raise ConfigError(f"lr must be > 0, got {tc.lr}")
    for key in ("warmup_ratio", "ema_decay", "max_bad_share"):
        if not 0 <= getattr(tc, key) <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {getattr(tc, key)}")
    for key in ("weight_decay", "grad_clip"):
        if not getattr(tc, key) >= 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(tc, key)}")
    from ladic.data.sources import DataError, expand_shards, is_webdataset

    if is_webdataset(tc.data):
        try:
            expand_shards(tc.data)
        except DataError as e:
            raise ConfigError(f"data: {e}") from None
        if tc.val_data is not None and not Path(tc.val_data).is_file():
            raise ConfigError(f"val_data {tc.val_data!r}: not a caption file (JSON, JSONL or CSV)")
    elif tc.data not in ("flickr8k", "scenes"):
        for key in ("data", "val_data"):
            if getattr(tc, key) is not None and not Path(getattr(tc, key)).is_file():
                raise ConfigError(f"{key} {getattr(tc, key)!r}: not 'flickr8k', 'scenes', a caption file (JSON, "
                                  f"JSONL or CSV) or webdataset shards (.tar)")
        if tc.image_root is None or not Path(tc.image_root).is_dir():
            raise ConfigError(f"image_root must name the image folder of the caption file {tc.data}, got {tc.image_root!r}")
    elif tc.val_data is not None:
        raise ConfigError(f"val_data goes with a caption file as data, not data={tc.data!r}")
    if tc.features_dir is not None and not Path(tc.features_dir, "manifest.json").is_file():
        raise ConfigError(f"features_dir {tc.features_dir!r}: not a finished `ladic features` folder (no manifest.json)")
    scale = tc.features_dir is not None or tc.image_features == "online"
    if scale and tc.data == "scenes":
        raise ConfigError("features_dir and image_features=online read caption files or shards, not data=scenes")
    in_ram = ["distill_from"] if tc.distill_from else []
    in_ram += ["references=consensus"] if tc.references == "consensus" else []
    if scale and in_ram:
        raise ConfigError(f"{', '.join(in_ram)} need(s) the in-RAM feature cache; drop features_dir / "
                          f"image_features=online, or the option")
    if tc.batch_size % tc.grad_accum:
        raise ConfigError(f"batch_size {tc.batch_size} is not divisible by grad_accum {tc.grad_accum}")
    if tc.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install -c constraints.txt "
                              "'.[tensorboard]' (log.jsonl has the same numbers without it)")
    encoder = tc.model.get("image_encoder")
    if encoder is not None:
        from ladic.image_encoders import HF_PREFIX, available_image_encoders

        if not (encoder in available_image_encoders() or (encoder.startswith(HF_PREFIX) and len(encoder) > len(HF_PREFIX))):
            raise ConfigError(f"unknown image encoder {encoder!r}; choose from {', '.join(available_image_encoders())} "
                              f"or 'hf:<name or folder>'")
    options = tc.model.get("image_encoder_options")
    if options and not str(encoder or PRESETS[tc.preset]["image_encoder"]).startswith("hf:"):
        raise ConfigError("model.image_encoder_options apply to 'hf:' image encoders only")
    unknown = sorted(set(tc.distill_sampler) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"distill_sampler: {', '.join(unknown)} not a sampling setting; use {', '.join(SAMPLING_KEYS)}")
    for key in ("init_from", "distill_from"):
        folder = getattr(tc, key)
        if folder is not None and not Path(folder, "config.json").is_file():
            raise ConfigError(f"{key} {folder!r}: not a model folder (no config.json there)")
    try:
        model_config(tc)  # the model options' own checks (LaDiCConfig.__post_init__), before any work starts
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


# ---------------------------------------------------------------------------- model config
# Settings a model inherits from its ``init_from`` folder unless the run sets them: its weights were trained with them.
INHERITED = ("input_scaling", "special_token_latent")


def model_config(tc: TrainConfig, legacy: bool = False) -> LaDiCConfig:
    """The model config of a run: the preset, then what the ``init_from`` folder was trained with (``INHERITED``),
    then the run's ``model`` overrides. ``legacy``: for a checkpoint written before issue 28 (no model_config.json),
    whose settings missing from ``model`` are ``LEGACY_DEFAULTS``."""
    base: dict[str, Any] = dict(LEGACY_DEFAULTS) if legacy else {}
    if tc.init_from:
        from ladic.checkpoint import CONFIG_NAME

        meta = json.loads((Path(tc.init_from) / CONFIG_NAME).read_text())
        folder = LaDiCConfig.from_dict(meta["config"])
        base.update({k: getattr(folder, k) for k in INHERITED})
    return preset(tc.preset, **{**base, **tc.model})


def checkpoint_model_config(ckpt: Path, tc: TrainConfig) -> LaDiCConfig:
    """The model config a training checkpoint was written with (``model_config.json``; for a checkpoint written
    before issue 28, the run's config with ``LEGACY_DEFAULTS``)."""
    path = ckpt / "model_config.json"
    if path.is_file():
        from ladic.checkpoint import CheckpointError

        try:
            return LaDiCConfig.from_dict(json.loads(path.read_text()))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return model_config(tc, legacy=True)


# ---------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; gloo on CPU, NCCL on GPU; a collective that waits over ``timeout_s`` fails."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return d, device


# ---------------------------------------------------------------------------- data
def length_percentile(ids: torch.Tensor, q: float, pad_id: int = 0) -> int:
    """(N, L) padded token ids of [CLS] caption [SEP] -> the q-quantile of the captions' lengths in word pieces."""
    lengths = (ids != pad_id).sum(dim=1) - 2
    return int(torch.quantile(lengths.float(), q, interpolation="higher"))


def load_datasets(tc: TrainConfig, model: LaDiC, progress: bool) -> tuple[FeatureSet, FeatureSet | None, list | None]:
    """Build (train features, val features, val images for scenes)."""
    from ladic.data.captions import load_captions, load_flickr8k
    from ladic.data.scenes import make_scenes

    cache = tc.cache_dir or os.environ.get("LADIC_CACHE") or str(Path.home() / ".cache" / "ladic")
    cache = str(Path(cache) / "features")
    if tc.data == "scenes":
        from ladic.data.captions import CaptionRecord

        def records(scenes, prefix):
            n = tc.scene_captions or None
            return [CaptionRecord(f"{prefix}{i}", "", s.captions[:n], prefix) for i, s in enumerate(scenes)]

        tr = make_scenes(tc.num_scenes, seed=tc.seed, size=tc.scene_size, max_objects=tc.scene_max_objects)
        va = make_scenes(max(tc.val_images, 1), seed=tc.seed + 10_000, size=tc.scene_size, max_objects=tc.scene_max_objects)
        train = training_features(tc, model, records(tr, "train"), None, [s.image for s in tr], progress)
        val = build_features(model, records(va, "val"), images=[s.image for s in va])
        return train, val, [s.image for s in va]
    if tc.data == "flickr8k":
        train_recs, val_recs = load_flickr8k(tc.train_split), load_flickr8k(tc.val_split)
    else:
        if tc.image_root is None:
            raise ValueError("image_root is required with a caption JSON")
        train_recs = load_captions(tc.data, tc.image_root, tc.train_split)
        val_recs = load_captions(tc.val_data or tc.data, tc.image_root, tc.val_split)
    train = training_features(tc, model, train_recs[: tc.train_images], cache, None, progress)
    val = build_features(model, val_recs[: tc.val_images], cache, progress=progress) if tc.val_images else None
    return train, val, None


def training_features(tc: TrainConfig, model: LaDiC, records: list, cache: str | None, images: list | None,
                      progress: bool) -> FeatureSet:
    """The training set; with ``distill_from``, each image's target is the teacher's caption of it
    (``ladic.data.distill``): the image tokens are built once, for the teacher and for the set."""
    tokens = build_image_features(model, records, cache, images, progress=progress)
    if tc.references == "consensus":
        from ladic.data.captions import CaptionRecord, consensus_index

        best = consensus_index([list(r.captions) for r in records])
        records = [CaptionRecord(r.image_id, r.image_path, [r.captions[k]], r.split) for r, k in zip(records, best)]
    elif tc.references != "all":
        raise ValueError(f"unknown references {tc.references!r}; use 'all' or 'consensus'")
    if tc.distill_from:
        from ladic.data.distill import distill_records, replace_dangling, select_by_references, teacher_captions

        sources = images if images is not None else [r.image_path for r in records]
        if tc.distill_select not in ("mbr", "references"):
            raise ValueError(f"unknown distill_select {tc.distill_select!r}; use 'mbr' or 'references'")
        by_refs = tc.distill_select == "references"
        caps = teacher_captions(tc.distill_from, [r.image_id for r in records], sources, tokens, model.image_encoder.name,
                                tc.distill_beams, tc.distill_mbr, cache, progress=progress, sampler=tc.distill_sampler,
                                candidates=by_refs)
        if by_refs:
            caps = select_by_references(caps, records)
        caps = replace_dangling(caps, records, tc.distill_dangling)
        records = distill_records(records, caps, tc.distill_keep_references)
    return build_features(model, records, cache, images=images, progress=progress, image_tokens=tokens)


def global_batch(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch of ``step``; epochs are consecutive permutations (last partial batch dropped)."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]


# ---------------------------------------------------------------------------- checkpoints
def _ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float, step: int) -> None:
    """EMA with warm-up: the decay grows as (1 + step) / (10 + step) up to ``decay``, so that a short run's
    average is not dominated by the random initialisation (0.999 ** 1000 = 0.37)."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in params.items():
            if v.is_floating_point():  # (the output vocabulary's ids are copied, not averaged)
                ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)


def save_checkpoint(path: Path, model: LaDiC, ema: dict[str, torch.Tensor], opt, sched, step: int, tc: TrainConfig) -> None:
    """Atomic: written to a temporary folder, then renamed over ``path``. With ``keep_checkpoints`` K > 1 the one it
    replaces becomes ``<path>-<its step>`` and only the newest K - 1 of those stay."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}, str(tmp / "weights.safetensors"))
    save_file({k: v.cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step}, tmp / "trainer_state.pt")
    (tmp / "train_config.json").write_text(json.dumps(asdict(tc), indent=1))
    (tmp / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    (tmp / "latent_stats.json").write_text(json.dumps({"mean": model.text.latent_mean.tolist(), "std": model.text.latent_std.tolist()}))
    old = path.with_name(path.name + ".old")
    if path.exists():
        previous = _checkpoint_step(path) if tc.keep_checkpoints > 1 else None
        path.rename(path.with_name(f"{path.name}-{previous:07d}") if previous is not None else old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    for stale in sorted(path.parent.glob(f"{path.name}-[0-9]*"))[: max(len(list(path.parent.glob(f"{path.name}-[0-9]*")))
                                                                   - (tc.keep_checkpoints - 1), 0)]:
        shutil.rmtree(stale)


def export_ema(model: LaDiC, ema: dict[str, torch.Tensor], out: Path, dtype: torch.dtype | None = None) -> None:
    """Write the EMA weights as a ``save_pretrained`` folder."""
    live = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    model.load_trainable_state_dict(ema)
    model.save_pretrained(out, dtype=dtype)
    model.load_trainable_state_dict(live)


# ---------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: LaDiC, ema: dict[str, torch.Tensor], val: FeatureSet, tc: TrainConfig, images=None) -> dict[str, Any]:
    """Caption the val subset with the EMA weights; BLEU/METEOR/ROUGE-L/CIDEr via pycocoevalcap."""
    from ladic.metrics import coco_metrics, java_available

    live = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    model.load_trainable_state_dict(ema)
    model.eval()
    inputs = images if images is not None else val.images.float()
    caps = model.generate(inputs, num_inference_steps=tc.val_steps, seed=tc.seed, batch_size=64).captions
    out: dict[str, Any] = {"examples": caps[:3]}
    if hasattr(model, "diffuser"):  # LaDiC: the share of noised reference tokens one denoiser call restores
        from ladic.evaluate import denoising_accuracy

        out.update({f"restore@{t}": acc for t, acc in denoising_accuracy(model, val, seed=tc.seed).items()})
    model.load_trainable_state_dict(live)
    model.train()
    results = dict(zip(val.image_ids, caps))
    if java_available()[0]:
        scores = coco_metrics(results, val.references, bert_score_model=None).scores
        out.update({k: v for k, v in scores.items() if v is not None})
    return out


# ---------------------------------------------------------------------------- data at scale
@dataclass
class TrainData:
    """What the loop trains on: a dataset indexed by ``BatchPlan`` (or a stream of batches), and what else it needs."""

    dataset: Any  # PlannedRows | OnlineRecords (map-style) or OnlineStream (iterable)
    size: int | None  # training captions (None for a stream)
    online: bool = False
    features: FeatureSet | None = None  # the in-RAM set (latent stats, vocabulary)
    records: list | None = None  # the caption records of an online run


def training_data(tc: TrainConfig, model: LaDiC, d: "Dist", progress: bool) -> tuple[TrainData, FeatureSet | None, list | None]:
    """(training data, validation features, validation images of scenes) for the run's data mode."""
    from ladic.data.loader import OnlineRecords, OnlineStream, PlannedRows
    from ladic.data.shards import ShardedFeatures
    from ladic.data.sources import CaptionSource

    from ladic.data.sources import DataError, is_webdataset

    if tc.features_dir is None and tc.image_features == "cached":
        if is_webdataset(tc.data):
            raise DataError("webdataset shards train from a `ladic features` folder (features_dir) or with "
                            "image_features=online")
        train_set, val_set, val_images = load_datasets(tc, model, progress)
        return TrainData(PlannedRows(train_set), len(train_set), features=train_set), val_set, val_images
    val_set = scale_validation(tc, model, progress)
    if tc.features_dir is not None:
        shards = ShardedFeatures(tc.features_dir)
        shards.check_model(model)
        return TrainData(PlannedRows(shards), len(shards)), val_set, None
    enc = model.image_encoder
    draft = enc.image_size
    tokenize = model.text.tokenize
    source = CaptionSource(tc.data, tc.image_root, tc.train_split, image_column=tc.image_column,
                           caption_column=tc.caption_column)
    if source.kind in ("records", "flickr8k"):
        records = source.records()[: tc.train_images]
        data = OnlineRecords(records, enc.preprocess, tokenize, draft)
        return TrainData(data, len(data), online=True, records=records), val_set, None
    local = tc.batch_size // tc.grad_accum // d.world
    stream = OnlineStream(source, enc.preprocess, tokenize, draft, local, tc.seed, d.rank, d.world,
                          resample=tc.resample_shards)
    return TrainData(stream, None, online=True), val_set, None


def scale_validation(tc: TrainConfig, model: LaDiC, progress: bool) -> FeatureSet | None:
    """The in-RAM validation features of a features_dir / online run: ``val_data``, else ``data``'s val split; none
    for webdataset shards without ``val_data``."""
    from ladic.data.captions import load_captions, load_flickr8k
    from ladic.data.sources import is_webdataset

    src = tc.val_data or tc.data
    if not tc.val_images or is_webdataset(src):
        if tc.val_images and progress:
            print("no validation: webdataset training data without val_data")
        return None
    recs = load_flickr8k(tc.val_split) if src == "flickr8k" else load_captions(src, tc.image_root, tc.val_split)
    return build_features(model, recs[: tc.val_images], None, progress=progress)


def stats_sample(tc: TrainConfig, data: TrainData, model: LaDiC) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, L, D), ids (n, L)) of up to ``stats_captions`` training captions, for the latent mean/std."""
    from ladic.data.features import encode_texts

    if data.features is not None:
        rows = epoch_order(len(data.features), tc.seed, -1)[: tc.stats_captions]
        return data.features.hidden[rows], data.features.ids[rows]
    if data.records is None and data.size is not None:  # shards
        rows = epoch_order(data.size, tc.seed, -1)[: tc.stats_captions].sort().values
        b = data.dataset.features.read(rows.tolist(), images=False)
        return b["hidden"], b["ids"]
    if data.records is not None:
        captions = [c for r in data.records for c in r.captions]
        rows = epoch_order(len(captions), tc.seed, -1)[: tc.stats_captions].tolist()
        captions = [captions[i] for i in rows]
    else:  # a stream: its first captions
        captions = []
        for sample in data.dataset.source:
            captions += sample.captions
            if len(captions) >= tc.stats_captions:
                break
    t = encode_texts(model.text, captions[: tc.stats_captions])
    return t["hidden"], t["ids"]


def vocabulary_and_lengths(data: TrainData, model: LaDiC, stats_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(every training word-piece id (1, V), or None for a stream; counts of caption lengths with [CLS]/[SEP]))."""
    pad, length = model.text.tokenizer.pad_token_id, model.config.max_length
    if data.features is not None:
        ids = data.features.ids
    elif data.records is not None:
        chunks = [model.text.tokenize(c)["input_ids"] for r in range(0, len(data.records), 4096)
                  for c in [[x for rec in data.records[r : r + 4096] for x in rec.captions]]]
        ids = torch.cat(chunks)
    elif data.size is not None:
        return data.dataset.features.token_stats(pad)
    else:
        return None, torch.bincount((stats_ids != pad).sum(1), minlength=length + 1)
    return ids.unique()[None], torch.bincount((ids != pad).sum(1), minlength=length + 1)


def _percentile_of_counts(counts: torch.Tensor, q: float) -> int:
    """The q-quantile of caption lengths in word pieces from counts of lengths with [CLS]/[SEP]."""
    cum = counts.cumsum(0).double() / max(int(counts.sum()), 1)
    return max(int(torch.searchsorted(cum, torch.tensor(q, dtype=torch.float64))) - 2, 0)


def same_on_every_rank(d: "Dist", what: dict[str, Any]) -> None:
    """Raise ``DataError`` naming the difference when the ranks do not see the same ``what`` (a checkpoint, a
    training set): one clear error on every rank instead of a hang or a silent restart on one of them."""
    if d.world == 1:
        return
    seen: list = [None] * d.world
    dist.all_gather_object(seen, what)
    for r, other in enumerate(seen):
        if other != seen[0]:
            key = next(k for k in what if other.get(k) != seen[0].get(k))
            from ladic.data.sources import DataError

            raise DataError(f"the ranks disagree on {key}: rank 0 sees {seen[0].get(key)!r}, rank {r} sees "
                             f"{other.get(key)!r} (a checkpoint or data folder not visible to every machine?)")


def _checkpoint_step(ckpt: Path) -> int | None:
    if not (ckpt / "weights.safetensors").is_file():
        return None
    return int(torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"])


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Metrics:
    """log.jsonl (every record) and metrics.csv / val_metrics.csv (fixed columns, appended across resumes)."""

    TRAIN = ("step", "loss", "latent", "caption", "lr", "elapsed_s", "samples_per_s", "data_wait", "peak_rss_mb")

    def __init__(self, out: Path) -> None:
        self.out = out
        self.log = (out / "log.jsonl").open("a")

    def _csv(self, name: str, rec: dict, columns: Sequence[str]) -> None:
        import csv

        path = self.out / name
        new = not path.is_file()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(rec)

    def train(self, rec: dict) -> None:
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()
        self._csv("metrics.csv", rec, self.TRAIN)

    def val(self, res: dict) -> None:
        self.log.write(json.dumps({"val": res}) + "\n")
        self.log.flush()
        path = self.out / "val_metrics.csv"
        scalars = ["step"] + sorted(k for k, v in res.items() if isinstance(v, (int, float)) and k != "step")
        columns = path.open().readline().strip().split(",") if path.is_file() else scalars
        self._csv("val_metrics.csv", res, columns)

    def close(self) -> None:
        self.log.close()


# ---------------------------------------------------------------------------- main loop
def train(tc: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training. Returns the folder of the exported EMA model (``<out_dir>/final``)."""
    from contextlib import nullcontext

    from ladic.data.loader import StepBatches, row_draws

    d, device = init_distributed(tc.dist_timeout_s)
    out = Path(tc.out_dir)
    ckpt = out / "checkpoint"
    progress = tc.progress and d.main
    same_on_every_rank(d, {"checkpoint step": _checkpoint_step(ckpt) if resume else None})
    torch.manual_seed(tc.seed)
    if device.type == "cuda" and tc.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from ladic.models import model_class

    model = model_class(tc.model_type)(model_config(tc)).to(device)
    if resume and (ckpt / "weights.safetensors").is_file():
        saved = checkpoint_model_config(ckpt, tc).input_scaling
        if saved != model.config.input_scaling:
            raise ValueError(f"{ckpt} was trained with input_scaling={saved!r}, this run's config says "
                             f"{model.config.input_scaling!r}; resume it with --set model.input_scaling={saved}")
    data, val_set, val_images = training_data(tc, model, d, progress)
    same_on_every_rank(d, {"training captions": data.size})
    if data.size is not None and data.size < tc.batch_size:
        raise ValueError(f"batch_size {tc.batch_size} is larger than the training set ({data.size} captions)")
    if tc.batch_size % (d.world * tc.grad_accum):
        raise ValueError(f"batch_size {tc.batch_size} is not divisible by {d.world} processes x {tc.grad_accum} "
                         f"accumulation steps")
    if tc.epochs:
        if data.size is None:
            raise ValueError("epochs needs a set of known size; a streaming source trains for max_steps")
        tc = dataclasses.replace(tc, max_steps=tc.epochs * max(data.size // tc.batch_size, 1))
    if tc.restrict_vocab and data.size is None and not tc.init_from:
        raise ValueError("restrict_vocab needs every training caption; with a streaming source make a features "
                         "folder first (ladic features)")
    # (a sample of the captions: for the latent stats, and for a stream's lengths; an init_from folder brings its stats)
    stats_hidden, stats_ids = stats_sample(tc, data, model) if not tc.init_from or data.size is None else (None, None)
    if tc.init_from:  # weights and latent stats of a model folder; fresh optimizer, schedule and EMA
        fresh = model.load_folder_weights(tc.init_from, missing_ok=True)
        if fresh and d.main:
            print(f"init_from {tc.init_from}: new modules start from their initialisation: {', '.join(fresh)}")
    else:
        fit_stats_from_hidden(model, stats_hidden.to(device), stats_ids.to(device))

    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=tc.lr)
    elif tc.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {tc.optimizer!r}; use 'adamw' or 'sgd'")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(tc, s))
    vocab, lengths = vocabulary_and_lengths(data, model, stats_ids)
    if tc.restrict_vocab and not model.text.output_vocab_size:  # (an init_from folder may bring its own)
        model.restrict_output_vocab(vocab)
    if hasattr(model.config, "trained_length_p99"):
        model.config = model.config.replace(trained_length_p99=_percentile_of_counts(lengths, 0.99))
    ema = {k: v.detach().clone().float() if v.is_floating_point() else v.clone()
           for k, v in model.trainable_state_dict().items()}
    step = 0
    if resume and (ckpt / "weights.safetensors").is_file():
        model.load_trainable_state_dict(load_file(str(ckpt / "weights.safetensors")), source=str(ckpt))
        ema = load_file(str(ckpt / "ema.safetensors"))
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        if d.main:
            print(f"resumed from {ckpt} at step {step}")
    ddp = DistributedDataParallel(model) if d.world > 1 else model
    step_fn = torch.compile(ddp) if tc.compile else ddp
    writer = None
    if tc.tensorboard and d.main:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(str(out / "tb"))
    out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out) if d.main else None
    precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # Map-style data: the sampler plans every rank's rows of every step (resumable at any step); a stream plans itself.
    sampler = (StepBatches(data.size, tc.batch_size, tc.seed, step, tc.max_steps, d.rank, d.world, tc.grad_accum)
               if data.size is not None else None)
    batches = iter(torch.utils.data.DataLoader(data.dataset, sampler=sampler, batch_size=None, num_workers=tc.num_workers,
                                               pin_memory=device.type == "cuda",
                                               prefetch_factor=4 if tc.num_workers else None))
    bad = None
    if data.online:
        from ladic.data.sources import BadSamples

        bad = BadSamples(max_share=tc.max_bad_share)
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", disable=not progress)
    model.train()
    t0 = window_t = time.time()
    saved, window_step, wait = None, step, 0.0  # data_wait: the share of the time since the last log record spent waiting for data
    while step < tc.max_steps:
        t_wait = time.perf_counter()
        micro = [next(batches) for _ in range(tc.grad_accum)]
        wait += time.perf_counter() - t_wait
        torch.manual_seed(tc.seed * 7_919 + step * d.world + d.rank)  # dropout
        opt.zero_grad(set_to_none=True)
        check = torch.zeros((), device=device)
        parts: dict[str, float] = {}
        for m, batch in enumerate(micro):
            if bad is not None:
                bad.merge(batch["bad"])
                bad.check()
            plan = batch["plan"]
            draws = row_draws(model, tc.seed, step, plan.positions)
            batch = _to_device(batch, device)
            if data.online:
                with torch.no_grad():
                    images = model.image_encoder(batch["pixels"]) if model.image_encoder.pretrained else batch["pixels"]
                    hidden = model.text.encode_hidden(batch["ids"], batch["attention_mask"])
            else:
                images, hidden = batch["images"], batch["hidden"]
            sync = ddp.no_sync() if d.world > 1 and m < len(micro) - 1 else nullcontext()
            with sync:
                with autocast:
                    losses = step_fn(images, hidden, batch["ids"], {k: v.to(device) for k, v in draws.items()})
                loss = losses["loss"].float() / len(micro)
                check = check + loss.detach()
                if step == tc.fail_at_step:
                    check = check + float("nan")
                scaler.scale(loss).backward()
            for k in ("latent", "caption"):
                if k in losses:
                    parts[k] = parts.get(k, 0.0) + losses[k].item() / len(micro)
        if d.world > 1:  # (the logged parts too: every rank's mean, not rank 0's)
            both = torch.cat([check.reshape(1), torch.tensor(list(parts.values()), device=device)])
            dist.all_reduce(both)
            both /= d.world
            check, parts = both[0], dict(zip(parts, both[1:].tolist()))
        if not torch.isfinite(check):
            raise TrainingDiverged(
                f"loss is {check.item()} at step {step}; stopping. The last good checkpoint in {ckpt} is intact "
                f"(resume with --resume, perhaps with a lower lr than {tc.lr})."
            )
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        _ema_update(ema, model.trainable_state_dict(), tc.ema_decay, step)
        step += 1
        bar.update(1)
        if d.main and (step % tc.log_every == 0 or step == tc.max_steps):
            now = time.time()
            window = max(now - window_t, 1e-9)
            rec = {"step": step, "loss": check.item(), **parts, "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(now - t0, 1), "samples_per_s": round(tc.batch_size * (step - window_step) / window, 2),
                   "data_wait": round(wait / window, 4), "peak_rss_mb": round(_peak_rss_mb())}
            window_t, window_step, wait = now, step, 0.0
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            metrics.train(rec)
            if writer is not None:
                for k in ("loss", "latent", "caption", "lr", "data_wait"):
                    if k in rec:
                        writer.add_scalar(f"train/{k}", rec[k], step)
        if d.main and step % tc.save_every == 0:
            save_checkpoint(ckpt, model, ema, opt, sched, step, tc)
            saved = step
        if d.main and val_set is not None and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.max_steps):
            res = validate(model, ema, val_set, tc, val_images)
            res["step"] = step
            tqdm.write(f"val step {step}: " + json.dumps(res))
            metrics.val(res)
            if writer is not None:
                for k, v in res.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"val/{k}", v, step)
    bar.close()
    if bad is not None and bad.skipped and d.main:
        print(bad.summary())
    final = out / "final"
    if d.main:
        if saved != step:
            save_checkpoint(ckpt, model, ema, opt, sched, step, tc)
        export_ema(model, ema, final)
        metrics.close()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def fit_stats_from_hidden(model: LaDiC, hidden: torch.Tensor, ids: torch.Tensor) -> None:
    """Latent mean/std (per dimension) over the real tokens of cached hidden states (N, L, D)."""
    keep = ~model.text.special_mask(ids.long())
    h = hidden[keep].double()
    model.text.latent_mean.copy_(h.mean(0).float())
    model.text.latent_std.copy_(h.std(0, unbiased=False).float())


def lr_factor(tc: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warm = max(int(tc.warmup_ratio * tc.max_steps), 1)
    return min((step + 1) / warm, max(0.0, (tc.max_steps - step) / max(tc.max_steps - warm, 1)))


__all__ = ["TrainConfig", "TrainingDiverged", "train", "global_batch", "save_checkpoint", "export_ema", "lr_factor"]
