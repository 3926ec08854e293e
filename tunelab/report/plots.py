"""Charts for the HTML report, as inline SVG strings (matplotlib, Agg backend; nothing written to disk).

Text is kept as SVG ``<text>`` (``svg.fonttype: none``) so the browser draws it with its own fonts,
which also covers Korean names.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_RC = {"svg.fonttype": "none", "font.size": 10, "axes.spines.top": False, "axes.spines.right": False}
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}


@contextmanager
def _style() -> Iterator[None]:
    """Report style; "Glyph ... missing from font" warnings hidden, as the browser draws the text."""
    with plt.rc_context(_RC), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def _to_svg(fig: plt.Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata=_NO_METADATA)
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: the SVG is inlined in HTML


def metric_bars(names: Sequence[str], values: Sequence[float], lows: Sequence[float], highs: Sequence[float], *,
                metric: str, best: int | None = None) -> str:
    """Horizontal bars of ``metric`` (fractions, drawn as %) with the confidence intervals as error bars."""
    v, lo, hi = (np.asarray(x, dtype=float) * 100 for x in (values, lows, highs))
    y = np.arange(len(names))[::-1]  # first cell on top
    with _style():
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.0))
        colors = ["#2f6fb3" if i == best else "#9db8d6" for i in range(len(names))]
        ax.barh(y, v, xerr=[np.maximum(v - lo, 0), np.maximum(hi - v, 0)], color=colors, height=0.6,
                error_kw={"ecolor": "#333333", "capsize": 3, "elinewidth": 1})
        for yi, vi, hii in zip(y, v, hi):
            ax.text(min(hii, 100) + 1, yi, f"{vi:.1f}", va="center", fontsize=9)
        ax.set_yticks(y, list(names))
        ax.set_xlim(0, 108)
        ax.set_xlabel(f"{metric} (%), bars = confidence interval")
        ax.grid(axis="x", color="#e5e5e5")
        ax.set_axisbelow(True)
        fig.tight_layout()
        return _to_svg(fig)


def confusion_heatmap(labels: Sequence[str], matrix: Sequence[Sequence[int]], *, title: str = "") -> str:
    """Heatmap of a confusion matrix: rows = gold (``labels`` without the last), columns = predicted.

    Rows are normalised for the colour (recall per gold label); the cells show the counts.
    """
    m = np.asarray(matrix, dtype=float)  # (k, k + 1)
    rows = list(labels)[: m.shape[0]]
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    with _style():
        fig, ax = plt.subplots(figsize=(0.7 * m.shape[1] + 1.8, 0.6 * m.shape[0] + 1.2))
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), count in np.ndenumerate(m):
            ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=9,
                    color="white" if norm[i, j] > 0.6 else "#222222")
        ax.set_xticks(range(m.shape[1]), list(labels), rotation=30, ha="right")
        ax.set_yticks(range(m.shape[0]), rows)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.spines[:].set_visible(False)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        return _to_svg(fig)
