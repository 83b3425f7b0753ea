"""Issue 31 item 6: what an asked length gives (shipped student and full-sampler model, first 200 val photos)."""
import json
import sys

from ladic import LaDiC
from ladic.bench.text_stats import broken_pair_share, dangling_share, training_text
from ladic.captioner import default_model_path, full_model_path
from ladic.data.captions import load_flickr8k
from ladic.evaluate import caption_split
from ladic.metrics import coco_metrics

train = training_text([c for r in load_flickr8k("train") for c in r.captions])
val = load_flickr8k("val")[:200]
refs = {r.image_id: r.captions for r in val}
rows = []
for name, path in (("student", default_model_path()), ("full", full_model_path())):
    model = LaDiC.from_pretrained(path)
    for length in (None, 6, 8, 10, 12, 14, 16, 18, 20, 22):
        caps, _ = caption_split(model, val, sampling={"length": length, "seed": 0}, progress=False)
        texts = [caps[r.image_id] for r in val]
        cider = coco_metrics(caps, refs, bert_score_model=None).scores["CIDEr"]
        row = {"model": name, "length": length, "CIDEr": round(100 * cider, 1),
               "broken pair %": round(100 * broken_pair_share(texts, train), 1),
               "dangling %": round(100 * dangling_share(texts), 1), "example": texts[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
