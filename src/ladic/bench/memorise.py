"""The memorisation capability test (issue 28): can a diffuser learn a few dozen captions by heart?

A model that cannot reproduce N training captions from their own image after many passes over each cannot
learn word order from data at all. Each "photo" is a fixed random image-token tensor (a distinct condition;
what the image encoder would give does not matter for memorisation) paired with one caption; the diffuser,
its LM head and (with length conditioning) its length head train on them with the model's own loss, and
the share of captions that the sampler reproduces exactly is measured at 1 step and at the model's
default step count. One denoiser call's token accuracy on noised references (``restore``) is reported too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ladic.captioner import LaDiC
from ladic.config import LaDiCConfig
from ladic.evaluate import restored_words
from ladic.image_encoders import build_image_encoder


# The arms of issue 28's separation: config overrides on top of the preset (noise factor 4).
ARMS: dict[str, dict] = {
    "before issue 28 (unscaled input, position init 0.02)": {"input_scaling": "none", "position_init_std": 0.02},
    "input scaling only": {"position_init_std": 0.02},
    "position init 0.5 only": {"input_scaling": "none"},
    "both (the default)": {},
}


@dataclass
class MemoriseResult:
    exact: dict[int, float]  # sampling steps -> share of captions reproduced exactly
    restore: dict[int, float]  # timestep t -> word-token accuracy of one denoiser call on x_t
    losses: list[float]  # training loss per step
    samples: list[str]  # the default sampler's captions of the first photos
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


def memorisation_test(
    config: LaDiCConfig,
    captions: Sequence[str],
    *,
    steps: int = 300,
    lr: float = 8e-4,
    sample_steps: Sequence[int] = (1,),
    restore_timesteps: Sequence[int] = (300, 600, 900, 999),
    seed: int = 0,
    progress: bool = False,
) -> MemoriseResult:
    """Train a fresh LaDiC of ``config`` on one caption per random "photo" (all of them in every batch, AdamW at
    ``lr``, no warm-up, no dropout of the image) for ``steps`` steps, then sample every photo at each of
    ``sample_steps`` and at the config's default step count (seed ``seed``) and count exact reproductions.

    Captions are compared after the model's own tokenisation (lower case, word pieces joined)."""
    torch.manual_seed(seed)
    encoder = build_image_encoder(config.image_encoder, seed=seed) if config.image_encoder == "tiny" else None
    model = LaDiC(config, image_encoder=encoder)
    model.text.fit_latent_stats(list(captions))
    x0, ids = model.encode_captions(list(captions))
    model.restrict_output_vocab(ids)
    n = len(captions)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((n, model.image_encoder.num_tokens, model.image_encoder.dim), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="memorising", disable=not progress):
        out = model.training_losses(images, x0, ids, model.draw_training_noise(n, g))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(out["loss"].detach()))
    model.eval()
    targets = model.text.ids_to_text(ids)
    exact, samples = {}, []
    for s in dict.fromkeys([*sample_steps, config.num_inference_steps]):
        caps = model.generate(images, num_inference_steps=s, seed=seed, batch_size=n).captions
        exact[s] = sum(c == r for c, r in zip(caps, targets)) / n
        if s == config.num_inference_steps:
            samples = caps
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    words = int((~model.text.special_mask(ids)).sum())
    restore = {t: n / words for t, n in restored_words(model, images, x0, ids, noise, tuple(restore_timesteps)).items()}
    return MemoriseResult(exact, restore, losses, samples, time.perf_counter() - t0)


def memorise_markdown(rows: list[dict], notes: list[str], meta: dict) -> str:
    """The arms' table: exact captions at each step count, one-call restore at each t, final loss, time."""
    from ladic.bench.report import markdown_header, md_table

    steps = sorted({int(k) for r in rows for k in r["exact"]})
    ts = sorted({int(k) for r in rows for k in r["restore"]})
    head = ["arm", "overrides", *[f"exact, {k} step{'s' * (k > 1)} %" for k in steps],
            *[f"restore t={t} %" for t in ts], "final loss", "seconds"]
    table = [[r["arm"], f"`{json.dumps(r['overrides'])}`", *[f"{100 * r['exact'][str(k)]:.1f}" for k in steps],
              *[f"{100 * r['restore'][str(t)]:.1f}" for t in ts], f"{r['losses'][-1]:.3f}", f"{r['seconds']:.0f}"]
             for r in rows]
    parts = [markdown_header("Memorisation capability test", meta), *[f"- {n}" for n in notes], "", md_table(head, table),
             "", "Captions of the default sampler for the first three photos:", ""]
    parts += [f"- {r['arm']}: " + " / ".join(f'"{c}"' for c in r["samples"][:3]) for r in rows]
    return "\n".join(parts) + "\n"


__all__ = ["ARMS", "MemoriseResult", "memorisation_test", "memorise_markdown"]
