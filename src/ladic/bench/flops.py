"""``ladic bench flops``: achieved GFLOP/s of the model's forwards against a plain fp32 matmul."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ladic.bench.report import fmt_seconds, markdown_header, md_table, pyplot, save_figure
from ladic.bench.timing import example_photos, time_call


def run_flops(
    *, preset_name: str = "small", batch: int = 64, repeats: int = 5, warmup: int = 1, device: str = "cpu",
    matmul_size: int = 1024, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Achieved GFLOP/s of the model's forwards vs a plain fp32 matmul, timed in the same run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ladic.captioner import LaDiC
    from ladic.config import preset
    from ladic.image_io import load_image

    torch.manual_seed(0)
    cfg = preset(preset_name)
    model = LaDiC(cfg).to(device).eval()
    enc, diff = model.image_encoder, model.diffuser
    L, D = cfg.max_length, model.text.dim
    g = torch.Generator().manual_seed(0)
    n = matmul_size
    a, bm = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    x = torch.randn(batch, L, D, generator=g).to(device)
    t = torch.full((batch,), model.diffusion.num_timesteps // 2, device=device)
    with torch.inference_mode():
        pixels = enc.preprocess([load_image(p) for p in example_photos(batch)]).to(device)
        img = enc(pixels).float()
        ctx = diff.image_context(img)
        kv = diff.image_kv(ctx)
        kv2 = diff.image_kv(torch.cat([ctx, diff.null_context(batch)]))
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    cases = [
        ("matmul (reference)", f"{n}x{n} @ {n}x{n} fp32", lambda: a @ bm),
        ("diffuser forward", f"B={batch}, L={L}, image K/V precomputed", lambda: diff(x, t, x, kv)),
        ("diffuser forward, CFG pair", f"B=2x{batch}, L={L} (one guided step)", lambda: diff(x2, t2, x2, kv2)),
        ("text decoder + LM head", f"B={batch}, L={L} (upper BERT + tied LM head)", lambda: model.text.logits(x)),
        (f"image encoder ({cfg.image_encoder})", f"B={batch}, pixels {tuple(pixels.shape[1:])}", lambda: enc(pixels)),
    ]
    rows = []
    for name, shape, fn in cases:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
        flops = counter.get_total_flops()
        ops = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
        times, _ = time_call(fn, repeats, warmup, device)
        med = statistics.median(times)
        rows.append({"case": name, "shape": shape, "flops": int(flops), "median_s": med, "min_s": min(times),
                     "times_s": times, "gflops_per_s": flops / med / 1e9 if med > 0 else None, "counted_ops": ops})
        log(f"flops {name:34s} {flops / 1e9:9.2f} GFLOP  {fmt_seconds(med):>10s}  {flops / med / 1e9:8.1f} GFLOP/s")
    ref = rows[0]["gflops_per_s"]
    for r in rows:
        r["fraction_of_matmul"] = r["gflops_per_s"] / ref if ref else None
    notes = [
        f"`{preset_name}` preset, randomly initialised; batch {batch}, caption length L={L}, text width {D}, "
        f"{cfg.num_layers} diffuser layers of {cfg.hidden_size}; device {device}.",
        "FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one call (a multiply-add = 2 FLOPs). It counts "
        "matmuls, convolutions and the attention kernels it has formulas for; element-wise ops, LayerNorm, "
        "softmax and GELU are not counted. Counted ops per row are in the JSON.",
        f"Time: median of {repeats} calls after {warmup} warm-up(s), torch.inference_mode.",
    ]
    diff_ops = rows[1]["counted_ops"]
    if not any("attention" in k for k in diff_ops):
        heads_flops = 4 * batch * cfg.num_layers * cfg.hidden_size * (L * L + (L * enc.num_tokens if diff.cross else 0))
        notes.append(
            f"On this build FlopCounterMode does not count scaled_dot_product_attention ({', '.join(diff_ops)} only); "
            f"the attention matmuls of the diffuser forward add about {heads_flops / 1e9:.2f} GFLOP "
            f"({100 * heads_flops / max(rows[1]['flops'], 1):.1f}% of the counted), not included above.")
    return {"notes": notes, "rows": rows}


def flops_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    parts = [markdown_header("LaDiC benchmark: achieved GFLOP/s", meta)]
    parts += [f"- {n}" for n in result["notes"]] + [""]
    table = [[r["case"], r["shape"], f"{r['flops'] / 1e9:.2f}", fmt_seconds(r["median_s"]),
              f"{r['gflops_per_s']:.1f}", f"{100 * r['fraction_of_matmul']:.0f}%"] for r in result["rows"]]
    parts += [md_table(["case", "shape", "GFLOP", "median time", "GFLOP/s", "of matmul"], table), ""]
    return "\n".join(parts)


def flops_plot(result: dict[str, Any], path: Path, meta: dict[str, Any]) -> None:
    plt = pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    ax.barh([r["case"] for r in rows][::-1], [r["gflops_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("achieved GFLOP/s")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, path, meta)
