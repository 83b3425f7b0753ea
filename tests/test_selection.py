"""Choosing one of several drafts by the model's own likelihood (issue 38): the score, determinism, batch
independence, the length cycle of the drafts, and bad settings."""

import pytest
import torch

from ladic import LaDiC, preset
from ladic.cli import main
from ladic.config import LaDiCConfig


@pytest.fixture(scope="module")
def length_model():
    torch.manual_seed(0)
    return LaDiC(preset("tiny", length_conditioning=True)).eval()


def test_likelihood_scores_prefer_what_the_denoiser_reconstructs(length_model, scenes):
    m = length_model
    feats = m.encode_images([scenes[0].image] * 3)
    ctx = m.diffuser.image_context(feats)
    caps = ["a red circle", "a red circle", "circle a red red a"]
    gen = [torch.Generator().manual_seed(1) for _ in caps]
    s = m.likelihood_scores(ctx, caps, gen)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s <= 0).all()
    assert s[0] == s[1]  # same caption, same image, same noise draw
    # The score is -mean ||f(x_t, v, t) - x0||^2 over the caption's words: recomputed by hand for one caption.
    x0, ids = m.text.encode(caps[:1])
    eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(1))[None]
    t = torch.tensor(m.config.likelihood_timesteps[:1])
    ctx1 = m.diffuser.add_length(ctx[:1], m.caption_lengths(ids))
    x0_hat = m.diffuser(m.diffusion.q_sample(x0, t, eps), t, torch.zeros_like(x0), m.diffuser.image_kv(ctx1))
    words = ~m.text.special_mask(ids)
    assert s[0].item() == pytest.approx(-((x0_hat - x0) ** 2).mean(-1)[words].mean().item(), rel=1e-4)


def test_selected_draft_is_the_highest_scoring_one(length_model, scenes, monkeypatch):
    m = length_model
    images = [s.image for s in scenes[:3]]
    out = m.generate(images, seed=2, mbr_candidates=4, select="likelihood")
    assert len(out.candidates) == 3 and all(len(c) == 4 for c in out.candidates)
    assert all(cap in cands for cap, cands in zip(out.captions, out.candidates))
    mbr = m.generate(images, seed=2, mbr_candidates=4, select="mbr")
    assert mbr.candidates == out.candidates  # the same drafts; only the choice differs
    # With a stand-in score (the number of characters), the longest draft of each photo is kept.
    monkeypatch.setattr(m, "likelihood_scores", lambda ctx, caps, gen: torch.tensor([float(len(c)) for c in caps]))
    longest = m.generate(images, seed=2, mbr_candidates=4, select="likelihood")
    assert longest.captions == [max(c, key=len) for c in out.candidates]


def test_likelihood_choice_is_deterministic_and_batch_independent(length_model, scenes):
    m = length_model
    images = [s.image for s in scenes[:4]]
    kw = dict(seed=5, mbr_candidates=4, select="likelihood")
    together = m.generate(images, batch_size=4, **kw).captions
    assert m.generate(images, batch_size=4, **kw).captions == together
    one_by_one = [m.generate([im], batch_size=1, **kw).captions[0] for im in images]
    assert one_by_one == together
    assert m.generate(images[::-1], batch_size=3, **kw).captions == together[::-1]


def test_drafts_cycle_over_the_most_likely_lengths(length_model, scenes):
    m = length_model
    ctx = m.diffuser.image_context(m.encode_images([scenes[0].image])).repeat_interleave(6, 0)
    every = m.predicted_lengths(ctx, 6, "top", 0)
    two = m.predicted_lengths(ctx, 6, "top", 2)
    assert len(set(every.tolist())) == 6
    assert two.tolist() == every[:2].tolist() * 3


def test_config_defaults_apply_and_bad_settings_are_refused(length_model, scenes):
    m = length_model
    old = (m.config.num_candidates, m.config.candidate_select)
    try:
        m.config.num_candidates, m.config.candidate_select = 3, "likelihood"
        out = m.generate([scenes[0].image], seed=0)
        assert len(out.candidates[0]) == 3
        assert out.captions == m.generate([scenes[0].image], seed=0, mbr_candidates=3, select="likelihood").captions
    finally:
        m.config.num_candidates, m.config.candidate_select = old
    with pytest.raises(ValueError, match="select"):
        m.generate([scenes[0].image], mbr_candidates=2, select="best")
    with pytest.raises(ValueError, match="candidate_select"):
        LaDiCConfig(candidate_select="best")
    for bad in ((1000,), (), "x", 1.5, [1.5], [True]):
        with pytest.raises(ValueError, match="likelihood_timesteps"):
            LaDiCConfig(likelihood_timesteps=bad)
    assert LaDiCConfig(likelihood_timesteps=100).likelihood_timesteps == (100,)
    assert LaDiCConfig(likelihood_timesteps=[30, 100]).likelihood_timesteps == (30, 100)
    with pytest.raises(ValueError, match="num_candidates"):
        LaDiCConfig(num_candidates=0)


def test_cli_select_errors_are_one_line(capsys):
    assert main(["caption", "--examples", "--select", "likelihood", "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--select" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["caption", "--examples", "--select", "best"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
