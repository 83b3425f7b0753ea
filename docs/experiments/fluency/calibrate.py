"""Calibrate a fluency check's threshold on ../shared/fluency/val-judged.tsv (run from the project root).

python docs/experiments/fluency/calibrate.py CHECK_DIR
Prints recall of the editor's bad LaDiC captions and the share of human references flagged at each threshold, the
chosen one (the largest recall that flags at most 10 % of the human references), per-system agreement, and a
two-fold check (threshold chosen on 75 photos, applied to the other 75).
"""
import csv, json, sys, random
import numpy as np
from ladic.fluency import FluencyCheck
check = FluencyCheck.load(sys.argv[1])
rows = list(csv.DictReader(open('../shared/fluency/val-judged.tsv'), delimiter='\t'))
p = check.score([r['caption'] for r in rows]).numpy()
y = np.array([r['verdict'] == 'bad' for r in rows]); sysn = np.array([r['system'] for r in rows])
ladic = np.char.startswith(sysn.astype(str), 'ladic'); human = np.char.startswith(sysn.astype(str), 'human')
def rates(th, mask=None):
    mask = np.ones(len(y), bool) if mask is None else mask
    f = p >= th
    return (f & y & ladic & mask).sum() / max((y & ladic & mask).sum(), 1), (f & human & mask).sum() / max((human & mask).sum(), 1), \
           (f == y)[ladic & mask].mean()
print('threshold  recall(bad LaDiC)  human flagged  agreement on LaDiC')
for th in np.arange(0.1, 0.95, 0.05):
    r, h, a = rates(th); print(f'{th:.2f}  {r:.3f}  {h:.3f}  {a:.3f}')
# pick: the largest recall with human flagged <= 10 %
cands = [(rates(th)[0], -th, th) for th in np.arange(0.05, 0.99, 0.01) if rates(th)[1] <= 0.10]
best = max(cands)[2]; print('chosen threshold', round(best, 2), rates(best))
for sname in sorted(set(sysn)):
    m = sysn == sname; f = p[m] >= best
    print(f'  {sname:25s} flagged {f.mean():.3f}  judged bad {y[m].mean():.3f}  agree {(f == y[m]).mean():.3f}  recall {(f & y[m]).sum()/max(y[m].sum(),1):.3f}')
# two-fold by photo: threshold from one half, applied to the other
photos = sorted(set(r['photo'] for r in rows)); random.Random(0).shuffle(photos)
half = np.array([r['photo'] in set(photos[:75]) for r in rows])
for a, b in ((half, ~half), (~half, half)):
    c = [(rates(th, a)[0], -th, th) for th in np.arange(0.05, 0.99, 0.01) if rates(th, a)[1] <= 0.10]
    th = max(c)[2]; print('2-fold: threshold', round(th, 2), 'held-out recall/human/agree', [round(v, 3) for v in rates(th, b)])
