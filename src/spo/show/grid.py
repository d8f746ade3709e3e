"""Image grids, one module: a plain tiled grid with optional per-cell labels (the toy samples, the training
validation grid) and a grid with row and column labels (sweeps, before/after pairs)."""

from __future__ import annotations

import math
from typing import Sequence

MIN_CELL = 128  # toy images are 32 px: scale cells up so labels and details are readable
MAX_LABEL_LINES = 4  # a longer cell label is cut, ending in "…"


def columns_for(n: int, max_cols: int = 8) -> int:
    """Columns for n cells: the widest layout of at most max_cols whose rows are all full, unless that is narrower
    than half of max_cols (a prime n, say), where a short last row is better than a tall thin grid."""
    if n <= max_cols:
        return max(1, n)
    best = max(d for d in range(1, max_cols + 1) if n % d == 0)
    return best if 2 * best >= max_cols else max_cols


def image_grid(images: Sequence, cols: int | None = None, scale: int = 1, labels: Sequence[str] | None = None):
    """Tile PIL images (same size) row by row, each scaled up `scale` times (nearest: pixels stay sharp).

    cols: default `columns_for(len(images))`, so rows are full. labels: one caption per cell (e.g. "prompt · seed"),
    wrapped under its image.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    images = list(images)
    cols = cols or columns_for(len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    padded = images + [Image.new("RGB", (w, h), (255, 255, 255))] * (rows * cols - len(images))
    grid = make_image_grid(padded, rows, cols)
    grid = grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST)
    if not labels:
        return grid
    cw, ch = w * scale, h * scale
    font = _font(max(10, min(14, cw // 10)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_clip_lines(probe, _wrap(probe, str(t), font, cw - 6), font, cw - 6) for t in labels]
    line_h = int(font.size * 1.25) if hasattr(font, "size") else 12
    strip = max(len(lines) for lines in wrapped) * line_h + 4
    out = Image.new("RGB", (cols * cw, rows * (ch + strip)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i in range(len(images)):
        x, y = (i % cols) * cw, (i // cols) * (ch + strip)
        out.paste(grid.crop((x, (i // cols) * ch, x + cw, (i // cols + 1) * ch)), (x, y))
        for k, line in enumerate(wrapped[i] if i < len(wrapped) else []):
            draw.text((x + 3, y + ch + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return out


def _clip_lines(draw, lines: list[str], font, width: int, most: int = MAX_LABEL_LINES) -> list[str]:
    if len(lines) <= most:
        return lines
    last = lines[most - 1].split(" ")
    while len(last) > 1 and draw.textlength(" ".join(last) + " …", font=font) > width:
        last.pop()
    return lines[:most - 1] + [" ".join(last) + " …"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def labelled_grid(cells: list[list], row_labels: list[str], col_labels: list[str], title: str = ""):
    """cells[r][c] PIL images (same size) -> one image with column labels on top, row labels on the left."""
    from PIL import Image, ImageDraw

    w, h = cells[0][0].size
    scale = max(1, math.ceil(MIN_CELL / max(w, h)))
    cw, ch = w * scale, h * scale
    font = _font(max(12, cw // 10))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.size * 1.3) if hasattr(font, "size") else 14
    left = min(max(int(max(probe.textlength(t, font=font) for t in row_labels)) + 16, 60), 3 * cw)
    col_lines = [_wrap(probe, t, font, cw - 8) for t in col_labels]
    top_cols = max(len(lines) for lines in col_lines) * line_h + 8
    width = left + cw * len(col_labels)
    title_lines = _wrap(probe, title, font, width - 16) if title else []
    top = top_cols + len(title_lines) * line_h + (8 if title_lines else 0)
    img = Image.new("RGB", (width, top + ch * len(row_labels)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(title_lines):
        draw.text((8, 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    y0 = top - top_cols
    for c, lines in enumerate(col_lines):
        for i, line in enumerate(lines):
            tw = probe.textlength(line, font=font)
            draw.text((left + c * cw + (cw - tw) / 2, y0 + 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels):
        lines = _wrap(probe, label, font, left - 12)
        ly = top + r * ch + (ch - len(lines) * line_h) / 2
        for i, line in enumerate(lines):
            draw.text((6, ly + i * line_h), line, fill=(0, 0, 0), font=font)
        for c in range(len(col_labels)):
            img.paste(cells[r][c].resize((cw, ch), Image.NEAREST), (left + c * cw, top + r * ch))
    return img
