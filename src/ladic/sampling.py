"""The LaDiC sampler: DDIM with x0-prediction, classifier-free guidance, Back&Refine, infilling, MBR.

Written by hand rather than with a diffusers scheduler: those schedulers step one latent with one
model output, while LaDiC needs to (a) carry the self-conditioning estimate between steps, (b) roll
part of the sentence back to pure noise and restart the schedule at t = T (Back&Refine), (c)
overwrite given token positions after every step (infilling, length control) and (d) score
confidence through the text decoder. None of that fits the ``scheduler.step`` interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ladic.diffusion import GaussianDiffusion
from ladic.diffuser import KV, Diffuser

# (x_t (B, L, D), t (B,), self_cond (B, L, D)) -> x0_hat (B, L, D)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# x0_hat (B, L, D) -> confidence (B, L): the decoder's max token probability
ConfidenceFn = Callable[[torch.Tensor], torch.Tensor]
# (iteration, t, x0_hat) -> None
StepCallback = Callable[[int, int, torch.Tensor], None]
# x0_hat (B, L, D) -> x0_hat (B, L, D), e.g. snapped to the latents of its decoded tokens
ClampFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SampleResult:
    x0: torch.Tensor  # (B, L, D) final latent estimate
    renoised: torch.Tensor | None  # (B, L) bool, positions Back&Refine sent back to noise (None if it did not run)
    num_evaluations: int  # denoiser calls (each is one batched forward, both CFG branches included)


def guided_denoiser(diffuser: Diffuser, cond_ctx: torch.Tensor, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance x0 = (1 + w) f(x, v, t) - w f(x, emptyset, t), both branches in one forward.

    The image keys/values of cross-attention are computed here, once, and reused at every step.
    """
    b = cond_ctx.shape[0]
    if guidance_scale == 0:
        kv = diffuser.image_kv(cond_ctx)
        return lambda x, t, sc: diffuser(x, t, sc, kv)
    kv_both = diffuser.image_kv(torch.cat([cond_ctx, diffuser.null_context(b).to(cond_ctx.dtype)]))

    def denoise(x: torch.Tensor, t: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        out = diffuser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([sc, sc]), kv_both)
        cond, uncond = out[:b], out[b:]
        return (1 + guidance_scale) * cond - guidance_scale * uncond

    return denoise


def lowest_confidence(confidence: torch.Tensor, keep: float, protected: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) confidence -> (B, L) bool mask of the L - round(keep * L) least confident positions.

    ``protected`` positions (given tokens) are never selected.
    """
    b, length = confidence.shape
    n_drop = length - round(keep * length)
    if protected is not None:
        confidence = confidence.masked_fill(protected, float("inf"))
        n_drop = min(n_drop, int((~protected).sum(1).min()))
    idx = confidence.argsort(dim=1)[:, :n_drop]
    mask = torch.zeros(b, length, dtype=torch.bool, device=confidence.device)
    return mask.scatter(1, idx, True)


def gaussian_noise(
    shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """N(0, I) noise of ``shape`` (B, ...) on the CPU: from one generator for the whole batch, or row i from
    ``generator[i]`` only (one per row), so that a row's noise does not depend on the other rows."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator)
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])


def ddim_sample_loop(
    denoise: Denoiser,
    diffusion: GaussianDiffusion,
    shape: tuple[int, int, int],
    *,
    num_inference_steps: int = 5,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    fixed_x0: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    given_self_cond: bool = False,
    back_and_refine: bool = False,
    refine_time: float = 0.5,
    refine_keep: float = 0.5,
    refine_noise: str = "fresh",
    confidence_fn: ConfidenceFn | None = None,
    clamp_fn: ClampFn | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> SampleResult:
    """Denoise x_T ~ N(0, F^2 I) of ``shape`` (B, L, D) in ``num_inference_steps`` DDIM iterations.

    Args:
        fixed_x0, fixed_mask: (B, L, D) latents and (B, L) bool positions that are given (infilling,
            length control). After every step x0_hat takes the given latents at those positions.
        given_self_cond: the first call's self-conditioning input holds the given latents (zero elsewhere)
            instead of all zeros: at t = T the noisy input carries nothing, so a one-step sampler sees the given
            words only this way (for models trained with ``infill_self_cond_prob`` > 0).
        back_and_refine: at the first step with t <= refine_time * T, keep the ``refine_keep`` fraction
            of most confident positions, replace the rest with pure Gaussian noise and start a fresh
            denoising from t = T (paper section 3.4). Needs ``confidence_fn``.
        refine_noise: "fresh": the renoised positions take new Gaussian draws (paper); "initial": they take
            x_T's own noise, so the result is a deterministic function of x_T.
        clamp_fn: applied to x0_hat before every DDIM update (not to the final estimate): the
            "clamping trick" of Diffusion-LM (Li et al. 2022), x0_hat -> latents of its argmax tokens.
        callback: called after every iteration with (iteration, t, x0_hat).
        generator: one generator for the whole batch, or one per row (B of them; the same object may serve
            several rows, e.g. a photo's MBR candidates): row i's noise (L, D) is then drawn from generator[i]
            only, so it does not depend on the other rows of the batch.
    """
    if back_and_refine and confidence_fn is None:
        raise ValueError("back_and_refine needs a confidence_fn")
    device = torch.device(device)
    b, length, _ = shape
    f = diffusion.noise_factor
    T = diffusion.num_timesteps
    schedule = diffusion.inference_timesteps(num_inference_steps)

    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b} rows")

    def randn() -> torch.Tensor:
        return gaussian_noise(shape, generator).to(device)

    if refine_noise not in ("fresh", "initial"):
        raise ValueError(f"unknown refine_noise {refine_noise!r}; use 'fresh' or 'initial'")
    x = x_T = f * randn()
    self_cond = torch.zeros(shape, device=device)
    if given_self_cond and fixed_mask is not None:
        self_cond = torch.where(fixed_mask[..., None], fixed_x0, self_cond)
    x0_hat = self_cond
    renoised = None
    pending_refine = back_and_refine
    i = n_eval = 0
    bar = tqdm(total=len(schedule), desc="denoising", disable=not progress, leave=False)
    while i < len(schedule):
        t = schedule[i]
        tt = torch.full((b,), t, device=device, dtype=torch.long)
        x0_hat = denoise(x, tt, self_cond)
        if fixed_mask is not None:
            x0_hat = torch.where(fixed_mask[..., None], fixed_x0, x0_hat)
        self_cond = x0_hat
        if callback is not None:
            callback(n_eval, t, x0_hat)
        n_eval += 1
        bar.update(1)
        t_next = schedule[i + 1] if i + 1 < len(schedule) else t
        if pending_refine and t <= refine_time * T:
            # Back: keep the confident tokens at the current noise level, send the rest to pure noise.
            renoised = lowest_confidence(confidence_fn(x0_hat), refine_keep, fixed_mask)
            fresh = f * randn() if refine_noise == "fresh" else x_T
            x = torch.where(renoised[..., None], fresh, diffusion.ddim_step(x, x0_hat, tt, tt.new_full((b,), t_next)))
            # Refine: a fresh denoising from t = T.
            pending_refine = False
            i = 0
            bar.reset(total=len(schedule))
            continue
        if i + 1 < len(schedule):
            target = x0_hat if clamp_fn is None else clamp_fn(x0_hat)
            if fixed_mask is not None:
                target = torch.where(fixed_mask[..., None], fixed_x0, target)
            x = diffusion.ddim_step(x, target, tt, tt.new_full((b,), t_next))
        i += 1
    bar.close()
    return SampleResult(x0=x0_hat, renoised=renoised, num_evaluations=n_eval)


def token_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """Bag-of-words F1 between two token lists (the MBR similarity; not an evaluation metric)."""
    if not a or not b:
        return float(a == b)
    common = 0
    rest = list(b)
    for w in a:
        if w in rest:
            rest.remove(w)
            common += 1
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def bleu_similarity(a: str, b: str) -> float:
    """Sentence BLEU-4 of ``a`` against ``b`` with pycocoevalcap's scorer."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    scorer += (a, [b])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    return float(score[3])


def mbr_select(candidates: Sequence[str], similarity: str = "f1") -> int:
    """Minimum Bayes risk: index of the candidate with the highest mean similarity to the others."""
    k = len(candidates)
    if k == 1:
        return 0
    if similarity not in ("f1", "bleu"):
        raise ValueError(f"unknown MBR similarity {similarity!r}; use 'f1' or 'bleu'")
    toks = [c.split() for c in candidates]
    scores = []
    for i in range(k):
        sims = [
            token_f1(toks[i], toks[j]) if similarity == "f1" else bleu_similarity(candidates[i], candidates[j])
            for j in range(k) if j != i
        ]
        scores.append(sum(sims) / len(sims))
    return max(range(k), key=lambda i: (scores[i], -i))


__all__ = [
    "KV", "SampleResult", "guided_denoiser", "gaussian_noise", "lowest_confidence", "ddim_sample_loop", "token_f1",
    "mbr_select", "bleu_similarity",
]
