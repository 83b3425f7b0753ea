"""``ladic bench quality``: COCO caption metrics, caption statistics and decode time per sampling setting."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ladic.bench.report import fmt_score, markdown_header, md_table, pyplot, save_figure, write_outputs
from ladic.bench.text_stats import STATS_HEADERS, TrainingText, caption_stats, stats_cells

QUALITY_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


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


def require_java() -> None:
    """Raise RuntimeError (with the install hint) when Java, needed by pycocoevalcap, is missing."""
    from ladic.metrics import JAVA_INSTALL_HINT, java_available

    ok, why = java_available()
    if not ok:
        raise RuntimeError(f"Java is required for the COCO caption metrics ({why}); {JAVA_INSTALL_HINT}")


def quality_table(
    models: dict[str, Any], records, rows: Sequence[QualityRow], *, batch_size: int = 64, bert_score: bool = False,
    memo: CaptionMemo | None = None, progress: bool = False, train_text: TrainingText | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Caption ``records`` with every row's model/sampling (``caption_split``: cached image features) and score
    each with ``coco_metrics`` and ``caption_stats`` (OOV words and broken pairs against ``train_text``; None without it).
    ``models``: {"ladic": LaDiC, "ar": ARCaptioner or None}; rows of a missing model are skipped."""
    from ladic.metrics import coco_metrics

    require_java()
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
                    **caption_stats(list(results.values()), train_text),
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
             + [f"{r['decode_s']:.2f}", f"{r['ms_per_image']:.1f}"] + stats_cells(r) for r in rows]
    parts += [md_table(["setting"] + metrics + ["decode s", "ms / image", *STATS_HEADERS], table), ""]
    return "\n".join(parts)


def quality_plot(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    plt = pyplot()
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


def write_quality(rows: list[dict[str, Any]], notes: list[str], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """quality.json, quality.md and quality.png in ``out_dir``."""
    return write_outputs(out_dir, "quality", meta, {"notes": notes, "rows": rows},
                         lambda: quality_markdown(rows, notes, meta), lambda path: quality_plot(rows, path, meta))
