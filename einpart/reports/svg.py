"""A small SVG writer with no dependencies: the charts and layout drawings of
the reports, so `einpart pareto` and `einpart report` work on the core
install (matplotlib is only needed for PNG).

Every piece of text goes through `esc`, so a name from a spec can never
become markup; attribute values are numbers or fixed strings chosen here.
"""
from __future__ import annotations

import math
from html import escape

# Distinct colours (Tableau 10), used in order for chip counts and blocks.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def esc(text) -> str:
    return escape(str(text), quote=True)


def colour(i: int) -> str:
    """A colour per block index: the palette, then golden-angle hues beyond it."""
    if i < len(PALETTE):
        return PALETTE[i]
    return f"hsl({(i * 137.508) % 360:.1f}, 55%, 62%)"


def _n(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


class Svg:
    """Elements appended in order; `text()` is the finished document."""

    def __init__(self, width: float, height: float):
        self.width, self.height = width, height
        self.items: list[str] = []

    def rect(self, x, y, w, h, fill="none", stroke="#333", width=1.0, tip: str | None = None):
        body = f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" fill="{fill}" ' \
               f'stroke="{stroke}" stroke-width="{_n(width)}"'
        self.items.append(body + (f"><title>{esc(tip)}</title></rect>" if tip else "/>"))

    def line(self, x1, y1, x2, y2, stroke="#333", width=1.0, dash: str = ""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.items.append(f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" '
                          f'stroke="{stroke}" stroke-width="{_n(width)}"{d}/>')

    def polyline(self, pts, stroke="#333", width=1.5):
        p = " ".join(f"{_n(x)},{_n(y)}" for x, y in pts)
        self.items.append(f'<polyline points="{p}" fill="none" stroke="{stroke}" stroke-width="{_n(width)}"/>')

    def circle(self, x, y, r, fill, stroke="none", width=1.0, tip: str | None = None):
        body = f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{_n(r)}" fill="{fill}" stroke="{stroke}" ' \
               f'stroke-width="{_n(width)}"'
        self.items.append(body + (f"><title>{esc(tip)}</title></circle>" if tip else "/>"))

    def text(self, x, y, s, size=12, anchor="start", weight="normal", rotate: float = 0, fill="#222"):
        rot = f' transform="rotate({_n(rotate)} {_n(x)} {_n(y)})"' if rotate else ""
        self.items.append(f'<text x="{_n(x)}" y="{_n(y)}" font-size="{_n(size)}" text-anchor="{anchor}" '
                          f'font-weight="{weight}" fill="{fill}"{rot}>{esc(s)}</text>')

    def text_doc(self, standalone: bool = True) -> str:
        head = '<?xml version="1.0" encoding="UTF-8"?>\n' if standalone else ""
        return (head + f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(self.width)}" '
                f'height="{_n(self.height)}" viewBox="0 0 {_n(self.width)} {_n(self.height)}" '
                f'font-family="Helvetica, Arial, sans-serif">\n' + "\n".join(self.items) + "\n</svg>\n")


# ---------------------------------------------------------------- log-log charts
def _decades(lo: float, hi: float) -> tuple[float, float]:
    """Axis range in log10 units: whole decades around [lo, hi]."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return (a, b) if b > a else (a, a + 1)


def _tick_label(e: int) -> str:
    return f"{10.0 ** e:g}" if -3 <= e <= 3 else f"1e{e}"


def loglog_panel(svg: Svg, x0, y0, w, h, title: str, xlabel: str, ylabel: str, series: list[dict]):
    """One log-log scatter panel at (x0, y0) of size (w, h).

    series: [{"label", "colour", "points": [(x, y, tip, mark)], "line": bool}];
    a series with line=True is drawn as a polyline through its points in
    order (the frontier), each ringed and labelled with its mark; the others
    as dots. tip is the hover text.
    """
    pts = [(p[0], p[1]) for s in series for p in s["points"] if p[0] > 0 and p[1] > 0]
    svg.text(x0 + w / 2, y0 - 10, title, size=14, anchor="middle", weight="bold")
    svg.rect(x0, y0, w, h, stroke="#888")
    if not pts:
        svg.text(x0 + w / 2, y0 + h / 2, "no feasible point", anchor="middle", fill="#a00")
        return
    xa, xb = _decades(min(p[0] for p in pts), max(p[0] for p in pts))
    ya, yb = _decades(min(p[1] for p in pts), max(p[1] for p in pts))

    def px(x):
        return x0 + (math.log10(x) - xa) / (xb - xa) * w

    def py(y):
        return y0 + h - (math.log10(y) - ya) / (yb - ya) * h

    for e in range(xa, xb + 1):
        svg.line(px(10.0 ** e), y0, px(10.0 ** e), y0 + h, stroke="#ddd")
        svg.text(px(10.0 ** e), y0 + h + 16, _tick_label(e), size=11, anchor="middle")
    for e in range(ya, yb + 1):
        svg.line(x0, py(10.0 ** e), x0 + w, py(10.0 ** e), stroke="#ddd")
        svg.text(x0 - 6, py(10.0 ** e) + 4, _tick_label(e), size=11, anchor="end")
    svg.text(x0 + w / 2, y0 + h + 36, xlabel, size=12, anchor="middle")
    svg.text(x0 - 52, y0 + h / 2, ylabel, size=12, anchor="middle", rotate=-90)
    for s in series:
        good = [p for p in s["points"] if p[0] > 0 and p[1] > 0]
        if s.get("line"):
            svg.polyline([(px(x), py(y)) for x, y, _, _ in good], stroke=s["colour"], width=2)
        for x, y, tip, mark in good:
            if s.get("line"):
                svg.circle(px(x), py(y), 6, "none", stroke=s["colour"], width=2, tip=tip)
                if mark:
                    svg.text(px(x) + 8, py(y) - 6, mark, size=10, fill="#444")
            else:
                svg.circle(px(x), py(y), 4, s["colour"], tip=tip)
    # legend, top right inside the panel
    ly = y0 + 14
    for s in series:
        if s.get("line"):
            svg.line(x0 + w - 148, ly - 4, x0 + w - 130, ly - 4, stroke=s["colour"], width=2)
        else:
            svg.circle(x0 + w - 139, ly - 4, 4, s["colour"])
        svg.text(x0 + w - 124, ly, s["label"], size=11)
        ly += 16
