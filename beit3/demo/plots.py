"""Plots of training logs and of demo predictions (matplotlib, Agg canvas: no display needed).

- :func:`plot_logs`: loss curves (every ``loss*`` field, or the keys asked for) of one or more ``log.jsonl`` files;
- :func:`image_grid`: rows of a text and a few images (retrieval examples, generated captions).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from beit3.jsonl import read_jsonl

PathLike = str | Path


def read_log(path: PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (one JSON object per line with a ``step``; blank and torn lines are skipped)."""
    return [record for record in read_jsonl(path, skip_bad_lines=True) if "step" in record]


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(r["step"]))
            values.append(float(value))
    return steps, values


def loss_keys(records: list[dict]) -> list[str]:
    """The ``loss`` fields present in ``records`` (``loss`` first, then per-stream ``loss_*`` in name order)."""
    keys = sorted({k for r in records for k in r if k == "loss" or k.startswith("loss_")})
    return sorted(keys, key=lambda k: (k != "loss", k))


def gap_keys(records: list[dict]) -> list[str]:
    """The held-out evaluation's gap fields (``eval_*gap``: grounding gap, word-class probes) present in ``records``."""
    return sorted({k for r in records for k in r if k.startswith("eval_") and k.endswith("gap")})


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_logs(logs: Sequence[PathLike], out: PathLike, keys: Optional[Sequence[str]] = None,
              labels: Optional[Sequence[str]] = None, title: str = "", log_y: bool = False) -> Path:
    """One panel per log file with a curve per key (default: every ``loss*`` field) against the step; writes ``out``
    (PNG) and returns its path. ``labels`` name the panels (default: the log's parent folder)."""
    logs = [Path(p) for p in logs]
    if not logs:
        raise ValueError("plot_logs needs at least one log file")
    if labels is not None and len(labels) != len(logs):
        raise ValueError(f"{len(labels)} labels for {len(logs)} logs")
    cols = min(3, len(logs))
    rows = math.ceil(len(logs) / cols)
    fig = _figure(5.0 * cols, 3.6 * rows)
    for i, path in enumerate(logs):
        records = read_log(path)
        ax = fig.add_subplot(rows, cols, i + 1)
        plotted = 0
        for key in (keys or loss_keys(records)):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
                plotted += 1
        ax.set_title(labels[i] if labels is not None else path.parent.name or str(path), fontsize=10)
        ax.set_xlabel("step")
        if log_y and plotted:
            ax.set_yscale("log")
        if plotted:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def image_grid(rows: Sequence[dict], out: PathLike, title: str = "", image_px: float = 1.3) -> Path:
    """A PNG with one row per entry of ``rows``: ``{"text": str, "images": [PIL image or array, ...],
    "marks": [bool, ...] (optional: green / red frame), "captions": [str, ...] (optional, under each image)}``."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    import numpy as np

    ncols = max(len(r["images"]) for r in rows)
    text_w = 3.2
    fig = _figure(text_w + image_px * max(ncols, 1), (image_px + 0.35) * len(rows) + (0.4 if title else 0))
    grid = fig.add_gridspec(len(rows), ncols + 1, width_ratios=[text_w / image_px] + [1] * ncols)
    for i, row in enumerate(rows):
        ax = fig.add_subplot(grid[i, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, _wrap(row["text"], 38), va="center", ha="left", fontsize=8, transform=ax.transAxes)
        marks = row.get("marks") or [None] * len(row["images"])
        caps = row.get("captions") or [""] * len(row["images"])
        for j, image in enumerate(row["images"]):
            ax = fig.add_subplot(grid[i, j + 1])
            ax.imshow(np.asarray(image))
            ax.set_xticks([])
            ax.set_yticks([])
            if marks[j] is not None:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green" if marks[j] else "tab:red")
                    spine.set_linewidth(3)
            if caps[j]:
                ax.set_xlabel(caps[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line] if line else lines)
