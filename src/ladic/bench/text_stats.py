"""Plain-language caption statistics: captions that end on a function word, words unseen in training."""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from typing import Any

from ladic.bench.report import fmt_score
from ladic.data.captions import FUNCTION_WORDS, caption_words, ends_on_function_word

STATS_HEADERS = ("dangling %", "OOV words %")
MISSING = "–"


def caption_vocabulary(captions: Iterable[str]) -> frozenset[str]:
    """Every word of ``captions`` (e.g. all Flickr8k train references), computed once for ``oov_share``."""
    return frozenset(w for c in captions for w in caption_words(c))


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


def caption_stats(captions: Sequence[str], vocabulary: Set[str] | None) -> dict[str, float | None]:
    """Both measures, under the keys the result rows store them as."""
    return {"dangling_share": dangling_share(captions), "oov_share": oov_share(captions, vocabulary)}


def stats_cells(row: dict[str, Any]) -> list[str]:
    """Markdown cells (percent) of a row's ``caption_stats``; "–" where a row lacks them (older JSON files)."""
    return [fmt_score(row.get(k), missing=MISSING) for k in ("dangling_share", "oov_share")]


def stats_note(vocabulary_known: bool) -> str:
    """The notes line that explains the two columns."""
    oov = "the Flickr8k train references" + ("" if vocabulary_known else f" (not found here, hence {MISSING})")
    return (f"{STATS_HEADERS[0]}: captions whose last word is an article, preposition, conjunction or possessive "
            f"(`ladic.data.captions.FUNCTION_WORDS`); {STATS_HEADERS[1]}: caption words that never occur in {oov}.")
