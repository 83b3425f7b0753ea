"""LaDiC: image captioning with a latent diffusion model over a split-BERT sentence latent."""

__version__ = "0.1.0"

from ladic.config import LaDiCConfig, preset  # noqa: E402

__all__ = ["LaDiCConfig", "preset", "LaDiC", "__version__"]


def __getattr__(name: str):
    """Import the model lazily so ``import ladic`` stays cheap (the CLI starts fast)."""
    if name == "LaDiC":
        from ladic.captioner import LaDiC

        return LaDiC
    raise AttributeError(f"module 'ladic' has no attribute {name!r}")
