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


def loss_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, smooth: int | None = None) -> str:
    """Training loss per step, one line per run (``name -> (steps, losses)``); with many steps a running mean
    of ``smooth`` steps (default: a twentieth of the steps) is drawn over the raw curve."""
    with _style():
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (name, (steps, losses)) in enumerate(series.items()):
            c = colors[i % len(colors)]
            x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
            if len(x) == 0:
                continue
            k = smooth or max(2, len(y) // 20)
            if len(y) >= 10:
                ax.plot(x, y, lw=0.8, color=c, alpha=0.35)
                sm = np.convolve(y, np.ones(k) / k, mode="valid")
                ax.plot(x[k - 1:], sm, lw=2, color=c, label=f"{name} (mean of {k})")
            else:
                ax.plot(x, y, lw=1.5, color=c, marker="o", ms=3, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per target token")
        # The first steps of SFT often start 10-50x above where training settles (the answer format is not
        # learned yet); a log axis keeps the part that matters - the plateau and the descent - readable.
        ys = np.concatenate([np.asarray(v[1], dtype=float) for v in series.values()]) if series else np.array([])
        ys = ys[np.isfinite(ys) & (ys > 0)]
        if len(ys) and ys.max() / ys.min() > 10:
            ax.set_yscale("log")
        ax.grid(color="#e5e5e5")
        ax.set_axisbelow(True)
        if series:
            ax.legend(frameon=False)
        fig.tight_layout()
        return _to_svg(fig)


def diff_intervals(names: Sequence[str], diffs: Sequence[float], lows: Sequence[float], highs: Sequence[float], *,
                   xlabel: str) -> str:
    """Paired differences (fractions, drawn as points) with their intervals and a line at zero: an interval
    that does not cross the line is a difference the data support."""
    d, lo, hi = (np.asarray(x, dtype=float) * 100 for x in (diffs, lows, highs))
    y = np.arange(len(names))[::-1]
    with _style():
        fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(names) + 1.1))
        ax.axvline(0, color="#888888", lw=1)
        for yi, di, l, h in zip(y, d, lo, hi):
            color = "#1a7f37" if l > 0 else "#c62828" if h < 0 else "#555555"
            ax.plot([l, h], [yi, yi], color=color, lw=2.5)
            ax.plot([di], [yi], "o", color=color, ms=7)
            ax.text(h, yi + 0.18, f" {di:+.1f}", va="bottom", fontsize=9)
        span = max(5.0, float(np.nanmax(np.abs(np.concatenate([lo, hi])))) if len(d) else 5.0) * 1.2
        ax.set_xlim(-span, span)
        ax.set_yticks(y, list(names))
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", color="#e5e5e5")
        ax.set_axisbelow(True)
        fig.tight_layout()
        return _to_svg(fig)
