"""The one way megarope saves a figure: a PNG drawn on matplotlib's Agg canvas directly (no pyplot:
no display needed and no global backend switched under the caller), written atomically."""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megarope.atomic import atomic_output

DPI = 120


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG to ``path`` (tmp + rename) and return the path."""
    FigureCanvasAgg(fig)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return os.fspath(path)
