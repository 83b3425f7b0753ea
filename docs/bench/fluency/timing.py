"""Issue 38: end-to-end time per photo (JPEG decode + encode + caption) of the shipped default (16 drafts, likelihood
choice), 8 and 4 drafts, its single draft (the default before issue 38: ``mbr_candidates=1``) and the shipped AR baseline (greedy).

python docs/bench/fluency/timing.py OUT.json [THREADS]
Batch 1 over the first 50 Flickr8k val photos, batch 64 over the first 320; same process and thread count, one run
each, after a warm-up; image decoding in the main process (num_workers=0), as docs/bench/onnx/onnx_vs_torch.py.
"""
import json
import platform
import sys
import time

import torch

from ladic import LaDiC
from ladic.baselines.ar import ARCaptioner
from ladic.collection import CollectionConfig, caption_files
from ladic.data.captions import load_flickr8k

threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
paths = [r.image_path for r in load_flickr8k("val")]
ladic, ar = LaDiC.from_pretrained(), ARCaptioner.from_pretrained()
systems = {"default (16 drafts, likelihood)": (ladic, {}), "8 drafts, likelihood": (ladic, {"mbr_candidates": 8}),
           "4 drafts, likelihood": (ladic, {"mbr_candidates": 4}), "single draft": (ladic, {"mbr_candidates": 1}),
           "ar-small greedy": (ar, {})}


def run(model, kwargs, photos, batch):
    t0 = time.perf_counter()
    for _ in caption_files(model, photos, config=CollectionConfig(batch_size=batch, num_workers=0), seed=0, **kwargs):
        pass
    return time.perf_counter() - t0


for model, kwargs in systems.values():  # warm-up
    run(model, kwargs, paths[:8], 8)
rows = []
for batch, photos in ((1, paths[:50]), (64, paths[:320])):
    for name, (model, kwargs) in systems.items():
        seconds = run(model, kwargs, photos, batch)
        rows.append({"system": name, "batch": batch, "photos": len(photos), "ms_per_photo": round(1000 * seconds / len(photos), 1)})
        print(json.dumps(rows[-1]), flush=True)
info = {"threads": threads, "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
json.dump(info, open(sys.argv[1], "w"), indent=1)
