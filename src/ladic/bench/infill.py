"""``ladic bench infill``: how often a model fills a blanked word of a val reference back with that word."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ladic.bench.report import fmt_score, markdown_header, md_table

PROBES = ("noun", "verb")


def infill_table(systems: Sequence[tuple[str, Any, dict[str, Any]]], feats, batch_size: int = 64,
                 log=print) -> list[dict[str, Any]]:
    """One row per (name, LaDiC model, sampling): ``ladic.evaluate.infill_accuracy`` for each probe kind."""
    from ladic.evaluate import infill_accuracy

    rows = []
    for name, model, sampling in systems:
        row: dict[str, Any] = {"name": name, "sampling": sampling}
        for kind in PROBES:
            res = infill_accuracy(model, feats, kind, batch_size=batch_size, **sampling)
            row[kind] = res
            log(f"infill {name:40s} {kind}: {fmt_score(res['accuracy'])} % of {res['n']}")
        rows.append(row)
    return rows


def infill_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str], meta: dict[str, Any]) -> str:
    parts = [markdown_header("LaDiC benchmark: infilling one blanked word of a val reference", meta)]
    parts += [f"- {n}" for n in notes] + [""]
    table = [[r["name"]] + [f"{fmt_score(r[k]['accuracy'])} (n = {r[k]['n']})" for k in PROBES] for r in rows]
    parts += [md_table(["model, sampler", "noun filled back %", "verb filled back %"], table), ""]
    for r in rows:
        parts.append(f"Examples, {r['name']} (template -> filled; removed word):")
        parts += [f"- `{t}` -> `{f}`; {a}" for k in PROBES for t, f, a in r[k]["examples"][:2]]
        parts.append("")
    return "\n".join(parts)


__all__ = ["PROBES", "infill_table", "infill_markdown"]
