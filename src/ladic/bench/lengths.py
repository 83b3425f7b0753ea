"""``ladic bench lengths``: corpus BLEU-4 per bucket of mean reference length (paper Fig. 2b)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ladic.bench.quality import CaptionMemo, require_java
from ladic.bench.report import fmt_score, markdown_header, md_table, pyplot, save_figure
from ladic.bench.text_stats import STATS_HEADERS, TrainingText, caption_stats, stats_cells

DEFAULT_BUCKET_EDGES = (9, 11, 13)  # mean reference words: <=9, 10-11, 12-13, >=14


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
    batch_size: int = 64, memo: CaptionMemo | None = None, progress: bool = False,
    train_text: TrainingText | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Corpus BLEU-4 (pycocoevalcap, PTB-tokenized as ``coco_metrics``) per bucket of mean reference length,
    and each system's ``caption_stats`` over all images (OOV words and broken pairs against ``train_text``; None without it).

    ``systems``: (label, model, sampling). Returns {"buckets": [...], "rows": [{label, per bucket ...}]}."""
    from pycocoevalcap.bleu.bleu import Bleu

    from ladic.metrics import _ptb_tokenize  # the tokenization coco_metrics uses

    require_java()
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
                     **caption_stats(list(results.values()), train_text), "buckets": per})
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
                             for p in r["buckets"]] + stats_cells(r) for r in result["rows"]]
    parts += ["Mean generated caption length (words) per bucket, and caption statistics over all images:", "",
              md_table(["system"] + heads + list(STATS_HEADERS), table), ""]
    return "\n".join(parts)


def lengths_plot(result: dict[str, Any], path: Path, meta: dict[str, Any]) -> None:
    plt = pyplot()
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
