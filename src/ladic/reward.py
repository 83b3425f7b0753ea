"""Sentence-level reward for the one-step student: self-critical policy gradient on CIDEr-D (not in the paper).

A one-step student predicts every word position independently, given the image and the length, so the sentence
it decodes can repeat or misorder words that each position finds likely ("two dogs on a on a sidewalk"). A
token-level loss against the teacher's caption does not see that; CIDEr-D of the whole decoded sentence does.
Self-critical sequence training (Rennie et al. 2017), with the mean reward of the photo's other samples as the
baseline (Luo 2020), as in counterfactual-critical non-autoregressive captioning (Guo et al. 2020): sample k
captions per photo from the student's per-position distributions, score each against the photo's human
references, and raise the log-probability of the samples that beat their siblings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class CiderReward:
    """CIDEr-D (pycocoevalcap's ``Cider``) of sampled captions against their training photo's human references.

    ``references[i]``: the cleaned (``pre_caption``) human captions of training image i. Document frequencies come
    from the photos scored in one call (a rank's batch), as in ``ladic.data.captions.cider_table``.
    """

    references: list[list[str]]
    weight: float = 1.0  # of the policy-gradient loss, next to the distillation loss
    samples: int = 5  # k captions sampled per photo (>= 2: each sample's baseline is the mean of the others)
    supervised: float = 1.0  # weight of the supervised (latent + caption + length) loss; 0 = policy gradient only
    temperature: float = 1.0  # the policy samples softmax(logits / temperature): < 1 keeps samples near the argmax

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"reward samples must be >= 2 (the baseline is the other samples' mean), got {self.samples}")
        if self.temperature <= 0:
            raise ValueError(f"the sampling temperature must be > 0, got {self.temperature}")
        if self.supervised < 0:
            raise ValueError(f"the supervised loss weight must be >= 0, got {self.supervised}")

    def __call__(self, captions: Sequence[str], image_index: Sequence[int]) -> torch.Tensor:
        """Captions (N,) of training images ``image_index`` (N,) -> CIDEr-D (N,) float32."""
        from pycocoevalcap.cider.cider import Cider

        from ladic.data.captions import pre_caption

        gts = {j: self.references[i] for j, i in enumerate(image_index)}
        res = {j: [pre_caption(c)] for j, c in enumerate(captions)}
        _, scores = Cider().compute_score(gts, res)
        return torch.as_tensor(scores, dtype=torch.float32)


def self_critical_loss(logp: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a leave-one-out baseline: logp (B, k) sentence log-probabilities of k samples per photo,
    rewards (B, k) -> scalar loss  -mean((r_j - mean_{i != j} r_i) * log p_j)."""
    k = rewards.shape[1]
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return -((rewards - baseline).to(logp) * logp).mean()


__all__ = ["CiderReward", "self_critical_loss"]
