"""Per-photo randomness: a stable key for each photo and the ``torch.Generator`` it seeds.

A caption must depend on the photo and the seed only, never on which other photos share the batch,
their order, or the process that captions it. So every photo draws its sampling noise from its own
generator, seeded from ``(seed, key)``, where the key is a content hash of the photo.
"""

from __future__ import annotations

import hashlib

import torch
from PIL import Image

_DIGEST_BYTES = 16


def pixel_key(image: Image.Image) -> str:
    """Content key of a decoded image: a hash of its size, mode and pixels (hex string)."""
    h = hashlib.blake2b(f"{image.width}x{image.height}:{image.mode}:".encode(), digest_size=_DIGEST_BYTES)
    h.update(image.tobytes())
    return h.hexdigest()


def tensor_key(t: torch.Tensor) -> str:
    """Content key of a tensor (e.g. one photo's precomputed image tokens (N_img, D_img)): hash of shape, dtype, values."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(f"{tuple(t.shape)}:{t.dtype}:".encode(), digest_size=_DIGEST_BYTES)
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def photo_seed(seed: int, key: str) -> int:
    """The 63-bit seed of the photo with ``key`` under the run seed ``seed``."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def photo_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for the photo with ``key``, independent of every other photo."""
    return torch.Generator().manual_seed(photo_seed(seed, key))


__all__ = ["pixel_key", "tensor_key", "photo_seed", "photo_generator"]
