"""Run description and output helpers: command line, machine, markdown tables, JSON and PNG files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


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
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
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
        "options": {k: jsonable(v) for k, v in (options or {}).items() if k != "func"},
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


def fmt_score(v: float | None, scale: float = 100.0, missing: str = "-") -> str:
    return missing if v is None else f"{v * scale:.1f}"


def write_json(path: Path, meta: dict[str, Any], payload: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, **payload}, indent=1))


def write_outputs(out_dir: Path, stem: str, meta: dict[str, Any], payload: dict[str, Any],
                  markdown: Callable[[], str], plot: Callable[[Path], None] | None = None) -> list[Path]:
    """Write ``<stem>.json`` (meta + payload), then ``<stem>.md`` and, with ``plot``, ``<stem>.png``; their paths."""
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"] + ([out_dir / f"{stem}.png"] if plot else [])
    write_json(paths[0], meta, payload)
    paths[1].write_text(markdown())
    if plot is not None:
        plot(paths[2])
    return paths


def pyplot():
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
    pyplot().close(fig)
