"""Issue 38 arms: K drafts per photo over the m most likely lengths, one kept by `select`, with the library.

python docs/experiments/fluency/drafts.py OUT.json K M {likelihood|mbr} {A|sub|all} [config_key=json_value ...]
A: the 150 set-A photos; sub: set A and the 150 photos of ../shared/fluency; all: every val photo. Writes the
image ids, the kept captions and every draft. E.g. the shipped default: `... out.json 16 4 likelihood all`.
"""
import json, sys, time, csv, torch
from ladic import LaDiC
from ladic.data.captions import load_flickr8k
from ladic.data.features import build_image_features
from ladic.evaluate import feature_cache_dir
torch.set_num_threads(1)
out, k, m, select, which = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
model = LaDiC.from_pretrained().eval()
model.config.candidate_lengths = m
for kv in sys.argv[6:]:
    key, v = kv.split('='); setattr(model.config, key, json.loads(v))
recs = load_flickr8k('val')
feats = build_image_features(model, recs, feature_cache_dir()).float()
if which != 'all':
    ids = set(json.load(open('docs/experiments/fluency/set-a-photos.json')))
    if which == 'sub': ids |= {r['photo'].rsplit('.', 1)[0] for r in csv.DictReader(open('../shared/fluency/val-judged.tsv'), delimiter='\t')}
    keep = [i for i, r in enumerate(recs) if r.image_id in ids]
    recs = [recs[i] for i in keep]; feats = feats[keep]
t0 = time.time()
res = model.generate(feats, mbr_candidates=k, mbr_lengths='top', select=select, batch_size=32, progress=False)
print('sec', time.time() - t0, len(recs))
json.dump({'image_ids': [r.image_id for r in recs], 'captions': res.captions, 'candidates': res.candidates}, open(out, 'w'))
