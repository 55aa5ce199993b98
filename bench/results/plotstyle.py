"""The figures' matplotlib set-up and series styles, shared by the tables' plots and the learning curves."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display; imported when a figure is drawn, not with the module)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")


def series_style(i: int) -> dict:
    """The i-th series' matplotlib style: a colour (tab10, then tab20's light shades), and a marker and line style of
    its own (12 markers × 4 line styles), so that no two series of a figure look alike, even in grey."""
    import matplotlib

    colour = matplotlib.colormaps["tab10"](i) if i < 10 else matplotlib.colormaps["tab20"]((2 * (i - 10) + 1) % 20)
    return {"color": colour, "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(MARKERS)) % len(LINESTYLES)]}
