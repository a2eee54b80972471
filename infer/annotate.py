"""Draw a caption as a title above a copy of the image (long captions wrapped, aspect kept)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from prepare.files import atomic_path


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


MAX_W, MAX_H = 640, 1280      # the picture is scaled (up or down, aspect kept) to fit this box
MIN_TEXT_W = 320              # a narrower picture is centred on a canvas this wide, for the caption
MAX_PIXELS = 1_500_000        # the whole annotated copy, caption band included


def fit(w: int, h: int, max_w: int = MAX_W, max_h: int = MAX_H) -> tuple[int, int]:
    """Size of a w x h picture scaled to fit max_w x max_h, aspect kept, each side at least 1 px."""
    scale = min(max_w / w, max_h / h)
    return max(1, min(max_w, round(w * scale))), max(1, min(max_h, round(h * scale)))


def annotate(src: str | Path, captions: list[tuple[str, float]], dst: str | Path, width: int = MAX_W) -> None:
    """Write the annotated copy of image file `src` to dst (JPEG, atomically); see render."""
    with atomic_path(dst) as tmp:
        render(src, captions, width).save(tmp, format="JPEG", quality=90)


def render(src, captions: list[tuple[str, float]], width: int = MAX_W) -> Image.Image:
    """The annotated copy of `src` (a path or a file object): captions [(text, probability)] best
    first; the best is the title, the others listed small.

    The picture is scaled to fit `width` x 2*`width` (aspect kept, so a 10x1100 or 8x200000 picture
    stays a thin strip, never a huge image), converted to RGB by the same code as the encoder's input
    (EXIF rotation, 16-bit, alpha over white, CMYK...), and the whole copy stays under MAX_PIXELS.
    """
    from extract.images import to_rgb
    with Image.open(src) as im:
        im.draft("RGB", (2 * width, 2 * width))     # JPEG: decode big ones at a reduced size (>= the box)
        im = to_rgb(ImageOps.exif_transpose(im))
    im = im.resize(fit(im.width, im.height, width, 2 * width), Image.BILINEAR)
    width = max(im.width, min(width, MIN_TEXT_W))
    big, small = _font(max(14, width // 28)), _font(max(11, width // 40))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(4, width // 40)
    title = _wrap(probe, pretty(captions[0][0]) if captions else "(no caption)", big, width - 2 * margin)
    extra = [f"{i}) {pretty(t)} (p={p:.2g})" for i, (t, p) in enumerate(captions[1:], 1)]
    extra_lines = [ln for e in extra for ln in _wrap(probe, e, small, width - 2 * margin)]
    lh_big, lh_small = big.size + 6, small.size + 4
    band = margin + len(title) * lh_big + len(extra_lines) * lh_small + margin
    band = min(band, MAX_PIXELS // width - im.height)          # a freak caption cannot blow the size up
    canvas = Image.new("RGB", (width, im.height + band), "white")
    canvas.paste(im, ((width - im.width) // 2, band))
    d = ImageDraw.Draw(canvas)
    y = margin
    for ln in title:
        d.text((margin, y), ln, fill="black", font=big)
        y += lh_big
    for ln in extra_lines:
        d.text((margin, y), ln, fill=(90, 90, 90), font=small)
        y += lh_small
    return canvas
