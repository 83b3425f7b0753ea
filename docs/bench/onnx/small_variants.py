"""Issue 30 experiment (python docs/bench/onnx/small_variants.py OUT [int8,q4,...]): smaller downloads. Variants of the shipped default's ONNX export:
int8 captioner (shipped --int8) / 4-bit captioner (MatMulNBits, block 32) x fp32 encoder / encoder weights stored fp16
(+ Cast to fp32, folded by ORT at load) / the encoder's kernels of >= N weights as int8 per output channel and the rest
fp16 (store_weights_compact; "enc8" N = 1024, i.e. all, "enc8mid" 30k, "enc8big" 100k, the --int8 of today).
Sizes, CIDEr on all 1,000 val (batch 64), identical captions vs fp32 ORT."""
import json, shutil, sys, tempfile, time
from pathlib import Path

import onnx

from ladic.collection import CollectionConfig, caption_files
from ladic.data.captions import load_flickr8k
from ladic.metrics import coco_metrics
from ladic.onnx_export import OnnxCaptioner, onnx_folder, store_weights_compact

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
base = Path(onnx_folder())  # the fp32 export of the shipped default (cached)


def q4(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    m = onnx.load(str(src))
    q = MatMulNBitsQuantizer(m, block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def variant(name: str, captioner: str, encoder: str) -> Path:
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(base, d)
    if captioner == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(base / "captioner.onnx"), str(d / "captioner.onnx"), weight_type=QuantType.QInt8)
    elif captioner == "q4":
        q4(base / "captioner.onnx", d / "captioner.onnx")
    if encoder != "fp32":
        store_weights_compact(d / "image_encoder.onnx", {"fp16": None, "int8": 1024, "int8mid": 30_000, "int8big": 100_000}[encoder])
    return d


records = load_flickr8k("val")
paths = [r.image_path for r in records]
refs = {r.image_id: r.captions for r in records}
ids = [r.image_id for r in records]
results = {}
caps_base = None
VARIANTS = [("fp32", "fp32", "fp32"), ("int8", "int8", "fp32"), ("int8+enc16", "int8", "fp16"),
            ("int8+enc8", "int8", "int8"), ("int8+enc8mid", "int8", "int8mid"), ("int8+enc8big", "int8", "int8big"),
            ("q4", "q4", "fp32"), ("q4+enc16", "q4", "fp16")]
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
for name, cap, enc in VARIANTS:
    if only and name not in only and name != "fp32":
        continue
    d = base if name == "fp32" else variant(name, cap, enc)
    model = OnnxCaptioner(d, threads=1)
    t = time.time()
    caps = [r.caption for r in caption_files(model, paths, config=CollectionConfig(batch_size=64, num_workers=0), seed=0)]
    wall = time.time() - t
    if caps_base is None:
        caps_base = caps
    size = {f: round((d / f).stat().st_size / 1e6, 2) for f in ("captioner.onnx", "image_encoder.onnx")}
    cider = coco_metrics(dict(zip(ids, caps)), refs, bert_score_model=None).scores["CIDEr"]
    results[name] = {"sizes_mb": size, "total_mb": round(sum(size.values()), 2), "cider": round(100 * cider, 2),
                     "identical_to_fp32": sum(a == b for a, b in zip(caps, caps_base)), "wall_s": round(wall, 1)}
    print(name, json.dumps(results[name]), flush=True)
(out / "small_variants.json").write_text(json.dumps(results, indent=1))
