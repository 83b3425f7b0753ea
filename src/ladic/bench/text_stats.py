"""Plain-language caption statistics: captions that end on a function word, that contain a word pair never seen in
training, and words unseen in training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from typing import Any

from ladic.bench.report import fmt_score
from ladic.data.captions import FUNCTION_WORDS, caption_words, ends_on_function_word

STATS_HEADERS = ("dangling %", "broken pair %", "OOV words %")
STATS_KEYS = ("dangling_share", "broken_pair_share", "oov_share")
MISSING = "–"
FREQUENT = 50  # a word occurring at least this often in the training captions is "frequent" for broken pairs


@dataclass(frozen=True)
class TrainingText:
    """What the statistics need to know of the training captions: their words with counts, and every pair of
    words that occur next to each other in them."""

    counts: Counter
    pairs: frozenset[tuple[str, str]]

    @property
    def words(self) -> frozenset[str]:
        return frozenset(self.counts)


def training_text(captions: Iterable[str]) -> TrainingText:
    """Word counts and adjacent word pairs of ``captions`` (e.g. all Flickr8k train references), computed once."""
    counts: Counter = Counter()
    pairs: set[tuple[str, str]] = set()
    for c in captions:
        words = caption_words(c)
        counts.update(words)
        pairs.update(zip(words, words[1:]))
    return TrainingText(counts, frozenset(pairs))


def broken_pairs(caption: str, train: TrainingText, frequent: int = FREQUENT) -> list[tuple[str, str]]:
    """Adjacent word pairs of ``caption`` whose two words each occur at least ``frequent`` times in the training
    captions but never next to each other there ("into a the", "are and"): a sign of a broken sentence."""
    words = caption_words(caption)
    return [(a, b) for a, b in zip(words, words[1:])
            if train.counts[a] >= frequent and train.counts[b] >= frequent and (a, b) not in train.pairs]


def broken_pair_share(captions: Sequence[str], train: TrainingText | None, frequent: int = FREQUENT) -> float | None:
    """Share of captions with at least one ``broken_pairs`` pair; None without training text, 0.0 for no captions.
    A measurement only: no decoding rule uses these pairs."""
    if train is None:
        return None
    if not captions:
        return 0.0
    return sum(bool(broken_pairs(c, train, frequent)) for c in captions) / len(captions)


def dangling_share(captions: Sequence[str]) -> float:
    """Share of captions whose last word is in ``FUNCTION_WORDS``; 0.0 for no captions."""
    if not captions:
        return 0.0
    return sum(map(ends_on_function_word, captions)) / len(captions)


def oov_share(captions: Iterable[str], vocabulary: Set[str] | None) -> float | None:
    """Share of caption words (repeats counted) not in ``vocabulary``; None without one, 0.0 without words."""
    if vocabulary is None:
        return None
    words = [w for c in captions for w in caption_words(c)]
    return sum(w not in vocabulary for w in words) / len(words) if words else 0.0


def caption_stats(captions: Sequence[str], train: TrainingText | None) -> dict[str, float | None]:
    """The three measures, under the keys the result rows store them as."""
    return {"dangling_share": dangling_share(captions), "broken_pair_share": broken_pair_share(captions, train),
            "oov_share": oov_share(captions, None if train is None else train.words)}


def stats_cells(row: dict[str, Any]) -> list[str]:
    """Markdown cells (percent) of a row's ``caption_stats``; "–" where a row lacks them (older JSON files)."""
    return [fmt_score(row.get(k), missing=MISSING) for k in STATS_KEYS]


def stats_note(train_known: bool) -> str:
    """The notes line that explains the three columns."""
    refs = "the Flickr8k train references" + ("" if train_known else f" (not found here, hence {MISSING})")
    return (f"{STATS_HEADERS[0]}: captions whose last word is an article, preposition, conjunction or possessive "
            f"(`ladic.data.captions.FUNCTION_WORDS`); {STATS_HEADERS[1]}: captions with two adjacent words that each "
            f"occur at least {FREQUENT} times in {refs} but never next to each other there (a measurement; no "
            f"decoding rule uses it); {STATS_HEADERS[2]}: caption words that never occur in {refs}.")
