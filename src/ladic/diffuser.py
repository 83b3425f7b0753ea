"""The diffuser f(x_t, v, t): a transformer that predicts the clean caption latent x0 (paper section 3.3).

Each block: self-attention over the sentence, cross-attention from text queries to image tokens,
FFN (pre-LayerNorm). Inputs are the noisy latent x_t concatenated with the self-conditioning
estimate, plus position and timestep embeddings. The image side of cross-attention (keys and
values) depends only on the image, so ``image_kv`` computes it once and the sampler reuses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ladic.config import LaDiCConfig
from ladic.diffusion import make_betas

KV = tuple[torch.Tensor, torch.Tensor]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding: (B,) integer timesteps -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def init_weights(module: nn.Module, seed: int, params: tuple[nn.Parameter, ...]) -> None:
    """Deterministic init from ``seed``: every Linear weight and ``params`` ~ N(0, 0.02^2), biases 0."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
            nn.init.zeros_(m.bias)
    for p in params:
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)


def input_scale(config: LaDiCConfig) -> torch.Tensor:
    """(T,) factor applied to x_t before ``in_proj``: 1 / sqrt(ab_t + F^2 (1 - ab_t)) with ``input_scaling =
    "unit_variance"`` (the standard deviation of x_t for unit-variance x0), ones with ``"none"``."""
    ab = torch.cumprod(1.0 - make_betas(config.beta_schedule, config.num_train_timesteps), dim=0)
    if config.input_scaling == "none":
        return torch.ones(config.num_train_timesteps)
    return (ab + config.noise_factor**2 * (1.0 - ab)).rsqrt().float()


class Attention(nn.Module):
    """Multi-head attention; keys/values may come from another sequence (cross-attention)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, D/H)
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> KV:
        """(B, N, D) -> keys and values, each (B, H, N, D/H)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, kv: KV | None = None) -> torch.Tensor:
        """(B, L, D) queries; self-attention when ``kv`` is None. Returns (B, L, D)."""
        k, v = self.project_kv(x) if kv is None else kv
        y = F.scaled_dot_product_attention(self._heads(self.q(x)), k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, num_heads, dropout) if cross else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, kv: KV | None) -> torch.Tensor:
        h = h + self.drop(self.self_attn(self.norm1(h)))
        if self.cross_attn is not None:
            h = h + self.drop(self.cross_attn(self.norm2(h), kv))
        return h + self.drop(self.mlp(self.norm3(h)))


class Diffuser(nn.Module):
    """x0-prediction network.

    Args:
        config: model config (sizes, conditioning mode).
        text_dim: D_txt, size of a caption latent token.
        image_dim: D_img, size of an image token.
        num_image_tokens: N_img, number of image tokens (fixed by the image encoder).
    """

    def __init__(self, config: LaDiCConfig, text_dim: int, image_dim: int, num_image_tokens: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.cross = config.image_conditioning == "cross_attn"
        self.in_proj = nn.Linear(2 * text_dim, d)  # [x_t, self-conditioning x0 estimate]
        self.pos_emb = nn.Parameter(torch.zeros(1, config.max_length, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.image_proj = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, d))
        self.image_pos = nn.Parameter(torch.zeros(1, num_image_tokens, d))
        self.null_image = nn.Parameter(torch.zeros(1, num_image_tokens, d))  # learned null condition (CFG)
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.ffn_size, config.dropout, self.cross) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, text_dim)
        self.hidden_size = d
        self.max_caption_tokens = config.max_length - 2  # N: word pieces between [CLS] and [SEP]
        if config.length_conditioning:  # registered last: the other modules' initialisation does not change
            self.length_emb = nn.Embedding(config.max_length + 1, d)  # index N; 0 = unknown
            self.length_head = nn.Linear(d, config.max_length + 1)
        init_weights(self, config.seed_for_init, (self.pos_emb, self.image_pos, self.null_image))
        self.pos_emb.data.mul_(config.position_init_std / 0.02)  # (same random stream whatever the std)
        # c_in(t) = 1 / sqrt(ab_t + F^2 (1 - ab_t)), (T,): Var(c_in x_t) = 1 at every t (not saved with the weights).
        self.register_buffer("c_in", input_scale(config), persistent=False)
        if config.length_conditioning:
            nn.init.zeros_(self.length_emb.weight)  # a model initialised from one without it starts identical

    def image_context(self, image_feats: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens (B, N, D_img) -> context (B, N, d); rows where ``drop`` (B,) is True get the null image."""
        ctx = self.image_proj(image_feats) + self.image_pos
        if drop is not None:
            ctx = torch.where(drop[:, None, None], self.null_image.expand_as(ctx), ctx)
        return ctx

    def predict_length(self, context: torch.Tensor) -> torch.Tensor:
        """Context (B, N, d) -> logits (B, max_length + 1) over the caption length N (impossible N at -inf)."""
        logits = self.length_head(context.mean(dim=1))
        n = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill((n < 1) | (n > self.max_caption_tokens), float("-inf"))

    def add_length(self, context: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Condition a context (B, N, d) on caption lengths (B,) (0 = unknown): the length embedding is added to
        every image token."""
        return context + self.length_emb(lengths)[:, None]

    def null_context(self, batch_size: int) -> torch.Tensor:
        """The unconditional context f(., emptyset, .): (B, N, d)."""
        return self.null_image.expand(batch_size, -1, -1)

    def image_kv(self, context: torch.Tensor) -> list[KV] | torch.Tensor:
        """Per-block cross-attention keys/values of a context (computed once per sample).

        In "prepend" mode there is no cross-attention and the pooled context (B, 1, d) is returned.
        """
        if not self.cross:
            return context.mean(dim=1, keepdim=True)
        return [blk.cross_attn.project_kv(context) for blk in self.blocks]

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor, image_kv: list[KV] | torch.Tensor
    ) -> torch.Tensor:
        """x_t, self_cond: (B, L, D_txt); t: (B,) ints; image_kv from ``image_kv``. Returns x0_hat (B, L, D_txt)."""
        length = x_t.shape[1]
        x_t = x_t * self.c_in[t].to(x_t.dtype)[:, None, None]
        h = self.in_proj(torch.cat([x_t, self_cond], dim=-1)) + self.pos_emb[:, :length]
        h = h + self.time_mlp(timestep_embedding(t, self.hidden_size))[:, None]
        if not self.cross:
            h = torch.cat([image_kv, h], dim=1)  # the image as a prepended [CLS]-like token
        for i, blk in enumerate(self.blocks):
            h = blk(h, image_kv[i] if self.cross else None)
        if not self.cross:
            h = h[:, 1:]
        return self.out_proj(self.norm_out(h))
