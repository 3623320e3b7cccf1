"""Figures for the study report, one function per figure, each returning PNG bytes.

Leans on matplotlib's object API (`matplotlib.figure.Figure` rendered by the Agg canvas), not
pyplot: no global figure state, no GUI backend, safe in a worker thread and on a headless host.
The functions take plain numbers (no store rows), so `robonas.report` decides what to plot and
these only decide how it looks.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Inches and dots per inch: about 800x450 pixels, readable inline in a report column.
FIGSIZE = (8.0, 4.5)
DPI = 100


@dataclass(frozen=True)
class ParetoPoint:
    label: str
    predicted_real_return: float
    p99_ms: float
    on_front: bool


@dataclass(frozen=True)
class GapPoint:
    predicted: float
    real: float
    lo: float | None = None
    hi: float | None = None


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _new(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def learning_curves_png(
    curves: Mapping[str, Sequence[tuple[int, float, float]]],
    return_lo: float | None = None,
    return_hi: float | None = None,
) -> bytes:
    """Mean evaluation return against env steps per trial, with a +-1 std band.

    `return_hi`/`return_lo` (the study's resolved return range, the ends the objective normalises
    by) are drawn as labelled horizontal lines: the target a policy should reach and the floor a
    random policy sits at.
    """
    fig, ax = _new("Learning curves (top trials)", "env steps", "mean eval return")
    for value, label, style in (
        (return_hi, "target (return_hi)", "--"),
        (return_lo, "floor (return_lo)", ":"),
    ):
        if value is not None:
            ax.axhline(value, color="black", linestyle=style, linewidth=1.2, label=f"{label} = {value:,.1f}")
    for label, points in curves.items():
        if not points:
            continue
        steps = [p[0] for p in points]
        mean = [p[1] for p in points]
        std = [p[2] for p in points]
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=label)
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(),
            alpha=0.15,
        )
    if ax.lines:
        ax.legend(fontsize="small", loc="best")
    return _png(fig)


@dataclass(frozen=True)
class HistoryPoint:
    """One finished trial of the search: when it finished, env steps so far, its objective."""

    wall_s: float  # seconds since the first trial finished
    env_steps: int  # cumulative env steps of the study up to and including this trial
    objective: float


def search_history_png(points: Sequence[HistoryPoint]) -> bytes:
    """Best objective so far against wall time and against cumulative env steps (two panels).

    Each trial is a dot at its own objective; the step line is the running best, so a flat line
    means the search has stopped finding better architectures.
    """
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 0.9))
    axes = fig.subplots(1, 2, sharey=True)
    ordered = sorted(points, key=lambda p: p.wall_s)
    best: list[float] = []
    for p in ordered:
        best.append(p.objective if not best else max(best[-1], p.objective))
    # the wall-time unit follows the span, so a minute-long test study and a day-long search
    # both get readable tick labels
    span = ordered[-1].wall_s if ordered else 0.0
    scale, unit = (1.0, "s") if span < 120 else (60.0, "min") if span < 7200 else (3600.0, "h")
    for ax, xs, xlabel in (
        (axes[0], [p.wall_s / scale for p in ordered], f"wall time since first trial ({unit})"),
        (axes[1], [float(p.env_steps) for p in ordered], "cumulative env steps"),
    ):
        ax.scatter(xs, [p.objective for p in ordered], color="tab:gray", alpha=0.7, s=18, label="trial")
        ax.plot(xs, best, color="tab:blue", drawstyle="steps-post", label="best so far")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("objective")
    axes[0].set_title("Best objective vs wall time")
    axes[1].set_title("Best objective vs env steps")
    if ordered:
        axes[0].legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return _png(fig)


def importance_png(importances: Mapping[str, float]) -> bytes:
    """Horizontal bars: each architecture choice's importance for the objective, largest on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(FIGSIZE[0], max(2.0, 0.45 * len(items) + 1.2)))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    for i, (_, v) in enumerate(items):
        ax.annotate(
            f"{v:.2f}", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small"
        )
    ax.set_xlim(0, max([v for _, v in items] + [0.0]) * 1.15 or 1.0)
    ax.set_title("Which architecture choices mattered")
    ax.set_xlabel("importance (shares sum to 1)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def pareto_png(
    points: Sequence[ParetoPoint], budget_ms: float | None = None, rejected_p99_ms: Sequence[float] = ()
) -> bytes:
    """Predicted real return against p99 latency; front joined by a step line, budget dashed.

    Rejected candidates have no return (they were never trained), so their predicted latency is
    drawn as marks along the bottom edge of the axes.
    """
    fig, ax = _new("Predicted real return vs p99 latency", "p99 latency (ms)", "predicted real return")
    rest = [p for p in points if not p.on_front]
    front = sorted((p for p in points if p.on_front), key=lambda p: p.p99_ms)
    if rest:
        ax.scatter(
            [p.p99_ms for p in rest],
            [p.predicted_real_return for p in rest],
            color="tab:gray",
            alpha=0.7,
            label="complete trials",
        )
    if front:
        ax.plot(
            [p.p99_ms for p in front],
            [p.predicted_real_return for p in front],
            color="tab:red",
            marker="o",
            drawstyle="steps-post",
            label="Pareto front",
        )
        for p in front:
            ax.annotate(
                p.label,
                (p.p99_ms, p.predicted_real_return),
                fontsize="x-small",
                xytext=(4, 4),
                textcoords="offset points",
            )
    if rejected_p99_ms:
        # x in data units, y in axes units: a rug just above the bottom edge.
        ax.plot(
            list(rejected_p99_ms),
            [0.02] * len(rejected_p99_ms),
            linestyle="none",
            marker="x",
            color="tab:purple",
            transform=ax.get_xaxis_transform(),
            label="rejected (predicted p99)",
        )
    if budget_ms is not None:
        ax.axvline(budget_ms, color="tab:orange", linestyle="--", label=f"latency budget {budget_ms:g} ms")
    if ax.lines or ax.collections:
        ax.legend(fontsize="small", loc="best")
    return _png(fig)


def latency_scatter_png(series: Mapping[str, Sequence[tuple[float, float]]]) -> bytes:
    """Measured against predicted latency (ms) per series of (predicted, measured), with y = x."""
    fig, ax = _new("Latency model: predicted vs measured", "predicted (ms)", "measured (ms)")
    every = [v for pts in series.values() for p in pts for v in p]
    for label, pts in series.items():
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label, alpha=0.8)
    if every:
        lo, hi = min(every), max(every)
        ax.plot([lo, hi], [lo, hi], color="black", linestyle=":", label="y = x")
        ax.legend(fontsize="small", loc="best")
    return _png(fig)


def gap_png(points: Sequence[GapPoint]) -> bytes:
    """Real return on the robot against predicted real return, with the prediction's interval."""
    fig, ax = _new("Gap model: predicted vs real return", "predicted real return", "real return (robot)")
    if points:
        x = [p.predicted for p in points]
        y = [p.real for p in points]
        # Error bars are horizontal: the uncertainty belongs to the prediction, not the robot.
        lower = [p.predicted - p.lo if p.lo is not None else 0.0 for p in points]
        upper = [p.hi - p.predicted if p.hi is not None else 0.0 for p in points]
        ax.errorbar(
            x,
            y,
            xerr=[[max(v, 0.0) for v in lower], [max(v, 0.0) for v in upper]],
            fmt="o",
            capsize=3,
            label="trials",
        )
        ends = x + y + [p.lo for p in points if p.lo is not None] + [p.hi for p in points if p.hi is not None]
        lo, hi = min(ends), max(ends)
        ax.plot([lo, hi], [lo, hi], color="black", linestyle=":", label="y = x")
        ax.legend(fontsize="small", loc="best")
    return _png(fig)
