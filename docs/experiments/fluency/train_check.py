"""The shipped fluency check (src/ladic/assets/fluency-check), both stages, from the Flickr8k train captions and the
blind-judged drafts of 150 val photos (set-a-judged.tsv; none of them in ../shared/fluency's 150 photos).

python docs/experiments/fluency/train_check.py OUT_DIR [THRESHOLD]
Stage 1: 2 epochs on the 30,000 train captions and their corruptions (about 30 min on one core of the 2-core EPYC).
Stage 2: 3 epochs on the judged drafts, AR captions and human references (read from ../shared/data at run time),
with fresh train captions beside them. The threshold (0.43) is calibrated on ../shared/fluency/val-judged.tsv
with calibrate.py (the largest recall of bad LaDiC captions that flags at most 10 % of the human references).
"""
import csv
import json
import sys
from pathlib import Path

import torch

from ladic.data.captions import load_flickr8k
from ladic.fluency import finetune_check, train_check

torch.set_num_threads(1)
here = Path(__file__).parent
train = [c for r in load_flickr8k("train") for c in r.captions]
val = {r.image_id: r.captions for r in load_flickr8k("val")}
judged = []
for row in csv.DictReader(open(here / "set-a-judged.tsv"), delimiter="\t"):
    caption = row["caption"]
    if row["system"] == "human":  # "human reference 1 of <image id>": the text stays in ../shared/data
        caption = val[caption.rsplit(" ", 1)[1]][0]
    judged.append((caption, row["verdict"] == "bad"))
check = train_check(train, epochs=2, seed=0)
check = finetune_check(check, judged, train, epochs=3, seed=0)
check.config.threshold = float(sys.argv[2]) if len(sys.argv) > 2 else 0.43
check.save(sys.argv[1])
print(json.dumps({"saved": sys.argv[1], "judged": len(judged)}))
