"""``ladic bench curves``: validation curves of training runs side by side (every arm, losers included).

Reads the ``{"val": {...}}`` records that ``ladic train`` appends to ``<out_dir>/log.jsonl`` and the run's
wall time (the ``elapsed_s`` of its training records) and writes a table of each metric per step and a plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ladic.bench.report import fmt_score, markdown_header, md_table, pyplot, save_figure

CURVE_METRICS = ("CIDEr", "BLEU-4", "restore@600", "restore@900")  # restore@t: LaDiC runs only


def read_curve(run: str | Path) -> dict[str, Any]:
    """One run folder -> {"run", "steps", <metric>: [...], "elapsed_s", "examples"} from its log.jsonl.

    A resumed run appends to the same log: a later record of a step replaces an earlier one.
    """
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log (is {run} a `ladic train` out_dir?)")
    vals: dict[int, dict[str, Any]] = {}
    elapsed = 0.0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if "val" in rec:
            vals[int(rec["val"]["step"])] = rec["val"]
        elif "elapsed_s" in rec:
            elapsed = max(elapsed, float(rec["elapsed_s"]))
    steps = sorted(vals)
    out: dict[str, Any] = {"run": Path(run).name, "steps": steps, "elapsed_s": elapsed,
                           "examples": vals[steps[-1]].get("examples", []) if steps else []}
    for m in CURVE_METRICS:
        out[m] = [vals[s].get(m) for s in steps]
    return out


def _present(curves: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics that at least one run logged."""
    return [m for m in CURVE_METRICS if any(v is not None for c in curves for v in c[m])]


def curves_markdown(curves: Sequence[dict[str, Any]], notes: Sequence[str], meta: dict[str, Any]) -> str:
    steps = sorted({s for c in curves for s in c["steps"]})
    parts = [markdown_header("Validation curves of training runs", meta)]
    parts += [f"- {n}" for n in notes]
    for m in _present(curves):
        rows = []
        for c in curves:
            by_step = dict(zip(c["steps"], c[m]))
            best = max((v for v in c[m] if v is not None), default=None)
            rows.append([c["run"], *[fmt_score(by_step.get(s)) for s in steps], fmt_score(best)])
        parts += ["", f"### {m} (x100)", "", md_table(["run", *[str(s) for s in steps], "best"], rows)]
    rows = [[c["run"], f"{c['elapsed_s'] / 60:.0f} min", "; ".join(c["examples"][:2])] for c in curves]
    parts += ["", "### Wall time of the training records and sample captions at the last validation", "",
              md_table(["run", "wall time", "examples"], rows)]
    return "\n".join(parts) + "\n"


def curves_plot(curves: Sequence[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    plt = pyplot()
    metrics = _present(curves) or list(CURVE_METRICS[:1])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    axes = axes[0]
    for ax, m in zip(axes, metrics):
        for c in curves:
            pts = [(s, v * 100) for s, v in zip(c["steps"], c[m]) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c["run"])
        ax.set_xlabel("training step")
        ax.set_ylabel(f"val {m} (x100)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, meta)
