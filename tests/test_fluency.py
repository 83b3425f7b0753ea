"""The fluency check (issue 38): the editor's faults it is trained on, the shipped check on clear cases, its place in
``ladic eval``'s caption statistics, and that it saves and loads exactly."""

import random

import pytest
import torch

from ladic.data.captions import FUNCTION_WORDS, caption_words
from ladic.fluency import FluencyCheck, FluencyConfig, corrupt, not_fluent_share, training_pairs

CAPTIONS = ["a black dog is running through the grass", "two children are playing on the beach",
            "a man in a red shirt is riding a bike down a dirt road", "a girl jumps into a swimming pool"]


def test_corruptions_change_every_caption_and_pairs_are_balanced():
    rng = random.Random(0)
    vocab = [w for c in CAPTIONS for w in caption_words(c)]
    for _ in range(200):
        words = caption_words(rng.choice(CAPTIONS))
        bad = corrupt(words, rng, vocab)
        assert bad and bad != words and set(bad) <= set(vocab) | FUNCTION_WORDS | {"and", "in", "with"}
    texts, labels = training_pairs(CAPTIONS * 3, random.Random(1))
    assert len(texts) == 24 and sum(labels) == 12
    fluent = {" ".join(caption_words(c)) for c in CAPTIONS}
    assert {t for t, y in zip(texts, labels) if y == 0} == fluent


@pytest.fixture(scope="module")
def shipped_check():
    return FluencyCheck.load()


def test_shipped_check_flags_the_editors_faults_not_human_captions(shipped_check):
    broken = ["a man is riding a bike road", "a brown dog is playing with a red", "a man on a are on a street",
              "a woman in a blue shirt and a blue shirt", "a group of in a shirt is standing"]
    fluent = ["a man is riding a bike on a dirt road", "a brown dog is playing with a red ball",
              "a woman in a blue shirt is walking down the street", "two dogs run across a snowy field"]
    p_bad, p_ok = shipped_check.score(broken), shipped_check.score(fluent)
    assert p_bad.shape == (5,) and ((p_bad >= 0) & (p_bad <= 1)).all()
    assert p_bad.min() > p_ok.max()
    assert shipped_check.flags(broken) == [True] * 5 and shipped_check.flags(fluent) == [False] * 4
    assert not_fluent_share(broken + fluent, shipped_check) == pytest.approx(5 / 9)
    assert not_fluent_share([], shipped_check) == 0.0
    # The editor saw lowercased captions without their full stop: neither changes the verdict.
    assert shipped_check.flags(["A brown dog is playing with a red ball."]) == [False]


def test_check_saves_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    check = FluencyCheck(FluencyConfig(threshold=0.3)).eval()
    with torch.no_grad():
        for p in check.parameters():
            if p.requires_grad:
                p.copy_(p.half().float())  # the folder stores fp16
    check.save(tmp_path / "check")
    again = FluencyCheck.load(tmp_path / "check")
    assert again.config.threshold == 0.3
    assert torch.allclose(check.score(CAPTIONS), again.score(CAPTIONS), atol=1e-6)


def test_eval_caption_statistics_report_the_check(monkeypatch):
    from ladic import evaluate

    stats = evaluate.caption_statistics(["a brown dog is playing with a red", "a dog runs on the grass"])
    assert stats["not_fluent_share"] == pytest.approx(0.5)
    assert {"dangling_share", "broken_pair_share", "oov_share"} <= set(stats)
