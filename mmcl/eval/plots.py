"""PNG figures of a suite run, drawn with Pillow (no plotting library needed): a confusion matrix per
classification task and a recall@K curve per retrieval task."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

_FONT_SIZE = 12
_BLUE = (8, 48, 107)
_LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int = _FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _shade(fraction: float) -> tuple[int, int, int]:
    """White at 0 to dark blue at 1."""
    f = min(max(fraction, 0.0), 1.0)
    return tuple(round(255 + (c - 255) * f) for c in _BLUE)  # type: ignore[return-value]


def _vertical_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    w, h = _text_size(font, text)
    img = Image.new("RGBA", (w + 2, h + 4), (255, 255, 255, 0))
    ImageDraw.Draw(img).text((0, 0), text, fill=(0, 0, 0, 255), font=font)
    return img.rotate(90, expand=True)


def confusion_matrix_png(matrix: torch.Tensor, classnames: list[str], path: str | Path, title: str) -> Path:
    """``matrix [C, C]`` (row = true class, column = predicted; counts) as a heat map shaded by the row's
    fraction (the class's recall on the diagonal) and labelled with the counts."""
    font, small = _font(), _font(10)
    n = len(classnames)
    cell = 36 if n <= 20 else max(6, 720 // n)
    label_w = max(_text_size(font, c)[0] for c in classnames) + 10
    title_h = _text_size(font, title)[1] + 26
    top = title_h + label_w
    left = label_w + 18
    img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    draw.text((8, 6 + title_h // 2), "rows: true class, columns: predicted", fill=(90, 90, 90), font=small)
    rows = matrix.double()
    fractions = (rows / rows.sum(dim=1, keepdim=True).clamp(min=1e-12)).tolist()  # Python floats: no tensor per cell
    counts = rows.tolist()
    for i in range(n):
        for j in range(n):
            frac = fractions[i][j]
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_shade(frac), outline=(220, 220, 220))
            if n <= 20:
                value = counts[i][j]
                text = f"{value:.0f}" if value == round(value) else f"{value:.1f}"
                tw, th = _text_size(small, text)
                draw.text((x0 + (cell - tw) / 2, y0 + (cell - th) / 2 - 1), text,
                          fill="white" if frac > 0.5 else "black", font=small)
    for i, name in enumerate(classnames):
        tw, th = _text_size(font, name)
        draw.text((left - tw - 6, top + i * cell + (cell - th) / 2 - 2), name, fill="black", font=font)
        label = _vertical_text(name, font)
        img.paste(label, (left + i * cell + (cell - label.width) // 2, top - label.height - 4), label)
    out = Path(path)
    img.save(out)
    return out


def _ticks(max_k: int) -> list[int]:
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10**9) if max_k / s <= 10)
    ticks = [1] + list(range(step, max_k + 1, step))
    return sorted(set(ticks + [max_k]))


def recall_curve_png(curves: dict[str, list[float]], path: str | Path, title: str) -> Path:
    """Recall@K against K = 1 .. len(curve), one line per entry of ``curves``."""
    font = _font()
    width, height = 560, 360
    left, right, top, bottom = 52, 16, 34, 44
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black", font=font)
    pw, ph = width - left - right, height - top - bottom
    max_k = max(len(c) for c in curves.values())

    def xy(k: float, r: float) -> tuple[float, float]:
        x = left + (pw * (k - 1) / (max_k - 1) if max_k > 1 else pw / 2)
        return x, top + ph * (1.0 - r)

    for r in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = xy(1, r)[1]
        draw.line([left, y, left + pw, y], fill=(225, 225, 225))
        label = f"{r:.2f}"
        tw, th = _text_size(font, label)
        draw.text((left - tw - 6, y - th / 2 - 2), label, fill="black", font=font)
    for k in _ticks(max_k):
        x = xy(k, 0.0)[0]
        draw.line([x, top + ph, x, top + ph + 4], fill="black")
        tw, _ = _text_size(font, str(k))
        draw.text((x - tw / 2, top + ph + 6), str(k), fill="black", font=font)
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    xlabel = "K"
    draw.text((left + pw / 2 - _text_size(font, xlabel)[0] / 2, height - 18), xlabel, fill="black", font=font)
    ylabel = _vertical_text("recall@K", font)
    img.paste(ylabel, (4, top + ph // 2 - ylabel.height // 2), ylabel)
    for i, (name, curve) in enumerate(curves.items()):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        points = [xy(k + 1, r) for k, r in enumerate(curve)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(points) <= 30:
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + ph - 18 * (len(curves) - i)
        draw.line([left + pw - 150, ly + 7, left + pw - 130, ly + 7], fill=colour, width=2)
        draw.text((left + pw - 124, ly), name, fill="black", font=font)
    out = Path(path)
    img.save(out)
    return out
