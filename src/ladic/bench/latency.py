"""``ladic bench latency``: seconds per ``generate`` call vs caption length (paper Fig. 2a), LaDiC vs AR."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ladic.bench.report import fmt_seconds, markdown_header, md_table, pyplot, save_figure
from ladic.bench.timing import example_photos, time_call

DEFAULT_LENGTHS = (8, 16, 24, 32, 48, 60)


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


def build_timing_models(preset_name: str, length: int, image_encoder, device: str, output_vocab=None):
    """Randomly initialised LaDiC (sequence of ``length`` latents) and AR baseline (``length`` decode steps)
    sharing ``image_encoder``. The AR model never emits [SEP], so it always runs all ``length`` steps.
    ``output_vocab`` (token ids) restricts both LM heads to those word pieces."""
    from ladic.baselines.ar import ARCaptioner
    from ladic.captioner import LaDiC
    from ladic.config import preset

    name = image_encoder.name
    ladic = LaDiC(preset(preset_name, max_length=length, image_encoder=name), image_encoder=image_encoder).to(device).eval()
    ar = ARCaptioner(preset(preset_name, max_length=length + 1, image_encoder=name), image_encoder=image_encoder).to(device).eval()
    ar.banned[ar.eos_id] = True  # forced length: no early stop, exactly `length` new tokens
    if output_vocab is not None:
        ladic.restrict_output_vocab(output_vocab)
        ar.restrict_output_vocab(output_vocab)
    return ladic, ar


def run_latency(
    *, preset_name: str = "small", lengths: Sequence[int] = DEFAULT_LENGTHS, batch_sizes: Sequence[int] = (1, 64),
    steps: Sequence[int] = (1, 5, 30), bnr: Sequence[bool] = (True,), beams: int = 3, guidance: float | None = None,
    modes: Sequence[str] = ("decoder", "e2e"), repeats: int = 5, warmup: int = 1, device: str = "cpu",
    image_encoder: str | None = None, output_vocab=None, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time ``generate`` for every (length, batch, mode, system). Returns {"notes", "rows"}.

    ``image_encoder``: registry name (default: the preset's); ``output_vocab``: token ids (e.g. of the training
    captions) that both LM heads are restricted to (default: all word pieces)."""
    import torch

    from ladic.config import preset
    from ladic.image_encoders import build_image_encoder
    from ladic.image_io import load_image

    for m in modes:
        if m not in ("decoder", "e2e"):
            raise ValueError(f"unknown latency mode {m!r}; use decoder and/or e2e")
    cfg0 = preset(preset_name)
    w = cfg0.guidance_scale if guidance is None else guidance
    encoder = build_image_encoder(image_encoder or cfg0.image_encoder).to(device).eval()
    photos = {b: example_photos(b) for b in batch_sizes}
    with torch.inference_mode():
        feats = {b: encoder.encode([load_image(p) for p in photos[b]]).to(device).float() for b in batch_sizes}
    systems = latency_systems(steps, bnr, beams)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        torch.manual_seed(0)
        ladic, ar = build_timing_models(preset_name, length, encoder, device, output_vocab)
        vocab_size = ladic.text.output_vocab_size or len(ladic.text.tokenizer)
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
        f"image encoder {encoder.name} ({encoder.num_tokens} tokens), shared by both systems; LM heads over "
        + f"{vocab_size} word pieces" + (" (restricted to the training captions')." if output_vocab is not None else "."),
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
    plt = pyplot()
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
