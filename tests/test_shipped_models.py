"""The models shipped in ``src/ladic/assets``: the README's main command, and what they say about real photos."""

from __future__ import annotations

import json
import re

import pytest

from ladic.baselines.ar import ARCaptioner, default_ar_model_path
from ladic.captioner import DRAFT_ROWS, LaDiC, default_model_path, full_model_path
from ladic.cli import main
from ladic.data.captions import load_flickr8k

DOG = re.compile(r"\b(dog|dogs|puppy)\b")


@pytest.fixture(scope="module")
def dog_records():
    """Flickr8k val records (never trained on) whose five references all mention a dog."""
    try:
        records = load_flickr8k("val")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return [r for r in records if all(DOG.search(c) for c in r.captions)][:20]


@pytest.fixture(scope="module")
def dog_photos(dog_records) -> list[str]:
    return [r.image_path for r in dog_records]


@pytest.fixture(scope="module", params=["default", "full"])
def shipped_ladic(request) -> LaDiC:
    """Both shipped LaDiC models: the default one-step student and the full-sampler model (``--full``)."""
    return LaDiC.from_pretrained(None if request.param == "default" else full_model_path())


def test_the_default_model_is_a_one_step_student(dog_records, capsys):
    """The default is the one-step student: its sampler settings live in its config, it writes each caption at
    the length it predicts; --full loads the full-sampler model, --fast names the default."""
    fast, full = LaDiC.from_pretrained(), LaDiC.from_pretrained(full_model_path())
    assert default_model_path() != full_model_path()
    c, f = fast.config, full.config
    assert (c.num_inference_steps, c.guidance_scale, c.back_and_refine, c.clamp) == (1, 0.0, False, False)
    assert c.length_conditioning and (f.num_inference_steps, f.back_and_refine, f.clamp) == (5, True, True)
    assert c.output_vocab_size == f.output_vocab_size > 0
    assert (c.num_candidates, c.candidate_select, c.candidate_lengths, c.mbr_lengths) == (16, "likelihood", 4, "top")
    photos = [r.image_path for r in dog_records]
    out = fast.generate(photos, seed=0)
    # Per forward of DRAFT_ROWS // 16 photos: one evaluation drafts their 16 captions each, one scores them.
    assert out.num_evaluations == 2 * -(-len(photos) // (DRAFT_ROWS // 16))
    assert all(len(set(c)) > 1 and cap in c for cap, c in zip(out.captions, out.candidates))
    assert sum(bool(DOG.search(cap)) for cap in out.captions) >= 14, out.captions
    for flags in ([], ["--fast"]):
        assert main(["caption", photos[0], *flags]) == 0
        assert capsys.readouterr().out.strip().endswith(out.captions[0])
    full_caption = full.caption(photos[:1], seed=0)[0]
    assert main(["caption", photos[0], "--full"]) == 0
    assert capsys.readouterr().out.strip().endswith(full_caption)
    for flags in (["--fast", "--full"], ["--full", "--model", str(default_model_path())],
                  ["--fast", "--model", str(full_model_path())]):
        assert main(["caption", photos[0], *flags]) == 2
    assert "give one of --model, --fast, --full" in capsys.readouterr().err


def test_main_command_captions_the_examples(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["caption", "--examples", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    results = json.loads(out.read_text())
    assert len(results) == len(lines) >= 5
    assert {r["image_id"] for r in results} >= {"astronaut", "coffee", "chelsea", "rocket"}
    for r in results:
        assert set(r) == {"image_id", "file", "caption"}
        assert re.fullmatch(r"[a-z' ,.-]+", r["caption"]) and len(r["caption"].split()) >= 2


def test_shipped_ladic_sees_the_dogs(shipped_ladic, dog_photos):
    assert len(dog_photos) == 20
    captions = shipped_ladic.caption(dog_photos, seed=0)
    hits = sum(bool(DOG.search(c)) for c in captions)
    assert hits >= 14, captions


def test_shipped_ladic_writes_sentences(shipped_ladic, dog_records):
    """Word order, not just the right words: corpus BLEU-4 against the references. The model trained on human
    captions only (step 3,200, word salad with the right nouns) scores 0.15 here, the shipped one 0.29."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    captions = shipped_ladic.caption([r.image_path for r in dog_records], seed=0)
    scorer = BleuScorer(n=4)
    for cap, rec in zip(captions, dog_records):
        scorer += (cap, rec.captions)
    bleu, _ = scorer.compute_score(option="closest", verbose=0)
    assert bleu[3] >= 0.22, (bleu, captions)
    assert sum(len(c.split()) >= 5 for c in captions) >= 16, captions


def test_shipped_ar_baseline_loads_and_sees_the_dogs(dog_photos):
    assert default_ar_model_path().is_dir()
    ar = ARCaptioner.from_pretrained()
    captions = ar.caption(dog_photos)
    assert sum(bool(DOG.search(c)) for c in captions) >= 16, captions
    assert sum(len(c.split()) >= 5 for c in captions) >= 16  # sentences, not keywords


def test_bench_uses_the_shipped_ar_unless_told_not_to():
    import argparse

    from ladic.bench import _Session

    def session(ar_model):
        return _Session(argparse.Namespace(ar_model=ar_model, device="cpu"))

    assert isinstance(session("shipped").ar(), ARCaptioner)
    assert session("shipped").ar_path() == str(default_ar_model_path())
    assert session("none").ar() is None and session("none").ar_path() is None
    assert str(default_model_path()) != str(default_ar_model_path())
