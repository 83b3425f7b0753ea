"""ONNX export of a one-step LaDiC captioner (issue 30): one network evaluation is one graph.

Two graphs, written by ``export_onnx`` into a folder next to the tokenizer's vocabulary and a settings JSON:

* ``image_encoder.onnx``: pixels (B, 3, S, S), already resized and normalised as ``ImageEncoder.preprocess``
  does -> image tokens (B, N, D_img).
* ``captioner.onnx``: image tokens (B, N, D_img) and the standard-normal noise (B, L, D) of x_T -> token ids
  (B, L): the length prediction and its template, the one denoiser call at t = T - 1 (with classifier-free
  guidance where the model uses it), the upper BERT half, the LM head and the decoding rules of
  ``LaDiC._decode_ids``, written densely over (B, L, V') so that the graph has no data-dependent shapes.

The noise stays an input: ``LaDiC.generate`` draws each photo's noise from a generator seeded by the run seed
and a hash of the photo's pixels (``ladic.photo_seed``), and ``OnnxCaptioner`` draws the same, so its captions equal
the PyTorch captions for the same photo and seed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENCODER_FILE = "image_encoder.onnx"
CAPTIONER_FILE = "captioner.onnx"
SETTINGS_FILE = "onnx_config.json"
TOKENIZER_DIR = "tokenizer"
VOCAB_FILE = "vocab.json"  # id -> word piece, for runtimes without the transformers tokenizer (a browser page)
OPSET = 17
# onnxruntime-web's files the page loads: the WebAssembly build, and the WebGPU one for browsers with a GPU adapter
WEB_RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
                     "ort.webgpu.min.js", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")


class ExportError(ValueError):
    """A model (or sampler setting) this export does not cover; the message is one line."""


class OneStepGraph(nn.Module):
    """The one-step sampler of a LaDiC model as a traceable module: (B, N, D_img) tokens + (B, L, D) noise -> (B, L) ids.

    Equal to ``LaDiC.generate(tokens, num_inference_steps=1, mbr_candidates=1)`` (one draft: the graph does not draft
    several and choose, as the shipped default does in PyTorch) with its other sampling settings from the model's
    config, when ``noise`` is the standard-normal draw the sampler makes (``ladic.photo_seed``).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        if not hasattr(model, "diffuser"):
            raise ExportError("not a LaDiC model (the AR baseline's step graph is not exported)")
        cfg = model.config
        problems = [name for name, bad in ((f"{cfg.num_inference_steps} steps", cfg.num_inference_steps != 1),
                                           ("Back&Refine", cfg.back_and_refine)) if bad]
        if problems:
            raise ExportError(f"this model samples with {' and '.join(problems)}; the ONNX export covers one-step "
                              f"models (the shipped default, ladic-1step-flickr8k)")
        self.model = model
        # token id -> output-space index (TextSpace.output_index as a lookup table: ONNX has no searchsorted)
        self.register_buffer("output_index", model.text.output_index(torch.arange(model.text.tokenizer.vocab_size)),
                             persistent=False)
        self.noise_factor = float(model._sampling_diffusion().noise_factor)
        self.t = int(model.diffusion.inference_timesteps(1)[0])

    def _decode(self, x0: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        """``LaDiC._decode_ids(x0, free, given, no_dangling_end)`` over all positions at once (B, L, V')."""
        m, text = self.model, self.model.text
        logits = text.logits(x0)
        if given is None:
            return text.token_ids(logits.argmax(-1))
        free = given < 0
        banned = text.to_output_space(text.not_a_word)[None, None].expand_as(logits)
        if m.config.no_dangling_end:
            last = (given.roll(-1, dims=1) == text.tokenizer.sep_token_id) & free
            banned = banned | (last[..., None] & text.to_output_space(text.function_word)[None, None])
        for neighbour in (given.roll(1, dims=1), given.roll(-1, dims=1)):
            index = self.output_index[neighbour.clamp(min=0)]
            same = nn.functional.one_hot(index, logits.shape[-1]).bool() & (neighbour >= 0)[..., None]
            banned = banned | same
        best = text.token_ids(logits.masked_fill(banned, float("-inf")).argmax(-1))
        return torch.where(free, best, given)

    def forward(self, image_tokens: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        from ladic.sampling import guided_denoiser

        m, cfg = self.model, self.model.config
        b = noise.shape[0]
        ctx = m.diffuser.image_context(image_tokens)
        given = None
        if cfg.length_conditioning:
            lengths = m.diffuser.predict_length(ctx).argmax(-1)
            given = m.template_ids(lengths)
            ctx = m.diffuser.add_length(ctx, lengths.clamp(max=cfg.max_length - 2))
        t = torch.full((b,), self.t, dtype=torch.long, device=noise.device)
        x0 = guided_denoiser(m.diffuser, ctx, cfg.guidance_scale)(self.noise_factor * noise, t, torch.zeros_like(noise))
        if given is not None:
            x0 = x0.masked_fill((given >= 0)[..., None], 0.0)  # the template's given latents are zeros
        return self._decode(x0, given)


def store_weights_compact(path: Path, int8_min_elements: int | None = 100_000, min_elements: int = 1024) -> None:
    """Rewrite the ONNX file ``path`` with smaller stored weights that ONNX Runtime turns back into fp32 when a session
    loads (it still computes in fp32): matrices and convolution kernels of at least ``int8_min_elements`` as int8, one
    symmetric scale per output channel, through a DequantizeLinear; every other fp32 weight of at least
    ``min_elements`` as fp16 through a Cast. The DequantizeLinear nodes are folded at load only with the session
    setting ``session.disable_quant_qdq`` (``OnnxCaptioner`` and the browser page set it); without it they run on
    every call. Measured on the shipped default's encoder (docs/BENCHMARKS.md): fp16 alone CIDEr -0.1 (half the
    size), int8 for its kernels of >= 100k weights -0.4 (a third), int8 for all its kernels -1.2."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    kept, nodes = [], []
    for init in m.graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        w = numpy_helper.to_array(init)
        if int8_min_elements is not None and w.ndim >= 2 and w.size >= int8_min_elements:
            rows = w.reshape(w.shape[0], -1)
            scale = (np.abs(rows).max(1) / 127).astype(np.float32)
            scale[scale == 0] = 1.0
            q = np.clip(np.round(rows / scale[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
            kept += [numpy_helper.from_array(q, init.name + "_int8"), numpy_helper.from_array(scale, init.name + "_scale")]
            nodes.append(helper.make_node("DequantizeLinear", [init.name + "_int8", init.name + "_scale"], [init.name],
                                          axis=0, name=init.name + "_dequantize"))
        else:
            kept.append(numpy_helper.from_array(w.astype(np.float16), init.name + "_fp16"))
            nodes.append(helper.make_node("Cast", [init.name + "_fp16"], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "_cast"))
    nodes += list(m.graph.node)
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(path))


def export_onnx(model: Any, out: str | Path, batch_size: int = 2, int8: bool = False) -> Path:
    """Write ``model`` (a one-step LaDiC) as ONNX into the folder ``out``; returns it. Raises ``ExportError``.

    ``int8``: the smaller download. The captioner graph's matrix weights are stored as int8 (ONNX Runtime's dynamic
    quantization: about a quarter of the size; captions change, see docs/BENCHMARKS.md) and the image encoder's
    large kernels as int8, the rest as fp16, both turned back into fp32 when the session loads
    (``store_weights_compact``; it still computes in fp32)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    enc = model.image_encoder
    pixels = torch.zeros(batch_size, 3, enc.image_size, enc.image_size)
    graph = OneStepGraph(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        tokens = enc(pixels)
        noise = torch.zeros(batch_size, model.config.max_length, model.text.dim)
        torch.onnx.export(enc, (pixels,), str(out / ENCODER_FILE), input_names=["pixels"], output_names=["tokens"],
                          dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
        torch.onnx.export(graph, (tokens, noise), str(out / CAPTIONER_FILE), input_names=["tokens", "noise"],
                          output_names=["ids"], dynamic_axes={"tokens": {0: "batch"}, "noise": {0: "batch"},
                                                              "ids": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = out / (CAPTIONER_FILE + ".fp32")
        (out / CAPTIONER_FILE).rename(fp32)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer's advice and its notes on the integer tensors it leaves alone
        try:
            quantize_dynamic(str(fp32), str(out / CAPTIONER_FILE), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        fp32.unlink()
        store_weights_compact(out / ENCODER_FILE)
    tok = model.text.tokenizer
    tok.save_pretrained(str(out / TOKENIZER_DIR))
    (out / VOCAB_FILE).write_text(json.dumps(tok.convert_ids_to_tokens(list(range(len(tok))))))
    settings = {
        "image_size": enc.image_size, "mean": list(enc.mean), "std": list(enc.std), "image_encoder": enc.name,
        "max_length": model.config.max_length, "latent_dim": model.text.dim, "noise_factor": graph.noise_factor,
        "special_ids": sorted(set(model.text.special_ids)), "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id, "collapse_repeats": True, "opset": OPSET,
        "captioner_weights": "int8" if int8 else "fp32", "encoder_weights": "int8 kernels of >= 100k weights, the rest fp16 (computed in fp32)" if int8 else "fp32",
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    return out


class OnnxImageEncoder:
    """``image_encoder.onnx`` behind the interface of ``ImageEncoder`` that captioning uses (``preprocess``, a call on
    pixels, ``image_size``), so ``ladic.collection`` streams photos through it unchanged."""

    def __init__(self, session: Any, settings: dict[str, Any]) -> None:
        self.session, self.settings = session, settings
        self.name, self.image_size = settings["image_encoder"], settings["image_size"]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) pixels, exactly as the PyTorch encoder preprocesses them."""
        from ladic.image_encoders import pixels

        return pixels(list(images), self.image_size, tuple(self.settings["mean"]), tuple(self.settings["std"]))

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> image tokens (B, N, D_img)."""
        return torch.from_numpy(self.session.run(["tokens"], {"pixels": pixel_values.cpu().numpy()})[0])

    def encode(self, images: Sequence[Any]) -> torch.Tensor:
        return self(self.preprocess(images))


class OnnxCaptioner:
    """Captions with an ``export_onnx`` folder through ONNX Runtime: the same captions as ``LaDiC.caption`` for the
    same photos and seed. ``generate`` takes image tokens and per-photo keys like ``LaDiC.generate`` (the sampler
    settings are the exported ones), so ``ladic.collection.caption_files`` works with it."""

    device = torch.device("cpu")

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.folder = folder
        self.settings = json.loads((folder / SETTINGS_FILE).read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.disable_quant_qdq", "1")  # fold int8-stored weights once, at load
        # idle pool threads sleep instead of spinning: a spinning pool took the cores from JPEG decoding and torch's
        # own threads between calls (batch 1 on 2 cores: 58-63 ms per photo spinning, 23 ms not; docs/BENCHMARKS.md)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.image_encoder = OnnxImageEncoder(ort.InferenceSession(str(folder / ENCODER_FILE), opts, providers=providers),
                                              self.settings)
        self.captioner = ort.InferenceSession(str(folder / CAPTIONER_FILE), opts, providers=providers)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))

    def generate(self, image_tokens: torch.Tensor, keys: Sequence[str] | None = None, seed: int | None = 0,
                 batch_size: int = 0, progress: bool = False, **sampling: Any) -> Any:
        """Image tokens (B, N, D_img) and one noise key per photo (``ladic.photo_seed.pixel_key``; default, as
        ``LaDiC.generate``: a hash of each row of tokens) -> a ``CaptionOutput``. Sampler settings other than the
        exported ones are refused (``ValueError``)."""
        from ladic.captioner import CaptionOutput
        from ladic.photo_seed import photo_generator, tensor_key
        from ladic.sampling import gaussian_noise

        if keys is None:
            keys = [tensor_key(row) for row in image_tokens]
        defaults = {"num_inference_steps": (None, 1), "guidance_scale": (None,), "back_and_refine": (None, False),
                    "mbr_candidates": (None, 1), "select": (None,), "length": (None,), "return_trajectory": (False,),
                    "clamp": (None,), "mbr_lengths": (None,), "template": (None,)}
        changed = [k for k, v in sampling.items() if v not in defaults.get(k, ())]
        if changed:
            raise ValueError(f"the ONNX runtime samples as exported (one step); it does not take {', '.join(changed)}")
        s = self.settings
        generators = [photo_generator(seed or 0, key) for key in keys]
        noise = gaussian_noise((len(keys), s["max_length"], s["latent_dim"]), generators).numpy()
        ids = self.captioner.run(["ids"], {"tokens": image_tokens.cpu().float().numpy(), "noise": noise})[0]
        return CaptionOutput(captions=[self.decode(row) for row in ids.tolist()], num_evaluations=1)

    def caption(self, images: Sequence[Any], seed: int = 0) -> list[str]:
        """Caption PIL images (or anything ``ladic.image_io.load_images`` reads) with the run seed ``seed``."""
        from ladic.image_io import load_images
        from ladic.photo_seed import pixel_key

        loaded = load_images(list(images))
        bad = next((e for e in loaded if isinstance(e, Exception)), None)
        if bad is not None:
            raise bad
        return self.generate(self.image_encoder.encode(loaded), [pixel_key(im) for im in loaded], seed=seed).captions

    def decode(self, ids: list[int]) -> str:
        """``TextSpace.ids_to_text`` for one row: specials erased, repeated word pieces collapsed."""
        from ladic.text_space import ids_to_caption

        return ids_to_caption(self.tokenizer, ids, set(self.settings["special_ids"]), self.settings["collapse_repeats"])


def onnx_captioner(path: str | Path | None = None, threads: int | None = None) -> OnnxCaptioner:
    """``OnnxCaptioner`` on ``onnx_folder(path)``."""
    return OnnxCaptioner(onnx_folder(path), threads)


def web_runtime_dir() -> Path | None:
    """onnxruntime-web's ``dist`` folder as the project's install step puts it (``web/node_modules``, npm, pinned in
    ``web/package.json``), or ``$LADIC_ORT_WEB_DIR``; None where it is not installed."""
    import os

    env = os.environ.get("LADIC_ORT_WEB_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "web" / "node_modules" / "onnxruntime-web" / "dist"
    return folder if (folder / "ort.wasm.min.js").is_file() else None


def onnx_folder(path: str | Path | None = None) -> Path:
    """An ONNX folder as is, or a LaDiC model folder (``None``: the shipped default) exported once into the cache
    (``$LADIC_CACHE`` or ``~/.cache/ladic``, under ``onnx/``, keyed by the folder's files). Raises ``ExportError``
    for a model the export does not cover and ``CheckpointError`` for a bad folder."""
    import hashlib
    import os
    import shutil

    from ladic.captioner import default_model_path
    from ladic.checkpoint import resolve_model_path
    from ladic.models import load_model

    folder = default_model_path() if path is None else resolve_model_path(path)
    if (folder / SETTINGS_FILE).is_file():
        return folder
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(folder.glob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    cache = Path(os.environ.get("LADIC_CACHE") or Path.home() / ".cache" / "ladic") / "onnx" / f"{folder.name}-{h.hexdigest()}"
    if not (cache / SETTINGS_FILE).is_file():
        tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        export_onnx(load_model(folder).float(), tmp)  # an AR folder is refused by OneStepGraph in one line
        try:
            tmp.rename(cache)
        except OSError:  # another process (a torchrun rank) exported it first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def write_web_page(out: str | Path, onnx_dir: str | Path) -> Path:
    """A static folder that captions in the browser from any static file server: the page (``assets/web``),
    onnxruntime-web's files in ``ort/`` and the ONNX export ``onnx_dir`` copied to ``model/``. Needs onnxruntime-web
    installed (``web_runtime_dir``); raises ``ExportError`` otherwise."""
    import shutil
    from importlib import resources

    ort_dir = web_runtime_dir()
    if ort_dir is None:
        raise ExportError("onnxruntime-web is not installed (./install.sh installs it with npm into web/node_modules)")
    out = Path(out)
    (out / "ort").mkdir(parents=True, exist_ok=True)
    page = Path(str(resources.files("ladic").joinpath("assets/web")))
    for name in ("index.html", "app.mjs", "preprocess.mjs"):
        shutil.copyfile(page / name, out / name)
    for name in WEB_RUNTIME_FILES:
        shutil.copyfile(ort_dir / name, out / "ort" / name)
    if Path(onnx_dir).resolve() != (out / "model").resolve():
        shutil.copytree(onnx_dir, out / "model", dirs_exist_ok=True)
    return out
