"""Figures as PNG bytes: what the run directory publishes whole and report.html embeds inline."""
from __future__ import annotations

import io


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (published whole, embedded in report.html)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
