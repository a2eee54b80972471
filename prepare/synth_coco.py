"""A caption set of MS-COCO 2014's size and shape, for rehearsing every stage at COCO's scale
(`python -m prepare synth-coco`; `python -m infer rehearse` times the stages on it).

    DIR/images/<split>/COCO_synth_<id:012>.png     a 32 x 32 placeholder (one of 64 flat colours)
    DIR/annotations/captions_<split>.json          COCO caption format, 5 captions an image

The full size is Karpathy's split of COCO 2014 (its 82,783 train + 40,504 val images regrouped):
113,287 train, 5,000 val, 5,000 test images, 616,435 captions; `--fraction 1/16` or `1/4` scales
every split. Captions are made of 10,000 pseudo-words ("bakedo") drawn with Zipf frequencies
(the k-th most frequent word ~ 1 / (k + 2.7)), lengths like COCO's (8 to ~50 words, mean 10.5),
the first letter capitalised and a full stop on most, as people type them. Nothing in them is
learnable: the set measures time and memory, not quality. Deterministic for (fraction, seed).
"""
from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from prepare.errors import UserError, check_range
from prepare.synth import SPLITS, begin_dataset, check_out, end_dataset

FULL = {"train": 113_287, "val": 5_000, "test": 5_000}     # Karpathy's split of COCO 2014 (123,287 images)
CAPTIONS_PER_IMAGE = 5
VOCAB = 10_000
ZIPF_SHIFT = 2.7            # Zipf-Mandelbrot: p(k) ~ 1 / (k + shift), k = 0, 1, ... by frequency rank
PLACEHOLDER_SIDE, PLACEHOLDER_COLOURS = 32, 64
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]     # 70 syllables


def parse_fraction(text: str, flag: str = "--fraction") -> float:
    """'1/16', '0.25' or '1' -> a float in (0, 1]; UserError naming the flag otherwise."""
    try:
        f = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{flag} {text!r} is not a number; give e.g. 1/16, 0.25 or 1 (COCO's full size)") from None
    if not 0 < f <= 1:
        raise UserError(f"{flag} must be above 0 and at most 1 (got {text}); 1 is COCO 2014's size")
    return float(f)


def split_counts(fraction: float) -> dict[str, int]:
    """Images per split at `fraction` of the full size (at least one each)."""
    return {s: max(1, round(n * fraction)) for s, n in FULL.items()}


def pseudo_words(n: int = VOCAB) -> list[str]:
    """n distinct lower-case pseudo-words of 2-3 syllables, the same list every time."""
    k = len(SYLLABLES)
    two = [a + b for a in SYLLABLES for b in SYLLABLES]                          # 4,900
    three = (SYLLABLES[i % k] + SYLLABLES[(i // k) % k] + SYLLABLES[(i // k // k) % k] for i in range(k ** 3))
    out = two[:n]
    for w in three:
        if len(out) >= n:
            break
        out.append(w)
    return out


def caption_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per caption like COCO's: at least 8, mostly 8-13, a long tail to ~50 (mean ~10.5)."""
    length = 8 + rng.poisson(2.2, n)
    tail = rng.random(n) < 0.03
    length[tail] += rng.geometric(0.1, int(tail.sum()))
    return np.minimum(length, 50)


def zipf_probabilities(n: int = VOCAB) -> np.ndarray:
    p = 1.0 / (np.arange(n) + ZIPF_SHIFT)
    return p / p.sum()


def _placeholders() -> list[bytes]:
    """PNG bytes of 64 flat-coloured squares (encoded once; each image file is a copy of one)."""
    from PIL import Image
    out = []
    for i in range(PLACEHOLDER_COLOURS):
        rgb = ((i * 37) % 256, (i * 91) % 256, (i * 53 + 100) % 256)
        buf = io.BytesIO()
        Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), rgb).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def check_args(out, fraction: float, seed: int, overwrite: bool) -> None:
    """UserError (naming the flag) for anything generate() would refuse; writes nothing."""
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be above 0 and at most 1 (got {fraction})")
    check_range("--seed", seed, 0)
    check_out(out, overwrite)


def generate(out: str | os.PathLike, fraction: float = 1.0, seed: int = 0, progress: bool = True,
             overwrite: bool = False, log=print) -> dict[str, int]:
    """Write the caption set (deterministic for fraction and seed) -> images per split.
    Refuses a non-empty --out without overwrite; a run stopped part-way (kill, full disk) is
    started over by the same command (prepare.synth's UNFINISHED mark)."""
    from prepare.cli import progress_bar
    from prepare.files import write_json_atomic
    check_args(out, fraction, seed, overwrite)
    out = Path(out)
    begin_dataset(out, overwrite, log)
    words, p, pngs = np.array(pseudo_words()), zipf_probabilities(), _placeholders()
    counts, next_id, next_ann = split_counts(fraction), 1, 1
    for si, split in enumerate(SPLITS):
        n = counts[split]
        rng = np.random.default_rng([seed, si])
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ids = np.arange(next_id, next_id + n)
        next_id += n
        images = []
        for i in progress_bar(progress, iterable=ids.tolist(), total=n, desc=f"synth-coco {split}", unit="img"):
            name = f"COCO_synth_{i:012d}.png"
            (img_dir / name).write_bytes(pngs[i % PLACEHOLDER_COLOURS])
            images.append({"id": i, "file_name": name, "width": PLACEHOLDER_SIDE, "height": PLACEHOLDER_SIDE})
        m = n * CAPTIONS_PER_IMAGE
        lengths = caption_lengths(rng, m)
        tokens = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
        stops = rng.random(m) < 0.8
        anns, start = [], 0
        for j in range(m):
            ws = tokens[start:start + lengths[j]]
            start += lengths[j]
            text = " ".join(ws)
            anns.append({"id": next_ann + j, "image_id": int(ids[j // CAPTIONS_PER_IMAGE]),
                         "caption": text[0].upper() + text[1:] + ("." if stops[j] else "")})
        next_ann += m
        doc = {"info": {"description": "show-and-tell synth-coco: MS-COCO 2014's size and shape, placeholder "
                                       "images, Zipf pseudo-word captions", "fraction": fraction, "seed": seed},
               "licenses": [{"id": 1, "name": "CC0", "url": ""}], "images": images, "annotations": anns}
        write_json_atomic(out / "annotations" / f"captions_{split}.json", doc)
    end_dataset(out)
    return counts

