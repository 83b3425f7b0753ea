"""The memorisation capability test (issue 28): a LaDiC must learn a few dozen captions by heart.

Before the fix the diffuser's input grew to variance F^2 = 16 at high noise and swamped a position embedding
initialised at std 0.02: it could not tell word slots apart and reproduced none of 32 captions after 100 passes
over each. With its input scaled to unit variance and the position embedding initialised at std 0.5 it reproduces
almost all of them, at one step and at its default step count.
"""

import pytest

from ladic.bench.memorise import memorisation_test
from ladic.config import preset


@pytest.fixture(scope="module")
def captions():
    from ladic.data.captions import load_flickr8k

    try:
        records = load_flickr8k("train")
    except FileNotFoundError as e:
        pytest.skip(f"Flickr8k not found ({e})")
    return [r.captions[0] for r in records[:32]]


def memorise(captions, **overrides):
    return memorisation_test(preset("small", noise_factor=4.0, max_length=16, **overrides), captions, steps=100)


def test_the_diffuser_memorises_its_captions(captions):
    r = memorise(captions)
    assert r.exact[1] >= 0.8, r.samples[:3]
    assert r.exact[5] >= 0.9, r.samples[:3]
    assert min(r.restore.values()) >= 0.95


def test_the_unscaled_diffuser_does_not(captions):
    """The same test fails on the diffuser as it was before issue 28 (what old model folders still load as)."""
    r = memorise(captions, input_scaling="none", position_init_std=0.02)
    assert r.exact[1] <= 0.1 and r.exact[5] <= 0.1
    assert r.restore[999] < 0.3
