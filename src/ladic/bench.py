"""``ladic bench``: latency, FLOP/s, quality, quality-by-length and ablation tables (markdown + JSON) and plots (PNG).

Subcommands (``ladic bench WHAT ...``; ``all`` = latency flops quality lengths):

- ``latency``: seconds per ``generate`` call vs caption length (paper Fig. 2a) for LaDiC at several step counts
  and the AR baseline (greedy and beam), per batch size, decoder-only (from precomputed image tokens) and
  end-to-end (image encoder included, photos from ``skimage.data``). Models are randomly initialised
  (``--preset``, default ``small``): timing does not depend on the weights once the AR baseline is kept from
  stopping early, which is done by banning [SEP] (``banned`` buffer) so that it runs exactly N decode steps.
- ``flops``: achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``) of the diffuser
  forward, the text decoder + LM head and the image encoder at one batch size, against a plain fp32 matmul
  timed in the same run.
- ``quality``: BLEU-4 / METEOR / ROUGE-L / CIDEr and decode seconds on Flickr8k val for LaDiC sampling settings
  (steps, Back&Refine, MBR, guidance) and the AR baseline (greedy, beam). Image features come from the
  feature cache (``ladic.evaluate.caption_split``), so a row costs only its decoding.
- ``lengths``: corpus BLEU-4 per bucket of mean reference length (words) for LaDiC and AR (paper Fig. 2b).
- ``ablations``: Table-5 style ablations, each trained with the same short budget via ``ladic.train.train``
  (resumable, skipped when ``<work-dir>/<variant>/final`` exists), then scored like ``quality``.

Every file written starts with the command line, the date (UTC) and the machine (CPU model, cores, torch
version and threads).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SUBCOMMANDS = ("latency", "flops", "quality", "lengths", "ablations")
ALL = ("latency", "flops", "quality", "lengths")  # ``all``: everything except the ablations, which train
DEFAULT_LENGTHS = (8, 16, 24, 32, 48, 60)
DEFAULT_BUCKET_EDGES = (9, 11, 13)  # mean reference words: <=9, 10-11, 12-13, >=14
QUALITY_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")  # RGB photos


# ============================================================================ run description
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def command_line() -> str:
    """The process's command line, with the ``ladic`` entry point shown by name."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "ladic":
        argv[0] = "ladic"
    return shlex.join(argv)


def run_meta(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Command line, date (UTC), machine, torch version and threads, package version, options."""
    import torch

    from ladic import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "command": command_line(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": {
            "cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(), "load_average_1min": load,
        },
        "ladic_version": __version__,
        "git_commit": _git_commit(),
        "options": {k: _jsonable(v) for k, v in (options or {}).items() if k != "func"},
    }


def machine_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    s = (f"{m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), torch {m['torch']}, "
         f"{m['torch_threads']} torch threads")
    if m.get("cuda"):
        s += f", GPU {m['cuda']}"
    if m.get("load_average_1min") is not None:
        s += f", 1-min load average {m['load_average_1min']} at start"
    return s


def markdown_header(title: str, meta: dict[str, Any]) -> str:
    lines = [f"# {title}", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date_utc']}",
             f"- machine: {machine_line(meta)}",
             f"- ladic {meta['ladic_version']}" + (f", git {meta['git_commit']}" if meta.get("git_commit") else ""),
             ""]
    return "\n".join(lines)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def fmt_score(v: float | None, scale: float = 100.0) -> str:
    return "-" if v is None else f"{v * scale:.1f}"


def write_json(path: Path, meta: dict[str, Any], payload: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, **payload}, indent=1))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, meta: dict[str, Any]) -> None:
    """Save with the command, date and machine printed above the plots and stored in the PNG metadata."""
    cmd = meta["command"]
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    info = f"{cmd}\n{meta['date_utc']} | {machine_line(meta)}"
    fig.text(0.0, 1.0, info, fontsize=6, family="monospace", ha="left", va="bottom", transform=fig.transFigure)
    fig.savefig(path, dpi=120, bbox_inches="tight",
                metadata={"Title": path.stem, "Description": json.dumps(meta), "Software": "ladic bench"})
    _pyplot().close(fig)


# ============================================================================ timing helpers
def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> tuple[list[float], Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns (seconds per call, last output)."""
    import torch

    out = None
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        _sync(device)
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times, out


def example_photos(n: int) -> list:
    """``n`` real photos from ``skimage.data`` (uint8 H x W x 3 arrays), cycled."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    return [photos[i % len(photos)] for i in range(n)]


# ============================================================================ latency
@dataclass(frozen=True)
class LatencySystem:
    """One decoder configuration of the latency benchmark."""

    system: str  # "LaDiC" or "AR"
    steps: int | None = None  # LaDiC denoising iterations
    back_and_refine: bool | None = None
    beams: int | None = None  # AR: 1 = greedy

    @property
    def label(self) -> str:
        if self.system == "AR":
            return "AR greedy" if self.beams == 1 else f"AR beam {self.beams}"
        return f"LaDiC {self.steps} step{'s' if self.steps != 1 else ''}" + (" +B&R" if self.back_and_refine else "")


def latency_systems(steps: Sequence[int], bnr: Sequence[bool], beams: int) -> list[LatencySystem]:
    out = [LatencySystem("LaDiC", steps=s, back_and_refine=b) for s in steps for b in bnr]
    return out + [LatencySystem("AR", beams=1)] + ([LatencySystem("AR", beams=beams)] if beams > 1 else [])


def build_timing_models(preset_name: str, length: int, image_encoder, device: str):
    """Randomly initialised LaDiC (sequence of ``length`` latents) and AR baseline (``length`` decode steps)
    sharing ``image_encoder``. The AR model never emits [SEP], so it always runs all ``length`` steps."""
    from ladic.baselines.ar import ARCaptioner
    from ladic.captioner import LaDiC
    from ladic.config import preset

    ladic = LaDiC(preset(preset_name, max_length=length), image_encoder=image_encoder).to(device).eval()
    ar = ARCaptioner(preset(preset_name, max_length=length + 1), image_encoder=image_encoder).to(device).eval()
    ar.banned[ar.eos_id] = True  # forced length: no early stop, exactly `length` new tokens
    return ladic, ar


def run_latency(
    *, preset_name: str = "small", lengths: Sequence[int] = DEFAULT_LENGTHS, batch_sizes: Sequence[int] = (1, 64),
    steps: Sequence[int] = (1, 5, 30), bnr: Sequence[bool] = (True,), beams: int = 3, guidance: float | None = None,
    modes: Sequence[str] = ("decoder", "e2e"), repeats: int = 5, warmup: int = 1, device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time ``generate`` for every (length, batch, mode, system). Returns {"notes", "rows"}."""
    import torch

    from ladic.config import preset
    from ladic.image_encoders import build_image_encoder
    from ladic.image_io import load_image

    for m in modes:
        if m not in ("decoder", "e2e"):
            raise ValueError(f"unknown latency mode {m!r}; use decoder and/or e2e")
    cfg0 = preset(preset_name)
    w = cfg0.guidance_scale if guidance is None else guidance
    encoder = build_image_encoder(cfg0.image_encoder).to(device).eval()
    photos = {b: example_photos(b) for b in batch_sizes}
    with torch.inference_mode():
        feats = {b: encoder.encode([load_image(p) for p in photos[b]]).to(device).float() for b in batch_sizes}
    systems = latency_systems(steps, bnr, beams)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        torch.manual_seed(0)
        ladic, ar = build_timing_models(preset_name, length, encoder, device)
        for b in batch_sizes:
            for mode in modes:
                inputs = feats[b] if mode == "decoder" else photos[b]
                for s in systems:
                    if s.system == "LaDiC":
                        def fn(s=s, inputs=inputs, b=b):
                            return ladic.generate(inputs, num_inference_steps=s.steps, guidance_scale=w,
                                                  back_and_refine=s.back_and_refine, seed=0, batch_size=b)
                    else:
                        def fn(s=s, inputs=inputs, b=b):
                            return ar.generate(inputs, num_beams=s.beams, max_new_tokens=length, batch_size=b)
                    times, out = time_call(fn, repeats, warmup, device)
                    med = statistics.median(times)
                    rows.append({
                        "system": s.system, "label": s.label, "steps": s.steps, "back_and_refine": s.back_and_refine,
                        "guidance": w if s.system == "LaDiC" else None, "beams": s.beams, "length": length,
                        "batch": b, "mode": mode, "nfe": out.num_evaluations, "median_s": med, "min_s": min(times),
                        "times_s": times, "ms_per_image": med * 1e3 / b,
                    })
                    log(f"latency L={length} B={b} {mode:7s} {s.label:22s} NFE={out.num_evaluations:3d} "
                        f"median {fmt_seconds(med)}")
        del ladic, ar
    notes = [
        f"Models: `{preset_name}` preset, randomly initialised (timing does not depend on the weights); "
        f"image encoder {cfg0.image_encoder}, shared by both systems.",
        "Length N: LaDiC denoises a sequence of N latents (`max_length=N`, [CLS] and [SEP] included); the AR "
        "baseline (`max_length=N+1`) runs exactly N decode steps after [CLS] (N new tokens, KV cache on): its "
        "[SEP] is banned for the benchmark, so no sequence stops early. One `generate` call per timing.",
        f"LaDiC: classifier-free guidance w={w:g} (both branches in one batched forward of 2B), "
        "Back&Refine as in the label (`+B&R`): it restarts the schedule once t <= T/2, hence NFE > steps; with "
        "1 step it never triggers (the only step is at t > T/2). "
        "NFE = denoiser forwards (LaDiC) or decoder steps (AR), from `CaptionOutput.num_evaluations`.",
        f"Timing: median of {repeats} calls after {warmup} warm-up call(s), under torch.inference_mode, "
        f"device {device}. `decoder`: from precomputed image tokens; `e2e`: from uint8 photos of skimage.data "
        "(load_image + image encoder + decoding).",
    ]
    return {"notes": notes, "rows": rows}


def latency_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = result["rows"]
    lengths = sorted({r["length"] for r in rows})
    parts = [markdown_header("LaDiC benchmark: latency vs caption length (paper Fig. 2a)", meta)]
    parts += [f"- {n}" for n in result["notes"]] + [""]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows):
            sel = [r for r in rows if r["mode"] == mode and r["batch"] == b]
            if not sel:
                continue
            name = "decoder only (precomputed image tokens)" if mode == "decoder" else "end to end (image encoder included)"
            parts += [f"## {name}, batch {b}: median seconds per call", ""]
            table = []
            for label in labels:
                mine = {r["length"]: r for r in sel if r["label"] == label}
                if not mine:
                    continue
                nfes = {r["nfe"] for r in mine.values()}
                nfe = str(nfes.pop()) if len(nfes) == 1 else ("N" if all(r["nfe"] == n for n, r in mine.items())
                                                              else "/".join(str(mine[n]["nfe"]) for n in sorted(mine)))
                table.append([label, nfe] + [fmt_seconds(mine[n]["median_s"]) if n in mine else "-" for n in lengths])
            parts += [md_table(["system", "NFE"] + [f"N={n}" for n in lengths], table), ""]
    return "\n".join(parts)


def latency_plot(result: dict[str, Any], path: Path, meta: dict[str, Any]) -> None:
    plt = _pyplot()
    rows = result["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(batches), figsize=(5 * len(batches), 3.8 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for label in labels:
                pts = sorted((r["length"], r["median_s"]) for r in rows if r["mode"] == mode and r["batch"] == b
                             and r["label"] == label)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if label.startswith("AR") else "-",
                            label=label)
            ax.set_yscale("log")
            ax.set_xticks(sorted({r["length"] for r in rows}))
            ax.set_xlabel("caption length N (tokens)")
            ax.set_ylabel("median seconds per call")
            ax.set_title(f"{'decoder only' if mode == 'decoder' else 'end to end'}, batch {b}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, meta)


# ============================================================================ flops
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
    plt = _pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    ax.barh([r["case"] for r in rows][::-1], [r["gflops_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("achieved GFLOP/s")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, path, meta)


# ============================================================================ quality
@dataclass(frozen=True)
class QualityRow:
    """One row of the quality table: which model and its ``generate`` arguments."""

    name: str
    model: str  # "ladic" or "ar"
    sampling: dict[str, Any] = field(default_factory=dict, hash=False)


def ladic_sampling(steps: int = 5, back_and_refine: bool = True, mbr: int = 1, guidance: float = 1.0,
                   seed: int = 0) -> dict[str, Any]:
    return dict(num_inference_steps=steps, back_and_refine=back_and_refine, mbr_candidates=mbr,
                guidance_scale=float(guidance), seed=seed)


def _ladic_row(steps: int, bnr: bool, mbr: int, w: float) -> QualityRow:
    name = f"LaDiC {steps} step{'s' if steps != 1 else ''}, {'B&R' if bnr else 'no B&R'}, {'MBR ' + str(mbr) if mbr > 1 else 'no MBR'}, w={w:g}"
    return QualityRow(name, "ladic", ladic_sampling(steps, bnr, mbr, w))


def quality_rows(grid: str = "axes", steps: Sequence[int] = (5, 30), mbr: int = 5,
                 guidances: Sequence[float] = (0, 1, 2), beams: int = 3, ar: bool = True) -> list[QualityRow]:
    """``axes``: for each step count, the default (B&R on, no MBR, w=1) and each other factor changed alone;
    ``full``: every combination of steps x B&R x MBR x guidance. Then AR greedy and beam."""
    rows: list[QualityRow] = []
    if grid == "full":
        for s, bnr, k, w in itertools.product(steps, (True, False), (1, mbr), guidances):
            rows.append(_ladic_row(s, bnr, k, w))
    elif grid == "axes":
        for s in steps:
            rows.append(_ladic_row(s, True, 1, 1.0))
            rows.append(_ladic_row(s, False, 1, 1.0))
            if mbr > 1:
                rows.append(_ladic_row(s, True, mbr, 1.0))
            rows += [_ladic_row(s, True, 1, w) for w in guidances if float(w) != 1.0]
    else:
        raise ValueError(f"unknown grid {grid!r}; use axes or full")
    if ar:
        rows.append(QualityRow("AR greedy", "ar", {"num_beams": 1}))
        if beams > 1:
            rows.append(QualityRow(f"AR beam {beams}", "ar", {"num_beams": beams}))
    return rows


class CaptionMemo:
    """Captions per (model, sampling, images), so ``quality`` and ``lengths`` in one run decode once."""

    def __init__(self) -> None:
        self._store: dict[tuple, tuple[dict[str, str], float]] = {}

    def get(self, model, records, sampling: dict[str, Any], batch_size: int = 64,
            progress: bool = False) -> tuple[dict[str, str], float]:
        from ladic.evaluate import caption_split

        key = (id(model), json.dumps(sampling, sort_keys=True), tuple(r.image_id for r in records), batch_size)
        if key not in self._store:
            self._store[key] = caption_split(model, records, sampling=sampling, batch_size=batch_size,
                                             progress=progress)
        return self._store[key]


def _require_java() -> None:
    from ladic.metrics import JAVA_INSTALL_HINT, java_available

    ok, why = java_available()
    if not ok:
        raise RuntimeError(f"Java is required for the COCO caption metrics ({why}); {JAVA_INSTALL_HINT}")


def quality_table(
    models: dict[str, Any], records, rows: Sequence[QualityRow], *, batch_size: int = 64, bert_score: bool = False,
    memo: CaptionMemo | None = None, progress: bool = False, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Caption ``records`` with every row's model/sampling (``caption_split``: cached image features) and score
    each with ``coco_metrics``. ``models``: {"ladic": LaDiC, "ar": ARCaptioner or None}; rows of a missing model
    are skipped."""
    from ladic.metrics import coco_metrics

    _require_java()
    memo = memo or CaptionMemo()
    refs = {r.image_id: r.captions for r in records}
    out = []
    for row in rows:
        model = models.get(row.model)
        if model is None:
            continue
        results, seconds = memo.get(model, records, row.sampling, batch_size, progress)
        res = coco_metrics(results, refs, bert_score_model="minilm" if bert_score else None)
        scores = {m: res.scores.get(m) for m in QUALITY_METRICS + (("BERT-Score",) if bert_score else ())}
        out.append({"name": row.name, "model": row.model, "sampling": row.sampling, "images": len(records),
                    "scores": scores, "decode_s": seconds, "ms_per_image": 1e3 * seconds / max(len(records), 1),
                    "examples": [results[r.image_id] for r in records[:3]]})
        log(f"quality {row.name:45s} " + " ".join(f"{m}={fmt_score(v)}" for m, v in scores.items())
            + f" decode {seconds:.2f} s")
    return out


def quality_markdown(rows: list[dict[str, Any]], notes: list[str], meta: dict[str, Any],
                     title: str = "LaDiC benchmark: caption quality on Flickr8k val") -> str:
    parts = [markdown_header(title, meta)]
    parts += [f"- {n}" for n in notes] + [""]
    metrics = list(rows[0]["scores"]) if rows else list(QUALITY_METRICS)
    table = [[r["name"]] + [fmt_score(r["scores"][m]) for m in metrics]
             + [f"{r['decode_s']:.2f}", f"{r['ms_per_image']:.1f}"] for r in rows]
    parts += [md_table(["setting"] + metrics + ["decode s", "ms / image"], table), ""]
    return "\n".join(parts)


def quality_plot(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        c = r["scores"].get("CIDEr")
        if c is None:
            continue
        ax.scatter(r["decode_s"], 100 * c, color="tab:orange" if r["model"] == "ar" else "tab:blue")
        ax.annotate(r["name"].replace("LaDiC ", ""), (r["decode_s"], 100 * c), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"decode seconds ({rows[0]['images'] if rows else 0} images)")
    ax.set_ylabel("CIDEr")
    ax.set_title("quality vs decoding time (blue LaDiC, orange AR)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path, meta)


# ============================================================================ lengths
def bucket_labels(edges: Sequence[int]) -> list[str]:
    labels, lo = [], None
    for e in edges:
        labels.append(f"<={e}" if lo is None else (f"{lo}" if lo == e else f"{lo}-{e}"))
        lo = e + 1
    labels.append(f">={lo}")
    return labels


def bucket_of(mean_words: float, edges: Sequence[int]) -> int:
    """Bucket index of a mean reference length; bucket i holds (edges[i-1], edges[i]] (rounded half up)."""
    w = int(mean_words + 0.5)
    for i, e in enumerate(edges):
        if w <= e:
            return i
    return len(edges)


def lengths_table(
    systems: Sequence[tuple[str, Any, dict[str, Any]]], records, edges: Sequence[int] = DEFAULT_BUCKET_EDGES, *,
    batch_size: int = 64, memo: CaptionMemo | None = None, progress: bool = False, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Corpus BLEU-4 (pycocoevalcap, PTB-tokenized as ``coco_metrics``) per bucket of mean reference length.

    ``systems``: (label, model, sampling). Returns {"buckets": [...], "rows": [{label, per bucket ...}]}."""
    from pycocoevalcap.bleu.bleu import Bleu

    from ladic.metrics import _ptb_tokenize  # the tokenization coco_metrics uses

    _require_java()
    memo = memo or CaptionMemo()
    labels = bucket_labels(edges)
    refs = {r.image_id: r.captions for r in records}
    mean_len = {r.image_id: sum(len(c.split()) for c in r.captions) / len(r.captions) for r in records}
    members: list[list[str]] = [[] for _ in labels]
    for r in records:
        members[bucket_of(mean_len[r.image_id], edges)].append(r.image_id)
    rows = []
    for label, model, sampling in systems:
        results, seconds = memo.get(model, records, sampling, batch_size, progress)
        ids = list(results)
        gts, res = _ptb_tokenize(ids, results, refs)
        per = []
        for name, ids_b in zip(labels, members):
            if not ids_b:
                per.append({"bucket": name, "images": 0, "BLEU-4": None, "mean_caption_words": None})
                continue
            score, _ = Bleu(4).compute_score({i: gts[i] for i in ids_b}, {i: res[i] for i in ids_b}, verbose=0)
            per.append({"bucket": name, "images": len(ids_b), "BLEU-4": float(score[3]),
                        "mean_caption_words": sum(len(results[i].split()) for i in ids_b) / len(ids_b)})
        overall, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rows.append({"label": label, "sampling": sampling, "decode_s": seconds, "overall_BLEU-4": float(overall[3]),
                     "buckets": per})
        log(f"lengths {label:30s} " + " ".join(f"{p['bucket']}:{fmt_score(p['BLEU-4'])}" for p in per))
    buckets = [{"bucket": name, "images": len(m),
                "mean_reference_words": (sum(mean_len[i] for i in m) / len(m)) if m else None}
               for name, m in zip(labels, members)]
    return {"buckets": buckets, "rows": rows}


def lengths_markdown(result: dict[str, Any], notes: list[str], meta: dict[str, Any]) -> str:
    parts = [markdown_header("LaDiC benchmark: BLEU-4 vs reference caption length (paper Fig. 2b)", meta)]
    parts += [f"- {n}" for n in notes] + [""]
    heads = [f"{b['bucket']} words ({b['images']} img)" for b in result["buckets"]]
    table = [[r["label"]] + [fmt_score(p["BLEU-4"]) for p in r["buckets"]] + [fmt_score(r["overall_BLEU-4"])]
             for r in result["rows"]]
    parts += ["BLEU-4 (x100) per bucket of mean reference length:", "",
              md_table(["system"] + heads + ["all"], table), ""]
    table = [[r["label"]] + ["-" if p["mean_caption_words"] is None else f"{p['mean_caption_words']:.1f}"
                             for p in r["buckets"]] for r in result["rows"]]
    parts += ["Mean generated caption length (words) per bucket:", "", md_table(["system"] + heads, table), ""]
    return "\n".join(parts)


def lengths_plot(result: dict[str, Any], path: Path, meta: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = [f"{b['bucket']}\n({b['images']})" for b in result["buckets"]]
    for r in result["rows"]:
        ys = [None if p["BLEU-4"] is None else 100 * p["BLEU-4"] for p in r["buckets"]]
        ax.plot(range(len(names)), [float("nan") if y is None else y for y in ys], marker="o",
                ls="--" if r["label"].startswith("AR") else "-", label=r["label"])
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("mean reference length, words (images)")
    ax.set_ylabel("BLEU-4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, meta)


# ============================================================================ ablations
@dataclass(frozen=True)
class Ablation:
    name: str
    description: str
    model: dict[str, Any] | None  # LaDiCConfig overrides to train with; None = reuse "full"
    sampling: dict[str, Any] = field(default_factory=dict, hash=False)


RESTORE_TIMESTEPS = (300, 600, 900)

ABLATIONS = (
    Ablation("full", "full model", {}),
    Ablation("no_caption_loss", "no caption loss (caption_loss_weight=0)", {"caption_loss_weight": 0.0}),
    Ablation("no_norm_reassign", "no normalisation / special-token reassignment "
             "(normalize_latents=False, special_token_latent=none)",
             {"normalize_latents": False, "special_token_latent": "none"}),
    Ablation("prepend_image", "image as a prepended [CLS] token, no cross-attention (image_conditioning=prepend)",
             {"image_conditioning": "prepend"}),
    Ablation("no_back_and_refine", "full model, Back&Refine off at inference", None, {"back_and_refine": False}),
    Ablation("dinov2_encoder", "image encoder DINOv2-S (257 tokens) instead of EfficientNet-Lite0 (49)",
             {"image_encoder": "dinov2-s"}),
)


def ablation_train_config(name: str, overrides: dict[str, Any], work_dir: Path, *, preset_name: str = "small",
                          max_steps: int = 400, train_images: int = 2000, batch_size: int = 64,
                          progress: bool = False):
    from ladic.train import TrainConfig

    return TrainConfig(
        preset=preset_name, model=dict(overrides), data="flickr8k", train_images=train_images, max_steps=max_steps,
        batch_size=batch_size, val_images=0, eval_every=0, save_every=max(min(100, max_steps), 1),
        out_dir=str(work_dir / name), progress=progress, log_every=max(min(50, max_steps), 1),
    )


def _last_log(out: Path) -> dict[str, Any]:
    last: dict[str, Any] = {}
    log = out / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                last = rec
    return last


def run_ablations(
    records, work_dir: Path, *, ablations: Sequence[Ablation] = ABLATIONS, preset_name: str = "small",
    max_steps: int = 400, train_images: int = 2000, batch_size: int = 64, eval_steps: int = 5,
    caption_batch: int = 64, progress: bool = False, train_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each variant (skipped when ``<work_dir>/<name>/final`` exists; resumed from its checkpoint
    otherwise), then caption ``records`` with ``eval_steps`` steps and score with ``coco_metrics``."""
    from ladic.data.features import build_features
    from ladic.evaluate import denoising_accuracy, feature_cache_dir
    from ladic.metrics import coco_metrics
    from ladic.models import load_model

    _require_java()
    if train_fn is None:
        from ladic.train import train as train_fn  # noqa: N811
    work_dir = Path(work_dir)
    trained: dict[str, dict[str, Any]] = {}
    for ab in ablations:
        if ab.model is None:
            continue
        out = work_dir / ab.name
        tc = ablation_train_config(ab.name, ab.model, work_dir, preset_name=preset_name, max_steps=max_steps,
                                   train_images=train_images, batch_size=batch_size, progress=progress)
        skipped = (out / "final" / "config.json").is_file()
        t0 = time.perf_counter()
        if skipped:
            log(f"ablation {ab.name}: {out / 'final'} exists, not training")
        else:
            log(f"ablation {ab.name}: training {max_steps} steps into {out}")
            train_fn(tc, resume=True)
        trained[ab.name] = {"dir": str(out / "final"), "skipped_training": skipped,
                            "train_wall_s_this_run": None if skipped else time.perf_counter() - t0,
                            "train_config": {k: _jsonable(v) if not isinstance(v, dict) else v
                                             for k, v in vars(tc).items()},
                            "last_log": _last_log(out)}
    refs = {r.image_id: r.captions for r in records}
    memo = CaptionMemo()
    restore: dict[str, dict[int, float]] = {}
    rows = []
    for ab in ablations:
        src = ab.name if ab.model is not None else "full"
        if src not in trained:
            raise ValueError(f"ablation {ab.name} evaluates the 'full' model, which is not in this run")
        model = load_model(trained[src]["dir"])
        if src not in restore:
            feats = build_features(model, records, feature_cache_dir(), progress=progress)
            restore[src] = denoising_accuracy(model, feats, RESTORE_TIMESTEPS)
        sampling = {"num_inference_steps": eval_steps, "seed": 0, **ab.sampling}
        results, seconds = memo.get(model, records, sampling, caption_batch, progress)
        res = coco_metrics(results, refs, bert_score_model=None)
        scores = {m: res.scores.get(m) for m in QUALITY_METRICS}
        info = trained[src]
        rows.append({"name": ab.name, "description": ab.description, "model_overrides": ab.model or {},
                     "trained_as": src, "sampling": sampling, "images": len(records), "scores": scores,
                     "restore_accuracy": restore[src],
                     "decode_s": seconds, "final_train_loss": info["last_log"].get("loss"),
                     "final_caption_loss": info["last_log"].get("caption"),
                     "train_elapsed_s": info["last_log"].get("elapsed_s"), "model_dir": info["dir"],
                     "skipped_training": info["skipped_training"]})
        log(f"ablation {ab.name:20s} " + " ".join(f"{m}={fmt_score(v)}" for m, v in scores.items()))
    return {"rows": rows, "trained": trained}


def ablations_markdown(result: dict[str, Any], notes: list[str], meta: dict[str, Any]) -> str:
    parts = [markdown_header("LaDiC benchmark: ablations (paper Table 5, short CPU budget)", meta)]
    parts += [f"- {n}" for n in notes] + [""]
    table = [[r["description"]] + [fmt_score(r["scores"][m]) for m in QUALITY_METRICS]
             + [fmt_score(r["restore_accuracy"][t]) for t in RESTORE_TIMESTEPS]
             + ["-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}", f"{r['decode_s']:.2f}"]
             for r in result["rows"]]
    restore = [f"restore % t={t}" for t in RESTORE_TIMESTEPS]
    parts += [md_table(["variant"] + list(QUALITY_METRICS) + restore + ["final train loss", "decode s"], table), ""]
    parts += ["restore % t: word tokens of the first reference recovered by one denoiser call from x_t ~ q(x_t | x0) "
              "with the image (`ladic.evaluate.denoising_accuracy`); it separates variants whose sampled captions "
              "are still near zero at a short budget.", ""]
    return "\n".join(parts)


# ============================================================================ CLI
def _ints(s: str | Sequence[int]) -> list[int]:
    if isinstance(s, str):
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    return [int(x) for x in s]


def _floats(s: str | Sequence[float]) -> list[float]:
    if isinstance(s, str):
        return [float(x) for x in s.replace(" ", "").split(",") if x]
    return [float(x) for x in s]


def _bnr_modes(s: str) -> list[bool]:
    out = []
    for x in s.replace(" ", "").split(","):
        if x not in ("on", "off"):
            raise ValueError(f"--bnr takes on, off or on,off (got {s!r})")
        out.append(x == "on")
    return out


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``ladic bench`` beyond those cli.py declares itself."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--preset", default="small", help="latency/flops: preset of the randomly initialised models")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="latency: caption lengths N")
    p.add_argument("--batch-sizes", default="1,64", help="latency: batch sizes")
    p.add_argument("--steps", default="1,5,30", help="latency: LaDiC denoising steps")
    p.add_argument("--bnr", default="on", help="latency: Back&Refine on, off or on,off (default on)")
    p.add_argument("--guidance", type=float, default=None, help="latency: LaDiC guidance w (default: preset's, 1.0)")
    p.add_argument("--beams", type=int, default=3, help="AR beam width of the beam rows (latency, quality, lengths)")
    p.add_argument("--modes", default="decoder,e2e", help="latency: decoder (precomputed image tokens) and/or e2e")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each timing")
    p.add_argument("--flops-batch", type=int, default=64, help="flops: batch size")
    p.add_argument("--matmul-size", type=int, default=1024, help="flops: n of the n x n reference matmul")
    p.add_argument("--split", default="val", help="quality/lengths/ablations: Flickr8k split")
    p.add_argument("--grid", choices=("axes", "full"), default="axes",
                   help="quality: axes = one factor at a time per step count; full = all combinations")
    p.add_argument("--quality-steps", default="5,30", help="quality: LaDiC step counts")
    p.add_argument("--mbr", type=int, default=5, help="quality: MBR candidates of the MBR rows")
    p.add_argument("--guidances", default="0,1,2", help="quality: guidance weights")
    p.add_argument("--bert-score", action="store_true", help="quality: also BERT-Score (MiniLM; slow)")
    p.add_argument("--caption-batch", type=int, default=64, help="quality/lengths/ablations: images per batch")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKET_EDGES)),
                   help="lengths: upper edges of the mean-reference-length buckets in words (9,11,13: <=9 10-11 12-13 >=14)")
    p.add_argument("--work-dir", default=str(Path.home() / "ladic_runs" / "ablations"),
                   help="ablations: training folders (a variant with <dir>/final is not retrained)")
    p.add_argument("--max-steps", type=int, default=400, help="ablations: training steps per variant")
    p.add_argument("--train-images", type=int, default=2000, help="ablations: training images")
    p.add_argument("--variants", default=",".join(a.name for a in ABLATIONS), help="ablations: which variants")
    p.add_argument("--progress", action="store_true", help="progress bars")


class _Session:
    """Models, records and captions shared by the subcommands of one ``ladic bench`` run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.memo = CaptionMemo()
        self._models: dict[str, Any] = {}
        self._records = None

    def ladic(self):
        if "ladic" not in self._models:
            from ladic.captioner import LaDiC
            from ladic.models import load_model

            m = load_model(self.args.model, device=self.args.device)
            if not isinstance(m, LaDiC):
                raise ValueError(f"--model {self.args.model} is not a LaDiC model folder")
            self._models["ladic"] = m
        return self._models["ladic"]

    def ar_path(self) -> str | None:
        """The AR baseline folder of ``--ar-model`` ("shipped": the packaged one if present; "none": no AR rows)."""
        from ladic.baselines.ar import default_ar_model_path

        choice = self.args.ar_model
        if choice == "shipped":
            return str(default_ar_model_path()) if default_ar_model_path().is_dir() else None
        return None if choice in (None, "none") else choice

    def ar(self):
        path = self.ar_path()
        if path is None:
            return None
        if "ar" not in self._models:
            from ladic.baselines.ar import ARCaptioner
            from ladic.models import load_model

            m = load_model(path, device=self.args.device)
            if not isinstance(m, ARCaptioner):
                raise ValueError(f"--ar-model {self.args.ar_model} is not an AR baseline folder (model_type 'ar')")
            self._models["ar"] = m
        return self._models["ar"]

    def records(self):
        if self._records is None:
            from ladic.data.captions import load_flickr8k

            recs = load_flickr8k(self.args.split)
            self._records = recs[: self.args.limit] if self.args.limit else recs
        return self._records

    def data_notes(self) -> list[str]:
        a = self.args
        n = len(self.records())
        notes = [f"Data: Flickr8k {a.split}, {'the first ' if a.limit else 'all '}{n} images, 5 references each."]
        notes.append(f"LaDiC model: {a.model or 'shipped default'}; AR model: {self.ar_path() or 'none (AR rows skipped)'}.")
        return notes


def _cmd_latency(args: argparse.Namespace, session: _Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    res = run_latency(preset_name=args.preset, lengths=_ints(args.lengths), batch_sizes=_ints(args.batch_sizes),
                      steps=_ints(args.steps), bnr=_bnr_modes(args.bnr), beams=args.beams, guidance=args.guidance,
                      modes=[m for m in args.modes.split(",") if m], repeats=args.repeats, warmup=args.warmup,
                      device=args.device)
    paths = [out_dir / "latency.json", out_dir / "latency.md", out_dir / "latency.png"]
    write_json(paths[0], meta, res)
    paths[1].write_text(latency_markdown(res, meta))
    latency_plot(res, paths[2], meta)
    return paths


def _cmd_flops(args: argparse.Namespace, session: _Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    res = run_flops(preset_name=args.preset, batch=args.flops_batch, repeats=args.repeats, warmup=args.warmup,
                    device=args.device, matmul_size=args.matmul_size)
    paths = [out_dir / "flops.json", out_dir / "flops.md", out_dir / "flops.png"]
    write_json(paths[0], meta, res)
    paths[1].write_text(flops_markdown(res, meta))
    flops_plot(res, paths[2], meta)
    return paths


def write_quality(rows: list[dict[str, Any]], notes: list[str], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    paths = [out_dir / "quality.json", out_dir / "quality.md", out_dir / "quality.png"]
    write_json(paths[0], meta, {"notes": notes, "rows": rows})
    paths[1].write_text(quality_markdown(rows, notes, meta))
    quality_plot(rows, paths[2], meta)
    return paths


def _cmd_quality(args: argparse.Namespace, session: _Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    models = {"ladic": session.ladic(), "ar": session.ar()}
    rows = quality_rows(args.grid, _ints(args.quality_steps), args.mbr, _floats(args.guidances), args.beams,
                        ar=models["ar"] is not None)
    table = quality_table(models, session.records(), rows, batch_size=args.caption_batch, bert_score=args.bert_score,
                          memo=session.memo, progress=args.progress)
    notes = session.data_notes() + [
        "Scores x100 from `ladic.metrics.coco_metrics` (pycocoevalcap; CIDEr = CIDEr-D). "
        + ("BERT-Score: MiniLM (not the paper's roberta-large)." if args.bert_score else "BERT-Score off."),
        "Decode seconds: `ladic.evaluate.caption_split` (from cached image features, so image encoding is not "
        f"included), batch {args.caption_batch}, device {args.device}; seed 0. B&R = Back&Refine; MBR k draws k "
        "captions per image and keeps the minimum-Bayes-risk one; w = classifier-free guidance weight.",
    ]
    return write_quality(table, notes, out_dir, meta)


def _lengths_systems(session: _Session, beams: int) -> list[tuple[str, Any, dict[str, Any]]]:
    m = session.ladic()
    cfg = m.config
    systems = [(f"LaDiC {cfg.num_inference_steps} steps" + (", B&R" if cfg.back_and_refine else ""), m,
                ladic_sampling(cfg.num_inference_steps, cfg.back_and_refine, 1, cfg.guidance_scale))]
    ar = session.ar()
    if ar is not None:
        systems.append(("AR greedy", ar, {"num_beams": 1}))
        if beams > 1:
            systems.append((f"AR beam {beams}", ar, {"num_beams": beams}))
    return systems


def _cmd_lengths(args: argparse.Namespace, session: _Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    res = lengths_table(_lengths_systems(session, args.beams), session.records(), _ints(args.buckets),
                        batch_size=args.caption_batch, memo=session.memo, progress=args.progress)
    notes = session.data_notes() + [
        "Images are bucketed by the mean length (words, after the data set's caption cleaning) of their 5 "
        "references, rounded to the nearest integer. BLEU-4 is corpus BLEU-4 over each bucket "
        "(pycocoevalcap Bleu after the PTB tokenizer, as `coco_metrics`), x100.",
        "LaDiC uses the model's default sampling (steps, Back&Refine, guidance as in its config), seed 0.",
    ]
    paths = [out_dir / "lengths.json", out_dir / "lengths.md", out_dir / "lengths.png"]
    write_json(paths[0], meta, {"notes": notes, **res})
    paths[1].write_text(lengths_markdown(res, notes, meta))
    lengths_plot(res, paths[2], meta)
    return paths


def _cmd_ablations(args: argparse.Namespace, session: _Session, out_dir: Path) -> list[Path]:
    meta = run_meta(vars(args))
    wanted = [v for v in args.variants.replace(" ", "").split(",") if v]
    known = {a.name: a for a in ABLATIONS}
    bad = [v for v in wanted if v not in known]
    if bad:
        raise ValueError(f"unknown ablation variant(s) {', '.join(bad)}; choose from {', '.join(known)}")
    chosen = [known[v] for v in wanted]
    if any(a.model is None for a in chosen) and "full" not in wanted:
        chosen.insert(0, known["full"])
    res = run_ablations(session.records(), Path(args.work_dir).expanduser(), ablations=chosen,
                        max_steps=args.max_steps, train_images=args.train_images, caption_batch=args.caption_batch,
                        progress=args.progress)
    notes = session.data_notes()[:1] + [
        f"Each variant: `ladic.train.train` with preset small, Flickr8k train (first {args.train_images} images), "
        f"{args.max_steps} steps, batch 64, seed 0, no validation; folders under {args.work_dir} "
        "(a variant whose `final` exists is not retrained; an interrupted one resumes from its checkpoint).",
        "Evaluation: 5 denoising steps (model defaults otherwise: guidance 1.0, Back&Refine on unless the row "
        "turns it off), seed 0; scores x100 from `coco_metrics`.",
    ]
    paths = [out_dir / "ablations.json", out_dir / "ablations.md"]
    write_json(paths[0], meta, {"notes": notes, **res})
    paths[1].write_text(ablations_markdown(res, notes, meta))
    return paths


RUNNERS = {"latency": _cmd_latency, "flops": _cmd_flops, "quality": _cmd_quality, "lengths": _cmd_lengths,
           "ablations": _cmd_ablations}


def bench_cli(args: argparse.Namespace) -> int:
    """Entry point of ``ladic bench``."""
    what: list[str] = []
    for w in args.what or ["latency"]:
        names = ALL if w == "all" else (w,)
        for n in names:
            if n not in RUNNERS:
                print(f"error: unknown benchmark {w!r}; choose from {', '.join(SUBCOMMANDS)} or all", file=sys.stderr)
                return 2
            if n not in what:
                what.append(n)
    # Options that cli.py may not declare (when called with a bare Namespace): fill in the defaults.
    defaults = argparse.ArgumentParser(add_help=False)
    add_bench_arguments(defaults)
    for k, v in vars(defaults.parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    session = _Session(args)
    failed = 0
    for name in what:
        try:
            paths = RUNNERS[name](args, session, out_dir)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"error: bench {name}: {' '.join(str(e).split())}", file=sys.stderr)
            failed += 1
            continue
        print(f"bench {name}: wrote " + ", ".join(str(p) for p in paths))
    return 2 if failed else 0


__all__ = [
    "SUBCOMMANDS", "ALL", "ABLATIONS", "Ablation", "LatencySystem", "QualityRow", "CaptionMemo", "bench_cli",
    "add_bench_arguments", "run_latency", "run_flops", "quality_rows", "quality_table", "lengths_table",
    "run_ablations", "run_meta", "bucket_of", "bucket_labels", "build_timing_models",
]
