"""Self-critical policy gradient on CIDEr-D for the one-step student (ladic.reward)."""

import pytest
import torch

from ladic import LaDiC, preset
from ladic.photo_seed import photo_generator
from ladic.reward import CiderReward, self_critical_loss
from ladic.sampling import gaussian_noise


class Recorder(CiderReward):
    """A reward that remembers what it scored and prefers captions holding ``word``."""

    def __init__(self, references, word: str, samples: int = 4) -> None:
        super().__init__(references, weight=1.0, samples=samples)
        self.word, self.seen = word, []

    def __call__(self, captions, image_index):
        self.seen.append((list(captions), list(image_index)))
        return torch.tensor([float(self.word in c.split()) for c in captions])


def test_cider_reward_scores_against_the_photos_own_references():
    refs = [["a dog runs on the grass", "a brown dog running on grass"], ["two men play guitar on a stage", "men play music"]]
    reward = CiderReward(refs)
    s = reward(["a dog runs on grass", "a dog runs on grass", "two men play guitar", "A DOG RUNS ON GRASS."], [0, 1, 1, 0])
    assert s.shape == (4,) and s.dtype == torch.float32
    assert s[0] > 1.0 and s[1] == 0.0 and s[2] > 1.0  # the right photo's references count, not the other's
    assert s[3] == pytest.approx(s[0].item())  # captions are cleaned like the references
    with pytest.raises(ValueError, match="samples"):
        CiderReward(refs, samples=1)
    with pytest.raises(ValueError, match="supervised"):
        CiderReward(refs, supervised=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        CiderReward(refs, temperature=0.0)


def test_self_critical_loss_pushes_up_the_samples_that_beat_their_siblings():
    logp = torch.zeros(2, 3, requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    self_critical_loss(logp, rewards).backward()
    # baseline = mean of the other two: advantages 0.75, -0.75, 0.0 and all 0 for the tied photo
    torch.testing.assert_close(logp.grad, -torch.tensor([[0.75, -0.75, 0.0], [0.0, 0.0, 0.0]]) / 6)


def test_reward_loss_samples_the_one_step_sampler_and_its_argmax_is_the_one_step_caption(scenes):
    torch.manual_seed(0)
    model = LaDiC(preset("tiny", length_conditioning=True, infill_self_cond_prob=0.2)).eval()
    images = model.encode_images([s.image for s in scenes[:3]])
    captions = [s.captions[0] for s in scenes[:3]]
    x0, ids = model.encode_captions(captions)
    keys = ["p0", "p1", "p2"]
    draws = model.draw_training_noise(3, torch.Generator().manual_seed(0))
    shape = (3, model.config.max_length, model.text.dim)
    draws["noise"] = gaussian_noise(shape, [photo_generator(0, key) for key in keys])  # the sampler's x_T / F
    reward = Recorder([[c] for c in captions], word="circle")
    losses = model.training_losses(images, x0, ids, draws, reward, torch.tensor([2, 0, 1]))
    assert set(losses) >= {"loss", "policy", "reward", "reward_greedy"} and torch.isfinite(losses["loss"])
    texts, index = reward.seen[0]
    assert index == [2] * 5 + [0] * 5 + [1] * 5  # k = 4 samples + the argmax caption per photo
    lengths = model.caption_lengths(ids).tolist()
    one_step = [model.generate(images[i : i + 1], num_inference_steps=1, guidance_scale=0.0, back_and_refine=False,
                               clamp=False, length=lengths[i], keys=[keys[i]]).captions[0] for i in range(3)]
    assert [texts[5 * i + 4] for i in range(3)] == one_step
    assert losses["reward_greedy"].item() == pytest.approx(sum("circle" in c.split() for c in one_step) / 3)
    with pytest.raises(ValueError, match="image index"):
        model.training_losses(images, x0, ids, draws, reward)
    reward.supervised = 0.0  # self-critical training only: the loss is the policy gradient's
    only = model.training_losses(images, x0, ids, draws, reward, torch.tensor([2, 0, 1]))
    assert only["loss"].item() == pytest.approx(only["policy"].item()) and only["latent"] > 0
    reward.temperature, reward.seen = 1e-4, []  # a cold policy samples its argmax
    model.training_losses(images, x0, ids, draws, reward, torch.tensor([2, 0, 1]))
    assert reward.seen[0][0] == [c for c in one_step for _ in range(5)]


def test_reward_training_raises_the_rewarded_word():
    """A few policy-gradient steps on a reward for the word 'red' make the one-step sampler say it more often."""
    from ladic.data.scenes import make_scenes

    scenes = make_scenes(16, seed=0)
    assert any("red" in c.split() for s in scenes for c in s.captions)
    torch.manual_seed(0)
    model = LaDiC(preset("tiny", length_conditioning=True))
    images = model.encode_images([s.image for s in scenes[:8]])
    x0, ids = model.encode_captions([s.captions[0] for s in scenes[:8]])
    model.restrict_output_vocab(model.encode_captions([c for s in scenes for c in s.captions])[1])
    reward = Recorder([["x"]] * 8, word="red", samples=8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def share() -> float:
        with torch.no_grad():
            model.eval()
            reward.seen.clear()
            model._reward_losses(images, ids, torch.randn(x0.shape, generator=torch.Generator().manual_seed(9)),
                                 reward, torch.arange(8))
            texts = reward.seen[0][0]
            return sum("red" in c.split() for c in texts) / len(texts)

    before = share()
    model.train()
    for _ in range(10):
        noise = torch.randn(x0.shape, generator=gen)
        loss = model._reward_losses(images, ids, noise, reward, torch.arange(8))["policy"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = share()
    assert after > before + 0.3, (before, after)
