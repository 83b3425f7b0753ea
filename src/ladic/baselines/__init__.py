"""Baselines trained and evaluated with the same pipeline as LaDiC.

- ``ARCaptioner`` (``model_type = "ar"``): an autoregressive transformer decoder of LaDiC's size.

``load_model(path, device)`` loads either kind of saved folder (see ``ladic.models``).
"""

from ladic.baselines.ar import ARCaptioner, ARCaptionOutput
from ladic.models import MODEL_TYPES, load_model, model_class

__all__ = ["ARCaptioner", "ARCaptionOutput", "load_model", "model_class", "MODEL_TYPES"]
