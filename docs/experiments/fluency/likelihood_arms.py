"""Issue 38: likelihood variants of drafts (the arms of docs/experiments/fluency.md), outside the library.

python docs/experiments/fluency/likelihood_arms.py {student|teacher} T1,T2,.. OUT.json DRAFTS.json [PHOTOS.json]
DRAFTS.json from drafts.py. For each draft and t: -MSE over all positions (latent), over word positions (latw),
per position (pos), the decoder's mean / min log-probability of the draft from the reconstruction (token /
tokmin), and the length head's log-probability (lenlp). Default photos: set A.
"""
import json, sys, torch
import torch.nn.functional as F
from ladic import LaDiC
from ladic.captioner import full_model_path
from ladic.data.captions import load_flickr8k
from ladic.data.features import build_image_features
from ladic.evaluate import feature_cache_dir
torch.set_num_threads(1)
which = sys.argv[1]; levels = [int(x) for x in sys.argv[2].split(',')]; out = sys.argv[3]
model = LaDiC.from_pretrained(None if which == 'student' else full_model_path()).eval()
recs = load_flickr8k('val')
feats = build_image_features(model, recs, feature_cache_dir()).float()
d = json.load(open(sys.argv[4]))
A = json.load(open(sys.argv[5])) if len(sys.argv) > 5 else json.load(open('docs/experiments/fluency/set-a-photos.json')); keep = [d['image_ids'].index(i) for i in A]
vid = [r.image_id for r in recs]; d['candidates'] = [d['candidates'][i] for i in keep]; feats = feats[[vid.index(i) for i in A]]; recs = [recs[vid.index(i)] for i in A]
k = len(d['candidates'][0])
res = {'pos': {t: [] for t in levels}, 'latw': {t: [] for t in levels}, 'lenlp': {0: []}, 'latent': {t: [] for t in levels}, 'token': {t: [] for t in levels}, 'tokmin': {t: [] for t in levels}}
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for s in range(0, len(recs), 32):
        caps = [c for cs in d['candidates'][s:s+32] for c in cs]
        x0, ids = model.text.encode(caps)
        img = feats[s:s+32].repeat_interleave(k, 0)
        ctx = model.diffuser.image_context(img)
        if model.config.length_conditioning:
            ctx = model.diffuser.add_length(ctx, model.caption_lengths(ids))
        kv = model.diffuser.image_kv(ctx)
        if model.config.length_conditioning:
            res['lenlp'][0] += model.diffuser.predict_length(model.diffuser.image_context(img)).log_softmax(-1).gather(-1, model.caption_lengths(ids)[:, None]).squeeze(-1).tolist()
        words = ~model.text.special_mask(ids)
        noise = torch.randn(x0.shape, generator=gen)
        for t in levels:
            tt = torch.full((x0.shape[0],), t, dtype=torch.long)
            xt = model.diffusion.q_sample(x0, tt, noise)
            xh = model.diffuser(xt, tt, torch.zeros_like(x0), kv)
            err = ((xh - x0) ** 2).mean(2)  # (B, L)
            res['pos'][t] += [[round(v, 4) for v, w in zip(row, wr) if w] for row, wr in zip(err.tolist(), words.tolist())]
            res['latw'][t] += (-(err * words).sum(1) / words.sum(1)).tolist()
            res['latent'][t] += (-err.mean(1)).tolist()
            lp = model.text.logits(xh).log_softmax(-1).gather(-1, model.text.output_index(ids)[..., None]).squeeze(-1)
            res['token'][t] += ((lp * words).sum(1) / words.sum(1)).tolist()
            res['tokmin'][t] += lp.masked_fill(~words, 0).amin(1).tolist()
        print(s, flush=True)
json.dump(res, open(out, 'w'))
