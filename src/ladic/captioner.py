"""The LaDiC model: image encoder + split-BERT text space + diffuser, with save/load and captioning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ladic.checkpoint import CONFIG_NAME, WEIGHTS_NAME, Captioner, CheckpointError, shipped_model_path
from ladic.config import CANDIDATE_SELECTS, LaDiCConfig
from ladic.diffuser import Diffuser
from ladic.diffusion import GaussianDiffusion
from ladic.image_encoders import ImageEncoder
from ladic.image_io import ImageInput, ImageLoadError, load_images
from ladic.photo_seed import photo_generator, pixel_key, tensor_key
from ladic.sampling import SampleResult, ddim_sample_loop, gaussian_noise, guided_denoiser, mbr_select

BLANK_MARKERS = ("[MASK]", "[mask]")
# Rows per forward pass when each image has several drafts (16 drafts x 4 images: 234 ms per photo against 277 with
# 64 images at a time, 2 threads; docs/BENCHMARKS.md, "Fluency: the cost of drafting").
DRAFT_ROWS = 64


class CaptioningCancelled(Exception):
    """Raised by ``LaDiC.generate`` when its ``should_stop`` callback asks it to stop."""


@dataclass
class CaptionOutput:
    """Full output of ``LaDiC.generate``."""

    captions: list[str]
    trajectories: list[list[str]] | None = None  # per image, the decoded caption after every denoising iteration
    candidates: list[list[str]] | None = None  # per image, the MBR candidates
    num_evaluations: int = 0
    errors: dict[int, ImageLoadError] = field(default_factory=dict)  # with errors="skip": input index -> why (caption None)


def default_model_path() -> Path:
    """The default model shipped inside the package (trained on Flickr8k train): the one-step student, one
    network evaluation per caption (``docs/MODEL_CARD.md``)."""
    return shipped_model_path("ladic-1step-flickr8k")


def full_model_path() -> Path:
    """The shipped full-sampler model, the student's teacher: 5 steps with Back&Refine, clamping and guidance,
    about 12x the default's decoding time for 2 CIDEr more on Flickr8k val (``docs/MODEL_CARD.md``)."""
    return shipped_model_path("ladic-small-flickr8k")


def is_blank(word: str) -> bool:
    return word in BLANK_MARKERS or (len(word) >= 2 and set(word) == {"_"})


class LaDiC(Captioner):
    """Latent diffusion captioner (Wang, Ren et al., NAACL 2024)."""

    def __init__(self, config: LaDiCConfig, image_encoder: ImageEncoder | None = None) -> None:
        super().__init__(config, image_encoder)
        self.diffuser = Diffuser(config, self.text.dim, self.image_encoder.dim, self.image_encoder.num_tokens)
        self.diffusion = GaussianDiffusion(
            config.num_train_timesteps, config.beta_schedule, config.noise_factor,
            config.timestep_sampling, config.student_steps, config.student_timestep_prob,
        )

    def core_modules(self) -> dict[str, nn.Module]:
        return {"diffuser": self.diffuser}

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "LaDiC":
        """Load a folder written by ``save_pretrained``, or a Hugging Face Hub id (``"org/name"``, fetched
        through ``huggingface_hub`` into its cache) when no such folder exists; ``None`` loads the shipped model."""
        return cls._from_folder(path if path is not None else default_model_path(), device)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> image tokens v: (B, N_img, D_img). The encoder runs once per image."""
        pil = self.load_images(images)
        return self.image_encoder.encode(pil).to(self.device)

    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (x0 (B, L, D_txt), ids (B, L))."""
        return self.text.encode(captions)

    # ------------------------------------------------------------------ training
    def draw_training_noise(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All randomness of one training step for a (global) batch, on the CPU: t (B,), noise (B, L, D),
        and uniforms for the CFG drop and self-conditioning (B,). Slicing it per rank makes DDP match one process."""
        cfg = self.config
        draws = {
            "t": self.diffusion.sample_timesteps(batch_size, generator),
            "noise": torch.randn((batch_size, cfg.max_length, self.text.dim), generator=generator),
            "u_drop": torch.rand(batch_size, generator=generator),
            "u_self_cond": torch.rand(batch_size, generator=generator),
        }
        if cfg.infill_self_cond_prob > 0:  # (drawn last, so that other configs keep their random stream)
            draws["u_infill"] = torch.rand(batch_size, generator=generator)
            draws["u_given"] = torch.rand(batch_size, generator=generator)
            draws["u_keep"] = torch.rand((batch_size, cfg.max_length), generator=generator)
        if cfg.length_conditioning:
            draws["u_length"] = torch.rand(batch_size, generator=generator)
        return draws

    def forward(
        self, image_inputs: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, draws: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Training step for DDP: cached image tokens (or pixels for a trainable encoder), cached text-encoder
        hidden states (B, L, D) and ids (B, L) -> losses (see ``training_losses``)."""
        return self.training_losses(self.image_tokens(image_inputs), self.text.regularize(hidden, ids), ids, draws)

    def training_losses(
        self, image_feats: torch.Tensor, x0: torch.Tensor, ids: torch.Tensor, draws: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """L = ||f(x_t, v, t) - x0||^2 + lambda CE(LMHead(decoder(denorm(x0_hat))), ids)  (paper Eq. 2).

        image_feats (B, N, D_img); x0 (B, L, D_txt) regularised latents; ids (B, L) token ids (targets,
        [PAD] included so that the decoder learns to emit it); ``draws`` from ``draw_training_noise``.
        Self-conditioning with probability p_sc, image dropped to the null condition with probability p_cfg.
        """
        cfg = self.config
        device = x0.device
        t, noise = draws["t"].to(device), draws["noise"].to(device)
        x_t = self.diffusion.q_sample(x0, t, noise)
        drop = draws["u_drop"].to(device) < cfg.cfg_drop_prob
        ctx = self.diffuser.image_context(image_feats, drop)
        length_loss = None
        if cfg.length_conditioning:  # predict N from the image; condition on N (or on "unknown")
            lengths = self.caption_lengths(ids).clamp(min=1)
            if (~drop).any():
                length_loss = F.cross_entropy(self.diffuser.predict_length(ctx[~drop]), lengths[~drop])
            known = torch.where(draws["u_length"].to(device) < cfg.length_drop_prob, 0, lengths)
            ctx = self.diffuser.add_length(ctx, known)
        kv = self.diffuser.image_kv(ctx)
        self_cond = torch.zeros_like(x0)
        use_sc = draws["u_self_cond"].to(device) < cfg.self_condition_prob
        if use_sc.any():
            with torch.no_grad():
                prev = self.diffuser(x_t, t, self_cond, kv)
            self_cond = torch.where(use_sc[:, None, None], prev, self_cond)
        if cfg.infill_self_cond_prob > 0:  # given words through self-conditioning: each position kept w.p. u_given
            given = draws["u_keep"].to(device) < draws["u_given"].to(device)[:, None]  # (B, L)
            use_given = (draws["u_infill"].to(device) < cfg.infill_self_cond_prob)[:, None, None]
            self_cond = torch.where(use_given, torch.where(given[..., None], x0, 0.0), self_cond)
        x0_hat = self.diffuser(x_t, t, self_cond, kv)
        latent = F.mse_loss(x0_hat, x0)
        caption = F.cross_entropy(self.text.logits(x0_hat).flatten(0, 1), self.text.output_index(ids).flatten())
        out = {"loss": latent + cfg.caption_loss_weight * caption, "latent": latent.detach(), "caption": caption.detach()}
        if length_loss is not None:
            out["loss"] = out["loss"] + cfg.length_loss_weight * length_loss
            out["length"] = length_loss.detach()
        return out

    # ------------------------------------------------------------------ sampling
    def _confidence(self, x0: torch.Tensor) -> torch.Tensor:
        return self.text.logits(x0).softmax(-1).amax(-1)

    def _clamp(self, x0: torch.Tensor) -> torch.Tensor:
        """Snap a latent estimate to the regularised latents of its argmax tokens ([PAD] masked from attention with
        ``clamp_mask_pad``, as training latents are encoded; all positions attended without)."""
        ids = self.text.token_ids(self.text.logits(x0).argmax(-1))
        mask = (ids != self.text.tokenizer.pad_token_id) if self.config.clamp_mask_pad else torch.ones_like(ids)
        return self.text.latents_from_ids(ids, mask.long())

    def _decode_ids(self, x0: torch.Tensor, free: torch.Tensor | None = None, given_ids: torch.Tensor | None = None,
                    no_dangling_end: bool = False, no_repeat: bool = False, words_only: bool = False) -> torch.Tensor:
        """Latent (B, L, D) -> ids (B, L). ``free`` positions take whole words only, never the word given right
        before or after them (a blank that repeats its neighbour would vanish when repeats collapse); given ids
        are forced. ``no_dangling_end``: a free position right before a given [SEP] takes no function word.
        ``no_repeat``: a free position never repeats the word decoded right before it (left to right), so a
        caption asked for N word pieces keeps N when repeats collapse. ``words_only``: free positions take no
        punctuation either (an infill blank is one word)."""
        if free is None or given_ids is None:
            ids = self.text.token_ids(self.text.logits(x0).argmax(-1))
            return ids if given_ids is None else torch.where(given_ids >= 0, given_ids, ids)
        ids = given_ids.clone()
        logits = self._free_logits(x0, free, given_ids, no_dangling_end, words_only)
        if not no_repeat:
            ids[free] = self.text.token_ids(logits.argmax(-1))
            return ids
        best, runner_up = torch.full_like(ids, -1), torch.full_like(ids, -1)
        best[free], runner_up[free] = self.text.token_ids(logits.topk(2, dim=-1).indices).unbind(-1)
        for pos in range(1, ids.shape[1]):  # position 0 is [CLS]
            pick = torch.where(best[:, pos] == ids[:, pos - 1], runner_up[:, pos], best[:, pos])
            ids[:, pos] = torch.where(free[:, pos], pick, ids[:, pos])
        return ids

    def _free_logits(self, x0: torch.Tensor, free: torch.Tensor, given_ids: torch.Tensor,
                     no_dangling_end: bool = False, words_only: bool = False) -> torch.Tensor:
        """The decoder's logits (N_free, V') at the ``free`` positions (B, L) of x0 (B, L, D), with every word
        ``_decode_ids`` may not choose there set to -inf."""
        # Only the free positions need a word, so the LM head runs there alone: (N_free, V') logits, not (B, L, V').
        banned = self.text.not_a_word | self.text.punctuation if words_only else self.text.not_a_word
        logits = self.text.logits(x0, free).masked_fill_(self.text.to_output_space(banned), float("-inf"))
        if no_dangling_end:
            # A one-step estimate of an uncertain final noun averages over the candidates and decodes to the
            # nearest frequent word, "a" or "the" ("... standing on a"); the best content word there reads better.
            last = (given_ids.roll(-1, dims=1) == self.text.tokenizer.sep_token_id)[free]
            logits[last] = logits[last].masked_fill(self.text.to_output_space(self.text.function_word), float("-inf"))
        for neighbour in (given_ids.roll(1, dims=1), given_ids.roll(-1, dims=1)):  # the ends are [CLS] / [PAD]
            nb = neighbour[free]
            rows = (nb >= 0).nonzero().squeeze(1)
            logits[rows, self.text.output_index(nb[rows])] = float("-inf")
        return logits

    def length_template(self, batch_size: int, num_tokens: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fixed positions for captions of exactly ``num_tokens`` word pieces (an int, or one per row (B,)):
        [CLS], [SEP] and [PAD]s are given, the word positions are -1 in the given ids."""
        length = self.config.max_length
        n = torch.as_tensor(num_tokens, device=self.device).expand(batch_size)
        if not bool(((n >= 1) & (n <= length - 2)).all()):
            raise ValueError(f"length must be in 1..{length - 2} tokens for max_length {length}")
        given = self.template_ids(n)
        return given >= 0, torch.zeros(batch_size, length, self.text.dim, device=self.device), given

    def template_ids(self, lengths: torch.Tensor) -> torch.Tensor:
        """Lengths (B,) -> given ids (B, L) of [CLS], N word positions (-1), [SEP], [PAD]s; no range check (traceable:
        the ONNX graph builds its template with it)."""
        tok = self.text.tokenizer
        pos = torch.arange(self.config.max_length, device=lengths.device)[None]
        n = lengths[:, None]
        given = torch.where(pos == n + 1, tok.sep_token_id, torch.where(pos > n, tok.pad_token_id, -1))
        return torch.where(pos == 0, tok.cls_token_id, given)

    def caption_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Word pieces per caption, [CLS]/[SEP]/[PAD] not counted; blanks (-1) of a template count: (B, L) -> (B,)."""
        tok = self.text.tokenizer
        special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | (ids == tok.pad_token_id)
        return (~special).sum(dim=1).clamp(max=self.config.max_length - 2)

    def predicted_lengths(self, context: torch.Tensor, k: int, mbr_lengths: str = "top", num_lengths: int = 0) -> torch.Tensor:
        """Lengths to sample at for a context (B, N, d) whose rows come in groups of ``k`` per image (MBR
        candidates): with ``mbr_lengths="top"`` the j-th row of a group gets the (j mod m)-th most likely N, m =
        ``num_lengths`` (0: m = k, one length per row), with "predicted" every row gets the most likely N (the
        candidates differ by their noise only). Returns (B,)."""
        if mbr_lengths not in ("top", "predicted"):
            raise ValueError(f"unknown mbr_lengths {mbr_lengths!r}; use 'top' or 'predicted'")
        logits = self.diffuser.predict_length(context[::k])
        if mbr_lengths == "predicted":
            return logits.argmax(-1).repeat_interleave(k)
        top = logits.topk(min(num_lengths or k, k, self.config.max_length - 2), dim=-1).indices  # (B / k, k')
        return top.repeat(1, -(-k // top.shape[1]))[:, :k].reshape(-1)

    def infill_template(self, template: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Parse ``"two ___ standing on a ___ field"`` (or ``[MASK]`` blanks; one blank = one token).

        Returns fixed (1, L) bool, fixed latents (1, L, D) and given ids (1, L) (-1 at blanks).
        """
        words = template.split()
        if not words or not any(is_blank(w) for w in words):
            raise ValueError("infill template must contain text and at least one blank ('___' or '[MASK]')")
        tok = self.text.tokenizer
        ids = [tok.cls_token_id]
        for w in words:
            ids += [tok.mask_token_id] if is_blank(w) else tok.encode(w, add_special_tokens=False)
        ids.append(tok.sep_token_id)
        length = self.config.max_length
        if len(ids) > length:
            raise ValueError(f"infill template is {len(ids)} tokens long; this model handles at most {length} (with [CLS]/[SEP])")
        ids_t = torch.tensor([ids + [tok.pad_token_id] * (length - len(ids))], device=self.device)
        mask = (ids_t != tok.pad_token_id).long()
        x0 = self.text.latents_from_ids(ids_t, mask)
        blanks = ids_t == tok.mask_token_id
        given = ids_t.masked_fill(blanks, -1)
        return ~blanks, x0, given

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        back_and_refine: bool | None = None,
        mbr_candidates: int | None = None,
        mbr_similarity: str = "f1",
        select: str | None = None,
        length: int | None = None,
        template: str | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
        batch_size: int = 32,
        return_trajectory: bool = False,
        progress: bool = False,
        errors: str = "raise",
        clamp: bool | None = None,
        refine_noise: str | None = None,
        no_dangling_end: bool | None = None,
        mbr_lengths: str | None = None,
        rerank_with: Captioner | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CaptionOutput:
        """Caption images. ``images`` are PIL images, paths, arrays/tensors, or precomputed image tokens
        (a float tensor (B, N_img, D_img)). See ``caption`` for the arguments.

        Each image draws its noise from its own generator, seeded from the run seed (``seed``, or one number
        drawn from ``generator``) and the image's key, so a caption does not depend on the other images of
        the call or their order. ``keys`` (one string per input) default to a hash of each image's decoded
        pixels (of its tokens for precomputed image tokens).

        ``errors="raise"`` raises ``ImageLoadError`` for the first bad input before any work;
        ``errors="skip"`` captions the good inputs and reports the bad ones in ``CaptionOutput.errors``
        (their caption, candidates and trajectory are ``None``).

        ``should_stop`` is asked after every denoising step; when it returns True, ``CaptioningCancelled`` is raised
        (the demo uses it to drop the work of a client that has gone away).
        """
        if errors not in ("raise", "skip"):
            raise ValueError("errors must be 'raise' or 'skip'")
        cfg = self.config
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        w = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if not 1 <= steps <= cfg.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
        if w < 0:
            raise ValueError(f"guidance_scale must be >= 0 (0 turns guidance off), got {w}")
        bnr = cfg.back_and_refine if back_and_refine is None else back_and_refine
        no_dangling = cfg.no_dangling_end if no_dangling_end is None else no_dangling_end
        mbr_candidates = cfg.num_candidates if mbr_candidates is None else mbr_candidates
        select = cfg.candidate_select if select is None else select
        if mbr_candidates < 1:
            raise ValueError("mbr_candidates must be >= 1")
        if rerank_with is not None and mbr_candidates < 2:
            raise ValueError("rerank_with chooses among candidates; give mbr_candidates >= 2 (--mbr K)")
        if select not in CANDIDATE_SELECTS:
            raise ValueError(f"unknown select {select!r}; use {' or '.join(map(repr, CANDIDATE_SELECTS))}")
        if rerank_with is not None and rerank_with.image_encoder.name != self.image_encoder.name:
            raise ValueError(f"rerank_with reads {rerank_with.image_encoder.name} image tokens; this model reads "
                             f"{self.image_encoder.name}")
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"got {len(keys)} keys for {len(images)} images")
        if template is not None and not isinstance(template, str) and len(template) != len(images):
            raise ValueError(f"got {len(template)} templates for {len(images)} images")
        if generator is None:
            run_seed = 0 if seed is None else seed
        else:
            run_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        is_feats = isinstance(images, torch.Tensor) and images.ndim == 3 and images.shape[-1] == self.image_encoder.dim
        out = CaptionOutput(captions=[], trajectories=[] if return_trajectory else None,
                            candidates=[] if mbr_candidates > 1 else None)
        pil = None
        if not is_feats and errors == "raise":
            pil = self.load_images(images)  # validate everything before any work
        elif not is_feats:
            loaded = load_images(images)
            out.errors = {i: e for i, e in enumerate(loaded) if isinstance(e, ImageLoadError)}
            pil = [im for im in loaded if not isinstance(im, ImageLoadError)]
        n = len(images) if pil is None else len(pil)
        if keys is not None:
            keys = [key for i, key in enumerate(keys) if i not in out.errors]
        else:
            keys = [tensor_key(row) for row in images] if pil is None else [pixel_key(im) for im in pil]
        k = mbr_candidates
        # An asked length is kept exactly (no word repeats its left neighbour); an infilled caption keeps every
        # blank's word, even one that repeats the word before it. Other captions collapse repeated words.
        exact = length is not None
        collapse = template is None and not exact
        blanks = template is not None and not exact  # infill: a blank is one word, never punctuation
        infill = None
        if template is not None and length is None:  # (n, L) fixed, (n, L, D) latents, (n, L) given ids
            templates = [template] * n if isinstance(template, str) else [t for i, t in enumerate(template) if i not in out.errors]
            infill = tuple(torch.cat(z) for z in zip(*[self.infill_template(t) for t in templates]))
        process = self._sampling_diffusion()
        if k > 1:  # at most DRAFT_ROWS rows (images x drafts) per forward: larger batches ran slower on the CPU
            batch_size = max(1, min(batch_size, DRAFT_ROWS // k))
        for start in tqdm(range(0, n, batch_size), desc="captioning", disable=not progress or n <= batch_size):
            feats = images[start : start + batch_size].to(self.device) if is_feats else \
                self.image_encoder.encode(pil[start : start + batch_size]).to(self.device)
            image_feats, feats = feats, feats.repeat_interleave(k, dim=0)
            b = feats.shape[0]
            fixed = x_fixed = given = None
            if length is not None:
                fixed, x_fixed, given = self.length_template(b, length)
            elif infill is not None:
                fixed, x_fixed, given = (z[start : start + batch_size].repeat_interleave(k, dim=0) for z in infill)
            ctx = image_ctx = self.diffuser.image_context(feats)
            if cfg.length_conditioning:  # the asked / template length, else the predicted one (top-k with MBR)
                if given is None:
                    fixed, x_fixed, given = self.length_template(b, self.predicted_lengths(
                        ctx, k, mbr_lengths or cfg.mbr_lengths, cfg.candidate_lengths))
                ctx = self.diffuser.add_length(ctx, self.caption_lengths(given))
            free = None if fixed is None else ~fixed
            traj: list[list[str]] = []
            callback = None
            if return_trajectory or should_stop is not None:
                def callback(i: int, t: int, x0: torch.Tensor) -> None:
                    if should_stop is not None and should_stop():
                        raise CaptioningCancelled(f"captioning cancelled after {i} denoising steps")
                    if return_trajectory:
                        traj.append(self.text.ids_to_text(
                            self._decode_ids(x0, free, given, no_dangling, exact, blanks), collapse_repeats=collapse))
            generators = [g for key in keys[start : start + batch_size] for g in [photo_generator(run_seed, key)] * k]
            res: SampleResult = ddim_sample_loop(
                guided_denoiser(self.diffuser, ctx, w), process, (b, cfg.max_length, self.text.dim),
                num_inference_steps=steps, generator=generators, device=self.device,
                fixed_x0=x_fixed, fixed_mask=fixed, given_self_cond=cfg.infill_self_cond_prob > 0,
                back_and_refine=bnr, refine_time=cfg.refine_time,
                refine_keep=cfg.refine_keep, refine_noise=refine_noise or cfg.refine_noise,
                confidence_fn=self._confidence, callback=callback,
                clamp_fn=self._clamp if (cfg.clamp if clamp is None else clamp) else None,
                progress=progress and n <= batch_size,
            )
            out.num_evaluations += res.num_evaluations
            texts = self.text.ids_to_text(self._decode_ids(res.x0, free, given, no_dangling, exact, blanks),
                                          collapse_repeats=collapse)
            scores = None
            if k > 1 and rerank_with is not None:
                scores = rerank_with.score_captions(image_feats, texts).view(-1, k)
            elif k > 1 and select == "likelihood":
                scores = self.likelihood_scores(image_ctx, texts, generators).view(-1, k)
                out.num_evaluations += len(cfg.likelihood_timesteps)
            for j in range(0, b, k):
                group = texts[j : j + k]
                best = mbr_select(group, mbr_similarity) if scores is None else int(scores[j // k].argmax())
                out.captions.append(group[best])
                if out.candidates is not None:
                    out.candidates.append(group)
                if out.trajectories is not None:
                    out.trajectories.append([step[j + best] for step in traj])
        for i in sorted(out.errors):  # put the failed inputs back in their places
            for items in (out.captions, out.candidates, out.trajectories):
                if items is not None:
                    items.insert(i, None)
        return out

    @torch.no_grad()
    def likelihood_scores(self, context: torch.Tensor, captions: Sequence[str],
                          generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """How well the model reconstructs each caption: a diffusion likelihood estimate for choosing among drafts.

        Each caption is re-encoded to its latent x0 (B, L, D), noised to x_t = q_sample(x0, t, eps) at every t of
        ``config.likelihood_timesteps`` (one eps per caption, drawn from ``generator``: one per row, as in sampling),
        and denoised once under its image ``context`` (B, N, d) (``Diffuser.image_context``, the length added here
        from the caption itself), without self-conditioning. Score = -mean over t of the mean squared error
        ||f(x_t, v, t) - x0||^2 at the caption's word positions ([CLS]/[SEP]/[PAD] not counted, so that short
        captions get no advantage). Returns (B,), higher = more likely. A caption with a missing or doubled word
        sits off the manifold the denoiser learned and comes back changed: a drafted broken caption scores low.
        """
        x0, ids = self.text.encode(list(captions))
        x0, ids = x0.to(self.device), ids.to(self.device)
        if self.config.length_conditioning:
            context = self.diffuser.add_length(context, self.caption_lengths(ids))
        kv = self.diffuser.image_kv(context)
        words = (~self.text.special_mask(ids)).float()  # (B, L)
        eps = gaussian_noise(tuple(x0.shape), generator).to(self.device)
        levels = self.config.likelihood_timesteps
        error = torch.zeros(x0.shape[0], device=self.device)
        for t in levels:
            tt = torch.full((x0.shape[0],), t, device=self.device, dtype=torch.long)
            x0_hat = self.diffuser(self.diffusion.q_sample(x0, tt, eps), tt, torch.zeros_like(x0), kv)
            error += ((x0_hat - x0) ** 2).mean(-1).mul(words).sum(1) / words.sum(1).clamp(min=1)
        return -error / len(levels)

    def _sampling_diffusion(self) -> GaussianDiffusion:
        """The process the sampler steps: the training one, or one with ``sampling_noise_factor``."""
        f = self.config.sampling_noise_factor
        if f == 0 or f == self.diffusion.noise_factor:
            return self.diffusion
        return GaussianDiffusion(self.config.num_train_timesteps, self.config.beta_schedule, f)

    def caption(self, images: Sequence[ImageInput] | ImageInput, **kwargs) -> list[str]:
        """Caption one image or a list of images.

        Args:
            images: PIL images, file paths, bytes, numpy arrays or tensors (H, W, C / C, H, W), a list of them,
                a batch tensor (B, C, H, W), or precomputed image tokens (B, N_img, D_img).
            num_inference_steps: denoising iterations (default from the config: 1 for the shipped student, 5 for
                the full-sampler model).
            guidance_scale: w of classifier-free guidance (default from the config; 0 disables the unconditional
                branch).
            back_and_refine: roll back low-confidence tokens at t = T/2 and refine (default from the config).
            mbr_candidates: k > 1 draws k captions per image and keeps one (``select``); default from the config
                (``num_candidates``: 16 for the shipped default, 1 otherwise).
            select: how one of the k drafts is kept: "mbr" (the highest mean similarity to the others) or "likelihood"
                (the one the model itself reconstructs best from noise, ``likelihood_scores``; the shipped default's
                choice; docs/MODEL_CARD.md says how often each choice reads broken).
                Default from the config (``candidate_select``).
            rerank_with: a model with ``score_captions`` and the same image encoder (the AR baseline,
                ``ARCaptioner``): of the k candidates, return the one it scores highest (noisy parallel decoding,
                Gu et al. 2018) instead of the MBR choice. One teacher-forced pass of that model over the k candidates.
            mbr_lengths: for a length-conditioned model, "top": MBR candidate j is sampled at the j-th most likely
                length; "predicted": all at the most likely length (default from the config, "top").
            length: ask for exactly this many word-piece tokens (no word then repeats the one before it). Beyond
                ``config.trained_length_p99`` (longer than 99 % of the training captions; 17 for the shipped models)
                the model has seldom seen such captions and mostly returns word salad of that length.
            generator / seed: randomness; the same seed gives the same captions, whatever the batch.
            keys: one stable string per image for its noise (default: a hash of its pixels).
            clamp: snap every intermediate estimate to the latents of its decoded tokens (Diffusion-LM's
                clamping trick; default from the config).
            refine_noise: "fresh" (paper) or "initial": Back&Refine renoises from x_T itself, so that the caption is
                a function of x_T alone (default from the config, "fresh").
            no_dangling_end: with a length (predicted, asked or a template's), the word before [SEP] is never a
                function word ("a", "on", ...), so no caption ends "... on a" (default from the config, on).
            batch_size: images per forward batch (with k drafts each, at most ``DRAFT_ROWS`` // k).

        Returns:
            one caption per image. Raises ``ImageLoadError`` naming the bad input (nothing is captioned then).
        """
        if isinstance(images, torch.Tensor):
            is_feats = images.ndim == 3 and images.shape[-1] == self.image_encoder.dim
            images = images if is_feats else list(images) if images.ndim == 4 else [images]
        elif isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
            images = [images]
        return self.generate(images, **kwargs).captions

    def infill(self, image: ImageInput, template: str, **kwargs) -> str:
        """Fill the blanks of ``template`` (``___`` or ``[MASK]``, one token each) for ``image``; given words are kept."""
        return self.generate([image], template=template, **kwargs).captions[0]


__all__ = ["LaDiC", "CaptionOutput", "CaptioningCancelled", "CheckpointError", "ImageLoadError", "default_model_path", "full_model_path", "CONFIG_NAME", "WEIGHTS_NAME"]
