import torch

from ladic.diffusion import GaussianDiffusion
from ladic.sampling import ddim_sample_loop, guided_denoiser, lowest_confidence, mbr_select, token_f1


def test_lowest_confidence_selects_exact_positions():
    conf = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2], [0.0, 1.0, 0.2, 0.9, 0.4, 0.6]])
    mask = lowest_confidence(conf, keep=0.5)
    assert mask.tolist() == [[False, True, False, True, False, True], [True, False, True, False, True, False]]
    protected = torch.zeros_like(mask)
    protected[0, 1] = True
    mask = lowest_confidence(conf, keep=0.5, protected=protected)
    assert not mask[0, 1] and mask[0].sum() == 3 and mask[0, 2]


def test_back_and_refine_renoises_lowest_confidence_and_restarts():
    d = GaussianDiffusion(1000)
    b, length, dim = 2, 8, 4
    conf = torch.rand(b, length, generator=torch.Generator().manual_seed(1))
    seen_t = []

    def denoise(x, t, sc):
        seen_t.append(int(t[0]))
        return torch.zeros_like(x) + 0.5

    res = ddim_sample_loop(denoise, d, (b, length, dim), num_inference_steps=5, back_and_refine=True,
                           confidence_fn=lambda x0: conf, generator=torch.Generator().manual_seed(0))
    expected = lowest_confidence(conf, 0.5)
    assert torch.equal(res.renoised, expected)
    assert res.renoised.sum(1).tolist() == [4, 4]
    # back at t = 499 <= T/2, then a fresh 5-step denoising from t = T - 1
    assert seen_t == [999, 749, 500, 999, 749, 500, 250, 0] or seen_t == [999, 749, 499, 999, 749, 499, 250, 0]
    assert res.num_evaluations == 8
    off = ddim_sample_loop(denoise, d, (b, length, dim), num_inference_steps=5, back_and_refine=False)
    assert off.renoised is None and off.num_evaluations == 5


def test_fixed_positions_are_reinserted_every_step():
    d = GaussianDiffusion(1000)
    fixed = torch.zeros(1, 6, dtype=torch.bool)
    fixed[0, [0, 2, 5]] = True
    given = torch.randn(1, 6, 3)
    seen = []

    def denoise(x, t, sc):
        seen.append(sc.clone())
        return torch.randn_like(x)

    res = ddim_sample_loop(denoise, d, (1, 6, 3), num_inference_steps=4, fixed_x0=given, fixed_mask=fixed)
    assert torch.equal(res.x0[fixed], given[fixed])
    for sc in seen[1:]:  # the self-conditioning estimate carries the given latents too
        assert torch.equal(sc[fixed], given[fixed])


def test_cfg_zero_equals_conditional_branch(tiny_model):
    diffuser = tiny_model.diffuser
    feats = torch.randn(2, tiny_model.image_encoder.num_tokens, tiny_model.image_encoder.dim)
    ctx = diffuser.image_context(feats)
    x = torch.randn(2, tiny_model.config.max_length, tiny_model.text.dim)
    t = torch.tensor([700, 700])
    sc = torch.zeros_like(x)
    with torch.no_grad():
        cond = diffuser(x, t, sc, diffuser.image_kv(ctx))
        uncond = diffuser(x, t, sc, diffuser.image_kv(diffuser.null_context(2)))
        assert torch.allclose(guided_denoiser(diffuser, ctx, 0.0)(x, t, sc), cond, atol=1e-5)
        w = 1.5
        assert torch.allclose(guided_denoiser(diffuser, ctx, w)(x, t, sc), (1 + w) * cond - w * uncond, atol=1e-4)


def test_mbr_picks_consensus():
    cands = ["a dog runs on grass", "a dog runs on the grass", "a cat sleeps", "a dog on the grass"]
    assert mbr_select(cands) == 1
    assert mbr_select(cands, "bleu") != 2  # never the outlier
    assert mbr_select(["only one"]) == 0
    assert token_f1("a b c".split(), "a b c".split()) == 1.0
    assert token_f1("a b".split(), "c d".split()) == 0.0


def test_clamp_is_applied_before_every_update_but_not_to_the_result():
    d = GaussianDiffusion(1000)
    calls = []

    def clamp(x0):
        calls.append(1)
        return torch.zeros_like(x0)

    res = ddim_sample_loop(lambda x, t, sc: torch.ones_like(x), d, (1, 4, 2), num_inference_steps=5, clamp_fn=clamp)
    assert len(calls) == 4 and torch.equal(res.x0, torch.ones(1, 4, 2))


def test_clamp_option_changes_captions(tiny_model, scenes):
    imgs = [s.image for s in scenes[:3]]
    a = tiny_model.generate(imgs, seed=0, clamp=True, back_and_refine=False)
    b = tiny_model.generate(imgs, seed=0, clamp=False, back_and_refine=False)
    assert a.num_evaluations == b.num_evaluations and a.captions != b.captions


def test_refine_noise_initial_makes_the_result_a_function_of_x_T():
    """Back&Refine with refine_noise="initial" renoises from x_T itself: reseeding the generator after the first
    draw changes nothing; with "fresh" (the paper's) it changes the result."""
    d = GaussianDiffusion(1000)
    shape = (2, 6, 4)
    conf = torch.rand(2, 6, generator=torch.Generator().manual_seed(1))

    def run(refine_noise: str, reseed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)

        def denoise(x, t, sc):
            if int(t[0]) == 999:
                g.manual_seed(reseed)  # every draw after x_T comes from another stream
            return torch.tanh(x) * 0.5 + 0.1 * sc

        return ddim_sample_loop(denoise, d, shape, num_inference_steps=4, back_and_refine=True, refine_noise=refine_noise,
                                confidence_fn=lambda x0: conf, generator=g).x0

    torch.testing.assert_close(run("initial", 1), run("initial", 2))
    assert not torch.allclose(run("fresh", 1), run("fresh", 2))
    import pytest

    with pytest.raises(ValueError, match="refine_noise"):
        run("other", 1)
