"""Issue 30: the shipped default through ONNX Runtime against PyTorch, end to end (JPEG decode + encode + caption).

python docs/bench/onnx/onnx_vs_torch.py OUT.json [THREADS]
Batch 1 over the first 50 Flickr8k val photos, batch 64 over all 1,000; same process, same thread count, one run
each, alternating; also counts identical captions and scores CIDEr-D of the batch-64 captions (fp32 and an int8
export, ``export_onnx(..., int8=True)``). Image decoding in the main process (num_workers=0).
"""
import json
import platform
import sys
import tempfile
import time

import torch

from ladic import LaDiC
from ladic.collection import CollectionConfig, caption_files
from ladic.data.captions import load_flickr8k
from ladic.metrics import coco_metrics
from ladic.onnx_export import OnnxCaptioner, export_onnx, onnx_captioner

threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.set_num_threads(threads)
records = load_flickr8k("val")
paths = [r.image_path for r in records]
int8_dir = export_onnx(LaDiC.from_pretrained().float(), tempfile.mkdtemp(prefix="ladic-onnx-int8-"), int8=True)
runtimes = {"torch": LaDiC.from_pretrained(), "onnx": onnx_captioner(threads=threads),
            "onnx int8": OnnxCaptioner(int8_dir, threads=threads)}


def run(model, photos, batch):
    t0 = time.perf_counter()
    caps = [r.caption for r in caption_files(model, photos, config=CollectionConfig(batch_size=batch, num_workers=0), seed=0)]
    return caps, time.perf_counter() - t0


for model in runtimes.values():  # warm-up
    run(model, paths[:8], 8)
rows, captions = [], {}
for batch, photos in ((1, paths[:50]), (64, paths)):
    for name, model in runtimes.items():
        caps, seconds = run(model, photos, batch)
        captions[(name, batch)] = caps
        rows.append({"runtime": name, "batch": batch, "photos": len(photos), "seconds": round(seconds, 2),
                     "ms_per_photo": round(1000 * seconds / len(photos), 1), "photos_per_s": round(len(photos) / seconds, 2)})
        print(json.dumps(rows[-1]), flush=True)
same = sum(a == b for a, b in zip(captions[("torch", 64)], captions[("onnx", 64)]))
same_int8 = sum(a == b for a, b in zip(captions[("torch", 64)], captions[("onnx int8", 64)]))
refs = {r.image_id: r.captions for r in records}
cider = {name: round(100 * coco_metrics(dict(zip(refs, captions[(name, 64)])), refs, bert_score_model=None).scores["CIDEr"], 2)
         for name in runtimes}
info = {"threads": threads, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "identical_captions_of_1000": same, "identical_int8_of_1000": same_int8, "cider": cider, "rows": rows}
print(json.dumps({k: v for k, v in info.items() if k != "rows"}))
json.dump(info, open(sys.argv[1], "w"), indent=1)
