"""PNG plots with Pillow only (no matplotlib): line plots of logged metrics and labelled image grids.

``line_plot`` draws one or more series (x, y) with axes, ticks, a legend and a title on a white canvas;
``image_grid`` tiles rows of [N, 3, H, W] images in [0, 1] (nearest-neighbour upscaled so small images stay
crisp) with a label per row. ``read_log`` / ``plot_run`` regenerate a run's plots from its ``log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import torch

__all__ = ["PALETTE", "image_grid", "line_plot", "plot_run", "read_log", "smooth"]

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
_BG, _FG, _GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


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
    """Draw ``{name: (xs, ys)}`` as lines into a PNG at ``path``; non-finite points are skipped."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, _BG)
    draw = ImageDraw.Draw(image)
    font = _font()
    left, right, top, bottom = 70, 20, 36, 50
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if pts:
        x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
        y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
    else:
        x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    sx = lambda x: x0 + (x - x_lo) / (x_hi - x_lo) * (x1 - x0)
    sy = lambda y: y1 - (y - y_lo) / (y_hi - y_lo) * (y1 - y0)

    for t in _nice_ticks(y_lo, y_hi):
        y = sy(t)
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        label = _fmt(t)
        draw.text((x0 - 6 - draw.textlength(label, font=font), y - 6), label, fill=_FG, font=font)
    for t in _nice_ticks(x_lo, x_hi, 6):
        x = sx(t)
        draw.line([(x, y1), (x, y1 + 4)], fill=_FG)
        label = _fmt(t)
        draw.text((x - draw.textlength(label, font=font) / 2, y1 + 6), label, fill=_FG, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=_FG)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        ly = y0 + 8 + 14 * i
        draw.line([(x0 + 10, ly + 6), (x0 + 30, ly + 6)], fill=colour, width=3)
        draw.text((x0 + 36, ly), name, fill=_FG, font=font)
    if title:
        draw.text(((width - draw.textlength(title, font=font)) / 2, 12), title, fill=_FG, font=font)
    draw.text(((x0 + x1 - draw.textlength(xlabel, font=font)) / 2, height - 20), xlabel, fill=_FG, font=font)
    if ylabel:
        draw.text((8, 12), ylabel, fill=_FG, font=font)
    image.save(path)
    return os.fspath(path)


def image_grid(
    rows: Sequence[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    scale: int = 4,
    gap: int = 4,
    title: str = "",
) -> str:
    """Save rows of images [N, 3, H, W] in [0, 1] (one label per row) as one PNG; rows may have different N."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("image_grid needs at least one row")
    font = _font()
    tiles = []
    for label, images in rows:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"row {label!r}: images must be [N, 3, H, W] in [0, 1]")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        tiles.append((label, [Image.fromarray(p.numpy()) for p in pixels]))
    h, w = tiles[0][1][0].height * scale, tiles[0][1][0].width * scale
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lbl, font=font)) for lbl, _ in tiles) + 12
    n_cols = max(len(t) for _, t in tiles)
    top = 22 if title else gap
    canvas = Image.new("RGB", (label_w + n_cols * (w + gap) + gap, top + len(tiles) * (h + gap)), _BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 6), title, fill=_FG, font=font)
    for r, (label, images) in enumerate(tiles):
        y = top + r * (h + gap)
        draw.text((4, y + h / 2 - 6), label, fill=_FG, font=font)
        for c, tile in enumerate(images):
            canvas.paste(tile.resize((w, h), Image.NEAREST), (label_w + c * (w + gap), y))
    canvas.save(path)
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
