"""The autoregressive baseline (ladic.baselines.ar): sizes, KV cache, search, persistence, training."""

import json

import pytest
import torch

from ladic import LaDiC, preset
from ladic.baselines import ARCaptioner, ARCaptionOutput, load_model
from ladic.captioner import CheckpointError


@pytest.fixture(scope="module")
def ar():
    torch.manual_seed(0)
    model = ARCaptioner(preset("tiny")).eval()
    # A random decoder puts almost all mass on a few tokens; sharpen the image dependence a little so that
    # beams and images actually differ.
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(8.0) if p.ndim > 1 else None
    return model


@pytest.fixture(scope="module")
def feats(ar, scenes):
    return ar.encode_images([s.image for s in scenes])


def _trainable(model, modules):
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_parameter_count_within_10_percent_of_ladic(name):
    cfg = preset(name)
    ar = ARCaptioner(cfg)
    ladic = LaDiC(cfg, image_encoder=ar.image_encoder)  # the same encoder (shared, not counted)
    n_ladic = _trainable(ladic, [ladic.diffuser, ladic.text.lm_head])
    n_ar = ar.num_trainable_parameters()
    assert n_ar == _trainable(ar, [ar.decoder, ar.text.lm_head])
    assert abs(n_ar / n_ladic - 1) < 0.10, (n_ar, n_ladic)
    # Same sizes: hidden, depth, heads, FFN, tokenizer and encoder.
    assert len(ar.decoder.blocks) == cfg.num_layers and ar.decoder.norm_out.normalized_shape == (cfg.hidden_size,)
    assert ar.decoder.blocks[0].mlp[0].out_features == cfg.ffn_size
    assert ar.decoder.blocks[0].self_attn.num_heads == cfg.num_heads
    assert ar.text.tokenizer.vocab_size == ladic.text.tokenizer.vocab_size


def test_shapes_and_training_loss(ar, feats, scenes):
    tok = ar.text.tokenize(["a red circle", "a green square on the left", "a blue star"])
    ids = tok["input_ids"]
    assert ids.shape == (3, ar.config.max_length)
    kv = ar.decoder.image_kv(feats[:3])
    logits, cache = ar.logits(kv, ids)
    assert logits.shape == (3, ar.config.max_length, len(ar.text.tokenizer))
    assert len(cache) == ar.config.num_layers and cache[0][0].shape[2] == ar.config.max_length
    assert ar.draw_training_noise(3, torch.Generator().manual_seed(0)) == {}
    losses = ar.training_losses(feats[:3], ids)
    assert set(losses) == {"loss", "latent", "caption"} and losses["loss"].ndim == 0
    assert torch.isfinite(losses["loss"]) and losses["latent"].item() == 0.0
    # [PAD] targets are ignored: the loss is the mean over real targets only.
    targets = ids[:, 1:]
    real = targets != ar.pad_id
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][real], targets[real])
    assert losses["loss"].item() == pytest.approx(manual.item(), rel=1e-5)
    # The trainer's forward: image tokens (pixels for the trainable tiny encoder), unused hidden states, ids.
    pixels = ar.image_encoder.preprocess([s.image for s in scenes[:3]])
    out = ar(pixels, torch.zeros(3, ar.config.max_length, ar.text.dim), ids, {})
    assert torch.isfinite(out["loss"])


def test_causal_prefix_does_not_see_the_future(ar, feats):
    kv = ar.decoder.image_kv(feats[:2])
    ids = ar.text.tokenize(["a red circle", "a blue star"])["input_ids"]
    full, _ = ar.logits(kv, ids)
    ids2 = ids.clone()
    ids2[:, 4:] = 1000  # change the future
    part, _ = ar.logits(kv, ids2)
    torch.testing.assert_close(full[:, :4], part[:, :4])


def test_cache_matches_full_recompute(ar, feats):
    kv = ar.decoder.image_kv(feats[:3])
    ids = ar.text.tokenize(["a red circle", "a green square on the left", "a blue star"])["input_ids"]
    full, _ = ar.logits(kv, ids)
    # one token at a time, then a chunk after a cached prefix
    cache, steps = None, []
    for t in range(6):
        lg, cache = ar.logits(kv, ids[:, t : t + 1], cache)
        steps.append(lg)
    lg, cache = ar.logits(kv, ids[:, 6:], cache)
    steps.append(lg)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        ar.logits(kv, ids[:, :1], cache)


def test_cached_greedy_equals_uncached(ar, feats):
    fast = ar.generate(feats, use_cache=True)
    slow = ar.generate(feats, use_cache=False)
    assert isinstance(fast, ARCaptionOutput)
    assert fast.captions == slow.captions
    assert fast.scores == pytest.approx(slow.scores, abs=1e-4)
    kv_ids_fast = ar._greedy(feats, ar.config.max_length - 1, True, 1.0)[0]
    kv_ids_slow = ar._greedy(feats, ar.config.max_length - 1, False, 1.0)[0]
    assert torch.equal(kv_ids_fast, kv_ids_slow)
    # Beam search with and without the cache (the cache is reordered with the beams).
    b_fast = ar._beam(feats, ar.config.max_length - 1, 3, True, 1.0)[2]
    b_slow = ar._beam(feats, ar.config.max_length - 1, 3, False, 1.0)[2]
    assert torch.equal(b_fast, b_slow)


def test_beam_one_is_greedy_and_beams_score_higher(ar, feats):
    steps = ar.config.max_length - 1
    g_ids, g_score, *_ = ar._greedy(feats, steps, True, 1.0)
    b_ids, b_score, *_ = ar._beam(feats, steps, 1, True, 1.0)
    assert torch.equal(g_ids, b_ids)
    torch.testing.assert_close(g_score, b_score)
    assert ar.generate(feats, num_beams=1).captions == ar.generate(feats).captions
    out = ar.generate(feats, num_beams=4)
    greedy = ar.generate(feats)
    assert len(out.candidates) == len(feats) and all(len(c) == 4 for c in out.candidates)
    assert all(c[0] == cap for c, cap in zip(out.candidates, out.captions))
    assert all(s == sorted(s, reverse=True) for s in out.candidate_scores)
    assert all(b >= g - 1e-5 for b, g in zip(out.scores, greedy.scores))
    # Scores are the model's length-normalised log-likelihood of the returned sequences.
    b_ids4, b_score4, *_ = ar._beam(feats, steps, 4, True, 1.0)
    torch.testing.assert_close(ar.sequence_scores(feats, b_ids4), b_score4, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ar.sequence_scores(feats, g_ids), g_score, atol=1e-4, rtol=1e-4)


def test_generate_inputs_and_limits(ar, scenes):
    imgs = [s.image for s in scenes[:3]]
    a = ar.caption(imgs, seed=1, num_inference_steps=5)  # LaDiC-only arguments are ignored
    assert len(a) == 3 and all(isinstance(x, str) for x in a)
    assert ar.caption(imgs[0]) == a[:1]
    assert ar.caption(ar.encode_images(imgs)) == a
    assert ar.generate(imgs, batch_size=2).captions == a
    short = ar.generate(imgs, max_new_tokens=2)
    assert all(len(c.split()) <= 2 for c in short.captions)  # at most 2 word pieces generated
    with pytest.raises(ValueError):
        ar.generate(imgs, max_new_tokens=ar.config.max_length)
    with pytest.raises(ValueError):
        ar.generate(imgs, num_beams=0)


def test_save_load_round_trip(ar, feats, tmp_path, tiny_model):
    ar.save_pretrained(tmp_path / "ar")
    meta = json.loads((tmp_path / "ar" / "config.json").read_text())
    assert meta["model_type"] == "ar"
    back = ARCaptioner.from_pretrained(tmp_path / "ar")
    assert back.generate(feats, num_beams=3).captions == ar.generate(feats, num_beams=3).captions
    assert back.caption(feats) == ar.caption(feats)
    loaded = load_model(tmp_path / "ar")
    assert isinstance(loaded, ARCaptioner)
    tiny_model.save_pretrained(tmp_path / "ladic")
    assert isinstance(load_model(tmp_path / "ladic"), LaDiC)
    with pytest.raises(CheckpointError, match="model_type"):
        ARCaptioner.from_pretrained(tmp_path / "ladic")
    with pytest.raises(CheckpointError):
        LaDiC.from_pretrained(tmp_path / "ar")
    sd = ar.trainable_state_dict()
    sd.pop(next(iter(sd)))
    with pytest.raises(CheckpointError, match="missing"):
        ar.load_trainable_state_dict(sd)


def test_train_with_model_type_ar(tmp_path, scenes):
    from ladic.train import TrainConfig, train

    tc = TrainConfig(
        preset="tiny", data="scenes", model_type="ar", num_scenes=48, scene_size=32, val_images=4,
        out_dir=str(tmp_path / "run"), batch_size=16, max_steps=40, lr=2e-3, warmup_ratio=0.1,
        save_every=1000, eval_every=0, log_every=1, progress=False, ema_decay=0.9,
    )
    final = train(tc)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    model = load_model(final)
    assert isinstance(model, ARCaptioner)
    caps = model.caption([s.image for s in scenes[:2]])
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    with pytest.raises(ValueError, match="model_type"):
        train(TrainConfig(preset="tiny", data="scenes", model_type="gru", out_dir=str(tmp_path / "bad")))


def test_scores_per_image_candidates_and_reranking(ar, feats, scenes):
    """``sequence_scores(repeats=k)`` shares each image's keys/values across its k rows and equals beam search's
    own scores; ``LaDiC.generate(rerank_with=ar)`` returns, per image, the candidate the AR scores highest."""
    _, _, beams, beam_scores, _ = ar._beam(feats, ar.config.max_length - 1, 3, True, 1.0)
    scores = ar.sequence_scores(feats, beams.flatten(0, 1), repeats=3)
    torch.testing.assert_close(scores.view(-1, 3), beam_scores, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="sequences"):
        ar.sequence_scores(feats, beams.flatten(0, 1), repeats=2)

    torch.manual_seed(0)
    model = LaDiC(preset("tiny"), image_encoder=ar.image_encoder).eval()
    imgs = [s.image for s in scenes]
    plain = model.generate(imgs, mbr_candidates=4, num_inference_steps=2, seed=0)
    out = model.generate(imgs, mbr_candidates=4, num_inference_steps=2, seed=0, rerank_with=ar)
    assert out.candidates == plain.candidates  # the same draws; only the choice differs
    flat = [c for group in out.candidates for c in group]
    best = ar.score_captions(feats, flat).view(-1, 4).argmax(1).tolist()
    assert out.captions == [group[j] for group, j in zip(out.candidates, best)]
    with pytest.raises(ValueError, match="multiple"):
        ar.score_captions(feats, flat[:-1])
    other = type("Other", (), {"image_encoder": type("Enc", (), {"name": "another-encoder"})()})()
    with pytest.raises(ValueError, match="another-encoder"):
        model.generate(imgs, mbr_candidates=2, rerank_with=other)
