"""Matplotlib figures of the studies and benchmarks: the shared axis style and how a figure is written as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_fd_axis(axis: Any, *, xlabel: str, ylabel: str) -> None:
    """An FD axis as every study draws it: log FD, both grids, a small legend."""
    axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def save_figure(figure: Any, path: Path) -> None:
    """Lay out, write the PNG (parent folders created) and close the figure."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
