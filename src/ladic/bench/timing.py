"""Timing helpers shared by the latency and FLOP/s benchmarks: timed calls and example photos."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")  # RGB photos


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> tuple[list[float], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns (seconds per call, last output)."""
    import torch

    out = None
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        _sync(device)
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times, out


def example_photos(n: int) -> list:
    """``n`` real photos from ``skimage.data`` (uint8 H x W x 3 arrays), cycled."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    return [photos[i % len(photos)] for i in range(n)]
