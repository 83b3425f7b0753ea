"""Training loop: one process or many (torchrun + DDP: gloo on CPU, NCCL on GPU), resumable, with EMA.

Every random draw of step s comes from generators seeded by (seed, s) and the data order of epoch e
from (seed, e), so a run killed at any point and resumed from its last checkpoint ends with the
same weights as an uninterrupted run, and a DDP run sees the same global batch and noise as one
process (each rank takes its slice of the global batch).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ladic.captioner import LaDiC
from ladic.config import LEGACY_DEFAULTS, LaDiCConfig, preset
from ladic.data.distill import with_teacher_noise
from ladic.data.features import FeatureSet, build_features, build_image_features
from ladic.photo_seed import tensor_key


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
    # With distill_select = "references": another captioner folder (e.g. the shipped AR baseline) whose
    # distill_pool_beams beam candidates per photo join the teacher's draws before the selection (not in the paper).
    distill_pool_from: str | None = None
    distill_pool_beams: int = 5
    # "reference": a teacher caption that ends on a function word ("... in front of a") is replaced by the image's
    # consensus human reference (see ``references``), so a student does not learn cut-off endings; "keep": as is.
    distill_dangling: str = "keep"
    distill_keep_references: bool = False  # train on the teacher caption and the human captions
    # Trajectory distillation (Luhman & Luhman 2021; not in the paper): this fraction of every batch is trained at
    # t = T - 1 on the very noise x_T from which the LaDiC teacher sampled that photo's target, so that a one-step
    # student learns the teacher's map x_T -> caption instead of an average over it. Needs distill_mbr = 1 and a
    # teacher sampler whose caption is a function of x_T alone (no Back&Refine, or refine_noise "initial").
    distill_noise_prob: float = 0.0
    # Flip augmentation (not in the paper): every training photo also enters mirrored, with "left"/"right"
    # swapped in its captions (ladic.data.captions.mirror_caption); the mirrored tokens are cached too.
    flip_augment: bool = False
    # Training references: "all" (every human caption) or "consensus" (one per image: the caption with the highest
    # CIDEr-D against the image's other captions, ladic.data.captions.consensus_index); not in the paper.
    references: str = "all"
    # The LM head scores only the word pieces of the training targets (+ specials) instead of all 30,522: the
    # output layer costs a fraction, and the vocabulary is saved with the model (LaDiCConfig.output_vocab_size).
    restrict_vocab: bool = False
    # Self-critical policy gradient on CIDEr-D (ladic.reward; not in the paper): with reward_weight > 0 every step
    # also samples reward_samples one-step captions per photo and adds reward_weight x the policy-gradient loss.
    reward_weight: float = 0.0
    reward_samples: int = 5
    # Weight of the supervised loss (latent + caption + length) beside the reward; 0 = self-critical training only
    # (the targets then give only the sampled captions' lengths).
    reward_supervised_weight: float = 1.0
    reward_temperature: float = 1.0  # the one-step policy samples softmax(logits / reward_temperature)
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
        _check_fields(cls, d, "training option")
        _check_fields(LaDiCConfig, d.get("model", {}), "model option", "model.")
        tc = cls(**d)
        check_train_config(tc)
        return tc


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
    "distill_dangling": ("keep", "reference"), "references": ("all", "consensus"),
}
_AT_LEAST = {
    "batch_size": 1, "max_steps": 0, "save_every": 1, "eval_every": 0, "val_images": 0, "val_steps": 1, "log_every": 1,
    "stats_captions": 1, "distill_beams": 1, "distill_mbr": 1, "distill_pool_beams": 1, "reward_samples": 1,
    "num_scenes": 1, "scene_size": 8, "scene_max_objects": 1, "scene_captions": 0, "train_images": 1,
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
    for key in ("lr", "reward_temperature"):
        if not getattr(tc, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(tc, key)}")
    for key in ("warmup_ratio", "ema_decay", "distill_noise_prob"):
        if not 0 <= getattr(tc, key) <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {getattr(tc, key)}")
    for key in ("weight_decay", "grad_clip", "reward_weight", "reward_supervised_weight"):
        if not getattr(tc, key) >= 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(tc, key)}")
    if tc.data not in ("flickr8k", "scenes"):
        for key in ("data", "val_data"):
            if getattr(tc, key) is not None and not Path(getattr(tc, key)).is_file():
                raise ConfigError(f"{key} {getattr(tc, key)!r}: not 'flickr8k', 'scenes' or a caption file (JSON, "
                                  f"JSONL or CSV)")
        if tc.image_root is None or not Path(tc.image_root).is_dir():
            raise ConfigError(f"image_root must name the image folder of the caption file {tc.data}, got {tc.image_root!r}")
    elif tc.val_data is not None:
        raise ConfigError(f"val_data goes with a caption file as data, not data={tc.data!r}")
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
    unknown = sorted(set(tc.distill_sampler) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"distill_sampler: {', '.join(unknown)} not a sampling setting; use {', '.join(SAMPLING_KEYS)}")
    for key in ("init_from", "distill_from", "distill_pool_from"):
        folder = getattr(tc, key)
        if folder is not None and not Path(folder, "config.json").is_file():
            raise ConfigError(f"{key} {folder!r}: not a model folder (no config.json there)")


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
        return LaDiCConfig.from_dict(json.loads(path.read_text()))
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


def init_distributed() -> tuple[Dist, torch.device]:
    """Read torchrun's environment; gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
    (``ladic.data.distill``): the image tokens are built once, for the teacher and for the set. With
    ``flip_augment`` the mirrored photos follow, captioned by the mirrored targets."""
    tokens = build_image_features(model, records, cache, images, progress=progress)
    human = list(records)  # before consensus / distillation replace the captions
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
        if tc.distill_pool_from and not by_refs:
            raise ValueError("distill_pool_from needs distill_select = 'references'")
        ids = [r.image_id for r in records]
        caps = teacher_captions(tc.distill_from, ids, sources, tokens, model.image_encoder.name, tc.distill_beams,
                                tc.distill_mbr, cache, progress=progress, sampler=tc.distill_sampler, candidates=by_refs)
        if tc.distill_pool_from:
            pool = teacher_captions(tc.distill_pool_from, ids, sources, tokens, model.image_encoder.name,
                                    tc.distill_pool_beams, cache_dir=cache, progress=progress, candidates=True)
            caps = [list(a) + list(b) for a, b in zip(caps, pool)]
        if by_refs:
            caps = select_by_references(caps, records)
        caps = replace_dangling(caps, records, tc.distill_dangling)
        records = distill_records(records, caps, tc.distill_keep_references)
    train = build_features(model, records, cache, images=images, progress=progress, image_tokens=tokens)
    if tc.flip_augment:
        from ladic.data.captions import CaptionRecord, mirror_caption

        def mirror(recs: list) -> list:
            return [CaptionRecord(f"{r.image_id}#flip", r.image_path, [mirror_caption(c) for c in r.captions], r.split)
                    for r in recs]

        flipped = build_image_features(model, records, cache, images, progress=progress, flip=True)
        train = train.concat(build_features(model, mirror(records), cache, images=images, progress=progress,
                                            image_tokens=flipped))
        human += mirror(human)
    if tc.reward_weight > 0:  # the reward scores against every human caption, not the (distilled) training targets
        train.references = {r.image_id: list(r.captions) for r in human}
    return train


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


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
    """Atomic: written to a temporary folder, then renamed over ``path``."""
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
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


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


# ---------------------------------------------------------------------------- main loop
def train(tc: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) training. Returns the folder of the exported EMA model (``<out_dir>/final``)."""
    d, device = init_distributed()
    out = Path(tc.out_dir)
    ckpt = out / "checkpoint"
    progress = tc.progress and d.main
    torch.manual_seed(tc.seed)
    from ladic.models import model_class

    model = model_class(tc.model_type)(model_config(tc)).to(device)
    if resume and (ckpt / "weights.safetensors").is_file():
        saved = checkpoint_model_config(ckpt, tc).input_scaling
        if saved != model.config.input_scaling:
            raise ValueError(f"{ckpt} was trained with input_scaling={saved!r}, this run's config says "
                             f"{model.config.input_scaling!r}; resume it with --set model.input_scaling={saved}")
    train_set, val_set, val_images = load_datasets(tc, model, progress)
    if len(train_set) < tc.batch_size:
        raise ValueError(f"batch_size {tc.batch_size} is larger than the training set ({len(train_set)} captions)")
    if tc.batch_size % d.world:
        raise ValueError(f"batch_size {tc.batch_size} is not divisible by the {d.world} processes")
    if tc.init_from:  # weights and latent stats of a model folder; fresh optimizer, schedule and EMA
        fresh = model.load_folder_weights(tc.init_from, missing_ok=True)
        if fresh and d.main:
            print(f"init_from {tc.init_from}: new modules start from their initialisation: {', '.join(fresh)}")
    else:
        stats_ids = epoch_order(len(train_set), tc.seed, -1)[: tc.stats_captions]
        fit_stats_from_hidden(model, train_set.hidden[stats_ids], train_set.ids[stats_ids])

    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=tc.lr)
    elif tc.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {tc.optimizer!r}; use 'adamw' or 'sgd'")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(tc, s))
    if tc.restrict_vocab and not model.text.output_vocab_size:  # (an init_from folder may bring its own)
        model.restrict_output_vocab(train_set.ids)
    if hasattr(model.config, "trained_length_p99"):
        p99 = length_percentile(train_set.ids, 0.99, model.text.tokenizer.pad_token_id)
        model.config = model.config.replace(trained_length_p99=p99)
    ema = {k: v.detach().clone().float() if v.is_floating_point() else v.clone()
           for k, v in model.trainable_state_dict().items()}
    image_keys = trajectory_keys(tc, model, train_set)
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
    reward = None
    if tc.reward_weight > 0:
        from ladic.reward import CiderReward

        reward = CiderReward([train_set.references[i] for i in train_set.image_ids], tc.reward_weight, tc.reward_samples,
                             tc.reward_supervised_weight, tc.reward_temperature)
    ddp = DistributedDataParallel(model) if d.world > 1 else model
    writer = None
    if tc.tensorboard and d.main:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(str(out / "tb"))
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a") if d.main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    local = tc.batch_size // d.world
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", disable=not progress)
    model.train()
    t0 = time.time()
    while step < tc.max_steps:
        idx = global_batch(len(train_set), tc.batch_size, tc.seed, step)
        gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        draws = model.draw_training_noise(tc.batch_size, gen)
        if image_keys is not None:
            keys = [image_keys[i] for i in train_set.caption_image[idx].tolist()]
            draws = with_teacher_noise(draws, gen, tc.distill_noise_prob, keys, model.diffusion.num_timesteps)
        mine = slice(d.rank * local, (d.rank + 1) * local)
        idx = idx[mine]
        draws = {k: v[mine] for k, v in draws.items()}
        torch.manual_seed(tc.seed * 7_919 + step * d.world + d.rank)  # dropout
        with autocast:
            losses = ddp(
                train_set.images[train_set.caption_image[idx]].to(device).float(),
                train_set.hidden[idx].to(device), train_set.ids[idx].to(device).long(), draws,
                **({} if reward is None else {"reward": reward, "image_index": train_set.caption_image[idx]}),
            )
        loss = losses["loss"]
        check = loss.detach().clone()
        if step == tc.fail_at_step:
            check.fill_(float("nan"))
        if d.world > 1:
            dist.all_reduce(check)
        if not torch.isfinite(check):
            raise TrainingDiverged(
                f"loss is {check.item()} at step {step}; stopping. The last good checkpoint in {ckpt} is intact "
                f"(resume with --resume, perhaps with a lower lr than {tc.lr})."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        sched.step()
        _ema_update(ema, model.trainable_state_dict(), tc.ema_decay, step)
        step += 1
        bar.update(1)
        if d.main and (step % tc.log_every == 0 or step == tc.max_steps):
            rec = {"step": step, "loss": loss.item(), "latent": losses["latent"].item(), "caption": losses["caption"].item(),
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            rec.update({k: losses[k].item() for k in ("policy", "reward", "reward_greedy") if k in losses})
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if writer is not None:
                for k in ("loss", "latent", "caption", "lr", "policy", "reward", "reward_greedy"):
                    if k in rec:
                        writer.add_scalar(f"train/{k}", rec[k], step)
        if d.main and step % tc.save_every == 0:
            save_checkpoint(ckpt, model, ema, opt, sched, step, tc)
        if d.main and val_set is not None and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.max_steps):
            res = validate(model, ema, val_set, tc, val_images)
            res["step"] = step
            tqdm.write(f"val step {step}: " + json.dumps(res))
            log.write(json.dumps({"val": res}) + "\n")
            log.flush()
            if writer is not None:
                for k, v in res.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"val/{k}", v, step)
        if d.world > 1:
            dist.barrier()
    bar.close()
    final = out / "final"
    if d.main:
        save_checkpoint(ckpt, model, ema, opt, sched, step, tc)
        export_ema(model, ema, final)
        log.close()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def trajectory_keys(tc: TrainConfig, model: LaDiC, train_set: FeatureSet) -> list[str] | None:
    """The per-photo noise keys of the teacher's captions (``distill_noise_prob`` > 0), else None."""
    if tc.distill_noise_prob <= 0:
        return None
    from ladic.checkpoint import CONFIG_NAME
    from ladic.models import checkpoint_model_type

    if not tc.distill_from or tc.distill_mbr != 1 or tc.flip_augment or tc.distill_keep_references:
        raise ValueError("distill_noise_prob needs distill_from (a LaDiC teacher), distill_mbr = 1, "
                         "no flip_augment and no distill_keep_references")
    teacher_cfg = json.loads((Path(tc.distill_from) / CONFIG_NAME).read_text()).get("config", {})
    same = model.image_encoder.pretrained and teacher_cfg.get("image_encoder") == model.image_encoder.name
    if checkpoint_model_type(tc.distill_from) != "ladic" or not same:  # (then the teacher sampled from the cached tokens)
        raise ValueError("distill_noise_prob needs a LaDiC teacher with the student's pretrained image encoder")
    return [tensor_key(row.float()) for row in train_set.images]  # (row by row: no float32 copy of the whole set)


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
