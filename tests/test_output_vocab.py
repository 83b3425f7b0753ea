"""A restricted output vocabulary (LM head over the training word pieces only): same argmax, saved with the
model, used in training; the AR baseline gets the same."""

import copy

import pytest
import torch

from ladic import LaDiC, preset
from ladic.baselines import ARCaptioner, load_model
from ladic.train import TrainConfig, train

FAST = dict(num_inference_steps=1, back_and_refine=False, clamp=False, guidance_scale=0.0, seed=0)


def _ids_of(model, captions: list[str]) -> torch.Tensor:
    return model.text.tokenize(captions)["input_ids"]


def test_text_space_maps_between_ids_and_output_space(tiny_model):
    model = copy.deepcopy(tiny_model)
    ids = _ids_of(model, ["a red circle on the left", "a blue square"])
    model.restrict_output_vocab(ids)
    vocab = model.text.lm_head.vocab_ids
    tok = model.text.tokenizer
    expected = set(ids.flatten().tolist()) | set(model.text.special_ids) | {tok.unk_token_id}
    assert vocab.tolist() == sorted(expected) and model.config.output_vocab_size == len(expected)
    x = torch.randn(2, model.config.max_length, model.text.dim)
    assert model.text.logits(x).shape == (2, model.config.max_length, len(expected))
    assert torch.equal(model.text.token_ids(model.text.output_index(ids)), ids)
    unknown = tok.convert_tokens_to_ids("zebra")
    assert model.text.token_ids(model.text.output_index(torch.tensor([unknown]))).item() == tok.unk_token_id
    full = tiny_model.text.logits(x)
    torch.testing.assert_close(model.text.logits(x), full[..., vocab])  # the same scores, fewer columns
    where = torch.zeros(2, model.config.max_length, dtype=torch.bool)
    where[0, 1:4], where[1, 6] = True, True
    torch.testing.assert_close(model.text.logits(x, where), full[where][:, vocab])  # the LM head at 4 positions only


def test_ladic_restricted_to_its_own_words_decodes_identically(tiny_model, scenes, tmp_path, monkeypatch):
    images = [s.image for s in scenes]
    model = copy.deepcopy(tiny_model)
    decoded = []
    to_text = model.text.ids_to_text
    monkeypatch.setattr(model.text, "ids_to_text", lambda ids, **kw: decoded.append(ids) or to_text(ids, **kw))
    before = model.caption(images, **FAST)
    monkeypatch.undo()
    model.restrict_output_vocab(torch.cat(decoded))  # every word piece the full head chose stays available
    assert model.caption(images, **FAST) == before
    model.save_pretrained(tmp_path / "m")
    back = LaDiC.from_pretrained(tmp_path / "m")
    assert back.config.output_vocab_size == model.config.output_vocab_size
    assert torch.equal(back.text.lm_head.vocab_ids, model.text.lm_head.vocab_ids)
    assert back.caption(images) == model.caption(images)  # default sampler (Back&Refine, guidance) included
    assert back.infill(images[0], "a ___ circle") == model.infill(images[0], "a ___ circle")
    assert back.infill(images[0], "a ___ circle").startswith("a ")


def test_ar_restricted_to_its_own_words_decodes_identically(scenes, tmp_path, monkeypatch):
    torch.manual_seed(0)
    ar = ARCaptioner(preset("tiny")).eval()
    with torch.no_grad():
        for p in ar.decoder.parameters():
            p.mul_(8.0) if p.ndim > 1 else None
    feats = ar.encode_images([s.image for s in scenes])
    decoded = []
    to_text = ar.text.ids_to_text
    monkeypatch.setattr(ar.text, "ids_to_text", lambda ids, **kw: decoded.append(ids.flatten()) or to_text(ids, **kw))
    greedy = ar.caption(feats)
    beams = ar.generate(feats, num_beams=3)
    monkeypatch.undo()
    ar.restrict_output_vocab(torch.cat(decoded))
    assert ar.caption(feats) == greedy
    assert ar.caption(feats, use_cache=False) == greedy
    # Beam search normalises over fewer words, so its ranking may change; it still only writes vocabulary words.
    decoded.clear()
    monkeypatch.setattr(ar.text, "ids_to_text", lambda ids, **kw: decoded.append(ids.flatten()) or to_text(ids, **kw))
    assert len(ar.generate(feats, num_beams=3).captions) == len(greedy)
    monkeypatch.undo()
    assert set(torch.cat(decoded).tolist()) <= set(ar.text.lm_head.vocab_ids.tolist())
    ar.save_pretrained(tmp_path / "ar")
    back = load_model(tmp_path / "ar")
    assert back.text.output_vocab_size == ar.text.output_vocab_size and back.caption(feats) == greedy


@pytest.mark.parametrize("model_type", ["ladic", "ar"])
def test_training_with_restrict_vocab(tmp_path, model_type):
    common = ["preset=tiny", "data=scenes", "num_scenes=32", "scene_size=32", "batch_size=8", "val_images=0",
              "eval_every=0", "progress=false", "lr=0.001", "restrict_vocab=true", f"model_type={model_type}"]
    final = train(TrainConfig.load(None, common + [f"out_dir={tmp_path / 'a'}", "max_steps=2"]))
    model = load_model(final)
    from ladic.data.scenes import make_scenes

    words = {c for s in make_scenes(32, seed=0, size=32, max_objects=1) for c in s.captions}
    ids = set(_ids_of(model, sorted(words)).flatten().tolist())
    vocab = set(model.text.lm_head.vocab_ids.tolist())
    assert ids <= vocab and len(vocab) < 100 and model.config.output_vocab_size == len(vocab)
    # Resuming (the checkpoint holds the vocabulary) and fine-tuning a restricted folder both work.
    more = train(TrainConfig.load(None, common + [f"out_dir={tmp_path / 'a'}", "max_steps=3"]), resume=True)
    assert torch.equal(load_model(more).text.lm_head.vocab_ids, model.text.lm_head.vocab_ids)
    tuned = train(TrainConfig.load(None, common[:-2] + [f"model_type={model_type}", f"out_dir={tmp_path / 'b'}",
                                                        "max_steps=1", f"init_from={final}"]))
    assert torch.equal(load_model(tuned).text.lm_head.vocab_ids, model.text.lm_head.vocab_ids)


def test_export_restricts_a_model_folder(tmp_path, tiny_model):
    """``ladic export <model folder> <out> --restrict-vocab <captions.json>``: the vocabulary of the train split."""
    import json
    import subprocess
    import sys

    data = {"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog runs."}, {"raw": "A brown dog!"}]},
        {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "A zebra."}]},
    ]}
    (tmp_path / "caps.json").write_text(json.dumps(data))
    tiny_model.save_pretrained(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "ladic.cli", "export", str(tmp_path / "m"), str(tmp_path / "r"),
                        "--restrict-vocab", str(tmp_path / "caps.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = load_model(tmp_path / "r")
    tok = model.text.tokenizer
    words = {tok.convert_ids_to_tokens(i) for i in model.text.lm_head.vocab_ids.tolist()}
    assert {"a", "dog", "runs", "brown"} <= words and "zebra" not in words and "[SEP]" in words
    assert model.config.output_vocab_size == len(words)
