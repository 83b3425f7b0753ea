"""Issue 28's diffuser input conditioning, its training options, and loading folders saved before them."""

import json

import pytest
import torch

from ladic import LaDiC, preset
from ladic.captioner import default_model_path, full_model_path
from ladic.config import LaDiCConfig
from ladic.diffuser import input_scale


def test_input_scale_makes_x_t_unit_variance():
    cfg = preset("tiny", noise_factor=4.0)
    c_in = input_scale(cfg)
    assert c_in.shape == (1000,)
    assert c_in[0] == pytest.approx(1.0, abs=1e-3) and c_in[-1] == pytest.approx(0.25, abs=1e-3)
    model = LaDiC(cfg)
    x0 = torch.randn(4000, 1, 8)  # unit-variance latents
    for t in (0, 500, 999):
        tt = torch.full((4000,), t)
        x_t = model.diffusion.q_sample(x0, tt, torch.randn_like(x0))
        assert float((x_t * c_in[t]).std()) == pytest.approx(1.0, rel=0.05)
    assert torch.equal(input_scale(cfg.replace(input_scaling="none")), torch.ones(1000))
    with pytest.raises(ValueError, match="input_scaling"):
        cfg.replace(input_scaling="edm")


def test_position_embedding_init_std():
    new, old = LaDiC(preset("tiny")), LaDiC(preset("tiny", position_init_std=0.02))
    assert float(new.diffuser.pos_emb.detach().std()) == pytest.approx(0.5, rel=0.05)
    assert torch.allclose(new.diffuser.pos_emb * 0.04, old.diffuser.pos_emb)  # the same draw, scaled
    assert torch.equal(new.diffuser.image_pos, old.diffuser.image_pos)


def test_the_scale_is_applied_to_x_t_only():
    """With input_scaling "none" and x_t pre-multiplied by c_in the diffuser gives the same output."""
    torch.manual_seed(0)
    scaled = LaDiC(preset("tiny", noise_factor=4.0)).eval()
    plain = LaDiC(preset("tiny", noise_factor=4.0, input_scaling="none")).eval()
    plain.diffuser.load_state_dict(scaled.diffuser.state_dict())
    x, sc = torch.randn(2, 12, scaled.text.dim) * 4, torch.randn(2, 12, scaled.text.dim)
    t = torch.tensor([999, 10])
    kv = scaled.diffuser.image_kv(scaled.diffuser.null_context(2))
    c = scaled.diffuser.c_in[t][:, None, None]
    assert torch.allclose(scaled.diffuser(x, t, sc, kv), plain.diffuser(x * c, t, sc, kv), atol=1e-5)


def test_new_configs_default_to_the_fix_old_folders_load_as_trained():
    new = LaDiCConfig()
    assert new.input_scaling == "unit_variance" and new.position_init_std == 0.5
    assert new.sampling_noise_factor == 1.0 and new.clamp and new.clamp_mask_pad
    for path in (default_model_path(), full_model_path()):
        saved = json.loads((path / "config.json").read_text())["config"]
        assert "input_scaling" not in saved  # written before issue 28
        cfg = LaDiCConfig.from_dict(saved)
        assert cfg.input_scaling == "none" and cfg.position_init_std == 0.02
        assert cfg.sampling_noise_factor == 0.0 and not cfg.clamp_mask_pad and cfg.clamp == saved["clamp"]
    assert LaDiCConfig.from_dict({"input_scaling": "unit_variance"}).input_scaling == "unit_variance"


def test_save_and_load_keep_the_input_conditioning(tmp_path):
    for scaling in ("unit_variance", "none"):
        model = LaDiC(preset("tiny", input_scaling=scaling))
        model.save_pretrained(tmp_path / scaling)
        loaded = LaDiC.from_pretrained(tmp_path / scaling)
        assert loaded.config.input_scaling == scaling
        assert torch.equal(loaded.diffuser.c_in, model.diffuser.c_in)


def test_clamping_encodes_like_training_with_pad_masked():
    model = LaDiC(preset("tiny"))
    x0, _ = model.encode_captions(["a dog runs on the grass"])
    logits_ids = model.text.token_ids(model.text.logits(x0).argmax(-1))
    masked = model.text.latents_from_ids(logits_ids, (logits_ids != model.text.tokenizer.pad_token_id).long())
    assert torch.allclose(model._clamp(x0), masked)
    model.config = model.config.replace(clamp_mask_pad=False)
    assert torch.allclose(model._clamp(x0), model.text.latents_from_ids(logits_ids, torch.ones_like(logits_ids)))


def test_sampling_noise_factor_and_eval_overrides():
    from ladic.evaluate import parse_sampling_overrides

    model = LaDiC(preset("tiny", noise_factor=4.0, sampling_noise_factor=0.0))
    assert model._sampling_diffusion() is model.diffusion
    model.config = model.config.replace(sampling_noise_factor=1.0)
    assert model._sampling_diffusion().noise_factor == 1.0
    assert parse_sampling_overrides(["clamp=false", "refine_noise=initial", "sampling_noise_factor=1"]) == {
        "clamp": False, "refine_noise": "initial", "sampling_noise_factor": 1}
    for bad, match in (("hidden_size=8", "not a sampling setting"), ("clamp", "KEY=VALUE")):
        with pytest.raises(ValueError, match=match):
            parse_sampling_overrides([bad])


def test_runs_inherit_the_input_conditioning_of_their_init_from_folder(tmp_path):
    from ladic.train import TrainConfig, checkpoint_model_config, model_config

    assert model_config(TrainConfig(preset="tiny")).input_scaling == "unit_variance"
    tc = TrainConfig(preset="tiny", init_from=str(full_model_path()))  # saved before issue 28
    assert model_config(tc).input_scaling == "none"
    tc.model = {"input_scaling": "unit_variance"}
    assert model_config(tc).input_scaling == "unit_variance"
    # A training checkpoint without model_config.json was written before issue 28.
    old = checkpoint_model_config(tmp_path, TrainConfig(preset="tiny"))
    assert old.input_scaling == "none" and old.clamp_mask_pad is False
    (tmp_path / "model_config.json").write_text(json.dumps(preset("tiny", hidden_size=64, num_heads=2).to_dict()))
    assert checkpoint_model_config(tmp_path, TrainConfig(preset="tiny")).hidden_size == 64
