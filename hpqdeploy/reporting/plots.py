"""The report's pictures: accuracy against bytes and latency (Pareto front marked), and a compression plan per layer.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state), so it runs headless
and in threads. Inputs are the small records below (`Point`, `LayerRow`), built by `hpqdeploy.reporting`;
nothing here reads result files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from hpqdeploy.errors import MissingExtra

DPI = 130
RUNTIME_COLORS = {"pytorch": "#7f7f7f", "onnxruntime": "#1f77b4", "openvino": "#9467bd", "executorch": "#e6740f",
                  "tensorrt": "#2ca02c"}
OTHER_COLORS = ("#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
METHOD_MARKERS = {"baseline": "o", "prune": "s", "quant": "^", "hybrid": "D"}
BIT_COLORS = {8: "#4c72b0", 4: "#dd8452", 2: "#c44e52", 16: "#55a868", 32: "#8c8c8c"}


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra("matplotlib", "report") from None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


# ---------------------------------------------------------------------------------------------------------------
# Pareto front


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has an x as small (fewer bytes, less latency) and a y as
    large (accuracy) with one of the two strictly better. Sorted by x. Equal points are all on the front."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(qx <= x and qy >= y and (qx < x or qy > y) for j, (qx, qy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# ---------------------------------------------------------------------------------------------------------------
# Accuracy against a cost


@dataclass
class Point:
    x: float
    accuracy: float
    label: str  # short, printed beside the point
    runtime: str  # colour
    method: str  # marker


def _runtime_color(runtime: str, seen: dict[str, str]) -> str:
    if runtime in RUNTIME_COLORS:
        return RUNTIME_COLORS[runtime]
    if runtime not in seen:
        seen[runtime] = OTHER_COLORS[len(seen) % len(OTHER_COLORS)]
    return seen[runtime]


def use_log(xs: list[float]) -> bool:
    """A log axis where the costs span more than a factor of 6; a linear one reads better over a narrow range."""
    return min(xs) > 0 and max(xs) / min(xs) > 6


def clusters(centers: list[tuple[float, float]], within: float) -> list[list[int]]:
    """Points whose markers would overlap (display coordinates closer than `within`), e.g. one fp32 baseline exported
    to three runtimes: they share one label and their markers are spread side by side. Single linkage."""
    out: list[list[int]] = []
    for i, (x, y) in enumerate(centers):
        near = [c for c in out if any(math.hypot(x - centers[j][0], y - centers[j][1]) < within for j in c)]
        merged = [i] + [j for c in near for j in c]
        out = [c for c in out if c not in near] + [sorted(merged)]
    return sorted(out)


MARKER_SIZE = 70  # scatter area in points^2: about 8.4 points across


def plot_tradeoff(panels: list[tuple[str, list[Point]]], path: Path, title: str, xlabel: str,
                  x_format: str = "bytes") -> Path:
    """Accuracy (y) against a cost (x), one panel per entry of `panels` (subtitle, points); the Pareto front of each
    panel drawn as a staircase through ringed points; every point labelled, without overlaps."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import offset_copy

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(6.8 * ncols + 2.2, 5.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    extra_colors: dict[str, str] = {}
    colors = {p.runtime: _runtime_color(p.runtime, extra_colors) for _, pts in panels for p in pts}
    markers = {p.method: METHOD_MARKERS.get(p.method, "P") for _, pts in panels for p in pts}
    for ax, (subtitle, points) in zip(axes, panels):
        log_x = use_log([p.x for p in points])
        if log_x:
            ax.set_xscale("log")
        _format_x(ax, x_format, log_x)
        ax.set_xlabel(xlabel + (" (log scale)" if log_x else ""))
        ax.set_ylabel("accuracy (%)")
        ax.set_title(subtitle, fontsize=10)
        ax.grid(True, which="major", color="#dddddd", lw=0.7)
        if log_x:
            ax.grid(True, which="minor", axis="x", color="#eeeeee", lw=0.5)
        ax.set_axisbelow(True)
        _pad_limits(ax, [p.x for p in points], [100 * p.accuracy for p in points], log_x)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    handles = [Line2D([], [], ls="", marker="o", ms=8, color=c, label=r) for r, c in colors.items()]
    handles += [Line2D([], [], ls="", marker=m, ms=8, color="#444444", label=k) for k, m in markers.items()]
    handles.append(Line2D([], [], ls="--", marker="o", ms=12, mfc="none", mec="#222222", color="#555555",
                          label="Pareto front"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False,
               title="colour: runtime\nmarker: method", title_fontsize=9)
    fig.canvas.draw()  # runs the layout with the limits fixed: from here on, display coordinates are final
    fig.set_layout_engine("none")
    px = fig.dpi / 72
    diameter = math.sqrt(MARKER_SIZE) * px
    for ax, (_, points) in zip(axes, panels):
        centers = [tuple(ax.transData.transform((p.x, 100 * p.accuracy))) for p in points]
        groups = clusters(centers, 1.1 * diameter)
        shift = {}  # point -> horizontal marker offset in points
        for c in groups:
            for k, i in enumerate(sorted(c, key=lambda i: centers[i][0])):
                shift[i] = 1.15 * math.sqrt(MARKER_SIZE) * (k - (len(c) - 1) / 2)
        front = pareto_front([(p.x, p.accuracy) for p in points])
        if len(front) > 1:
            ax.plot([points[i].x for i in front], [100 * points[i].accuracy for i in front], drawstyle="steps-post",
                    color="#555555", lw=1.1, ls="--", zorder=1)
        for i in front:
            tr = offset_copy(ax.transData, fig=fig, x=shift[i], y=0, units="points")
            ax.scatter([points[i].x], [100 * points[i].accuracy], s=3.7 * MARKER_SIZE, facecolors="none",
                       edgecolors="#222222", linewidths=1.2, zorder=2, transform=tr)
        for i, p in enumerate(points):
            tr = offset_copy(ax.transData, fig=fig, x=shift[i], y=0, units="points")
            ax.scatter([p.x], [100 * p.accuracy], s=MARKER_SIZE, c=colors[p.runtime], marker=markers[p.method],
                       edgecolors="white", linewidths=0.8, zorder=3, transform=tr)
        marker_px = [(centers[i][0] + shift[i] * px, centers[i][1]) for i in range(len(points))]
        anchors = [((min(marker_px[i][0] for i in c) + max(marker_px[i][0] for i in c)) / 2,
                    sum(centers[i][1] for i in c) / len(c)) for c in groups]
        labels = [" / ".join(dict.fromkeys(points[i].label for i in c)) for c in groups]
        spread = [(max(marker_px[i][0] for i in c) - min(marker_px[i][0] for i in c)) / 2 / px for c in groups]
        place_labels(ax, anchors, labels, marker_px, groups, spread)
    return _save(fig, path)


def _pad_limits(ax, xs: list[float], ys: list[float], log_x: bool) -> None:
    """Room around the points for their labels."""
    lo, hi = min(xs), max(xs)
    if log_x:
        llo, lhi = math.log10(lo), math.log10(hi)
        pad = max(0.22 * (lhi - llo), 0.12)
        ax.set_xlim(10 ** (llo - pad), 10 ** (lhi + pad))
    else:
        pad = max(0.22 * (hi - lo), 0.08 * abs(hi))
        ax.set_xlim(max(0.0, lo - pad), hi + pad)
    ylo, yhi = min(ys), max(ys)
    ypad = max(0.25 * (yhi - ylo), 0.25)
    ax.set_ylim(ylo - ypad, yhi + ypad)


def _format_x(ax, kind: str, log_x: bool) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: human_bytes(v)) if kind == "bytes" else FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(fmt)
    if log_x:
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
        ax.xaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="x", which="minor", labelsize=7, labelcolor="#666666")


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


# candidate label offsets (in points, times the distance): right, left, above, below, the diagonals, in between
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1), (0.5, 1), (-0.5, 1),
               (0.5, -1), (-0.5, -1), (1, 0.5), (-1, 0.5), (1, -0.5), (-1, -0.5))
_DISTANCES = (8, 16, 26, 38, 52, 70, 92)


def place_labels(ax, anchors: list[tuple[float, float]], labels: list[str], markers: list[tuple[float, float]],
                 owners: list[list[int]], spread: list[float] | None = None, fontsize: float = 8) -> list:
    """Label each anchor (display coordinates) where its text overlaps no other label and no marker, stays inside
    the axes and lies nearer its own markers than any other's. `owners[k]` are the markers anchor k stands for,
    `markers` their display positions, `spread[k]` the half-width in points of its group of markers. Greedy over
    candidate offsets at growing distances, most crowded anchors first; a label away from its point gets a leader
    line."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    r = 0.6 * math.sqrt(MARKER_SIZE) * px  # a marker's half-size in pixels, with a margin
    boxes = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in markers]
    spread = spread or [0.0] * len(anchors)
    at = [tuple(ax.transData.inverted().transform(a)) for a in anchors]  # data coordinates survive a dpi change

    def crowding(k):
        cx, cy = anchors[k]
        return sum(1 for x, y in markers if abs(x - cx) + abs(y - cy) < 150 * px)

    placed: list = []
    texts = []
    for k in sorted(range(len(anchors)), key=lambda k: (-crowding(k), k)):
        own = [boxes[i] for i in owners[k]]
        others = [b for i, b in enumerate(boxes) if i not in owners[k]]
        best = None
        for ring, dist in enumerate(_DISTANCES):
            for dx, dy in _DIRECTIONS:
                offset = (dx * (dist + spread[k]), dy * dist)
                ann = _annotate(ax, labels[k], at[k], offset, fontsize)
                box = ann.get_window_extent(renderer).padded(2 * px)
                ann.remove()
                cost = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, b) for b in others + own)
                cost += 4 * _outside(box, frame)
                near_own = min(_distance(box, b) for b in own)
                if others and min(_distance(box, b) for b in others) < near_own + 3 * px:
                    cost += 400 * px * px  # it would read as another point's label
                cost += ring * 20 * px * px  # nearer is better, all else equal
                if best is None or cost < best[0]:
                    best = (cost, offset, box, ring)
            if best[0] <= ring * 20 * px * px:
                break
        _, offset, box, ring = best
        placed.append(box)
        texts.append(_annotate(ax, labels[k], at[k], offset, fontsize, leader=ring >= 2))
    return texts


def _annotate(ax, text: str, xy, offset: tuple[float, float], fontsize: float, leader: bool = False):
    """`text` at `offset` points from `xy` (data coordinates)."""
    dx, dy = offset
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    kw = {"arrowprops": {"arrowstyle": "-", "color": "#888888", "lw": 0.7, "shrinkA": 1, "shrinkB": 6}} if leader \
        else {}
    return ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                       zorder=4, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                       **kw)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _distance(a, b) -> float:
    dx = max(b.x0 - a.x1, a.x0 - b.x1, 0.0)
    dy = max(b.y0 - a.y1, a.y0 - b.y1, 0.0)
    return math.hypot(dx, dy)


def _outside(box, frame) -> float:
    return box.width * box.height - _overlap(box, frame)


# ---------------------------------------------------------------------------------------------------------------
# The plan per layer


@dataclass
class LayerRow:
    name: str
    out_channels: int  # kept
    original: int | None  # before pruning; None when no result file says
    bits: dict[int, int]  # bit width -> output channels at that width
    sensitivity: float | None  # output divergence with the layer alone at the low bit width
    prune_sensitivity: float | None  # output divergence with the layer's pruning group alone pruned


def short_names(names: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (`hf.bert.` ...)."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def _block(name: str) -> str:
    """The transformer block or residual stage a layer belongs to: its name up to the first numeric component
    (`encoder.layer.3`, `layer2.1`), else its parent (`embeddings`)."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name) or re.match(r"^(\D*\d+)(\.|$)", name)
    return m.group(1) if m else name.rpartition(".")[0]


def plot_layers(rows: list[LayerRow], path: Path, title: str, subtitle: str = "") -> Path:
    """Three panels sharing one row per quantized layer: output channels kept of the original, the share of
    channels at each bit width, and the measured sensitivities (log scale)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(rows)
    names = short_names([r.name for r in rows])
    fig = _figure(14, max(4.5, 0.24 * n + 2.0))
    ax_keep, ax_bits, ax_sens = fig.subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [1.15, 1.0, 1.15]})
    ys = list(range(n))
    blocks = [_block(r.name) for r in rows]
    shade, prev = False, None
    for y, b in zip(ys, blocks):
        if b != prev:
            shade, prev = not shade, b
        if shade:
            for ax in (ax_keep, ax_bits, ax_sens):
                ax.axhspan(y - 0.5, y + 0.5, color="#f2f2f2", zorder=0, lw=0)

    # kept channels of the original
    known = [(y, r) for y, r in zip(ys, rows) if r.original]
    ax_keep.barh([y for y, _ in known], [1.0] * len(known), color="#d9d9d9", height=0.7, zorder=1)
    ax_keep.barh([y for y, _ in known], [r.out_channels / r.original for _, r in known], color="#3a7d44",
                 height=0.7, zorder=2)
    for y, r in zip(ys, rows):
        text = f"{r.out_channels:,} / {r.original:,}" if r.original else f"{r.out_channels:,} / ?"
        ax_keep.text(1.03, y, text, va="center", ha="left", fontsize=7, color="#333333" if r.original else "#a00")
    ax_keep.set_xlim(0, 1.62)
    ax_keep.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25%", "50%", "75%", "100%"])
    ax_keep.set_xlabel("output channels kept (share)")
    ax_keep.set_title("structured pruning: kept / original channels", fontsize=10)

    # share of channels per bit width
    widths = sorted({b for r in rows for b in r.bits}, reverse=True)
    left = [0.0] * n
    for b in widths:
        share = [r.bits.get(b, 0) / max(sum(r.bits.values()), 1) for r in rows]
        ax_bits.barh(ys, share, left=left, color=BIT_COLORS.get(b, "#999999"), height=0.7, zorder=2,
                     label=f"{b}-bit")
        left = [lo + s for lo, s in zip(left, share)]
    low = min(widths) if widths else None
    for y, r in zip(ys, rows):
        total = sum(r.bits.values())
        if low is not None and len(widths) > 1 and r.bits.get(low) and total:
            ax_bits.text(1.02, y, f"{r.bits[low] / total:.0%}", va="center", ha="left", fontsize=7,
                         color=BIT_COLORS.get(low, "#333333"))
    ax_bits.set_xlim(0, 1.16)
    ax_bits.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25%", "50%", "75%", "100%"])
    ax_bits.set_xlabel("output channels per weight bit width (share)")
    ax_bits.set_title("mixed-precision weights" + (f" (right: {low}-bit share)" if low is not None and
                                                   len(widths) > 1 else ""), fontsize=10)
    ax_bits.legend(handles=[Patch(color=BIT_COLORS.get(b, "#999999"), label=f"{b}-bit") for b in widths],
                   loc="lower center", bbox_to_anchor=(0.5, 1.03), ncols=max(len(widths), 1), fontsize=8,
                   frameon=False)

    # sensitivities
    q = [(y, r.sensitivity) for y, r in zip(ys, rows) if r.sensitivity and r.sensitivity > 0]
    p = [(y, r.prune_sensitivity) for y, r in zip(ys, rows) if r.prune_sensitivity and r.prune_sensitivity > 0]
    for y, v in q:
        ax_sens.plot([0, v], [y, y], color="#c9d6ea", lw=2.2, zorder=1, solid_capstyle="butt")
    if q:
        ax_sens.scatter([v for _, v in q], [y for y, _ in q], s=26, color="#4c72b0", zorder=3)
    if p:
        ax_sens.scatter([v for _, v in p], [y for y, _ in p], s=34, marker="|", color="#c44e52", linewidths=2,
                        zorder=4)
    values = [v for _, v in q + p]
    ax_sens.set_xscale("log")
    if values:
        lo, hi = min(values), max(values)
        ax_sens.set_xlim(10 ** (math.floor(math.log10(lo)) - 0.1), 10 ** (math.ceil(math.log10(hi)) + 0.1))
    ax_sens.set_xlabel("output divergence on calibration data (log scale)")
    ax_sens.set_title("measured sensitivity", fontsize=10)
    ax_sens.legend(handles=[Line2D([], [], ls="", marker="o", color="#4c72b0", label="layer at low bit width"),
                            Line2D([], [], ls="", marker="|", ms=9, mew=2, color="#c44e52",
                                   label="its pruning group alone pruned")],
                   loc="lower center", bbox_to_anchor=(0.5, 1.03), ncols=2, fontsize=8, frameon=False)
    if not values:
        ax_sens.text(0.5, 0.5, "no sensitivity recorded in plan.json", transform=ax_sens.transAxes, ha="center",
                     color="#a00")

    ax_keep.set_yticks(ys, names, fontsize=7.5)
    ax_keep.set_ylim(n - 0.5, -0.5)
    for ax in (ax_keep, ax_bits, ax_sens):
        ax.grid(True, axis="x", color="#dddddd", lw=0.7, zorder=0)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", length=0)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    return _save(fig, path)
