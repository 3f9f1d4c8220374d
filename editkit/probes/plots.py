"""Pictures of the probes' results (matplotlib, Agg canvas, imported only when a plot is drawn).

Figures are built on their own Agg canvas rather than through pyplot, so drawing one neither
switches the caller's backend nor leaves a figure open in pyplot's registry. Each function
writes a PNG when given a path and returns the figure. The layer-distance profile of
localisation is :meth:`editkit.localization.Localization.plot`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from editkit.probes.projection import Projection
from editkit.probes.shift import ActivationShift


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is the optional "plots" extra
        raise ImportError("plots need matplotlib: pip install 'editkit[plots]'") from err
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, path: str | Path | None) -> Any:
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, format="png")
    return fig


def plot_rates(
    rates: Mapping[str, float | Mapping[str, float]],
    path: str | Path | None = None,
    *,
    title: str = "toxicity reduction and activation shift per method",
    ylabel: str = "rate (%)",
) -> Any:
    """Bars of rates (fractions, drawn in %) per method: ``{method: rate}``, or grouped bars
    ``{method: {measure: rate}}`` (e.g. toxicity reduction rate and activation shift rate)."""
    if not rates:
        raise ValueError("no rates to plot")
    methods = list(rates)
    grouped = {m: (dict(v) if isinstance(v, Mapping) else {"rate": float(v)}) for m, v in rates.items()}
    measures = list(dict.fromkeys(k for v in grouped.values() for k in v))
    fig = _figure(max(4.0, 1.5 + 1.1 * len(methods) * len(measures) ** 0.5), 3.2)
    ax = fig.add_subplot()
    width = 0.8 / len(measures)
    for j, measure in enumerate(measures):
        xs = [i + (j - (len(measures) - 1) / 2) * width for i in range(len(methods))]
        ys = [100 * grouped[m].get(measure, float("nan")) for m in methods]
        ax.bar(xs, ys, width=width, label=None if measure == "rate" else measure)
    ax.set_xticks(range(len(methods)), methods)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if measures != ["rate"]:
        ax.legend(fontsize="small")
    return _finish(fig, path)


def plot_shift_curves(
    curves: Mapping[str, ActivationShift | Mapping[int, float] | Sequence[float]],
    path: str | Path | None = None,
    *,
    title: str = "activation shift per layer",
    mark_layer: int | None = None,
) -> Any:
    """One line per method of the activation shift rate (drawn in %) against the layer; a curve is an
    :class:`ActivationShift`, ``{layer: rate}`` or a list indexed by layer. ``mark_layer`` (e.g. the
    located toxic layer) is drawn as a vertical line."""
    if not curves:
        raise ValueError("no curves to plot")
    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    for method, curve in curves.items():
        if isinstance(curve, ActivationShift):
            points = curve.as_mapping()
        elif isinstance(curve, Mapping):
            points = {int(k): float(v) for k, v in curve.items()}
        else:
            points = dict(enumerate(float(v) for v in curve))
        layers = sorted(points)
        ax.plot(layers, [100 * points[i] for i in layers], marker="o", markersize=3, label=method)
    if mark_layer is not None:
        ax.axvline(mark_layer, color="grey", linestyle="--", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("activation shift (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _finish(fig, path)


def plot_projection(projection: Projection, path: str | Path | None = None, *,
                    title: str = "safe vs unsafe states") -> Any:
    """Scatter of safe and unsafe states on (mean-shift, PC1): one panel before the edit and, if the
    projection has one, one after, on shared axes."""
    panels = [("before", projection.before)] + ([("after", projection.after)] if projection.after is not None else [])
    fig = _figure(4.0 * len(panels) + 0.5, 3.6)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, points) in zip(axes, panels):
        ax.scatter(points.safe[:, 0], points.safe[:, 1], s=12, alpha=0.7, color="#1f77b4", label="safe")
        ax.scatter(points.unsafe[:, 0], points.unsafe[:, 1], s=12, alpha=0.7, color="#d62728", label="unsafe")
        ax.set_title(f"{name} (separation {points.separation:.3g})", fontsize="medium")
        ax.set_xlabel("mean-shift direction")
    axes[0].set_ylabel(f"PC1 ({100 * projection.axes.pc1_explained:.0f}% var.)")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{title}, layer {projection.layer}")
    return _finish(fig, path)
