"""PNG pictures of a run with matplotlib (object API on the Agg canvas: no display, no pyplot state).

``line_plot`` draws one or more series (x, y) with a legend and a title; ``image_grid`` tiles rows of [N, 3, H, W]
images in [0, 1] at exact pixel positions (nearest-neighbour upscaled, so small images stay crisp) with a label per
row. ``read_log`` / ``plot_run`` regenerate a run's plots from its ``log.jsonl``. Why matplotlib: docs/design.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import torch

__all__ = ["figure", "image_grid", "line_plot", "plot_run", "read_log", "smooth"]

DPI = 100  # figure sizes below are in pixels: inches = pixels / DPI


def figure(width_px: int, height_px: int):
    """A matplotlib Figure of exactly width_px x height_px pixels on an Agg canvas (the benchmark plots use it too)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (NaNs skipped)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[int, int] = (720, 440),
) -> str:
    """Draw ``{name: (xs, ys)}`` as lines into a PNG of ``size`` pixels at ``path``; non-finite points are skipped
    (a series with one finite point is drawn as a dot)."""
    fig = figure(*size)
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) == 1 else None, lw=2, label=name)
    if series:
        ax.legend(loc="best", frameon=False)
    ax.grid(color="0.9")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path)
    return os.fspath(path)


def image_grid(
    rows: Sequence[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    scale: int = 4,
    gap: int = 4,
    title: str = "",
) -> str:
    """Save rows of images [N, 3, H, W] in [0, 1] (one label per row) as one PNG; rows may have different N.

    Layout in pixels: a label column as wide as the longest label + 12, then tiles of scale x (H, W) separated by
    ``gap``; a 22-pixel title band on top if ``title`` is given, else ``gap``."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    tiles = []
    for label, images in rows:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"row {label!r}: images must be [N, 3, H, W] in [0, 1]")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        tiles.append((label, pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)))  # nearest upscale
    h, w = tiles[0][1].shape[1:3]
    probe = figure(1, 1)
    renderer = probe.canvas.get_renderer()
    label_w = max(int(math.ceil(probe.text(0, 0, lbl).get_window_extent(renderer).width)) for lbl, _ in tiles) + 12
    n_cols = max(len(t) for _, t in tiles)
    top = 22 if title else gap
    width, height = label_w + n_cols * (w + gap) + gap, top + len(tiles) * (h + gap)
    canvas = torch.full((height, width, 3), 255, dtype=torch.uint8)
    for r, (_, images) in enumerate(tiles):
        y = top + r * (h + gap)
        for c, tile in enumerate(images):
            x = label_w + c * (w + gap)
            canvas[y : y + h, x : x + w] = tile
    fig = figure(width, height)
    fig.figimage(canvas.numpy(), 0, 0, origin="upper")  # pixel-exact: no resampling
    if title:
        fig.text(gap / width, 1 - 11 / height, title, va="center")
    for r, (label, _) in enumerate(tiles):
        fig.text(4 / width, 1 - (top + r * (h + gap) + h / 2) / height, label, va="center")
    fig.savefig(path, dpi=DPI)
    return os.fspath(path)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log (one JSON object per line; blank or truncated last lines are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write
            if isinstance(record, dict):
                records.append(record)
    return records


def _value(v) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else float("nan")


def plot_run(run_dir: str | os.PathLike, log_name: str = "log.jsonl") -> list[str]:
    """Regenerate ``reward.png`` and ``loss.png`` of a run (per method when the log has a ``method`` field)."""
    log = os.path.join(run_dir, log_name)
    if not os.path.isfile(log):
        raise FileNotFoundError(f"no {log_name} in {run_dir} (is it a flowkern run directory?)")
    records = read_log(log)
    if not records:
        raise ValueError(f"{log} holds no records")
    by_method: dict[str, list[dict]] = {}
    for rec in records:
        by_method.setdefault(str(rec.get("method", "run")), []).append(rec)
    written = []
    for key, fname, label in (("reward_mean", "reward.png", "reward"), ("loss", "loss.png", "loss")):
        series = {}
        for method, recs in by_method.items():
            xs = [_value(r.get("step")) for r in recs]
            ys = [_value(r.get(key)) for r in recs]
            if any(math.isfinite(y) for y in ys):
                window = max(1, len(ys) // 20)
                series[method if window == 1 else f"{method} (mean of {window})"] = (xs, smooth(ys, window))
        if series:
            written.append(line_plot(series, os.path.join(run_dir, fname), title=f"{label} per update", ylabel=label))
    return written
