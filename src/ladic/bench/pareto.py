"""``ladic bench pareto``: every system and sampling setting on one CIDEr-vs-time plane.

The rows: the few-step student (1 and 2 steps, each with and without MBR), the full-sampler teacher (5 and
30 steps x Back&Refine on/off x clamping on/off, at its own guidance weight), and the AR baseline (greedy
and beam). Rows of an earlier run in the same ``--out-dir`` are kept unless this run measures them again,
so the systems can be measured in separate processes (e.g. one per core) and land in one table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ladic.bench.quality import QUALITY_METRICS, QualityRow
from ladic.bench.report import fmt_score, markdown_header, md_table, pyplot, save_figure, write_outputs
from ladic.bench.text_stats import STATS_HEADERS, stats_cells

SYSTEMS = ("student", "teacher", "ar")
COLORS = {"student": "tab:green", "teacher": "tab:blue", "ar": "tab:orange"}


def student_name(steps: int) -> str:
    return f"student {steps} step{'s' if steps > 1 else ''}"


def student_sampling(steps: int) -> dict[str, Any]:
    """The student's own sampler at ``steps``: no guidance, Back&Refine or clamping; seed 0."""
    return dict(num_inference_steps=steps, guidance_scale=0.0, back_and_refine=False, clamp=False, seed=0)


def student_rows(steps: Sequence[int] = (1, 2), mbr: int = 5, rerank: Sequence[int] = (),
                 ar_path: str = "shipped") -> list[QualityRow]:
    """The student's own sampler at each step count, +/- MBR, and at its first step count without the
    ``no_dangling_end`` rule (what the model learnt, not what the rule forces); at one step also each of
    ``rerank``'s k: k draws at the k most likely lengths, the one the AR (``ar_path``) scores highest returned."""
    rows = [QualityRow(student_name(s) + (f" + MBR {k}" if k > 1 else ""), "student",
                       {**student_sampling(s), "mbr_candidates": k})
            for s in steps for k in ((1, mbr) if mbr > 1 else (1,))]
    rows += [QualityRow(f"{student_name(s)}, no end rule", "student", {**student_sampling(s), "no_dangling_end": False})
             for s in steps[:1]]
    return rows + [QualityRow(f"{student_name(1)} x {k} + AR rerank", "student",
                              {**student_sampling(1), "mbr_candidates": k, "mbr_lengths": "top", "rerank_with": ar_path})
                   for k in rerank]


def teacher_rows(steps: Sequence[int] = (5, 30), guidance: float = 1.0) -> list[QualityRow]:
    """The teacher's full sampler and each of its parts turned off: steps x Back&Refine x clamping."""
    rows = []
    for s in steps:
        for bnr in (True, False):
            for clamp in (True, False):
                name = f"teacher {s} steps, {'B&R' if bnr else 'no B&R'}, {'clamp' if clamp else 'no clamp'}"
                rows.append(QualityRow(name, "teacher", dict(num_inference_steps=s, guidance_scale=guidance,
                                                             back_and_refine=bnr, clamp=clamp, seed=0)))
    return rows


def ar_rows(beams: int = 3) -> list[QualityRow]:
    return [QualityRow("AR greedy", "ar", {"num_beams": 1})] + (
        [QualityRow(f"AR beam {beams}", "ar", {"num_beams": beams})] if beams > 1 else [])


def merge_rows(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows not re-measured in ``new``, then ``new``; in system order (student, teacher, AR)."""
    names = {r["name"] for r in new}
    rows = [r for r in old if r["name"] not in names] + list(new)
    return sorted(rows, key=lambda r: SYSTEMS.index(r["model"]) if r["model"] in SYSTEMS else len(SYSTEMS))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier ``pareto.json`` (empty when there is none)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def pareto_front(rows: Sequence[dict[str, Any]]) -> set[str]:
    """Names of the rows no other row beats on both CIDEr (higher) and ms/image (lower)."""
    pts = [(r["name"], r["ms_per_image"], r["scores"]["CIDEr"]) for r in rows if r["scores"].get("CIDEr") is not None]
    return {n for n, t, c in pts
            if not any((t2 <= t and c2 >= c) and (t2 < t or c2 > c) for _, t2, c2 in pts)}


def pareto_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str], meta: dict[str, Any]) -> str:
    front = pareto_front(rows)
    parts = [markdown_header("LaDiC benchmark: quality against decoding time (Pareto plot)", meta)]
    parts += [f"- {n}" for n in notes] + [""]
    table = [[r["name"], f"{r['ms_per_image']:.1f}"] + [fmt_score(r["scores"].get(m)) for m in QUALITY_METRICS]
             + stats_cells(r) + ["yes" if r["name"] in front else "", r.get("measured", "")] for r in rows]
    parts += [md_table(["system, setting", "ms / image"] + list(QUALITY_METRICS) + list(STATS_HEADERS)
                       + ["on the front", "measured (UTC)"], table), ""]
    return "\n".join(parts)


def pareto_plot(rows: Sequence[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for system in SYSTEMS:
        pts = [r for r in rows if r["model"] == system and r["scores"].get("CIDEr") is not None]
        ax.scatter([r["ms_per_image"] for r in pts], [100 * r["scores"]["CIDEr"] for r in pts],
                   color=COLORS[system], label=system, zorder=3)
        for r in pts:
            label = r["name"].split(" ", 1)[1] if system != "ar" else r["name"]
            ax.annotate(label, (r["ms_per_image"], 100 * r["scores"]["CIDEr"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    front = sorted((r for r in rows if r["name"] in pareto_front(rows)), key=lambda r: r["ms_per_image"])
    ax.step([r["ms_per_image"] for r in front], [100 * r["scores"]["CIDEr"] for r in front], where="post",
            color="grey", alpha=0.5, zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("decoding ms / image (batch 64, cached image tokens)")
    ax.set_ylabel("CIDEr (x100)")
    ax.set_title(f"quality vs decoding time, Flickr8k val ({rows[0]['images'] if rows else 0} images)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, meta)


def write_pareto(rows: list[dict[str, Any]], notes: list[str], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """pareto.json, pareto.md and pareto.png in ``out_dir``."""
    return write_outputs(out_dir, "pareto", meta, {"notes": notes, "rows": rows},
                         lambda: pareto_markdown(rows, notes, meta), lambda path: pareto_plot(rows, path, meta))


__all__ = ["SYSTEMS", "student_name", "student_sampling", "student_rows", "teacher_rows", "ar_rows", "merge_rows",
           "read_rows", "pareto_front", "pareto_markdown", "pareto_plot", "write_pareto"]
