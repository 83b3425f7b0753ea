import numpy as np
import pytest
import torch

from ladic.captioner import CheckpointError, LaDiC
from ladic.config import LaDiCConfig, preset
from ladic.image_io import ImageLoadError
from ladic.photo_seed import pixel_key


def test_shapes_and_dtypes(tiny_model, scenes):
    m = tiny_model
    feats = m.encode_images([s.image for s in scenes[:3]])
    assert feats.shape == (3, m.image_encoder.num_tokens, m.image_encoder.dim) and feats.dtype == torch.float32
    x0, ids = m.encode_captions(["a red circle", "a green square", "a blue star"])
    assert x0.shape == (3, m.config.max_length, m.text.dim) and ids.dtype == torch.long
    draws = m.draw_training_noise(3, torch.Generator().manual_seed(0))
    losses = m.training_losses(feats, x0, ids, draws)
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    assert losses["loss"].item() == pytest.approx(losses["latent"].item() + 0.2 * losses["caption"].item(), rel=1e-5)


def test_caption_returns_strings_and_is_deterministic(tiny_model, scenes):
    imgs = [s.image for s in scenes[:3]]
    a = tiny_model.caption(imgs, seed=7)
    b = tiny_model.caption(imgs, seed=7)
    c = tiny_model.caption(imgs, seed=8)
    assert len(a) == 3 and all(isinstance(x, str) for x in a)
    assert a == b and a != c
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert tiny_model.caption(imgs, generator=g1) == tiny_model.caption(imgs, generator=g2)


def test_accepts_paths_arrays_tensors(tiny_model, scenes, tmp_path):
    p = tmp_path / "scene.png"
    scenes[0].image.save(p)
    arr = np.array(scenes[0].image)
    inputs = [str(p), arr, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, scenes[0].image]
    feats = tiny_model.encode_images(inputs)
    assert all(torch.allclose(feats[0], f, atol=1e-5) for f in feats[1:])
    out = [tiny_model.caption(x, seed=0)[0] for x in inputs]
    assert len(set(out)) == 1


def test_bad_image_names_the_file(tiny_model, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        tiny_model.caption([str(bad)])


def test_back_and_refine_and_mbr_change_the_computation(tiny_model, scenes):
    imgs = [s.image for s in scenes[:4]]
    on = tiny_model.generate(imgs, seed=1, back_and_refine=True)
    off = tiny_model.generate(imgs, seed=1, back_and_refine=False)
    assert on.num_evaluations > off.num_evaluations
    assert on.captions != off.captions
    mbr = tiny_model.generate(imgs, seed=1, mbr_candidates=3)
    assert len(mbr.candidates) == 4 and all(len(c) == 3 for c in mbr.candidates)
    assert all(cap in cands for cap, cands in zip(mbr.captions, mbr.candidates))


def test_infilling_keeps_given_tokens(tiny_model, scenes):
    template = "a red ___ on the ___ of a ___"
    for seed in range(3):
        out = tiny_model.infill(scenes[0].image, template, seed=seed)
        words = out.split()
        assert len(words) >= 8, out
        assert [words[i] for i in (0, 1, 3, 4, 6, 7)] == ["a", "red", "on", "the", "of", "a"], out
    with pytest.raises(ValueError, match="blank"):
        tiny_model.infill(scenes[0].image, "   ")
    with pytest.raises(ValueError, match="blank"):
        tiny_model.infill(scenes[0].image, "no blanks here")


def test_a_blank_is_never_filled_with_nothing(tiny_model, scenes, monkeypatch):
    """A blank cannot take the word given next to it (it would vanish when repeats collapse), and infilled
    captions keep every blank's word: one word per blank, whatever the model prefers."""
    import torch

    tok = tiny_model.text.tokenizer
    a_id = tok.convert_tokens_to_ids("a")
    real_logits = tiny_model.text.logits

    def loves_a(x, positions=None):  # a model that wants "a" everywhere
        out = real_logits(x, positions).clone()
        out[..., a_id] += 1e4
        return out

    monkeypatch.setattr(tiny_model.text, "logits", loves_a)
    for template in ("two ___ standing on a ___ field", "a ___ ___ dog"):
        out = tiny_model.infill(scenes[0].image, template, seed=0)
        assert len(out.split()) == len(template.split()), (template, out)
        blanks = [w for w, t in zip(out.split(), template.split()) if t == "___"]
        for i, t in enumerate(template.split()):
            if t == "___":
                assert out.split()[i] not in {template.split()[i - 1], template.split()[(i + 1) % len(template.split())]} - {"___"}
        assert "a" in blanks  # the ban is local: "a" is fine away from a given "a"


def test_one_template_per_image(tiny_model, scenes):
    images = [s.image for s in scenes[:3]]
    templates = ["a ___ circle", "the ___ is on the left", "a small ___"]
    together = tiny_model.generate(images, template=templates, seed=0).captions
    alone = [tiny_model.infill(im, t, seed=0) for im, t in zip(images, templates)]
    assert together == alone
    assert together[1].startswith("the ") and together[1].endswith(" is on the left")
    with pytest.raises(ValueError, match="templates"):
        tiny_model.generate(images, template=templates[:2])


def test_infill_probe_picks_the_subject_noun_and_the_verb():
    from ladic.evaluate import infill_probe

    assert infill_probe("a black dog is running through the grass", "verb") == 4
    assert infill_probe("a black dog is running through the grass", "noun") == 2
    assert infill_probe("two girls are playing", "noun") == 1
    assert infill_probe("a dog in the snow", "verb") is None
    with pytest.raises(ValueError):
        infill_probe("a dog", "adjective")


def test_length_control(tiny_model, scenes):
    for n in (3, 6):
        out = tiny_model.generate([s.image for s in scenes[:2]], length=n, seed=0)
        ids = [tiny_model.text.tokenizer.encode(c, add_special_tokens=False) for c in out.captions]
        assert all(len(i) == n for i in ids), out.captions  # exactly n: no word repeats its left neighbour
        assert all(a != b for i in ids for a, b in zip(i, i[1:])), out.captions


def test_trajectory(tiny_model, scenes):
    out = tiny_model.generate([scenes[0].image], num_inference_steps=4, back_and_refine=False, return_trajectory=True)
    assert len(out.trajectories[0]) == 4 and out.trajectories[0][-1] == out.captions[0]


def test_save_load_round_trip(tiny_model, scenes, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = LaDiC.from_pretrained(tmp_path / "m")
    imgs = [s.image for s in scenes[:3]]
    assert loaded.caption(imgs, seed=5) == tiny_model.caption(imgs, seed=5)
    assert not list(tmp_path.glob("m/*.bin")) and not list(tmp_path.glob("m/*.pt"))


def test_corrupt_and_mismatched_checkpoints(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="no such local model folder"):
        LaDiC.from_pretrained(tmp_path / "nothing")
    tiny_model.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt weights"):
        LaDiC.from_pretrained(tmp_path / "c")
    tiny_model.save_pretrained(tmp_path / "d")
    cfg = (tmp_path / "d" / "config.json").read_text().replace('"hidden_size": 128', '"hidden_size": 64')
    (tmp_path / "d" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="do not match"):
        LaDiC.from_pretrained(tmp_path / "d")


def test_errors_skip_keeps_good_items(tiny_model, scenes, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tiny_model.generate([scenes[0].image, str(bad), scenes[1].image], seed=0, errors="skip")
    assert out.captions[1] is None and isinstance(out.captions[0], str) and isinstance(out.captions[2], str)
    assert list(out.errors) == [1] and "broken.jpg" in str(out.errors[1])
    assert out.captions[0] == tiny_model.generate([scenes[0].image, scenes[1].image], seed=0).captions[0]


def test_caption_accepts_feature_and_batch_tensors(tiny_model, scenes):
    imgs = [s.image for s in scenes[:3]]
    feats = tiny_model.encode_images(imgs)
    keys = [pixel_key(im) for im in imgs]  # tokens carry no pixels: pass the images' keys for the same noise
    assert tiny_model.caption(feats, seed=2, keys=keys) == tiny_model.caption(imgs, seed=2)
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs])
    assert len(tiny_model.caption(batch, seed=2)) == 3


def test_config_rejects_unknown_timestep_sampling():
    with pytest.raises(ValueError, match="timestep_sampling"):
        preset("tiny", timestep_sampling="beta")
    with pytest.raises(ValueError, match="logit_normal.*git show 790f24f"):
        preset("tiny", timestep_sampling="logit_normal")
    cfg = preset("tiny", timestep_sampling="few_step")
    assert LaDiCConfig.from_dict(cfg.to_dict()) == cfg


def test_no_dangling_end_puts_a_content_word_before_sep(tiny_model, scenes, monkeypatch):
    from ladic.data.captions import ends_on_function_word

    m = tiny_model
    tok = m.text.tokenizer
    fixed, x0, given = m.length_template(1, 5)
    words = tok.encode("a dog runs on a", add_special_tokens=False)
    logits = torch.zeros(1, m.config.max_length, len(tok))
    for j, w in enumerate(words, start=1):
        logits[0, j, w] = 2.0
    logits[0, 5, tok.convert_tokens_to_ids("ball")] = 1.0  # the runner-up at the last slot
    monkeypatch.setattr(m.text, "logits", lambda x, positions=None: m.text.to_output_space(logits)[positions])
    assert m.text.ids_to_text(m._decode_ids(x0, ~fixed, given)) == ["a dog runs on a"]
    assert m.text.ids_to_text(m._decode_ids(x0, ~fixed, given, no_dangling_end=True)) == ["a dog runs on ball"]
    # An asked length: a word that repeats its left neighbour gives way to its runner-up instead of vanishing.
    logits[0, 3, words[1]] = 3.0  # "a dog dog on a"
    assert m.text.ids_to_text(m._decode_ids(x0, ~fixed, given)) == ["a dog on a"]
    assert m.text.ids_to_text(m._decode_ids(x0, ~fixed, given, no_repeat=True)) == ["a dog runs on a"]
    monkeypatch.undo()
    # Sampling end to end: a length-controlled caption never ends on a function word.
    images = [s.image for s in scenes]
    for n in (3, 4, 6):
        assert not any(map(ends_on_function_word, m.caption(images, length=n, seed=0, num_inference_steps=2)))


def test_an_infill_blank_is_never_punctuation(tiny_model):
    x0 = torch.randn(1, tiny_model.config.max_length, tiny_model.text.dim)
    fixed, _, given = tiny_model.infill_template("a dog on a ___")
    logits = tiny_model._free_logits(x0, ~fixed, given, words_only=True)
    punct = tiny_model.text.to_output_space(tiny_model.text.punctuation)
    assert punct.sum() > 10 and torch.isinf(logits[:, punct]).all()
    ids = tiny_model.text.tokenizer.convert_tokens_to_ids([",", ".", "?", "!"])
    assert tiny_model.text.punctuation[ids].all() and not tiny_model.text.punctuation[
        tiny_model.text.tokenizer.convert_tokens_to_ids(["dog", "2"])].any()
    for cap in tiny_model.generate(x0.new_zeros(3, tiny_model.image_encoder.num_tokens, tiny_model.image_encoder.dim)
                                   + torch.randn(3, 1, 1), template="a dog on a ___", seed=0).captions:
        assert cap.startswith("a dog on a ") and cap.split()[-1].isalnum(), cap
