import torch
from transformers import AutoModel

from ladic.text_space import TextSpace, resolve_text_backbone


def test_split_equals_full_bert(tiny_model):
    ts: TextSpace = tiny_model.text
    tok = ts.tokenize(["a man rides a horse on the beach", "two dogs"])
    bert = AutoModel.from_pretrained(resolve_text_backbone("minilm-l6"), attn_implementation="eager").eval()
    with torch.no_grad():
        full = bert(**tok).last_hidden_state
        split = ts.decode_hidden(ts.encode_hidden(tok["input_ids"], tok["attention_mask"]), tok["attention_mask"])
    assert split.shape == full.shape == (2, ts.max_length, 384)
    assert torch.allclose(split, full, atol=1e-4)


def test_frozen_halves_trainable_head(tiny_model):
    ts = tiny_model.text
    assert not any(p.requires_grad for p in ts.encoder_layers.parameters())
    assert not any(p.requires_grad for p in ts.decoder_layers.parameters())
    assert not ts.embeddings.word_embeddings.weight.requires_grad
    assert ts.lm_head.dense.weight.requires_grad and ts.lm_head.bias.requires_grad
    assert ts.lm_head.word_embeddings.weight is ts.embeddings.word_embeddings.weight  # tied


def test_zero_reassignment_and_pad_removal(tiny_model):
    ts = tiny_model.text
    x0, ids = ts.encode(["a red circle", "a blue square on the left"])
    assert x0.shape == (2, ts.max_length, ts.dim) and x0.dtype == torch.float32
    special = ts.special_mask(ids)
    assert special[0, 0] and special[0, 4] and special[0, -1]  # [CLS] ... [SEP] [PAD]...
    assert torch.all(x0[special] == 0)
    assert torch.all(x0[~special].abs().sum(-1) > 0)
    # ids with [PAD]s erased give back the captions, with variable length
    assert ts.ids_to_text(ids) == ["a red circle", "a blue square on the left"]


def test_latent_stats_normalise(tiny_model):
    ts = TextSpace("minilm-l6", 3, 12)
    caps = ["a red circle", "a dog runs on the grass", "two people walk", "a blue square on the left"] * 4
    ts.fit_latent_stats(caps)
    x0, ids = ts.encode(caps)
    real = x0[~ts.special_mask(ids)]
    assert torch.allclose(real.mean(0), torch.zeros(ts.dim), atol=1e-3)
    assert torch.allclose(real.std(0, unbiased=False), torch.ones(ts.dim), atol=1e-2)
    # denorm inverts norm
    h = torch.randn(3, 4, ts.dim)
    assert torch.allclose(ts.denorm(ts.norm(h)), h, atol=1e-5)


def test_frozen_halves_stay_in_eval_mode(tiny_model):
    ts = tiny_model.text
    ts.train()
    try:
        assert ts.lm_head.training
        assert not any(m.training for m in ts.decoder_layers.modules())
        assert not any(m.training for m in ts.encoder_layers.modules())
        x = torch.randn(2, 5, ts.dim)
        assert torch.equal(ts.logits(x), ts.logits(x))  # no dropout
    finally:
        ts.eval()
