"""Autoregressive baseline: a transformer decoder of LaDiC's size, trained and used like LaDiC.

Same image encoder, tokenizer (the ``TextSpace`` BERT word pieces), hidden size, depth, heads and FFN
as the LaDiC config it is built from. Tokens enter through the frozen BERT word embeddings and a
trainable projection, and leave through a projection back to the BERT width and the same kind of LM
head as LaDiC (tied to the frozen word embeddings), so the two models train the same kinds of weights.
Each block: causal self-attention, cross-attention to the projected image tokens, FFN (pre-LayerNorm,
``ladic.diffuser.Block`` with the self-attention made causal and cacheable).

API:
    ARCaptioner(config, image_encoder=None)
        .config, .text (TextSpace), .image_encoder, .decoder (ARDecoder)
        .draw_training_noise(batch, generator) -> {}            (no randomness beyond dropout)
        .forward(image_inputs, hidden, ids, draws) -> {"loss", "latent" (0), "caption"}  teacher-forcing CE
        .trainable_state_dict() / .load_trainable_state_dict(sd, source) / .save_pretrained(path, dtype)
        .from_pretrained(path, device)                          (config.json has "model_type": "ar")
        .generate(images_or_feats, *, num_beams=1, max_new_tokens=None, length_penalty=1.0, batch_size=32,
                  use_cache=True, seed=None, progress=False, **ignored) -> ARCaptionOutput
        .caption(images, **kw) -> list[str]
        .sequence_scores(feats, ids, length_penalty=1.0, repeats=1) -> (B * repeats,) the search objective of given ids
        .score_captions(feats, captions, length_penalty=1.0) -> (B * k,) the same for k caption strings per image

Search objective: sum of the log-probabilities of the generated tokens ([SEP] included, [CLS] not),
divided by (number of generated tokens) ** length_penalty. Special tokens other than [SEP] are never
generated. Self-attention keys/values are cached and appended per step; the image's cross-attention
keys/values are computed once per image (and shared by its beams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ladic.captioner import CaptionOutput
from ladic.checkpoint import Captioner, shipped_model_path
from ladic.config import LaDiCConfig
from ladic.diffuser import KV, Attention, Block, init_weights
from ladic.image_encoders import ImageEncoder
from ladic.image_io import ImageInput

MODEL_TYPE = "ar"


@dataclass
class ARCaptionOutput(CaptionOutput):
    """``CaptionOutput`` plus the search objective of each caption (and of each beam in ``candidates``)."""

    scores: list[float] | None = None
    candidate_scores: list[list[float]] | None = None


class CausalSelfAttention(Attention):
    """``Attention`` restricted to the past, with an optional cache of the past keys/values.

    ``forward(x, cache)``: x (B, T, D) are the newest T positions, ``cache`` the keys/values (B, H, P, D/H)
    of the P positions before them (or None). Returns (B, T, D) and the keys/values of all P + T positions.
    """

    def forward(self, x: torch.Tensor, cache: KV | None = None) -> tuple[torch.Tensor, KV]:  # type: ignore[override]
        k, v = self.project_kv(x)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        q = self._heads(self.q(x))
        t, total = x.shape[1], k.shape[2]
        past = total - t
        mask, causal = None, False
        if t > 1 and past == 0:
            causal = True
        elif t > 1:  # several new positions after a cached prefix: query i sees keys 0 .. past + i
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(x.shape)), (k, v)


class ARBlock(Block):
    """``ladic.diffuser.Block`` (self-attention, cross-attention, FFN) with causal, cached self-attention."""

    def __init__(self, dim: int, num_heads: int, ffn: int, dropout: float) -> None:
        super().__init__(dim, num_heads, ffn, dropout, cross=True)
        self.self_attn = CausalSelfAttention(dim, num_heads, dropout)

    def forward(self, h: torch.Tensor, kv: KV, cache: KV | None = None) -> tuple[torch.Tensor, KV]:  # type: ignore[override]
        a, cache = self.self_attn(self.norm1(h), cache)
        h = h + self.drop(a)
        h = h + self.drop(self.cross_attn(self.norm2(h), kv))
        return h + self.drop(self.mlp(self.norm3(h))), cache


class ARDecoder(nn.Module):
    """The trainable decoder: token embeddings (B, T, D_txt) + image tokens -> output features (B, T, D_txt).

    Args:
        config: sizes (hidden_size, num_layers, num_heads, ffn_size, dropout, max_length).
        text_dim: D_txt, width of the frozen word embeddings and of the LM head.
        image_dim, num_image_tokens: D_img and N_img of the image encoder.
    """

    def __init__(self, config: LaDiCConfig, text_dim: int, image_dim: int, num_image_tokens: int) -> None:
        super().__init__()
        d = config.hidden_size
        # Frozen word embedding -> d through a 2d-wide MLP. It stands in for LaDiC's input side (a
        # 2 D_txt -> d projection of [x_t, self-cond] plus the d -> d -> d timestep MLP), which it matches
        # in size, so the trainable count is within 1% of LaDiC's (diffuser + LM head) for every preset.
        self.in_proj = nn.Sequential(nn.Linear(text_dim, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, config.max_length, d))
        self.image_proj = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, d))
        self.image_pos = nn.Parameter(torch.zeros(1, num_image_tokens, d))
        self.blocks = nn.ModuleList(
            ARBlock(d, config.num_heads, config.ffn_size, config.dropout) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, text_dim)
        self.max_length = config.max_length
        init_weights(self, config.seed_for_init, (self.pos_emb, self.image_pos))

    def image_kv(self, image_feats: torch.Tensor) -> list[KV]:
        """Image tokens (B, N, D_img) -> per-block cross-attention keys/values (computed once per image)."""
        ctx = self.image_proj(image_feats) + self.image_pos
        return [blk.cross_attn.project_kv(ctx) for blk in self.blocks]

    def forward(
        self, tok_emb: torch.Tensor, image_kv: list[KV], cache: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        """tok_emb (B, T, D_txt) of positions P .. P+T-1, where P is the cached length (0 without a cache).

        Returns output features (B, T, D_txt) for the LM head and the new cache (keys/values of all P + T positions).
        """
        past = 0 if cache is None else cache[0][0].shape[2]
        t = tok_emb.shape[1]
        if past + t > self.max_length:
            raise ValueError(f"sequence of {past + t} tokens is longer than max_length {self.max_length}")
        h = self.in_proj(tok_emb) + self.pos_emb[:, past : past + t]
        new_cache = []
        for i, blk in enumerate(self.blocks):
            h, c = blk(h, image_kv[i], None if cache is None else cache[i])
            new_cache.append(c)
        return self.out_proj(self.norm_out(h)), new_cache


def _reorder(kvs: list[KV], index: torch.Tensor) -> list[KV]:
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kvs]


def default_ar_model_path() -> Path:
    """The AR baseline shipped inside the package (trained like the shipped LaDiC, for ``ladic bench``)."""
    return shipped_model_path("ar-small-flickr8k")


def load_reranker(path: str | Path | None = "shipped", device: str | torch.device = "cpu") -> "ARCaptioner":
    """The AR model that ``LaDiC.generate(rerank_with=...)`` scores candidates with: a folder, or the shipped one
    for ``None`` / ``"shipped"``."""
    return ARCaptioner.from_pretrained(None if path in (None, "shipped") else path, device=device)


class ARCaptioner(Captioner):
    """Autoregressive captioner with LaDiC's image encoder, tokenizer and sizes (see the module docstring)."""

    model_type = MODEL_TYPE

    def __init__(self, config: LaDiCConfig, image_encoder: ImageEncoder | None = None) -> None:
        # Same text space as LaDiC: its tokenizer, its frozen word embeddings and its LM head; the frozen
        # BERT halves are only used to build the trainer's feature cache (the hidden states go unused here).
        super().__init__(config, image_encoder)
        self.decoder = ARDecoder(config, self.text.dim, self.image_encoder.dim, self.image_encoder.num_tokens)
        tok = self.text.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        banned = torch.zeros(len(tok), dtype=torch.bool)
        banned[[i for i in tok.all_special_ids if i != self.eos_id]] = True
        self.register_buffer("banned", banned, persistent=False)  # never generated: [CLS], [PAD], [MASK], [UNK]

    def num_trainable_parameters(self, include_image_encoder: bool = False) -> int:
        """Trainable parameters of the decoder and LM head (and of the image encoder if asked and trainable)."""
        mods = [self.decoder, self.text.lm_head] + ([self.image_encoder] if include_image_encoder else [])
        return sum(p.numel() for m in mods for p in m.parameters() if p.requires_grad)

    def core_modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "ARCaptioner":
        """Load a folder written by ``save_pretrained``; ``None`` loads the shipped baseline."""
        return cls._from_folder(Path(path) if path is not None else default_ar_model_path(), device)

    # ------------------------------------------------------------------ encoders
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> image tokens (B, N_img, D_img)."""
        return self.image_encoder.encode(self.load_images(images)).to(self.device)

    # ------------------------------------------------------------------ model
    def logits(
        self, image_kv: list[KV], ids: torch.Tensor, cache: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        """Next-token logits (B, T, V) (V' columns over a restricted output vocabulary) for ids (B, T) following the ``cache``d prefix, and the new cache."""
        emb = self.text.embeddings.word_embeddings(ids)
        h, cache = self.decoder(emb, image_kv, cache)
        return self.text.lm_head(h), cache

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Model log-probabilities with the never-generated specials set to -inf."""
        return logits.float().log_softmax(-1).masked_fill(self.text.to_output_space(self.banned), float("-inf"))

    # ------------------------------------------------------------------ training
    def draw_training_noise(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Teacher forcing draws nothing (dropout uses the global seed the trainer sets per step)."""
        return {}

    def training_losses(self, image_feats: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forcing cross-entropy: predict ids[:, 1:] from ids[:, :-1]; [PAD] targets are ignored."""
        logits, _ = self.logits(self.decoder.image_kv(image_feats), ids[:, :-1])
        targets = self.text.output_index(ids[:, 1:]).masked_fill(ids[:, 1:] == self.pad_id, -100)
        caption = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return {"loss": caption, "latent": torch.zeros((), device=caption.device), "caption": caption.detach()}

    def forward(
        self, image_inputs: torch.Tensor, hidden: torch.Tensor | None, ids: torch.Tensor, draws: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Trainer interface (as ``LaDiC.forward``): cached image tokens (or pixels for a trainable encoder),
        text hidden states (unused) and ids (B, L) -> {"loss", "latent" (always 0), "caption"}."""
        return self.training_losses(self.image_tokens(image_inputs), ids.long())

    @torch.no_grad()
    def sequence_scores(
        self, image_feats: torch.Tensor, ids: torch.Tensor, length_penalty: float = 1.0, repeats: int = 1
    ) -> torch.Tensor:
        """The search objective of given sequences: ids (B * repeats, T) start with [CLS]; tokens after the first
        [SEP] are not counted (nor computed). Rows ``i * repeats .. (i + 1) * repeats - 1`` belong to image ``i`` of
        ``image_feats`` (B, N_img, D_img), whose cross-attention keys/values are computed once.
        Returns (B * repeats,) sum of log-probs of ids[:, 1:] / (number counted) ** length_penalty."""
        if ids.shape[0] != image_feats.shape[0] * repeats:
            raise ValueError(f"{ids.shape[0]} sequences for {image_feats.shape[0]} images x {repeats}")
        kv = self.decoder.image_kv(image_feats.to(self.device).float())
        if repeats > 1:
            kv = _reorder(kv, torch.arange(image_feats.shape[0], device=self.device).repeat_interleave(repeats))
        ids = ids.to(self.device)
        is_eos = ids[:, 1:] == self.eos_id
        count = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first [SEP]
        n = count.sum(1)
        longest = int(n.max())  # causal: the positions after every row's first [SEP] change nothing
        ids, count = ids[:, : longest + 1], count[:, :longest]
        logits, _ = self.logits(kv, ids[:, :-1])
        lp = self._log_probs(logits).gather(-1, self.text.output_index(ids[:, 1:, None])).squeeze(-1)
        return lp.masked_fill(~count, 0.0).sum(1) / n.float().pow(length_penalty)

    def score_captions(self, image_feats: torch.Tensor, captions: Sequence[str], length_penalty: float = 1.0) -> torch.Tensor:
        """Reranking (noisy parallel decoding, Gu et al. 2018): image tokens (B, N_img, D_img) and k captions per
        image (B * k strings, grouped by image) -> (B * k,) each caption's search objective (``sequence_scores``):
        its mean log-probability under this model with the default ``length_penalty`` 1.0."""
        if len(captions) % image_feats.shape[0]:
            raise ValueError(f"{len(captions)} captions is not a multiple of {image_feats.shape[0]} images")
        ids = self.text.tokenize(captions)["input_ids"]
        return self.sequence_scores(image_feats, ids, length_penalty, repeats=len(captions) // image_feats.shape[0])

    # ------------------------------------------------------------------ decoding
    def _greedy(self, feats: torch.Tensor, steps: int, use_cache: bool, length_penalty: float):
        b = feats.shape[0]
        kv = self.decoder.image_kv(feats)
        seqs = torch.full((b, 1), self.bos_id, dtype=torch.long, device=feats.device)
        total = torch.zeros(b, device=feats.device)
        length = torch.zeros(b, device=feats.device)
        done = torch.zeros(b, dtype=torch.bool, device=feats.device)
        cache, evals = None, 0
        for _ in range(steps):
            if use_cache:
                logits, cache = self.logits(kv, seqs[:, -1:], cache)
            else:  # recompute the whole prefix (reference for the cache)
                logits, _ = self.logits(kv, seqs)
            evals += 1
            lp = self._log_probs(logits[:, -1])
            best, tok = lp.max(-1)
            tok = self.text.token_ids(tok)
            tok = tok.masked_fill(done, self.pad_id)
            total += best.masked_fill(done, 0.0)
            length += (~done).float()
            seqs = torch.cat([seqs, tok[:, None]], dim=1)
            done |= tok == self.eos_id
            if done.all():
                break
        scores = total / length.clamp_min(1).pow(length_penalty)
        return seqs, scores, seqs[:, None], scores[:, None], evals

    def _beam(self, feats: torch.Tensor, steps: int, k: int, use_cache: bool, length_penalty: float):
        """Length-normalised beam search. Candidates are ranked by their normalised score at every step;
        a beam that emits [SEP] is frozen (extended by [PAD] at no cost) and keeps competing with its final
        score. With k = 1 this is exactly greedy decoding."""
        b, dev = feats.shape[0], feats.device
        kv = [(kk.repeat_interleave(k, 0), vv.repeat_interleave(k, 0)) for kk, vv in self.decoder.image_kv(feats)]
        seqs = torch.full((b * k, 1), self.bos_id, dtype=torch.long, device=dev)
        total = torch.full((b, k), float("-inf"), device=dev)
        total[:, 0] = 0.0  # one live hypothesis at the start
        length = torch.zeros(b, k, device=dev)
        done = torch.zeros(b, k, dtype=torch.bool, device=dev)
        base = (torch.arange(b, device=dev) * k)[:, None]
        cache, evals = None, 0
        for _ in range(steps):
            if use_cache:
                logits, cache = self.logits(kv, seqs[:, -1:], cache)
            else:
                logits, _ = self.logits(kv, seqs)
            evals += 1
            lp = self._log_probs(logits[:, -1]).view(b, k, -1)
            frozen = torch.full_like(lp[0, 0], float("-inf"))
            frozen[self.text.output_index(torch.tensor(self.pad_id, device=dev))] = 0.0
            lp = torch.where(done[..., None], frozen, lp)
            cand_total = total[..., None] + lp  # (b, k, V)
            cand_len = length + (~done).float()  # (b, k)
            cand_score = cand_total / cand_len.clamp_min(1)[..., None].pow(length_penalty)
            _, flat = cand_score.view(b, -1).topk(k, dim=-1)  # sorted, best first
            beam, tok = flat // lp.shape[-1], self.text.token_ids(flat % lp.shape[-1])
            total = cand_total.view(b, -1).gather(1, flat)
            length = cand_len.gather(1, beam)
            done = done.gather(1, beam) | (tok == self.eos_id)
            index = (base + beam).flatten()
            seqs = torch.cat([seqs.index_select(0, index), tok.flatten()[:, None]], dim=1)
            if cache is not None:
                cache = _reorder(cache, index)
            if done.all():
                break
        scores = total / length.clamp_min(1).pow(length_penalty)  # (b, k), sorted best first
        beams = seqs.view(b, k, -1)
        return beams[:, 0], scores[:, 0], beams, scores, evals

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        *,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        length_penalty: float = 1.0,
        batch_size: int = 32,
        use_cache: bool = True,
        seed: int | None = None,
        progress: bool = False,
        **ignored,
    ) -> ARCaptionOutput:
        """Caption images (PIL images, paths, arrays/tensors, or precomputed image tokens (B, N_img, D_img)).

        Greedy for ``num_beams == 1``, otherwise length-normalised beam search (``candidates`` then holds
        every beam's caption, best first). Decoding is deterministic: ``seed`` and LaDiC-only arguments
        (``num_inference_steps`` ...) are accepted and ignored. ``use_cache=False`` recomputes the whole
        prefix at every step (same tokens, slower; for tests and benchmarks).
        """
        if num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        limit = self.config.max_length - 1
        steps = limit if max_new_tokens is None else max_new_tokens
        if not 1 <= steps <= limit:
            raise ValueError(f"max_new_tokens must be in 1..{limit} for max_length {self.config.max_length}")
        enc = self.image_encoder
        is_feats = isinstance(images, torch.Tensor) and images.ndim == 3 and images.shape[-1] == enc.dim
        pil = None if is_feats else self.load_images(images)  # validate every input before any work
        n = len(images)
        out = ARCaptionOutput(captions=[], scores=[], candidates=[] if num_beams > 1 else None,
                              candidate_scores=[] if num_beams > 1 else None)
        for start in tqdm(range(0, n, batch_size), desc="caption", disable=not progress):
            feats = images[start : start + batch_size] if is_feats else enc.encode(pil[start : start + batch_size])
            feats = feats.to(self.device).float()
            if num_beams == 1:
                best, score, _, _, evals = self._greedy(feats, steps, use_cache, length_penalty)
            else:
                best, score, beams, beam_scores, evals = self._beam(feats, steps, num_beams, use_cache, length_penalty)
                for row, sc in zip(beams, beam_scores):
                    out.candidates.append(self.ids_to_text(row))
                    out.candidate_scores.append(sc.tolist())
            out.captions += self.ids_to_text(best)
            out.scores += score.tolist()
            out.num_evaluations += evals
        return out

    def ids_to_text(self, ids: torch.Tensor) -> list[str]:
        """(B, T) generated ids -> captions (specials dropped, nothing collapsed)."""
        return self.text.ids_to_text(ids, collapse_repeats=False)

    def caption(self, images: Sequence[ImageInput] | ImageInput, **kwargs) -> list[str]:
        """Caption one image or a list of images (see ``generate``). Returns one caption per image."""
        if isinstance(images, (str, Path, bytes)) or not isinstance(images, (Sequence, torch.Tensor)):
            images = [images]
        return self.generate(images, **kwargs).captions


__all__ = ["ARCaptioner", "ARCaptionOutput", "load_reranker", "ARDecoder", "ARBlock", "CausalSelfAttention", "MODEL_TYPE"]
