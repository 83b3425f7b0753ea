"""Issue 38, the lost training arm: the default's LM head retrained on decoder states of clean latents.

python docs/experiments/fluency/head_on_clean_latents.py OUT.safetensors
The 30,000 train captions -> regularised latents -> upper BERT half (frozen; states computed once, 8 min on one
core), then the LM head (dense, LayerNorm, bias; the output matrix stays tied to the frozen embeddings) for 2 epochs
of batch 256, AdamW one-cycle 1e-3 (6 min). Load it with
`model.text.lm_head.load_state_dict(safetensors.torch.load_file(OUT), strict=False)`.
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ladic import LaDiC
from ladic.data.captions import load_flickr8k

torch.set_num_threads(1)
torch.manual_seed(0)
model = LaDiC.from_pretrained().eval()
captions = [c for r in load_flickr8k("train") for c in r.captions]
states, ids = [], []
with torch.no_grad():
    for s in range(0, len(captions), 256):
        x0, i = model.text.encode(captions[s : s + 256])
        states.append(model.text.decode_hidden(model.text.denorm(x0)).half())
        ids.append(i)
states, ids = torch.cat(states), torch.cat(ids)
head = model.text.lm_head
params = [p for n, p in head.named_parameters() if not n.startswith("word_embeddings")]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
epochs, batch = 2, 256
sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=epochs * (len(ids) // batch), pct_start=0.05)
for epoch in range(epochs):
    perm = torch.randperm(len(ids))
    for s in range(0, len(ids) - batch + 1, batch):
        rows = perm[s : s + batch]
        loss = F.cross_entropy(head(states[rows].float()).flatten(0, 1), model.text.output_index(ids[rows]).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"epoch {epoch}: loss {loss.item():.3f}", flush=True)
save_file({k: v.contiguous() for k, v in model.text.trainable_state_dict().items()}, sys.argv[1])
