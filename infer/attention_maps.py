"""Attention maps people can see: a strip of small copies of the image, one per generated word,
each with a heat map of where the attention decoder looked before saying that word.

    attention_strip(image, words, maps, dst)
        maps [len(words) (+1 for <end>), P]: P = side * side positions of the encoder's grid,
        row-major (extract --features grid). Each map is drawn at its own scale (its largest weight
        is full colour) and its peak weight is printed under the word, so a flat map (attention
        spread evenly, peak ~1/P) reads differently from a sharp one.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from extract.encoder import grid_side
from prepare.files import atomic_path

TILE = 112            # side of each small copy, pixels
PER_ROW = 8           # tiles per row before the strip wraps
LABEL = 30            # band under each tile for the word and the peak weight


def heat_rgb(weights: np.ndarray, size: int) -> tuple[Image.Image, Image.Image]:
    """A [side*side] attention map -> (RGB colour image, L alpha mask), both size x size, smooth."""
    import matplotlib
    side = grid_side(len(weights))
    grid = np.asarray(weights, np.float32).reshape(side, side)
    grid = grid / max(float(grid.max()), 1e-12)
    up = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR))
    rgb = (matplotlib.colormaps["inferno"](np.clip(up, 0, 1))[..., :3] * 255).astype(np.uint8)
    alpha = (np.clip(up, 0, 1) * 200 + 30).astype(np.uint8)            # never fully hides the image
    return Image.fromarray(rgb, "RGB"), Image.fromarray(alpha, "L")


def attention_strip(image: str | Path | Image.Image, words: list[str], maps: np.ndarray, dst: str | Path,
                    tile: int = TILE, boxes: list | None = None) -> None:
    """Write the strip to dst (PNG, atomically): the image, then one tile per word. boxes: per word
    None or the box (x0, y0, x1, y1, fractions of the image) of the object the word names, drawn
    on its tile in cyan (where the attention should be)."""
    from extract.images import to_rgb
    from infer.annotate import _font
    if isinstance(image, Image.Image):
        im = to_rgb(image)
    else:
        with Image.open(image) as src:
            src.draft("RGB", (4 * tile, 4 * tile))
            im = to_rgb(ImageOps.exif_transpose(src))
    im = im.resize((tile, tile), Image.BILINEAR)          # the encoder also sees the image squared
    maps = np.asarray(maps)
    n = min(len(words), len(maps))
    tiles = [(im, "(image)", "")]
    boxes = list(boxes or []) + [None] * n
    for w, m, box in zip(words[:n], maps[:n], boxes):
        colour, alpha = heat_rgb(m, tile)
        t = im.copy()
        t.paste(colour, (0, 0), alpha)
        if box is not None:
            ImageDraw.Draw(t).rectangle([v * tile for v in box], outline=(0, 230, 255), width=2)
        tiles.append((t, w, f"peak {float(np.max(m)):.2f}"))
    cols = min(PER_ROW, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new("RGB", (cols * (tile + 4) + 4, rows * (tile + LABEL + 4) + 4), "white")
    d = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(10)
    for k, (t, word, peak) in enumerate(tiles):
        x, y = 4 + (k % cols) * (tile + 4), 4 + (k // cols) * (tile + LABEL + 4)
        canvas.paste(t, (x, y))
        d.text((x + 2, y + tile + 1), word[:16], fill="black", font=font)
        d.text((x + 2, y + tile + 16), peak, fill=(110, 110, 110), font=small)
    with atomic_path(dst) as tmp:
        canvas.save(tmp, format="PNG")


def caption_words(vocab, ids: list[int], n_maps: int) -> list[str]:
    """The words a caption's maps belong to: ids after <start>, <end> shown as '<end>'."""
    words = [vocab.words[i] if 0 <= i < len(vocab.words) else "?" for i in ids[1:]]
    return words[:n_maps]
