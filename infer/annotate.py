"""Draw a caption as a title above a copy of the image (long captions wrapped, aspect kept)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from prepare.util import atomic_path


def pretty(text: str) -> str:
    """Tokenized caption -> display text: 'a red star , and a dot .' -> 'A red star, and a dot.'"""
    import re
    t = re.sub(r" ([.,:;!?'])", r"\1", text.strip())
    return t[:1].upper() + t[1:]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1: scalable built-in font
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def annotate(src: str | Path, captions: list[tuple[str, float]], dst: str | Path, width: int = 640) -> None:
    """captions: [(text, probability)] best first; the best is the title, the others listed small."""
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    scale = width / im.width
    im = im.resize((width, max(1, round(im.height * scale))), Image.BILINEAR)
    big, small = _font(max(14, width // 28)), _font(max(11, width // 40))
    probe = ImageDraw.Draw(im)
    margin = width // 40
    title = _wrap(probe, pretty(captions[0][0]) if captions else "(no caption)", big, width - 2 * margin)
    extra = [f"{i}) {pretty(t)} (p={p:.2g})" for i, (t, p) in enumerate(captions[1:], 1)]
    extra_lines = [ln for e in extra for ln in _wrap(probe, e, small, width - 2 * margin)]
    lh_big, lh_small = big.size + 6, small.size + 4
    band = margin + len(title) * lh_big + len(extra_lines) * lh_small + margin
    canvas = Image.new("RGB", (width, im.height + band), "white")
    canvas.paste(im, (0, band))
    d = ImageDraw.Draw(canvas)
    y = margin
    for ln in title:
        d.text((margin, y), ln, fill="black", font=big)
        y += lh_big
    for ln in extra_lines:
        d.text((margin, y), ln, fill=(90, 90, 90), font=small)
        y += lh_small
    with atomic_path(dst) as tmp:
        canvas.save(tmp, format="JPEG", quality=90)
