"""ONNX export of a one-step model (ladic.onnx_export): ONNX Runtime gives the PyTorch captions, ids for ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

from ladic import LaDiC, preset  # noqa: E402
from ladic.onnx_export import ExportError, OneStepGraph, OnnxCaptioner, export_onnx  # noqa: E402


def _one_step_model(**overrides) -> LaDiC:
    torch.manual_seed(0)
    cfg = preset("tiny", num_inference_steps=1, back_and_refine=False, length_conditioning=True, **overrides)
    model = LaDiC(cfg).eval()
    captions = ["a dog runs on the grass", "two people sit on a bench", "a red car is parked near a tree"]
    model.restrict_output_vocab(model.text.tokenize(captions)["input_ids"])  # the lookup that replaces searchsorted
    return model


def _photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_onnx_runtime_captions_equal_pytorch(tmp_path, guidance):
    model = _one_step_model(guidance_scale=guidance)
    export_onnx(model, tmp_path / "onnx")
    runtime = OnnxCaptioner(tmp_path / "onnx", threads=1)
    photos = _photos(7)
    for seed in (0, 3):
        assert runtime.caption(photos, seed=seed) == model.caption(photos, seed=seed)
    # the graph itself, ids for ids, on image tokens and noise given directly
    tokens, noise = model.image_encoder.encode(photos), torch.randn(7, model.config.max_length, model.text.dim)
    with torch.no_grad():
        eager = OneStepGraph(model)(tokens, noise)
    ort_ids = runtime.captioner.run(["ids"], {"tokens": tokens.numpy(), "noise": noise.numpy()})[0]
    assert np.array_equal(ort_ids, eager.numpy())
    assert (ort_ids[:, 0] == model.text.tokenizer.cls_token_id).all()


def test_export_refuses_what_it_does_not_cover(tmp_path):
    with pytest.raises(ExportError, match="5 steps and Back&Refine"):
        export_onnx(LaDiC(preset("tiny", num_inference_steps=5, back_and_refine=True)), tmp_path / "x")


def test_cli_export_onnx(tmp_path, capsys):
    from ladic.cli import main

    model = _one_step_model()
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "onnx"), "--onnx"]) == 0
    assert "as ONNX to" in capsys.readouterr().out
    assert OnnxCaptioner(tmp_path / "onnx").caption(_photos(2), seed=1) == model.caption(_photos(2), seed=1)
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "o2"), "--onnx", "--fp16"]) == 2
    assert "--fp16 and --raw do not apply" in capsys.readouterr().err


def test_cli_caption_with_the_onnx_runtime(tmp_path, monkeypatch, capsys):
    """`ladic caption --runtime onnx`: the model folder is exported once into the cache; captions, results files and
    bad inputs behave as with PyTorch."""
    from ladic.cli import main

    monkeypatch.setenv("LADIC_CACHE", str(tmp_path / "cache"))
    _one_step_model().save_pretrained(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(_photos(5)):
        im.save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"not a photo")
    common = ["caption", str(photos), "--model", str(tmp_path / "model"), "--no-progress", "--workers", "0",
              "--batch-size", "2", "--seed", "4"]
    assert main(common) == 1
    torch_out = capsys.readouterr()
    assert main([*common, "--runtime", "onnx", "--out", str(tmp_path / "r.jsonl")]) == 1
    onnx_out = capsys.readouterr()
    assert onnx_out.out == torch_out.out and len(onnx_out.out.splitlines()) == 5
    assert "broken.jpg: not an image" in onnx_out.err
    assert len(list((tmp_path / "cache" / "onnx").glob("model-*/captioner.onnx"))) == 1
    assert main([*common, "--runtime", "onnx", "--out", str(tmp_path / "r.jsonl"), "--resume"]) == 1
    assert "captioned 0, failed 1, 5 already in" in capsys.readouterr().err
    assert main([*common, "--runtime", "onnx", "--steps", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --runtime onnx samples as exported (one step, on the CPU); drop --steps"


def test_int8_export_is_smaller_and_still_captions(tmp_path):
    model = _one_step_model()
    export_onnx(model, tmp_path / "fp32")
    export_onnx(model, tmp_path / "int8", int8=True)
    assert (tmp_path / "int8" / "captioner.onnx").stat().st_size < 0.5 * (tmp_path / "fp32" / "captioner.onnx").stat().st_size
    captions = OnnxCaptioner(tmp_path / "int8").caption(_photos(3))
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    # the encoder's weights stored as fp16 (cast back at load): smaller, and its tokens within fp16 rounding
    import onnxruntime as ort

    assert (tmp_path / "int8" / "image_encoder.onnx").stat().st_size < 0.8 * (tmp_path / "fp32" / "image_encoder.onnx").stat().st_size
    pixels = model.image_encoder.preprocess(_photos(2)).numpy()
    a, b = (ort.InferenceSession(str(tmp_path / v / "image_encoder.onnx")).run(None, {"pixels": pixels})[0]
            for v in ("fp32", "int8"))
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 1e-2 * np.abs(a).max()


def test_int8_stored_kernels_are_folded_at_load_and_stay_close(tmp_path):
    import shutil

    import onnx
    import onnxruntime as ort

    from ladic.onnx_export import store_weights_compact

    model = _one_step_model()
    export_onnx(model, tmp_path / "fp32")
    fp32 = tmp_path / "fp32" / "image_encoder.onnx"
    small = tmp_path / "small.onnx"
    shutil.copyfile(fp32, small)
    store_weights_compact(small, int8_min_elements=1024)  # every kernel of the tiny encoder as int8
    ops = {n.op_type for n in onnx.load(str(small)).graph.node}
    assert "DequantizeLinear" in ops and small.stat().st_size < 0.5 * fp32.stat().st_size
    pixels = model.image_encoder.preprocess(_photos(2)).numpy()
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    b = ort.InferenceSession(str(small), opts).run(None, {"pixels": pixels})[0]
    a = ort.InferenceSession(str(fp32)).run(None, {"pixels": pixels})[0]
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 5e-2 * np.abs(a).max()
    # the session turned the int8 kernels into fp32 constants once: no DequantizeLinear left to run per call
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(str(tmp_path / "loaded.onnx")).graph.node}


def test_cli_export_a_static_web_page(tmp_path, capsys):
    from ladic.cli import main
    from ladic.onnx_export import web_runtime_dir

    if web_runtime_dir() is None:
        pytest.skip("onnxruntime-web not installed (./install.sh installs it with npm)")
    _one_step_model().save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "site"), "--onnx", "--web"]) == 0
    assert "with the in-browser page" in capsys.readouterr().out
    site = tmp_path / "site"
    assert {p.name for p in site.iterdir()} == {"index.html", "app.mjs", "preprocess.mjs", "ort", "model"}
    assert {p.name for p in (site / "ort").iterdir()} == {"ort.wasm.min.js", "ort-wasm-simd-threaded.mjs",
                                                          "ort-wasm-simd-threaded.wasm", "ort.webgpu.min.js",
                                                          "ort-wasm-simd-threaded.asyncify.mjs",
                                                          "ort-wasm-simd-threaded.asyncify.wasm"}
    assert (site / "model" / "captioner.onnx").is_file() and (site / "model" / "vocab.json").is_file()
    assert OnnxCaptioner(site / "model").caption(_photos(1))
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "x"), "--web"]) == 2
    assert "--int8 and --web apply to --onnx exports" in capsys.readouterr().err
