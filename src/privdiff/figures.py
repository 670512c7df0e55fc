"""Figures as PNG bytes: matplotlib on the Agg backend (no display, no external resources)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot is imported)

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def png_bytes(fig: "plt.Figure", **savefig: object) -> bytes:
    """The figure as PNG bytes (dpi 110 unless given); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **{"dpi": 110, **savefig})
    plt.close(fig)
    return buffer.getvalue()


__all__ = ["COLOURS", "plt", "png_bytes"]
