"""Issue 28's diffuser input conditioning, its training options, and loading folders saved before them."""

import json
import math

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


def test_latent_loss_l2_is_the_unsquared_token_norm():
    torch.manual_seed(0)
    mse, l2 = LaDiC(preset("tiny")), LaDiC(preset("tiny", latent_loss="l2"))
    x0, err = torch.randn(3, 12, mse.text.dim), torch.randn(3, 12, mse.text.dim)
    assert torch.allclose(mse._latent_error(x0 + err, x0), err.pow(2).mean(-1))
    assert torch.allclose(l2._latent_error(x0 + err, x0), err.norm(dim=-1))
    assert float(l2._latent_error(x0 + err, x0).mean()) == pytest.approx(math.sqrt(mse.text.dim), rel=0.1)
    with pytest.raises(ValueError, match="latent_loss"):
        preset("tiny", latent_loss="l1")


def test_special_tokens_can_take_the_period_latent():
    zero, period = LaDiC(preset("tiny")), LaDiC(preset("tiny", special_token_latent="period"))
    x_zero, ids = zero.encode_captions(["a dog runs"])
    x_period, _ = period.encode_captions(["a dog runs"])
    special = zero.text.special_mask(ids)[0]
    assert torch.equal(x_zero[0, ~special], x_period[0, ~special])
    assert x_zero[0, special].abs().max() == 0
    dot, _ = period.encode_captions(["."])
    assert torch.allclose(x_period[0, special], dot[0, 1].expand(int(special.sum()), -1), atol=1e-5)
    assert float(x_period[0, special].norm(dim=-1).min()) > 1


def test_conditional_self_conditioning_feeds_the_unguided_estimate():
    from ladic.diffusion import GaussianDiffusion
    from ladic.sampling import ddim_sample_loop

    seen = []

    def denoise(x, t, sc):
        seen.append(sc.clone())
        return torch.full_like(x, 2.0), torch.full_like(x, 3.0)  # (guided, conditional)

    res = ddim_sample_loop(denoise, GaussianDiffusion(noise_factor=4.0), (1, 4, 2), num_inference_steps=3)
    assert torch.equal(res.x0, torch.full((1, 4, 2), 2.0))
    assert seen[0].abs().max() == 0 and all(torch.equal(sc, torch.full((1, 4, 2), 3.0)) for sc in seen[1:])


def test_guided_denoiser_returns_the_conditional_branch_on_request():
    from ladic.sampling import guided_denoiser

    torch.manual_seed(0)
    model = LaDiC(preset("tiny")).eval()
    ctx = model.diffuser.image_context(torch.randn(2, model.image_encoder.num_tokens, model.image_encoder.dim))
    x, sc, t = torch.randn(2, 12, model.text.dim), torch.zeros(2, 12, model.text.dim), torch.tensor([999, 999])
    with torch.no_grad():
        guided, cond = guided_denoiser(model.diffuser, ctx, 1.0, "conditional")(x, t, sc)
        assert torch.allclose(guided, guided_denoiser(model.diffuser, ctx, 1.0)(x, t, sc), atol=1e-5)
        assert torch.allclose(cond, guided_denoiser(model.diffuser, ctx, 0.0)(x, t, sc), atol=1e-5)


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
    assert parse_sampling_overrides(["clamp=false", "self_cond_source=conditional", "sampling_noise_factor=1"]) == {
        "clamp": False, "self_cond_source": "conditional", "sampling_noise_factor": 1}
    for bad, match in (("hidden_size=8", "not a sampling setting"), ("clamp", "KEY=VALUE")):
        with pytest.raises(ValueError, match=match):
            parse_sampling_overrides([bad])


def test_commit_rounds_commit_the_surest_words_and_keep_the_length():
    torch.manual_seed(0)
    model = LaDiC(preset("tiny", length_conditioning=True, commit_rounds=3)).eval()
    feats = torch.randn(2, model.image_encoder.num_tokens, model.image_encoder.dim)
    one = model.generate(feats, length=6, seed=0, num_inference_steps=1, back_and_refine=False)
    model.config = model.config.replace(commit_rounds=1)
    base = model.generate(feats, length=6, seed=0, num_inference_steps=1, back_and_refine=False)
    assert one.num_evaluations == 3 * base.num_evaluations
    assert all(len(model.text.tokenizer.tokenize(c)) == 6 for c in one.captions)
    x0 = torch.randn(2, 12, model.text.dim)
    fixed, x_fixed, given = model.length_template(2, 6)
    free = ~fixed
    f1, x1, g1 = model._commit(x0, free, fixed, x_fixed, given, 1 / 3, False, True)
    assert ((f1 & free).sum(1) == 2).all() and ((g1 >= 0) == f1).all()
    conf = model._confidence(x0).masked_fill(fixed, float("-inf"))
    assert torch.equal((f1 & free), conf >= conf.topk(2, dim=1).values[:, -1:])
    f2, _, _ = model._commit(x0, free, f1, x1, g1, 2 / 3, False, True)
    assert ((f2 & free).sum(1) == 4).all() and (f2 >= f1).all()


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
