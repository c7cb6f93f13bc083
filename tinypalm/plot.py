"""The loss curve as a hand-written SVG, and the metrics log it is drawn from."""

import json
import math
import os
from xml.sax.saxutils import escape

from .files import write_atomically

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 40, 52  # margins around the plot area
COLORS = {"train": "#1f77b4", "val": "#ff7f0e"}


def _ticks(lo, hi, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:  # a single value: give it some room, but keep a step or loss of >= 0 on an axis from >= 0
        pad = max(1.0, abs(lo) * 0.1)
        lo, hi = (max(0.0, lo - pad) if lo >= 0 else lo - pad), hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    decimals = max(0, -math.floor(math.log10(step)))
    return [(i * step, f"{i * step:.{decimals}f}") for i in range(first, last + 1)]


def _svg(body, title):
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'font-family="sans-serif" font-size="12">\n<rect width="{W}" height="{H}" fill="white"/>\n'
        f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>\n'
        + "\n".join(body)
        + "\n</svg>\n"
    )


def write_loss_svg(path, train_points, val_points, title="tinypalm"):
    """Loss against step: train as a line, validation as a line with dots. Points are (step, loss)."""
    series = {
        name: [(float(s), float(l)) for s, l in pts if math.isfinite(s) and math.isfinite(l)]
        for name, pts in (("train", train_points), ("val", val_points))
    }
    series = {k: v for k, v in series.items() if v}
    body = []
    if not series:
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#888">no data yet</text>')
    else:
        allp = [p for pts in series.values() for p in pts]
        xt = _ticks(min(p[0] for p in allp), max(p[0] for p in allp))
        yt = _ticks(min(p[1] for p in allp), max(p[1] for p in allp))
        (x0, x1), (y0, y1) = (xt[0][0], xt[-1][0]), (yt[0][0], yt[-1][0])

        def px(x):
            return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

        def py(y):  # SVG y grows downwards
            return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)

        for v, label in xt:  # vertical grid line and label per x tick
            body.append(f'<line x1="{px(v):.1f}" y1="{TOP}" x2="{px(v):.1f}" y2="{H - BOTTOM}" stroke="#eee"/>')
            body.append(f'<text x="{px(v):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{label}</text>')
        for v, label in yt:
            body.append(f'<line x1="{LEFT}" y1="{py(v):.1f}" x2="{W - RIGHT}" y2="{py(v):.1f}" stroke="#eee"/>')
            body.append(f'<text x="{LEFT - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{label}</text>')
        body.append(f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#444"/>')
        body.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">step</text>')
        body.append(f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">loss</text>')

        for i, (name, pts) in enumerate(series.items()):
            color = COLORS[name]
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            body.append(f'<polyline class="{name}" points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            if name == "val" or len(pts) == 1:  # a one-point line is invisible, so mark it
                body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
            ly = TOP + 14 + 16 * i  # legend, top right inside the plot
            body.append(f'<line x1="{W - RIGHT - 64}" y1="{ly - 4}" x2="{W - RIGHT - 44}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
            body.append(f'<text x="{W - RIGHT - 38}" y="{ly}">{name}</text>')

    text = _svg(body, title).encode("utf-8")
    write_atomically(os.fspath(path), lambda f: f.write(text), "loss picture")   # a viewer never sees half of one


def read_metrics(path):
    """(train_points, val_points) from a metrics.jsonl; lines that are not {"split", "step", "loss"} are skipped.

    A resumed run logs some steps again, so the last record for a step wins and points are sorted by step.
    """
    seen = {"train": {}, "val": {}}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return [], []
    for line in lines:
        try:
            r = json.loads(line)
            step, loss = r["step"], r["loss"]
            if r["split"] in seen and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (step, loss)):
                seen[r["split"]][step] = loss
        except (ValueError, KeyError, TypeError):  # a partial last line, a record of another kind, ...
            continue
    return tuple(sorted(seen[k].items()) for k in ("train", "val"))
