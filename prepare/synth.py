"""The built-in synthetic dataset, in exactly MS-COCO's caption format.

    DIR/images/<split>/<split>_<id>.jpg
    DIR/annotations/captions_<split>.json   {info, licenses, images, annotations}

Each image holds 1-3 non-overlapping objects (shape x colour x size, placed anywhere in the
frame) on a dark or light background with a gentle gradient. Each image gets 5 different
captions from varied sentence patterns that say only what is true in the pixels. The truth
is kept on each `images` entry (`objects`, `background`), which COCO readers ignore, so that
evaluation can check what a caption *says* (`parse_caption` + model/metrics.py's `score_content`).

Coordinates: x grows to the right, y grows downwards; (cx, cy, r) in pixels.
"""
from __future__ import annotations

import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # name -> RGB (jittered a little per object)
    "red": (220, 35, 35), "green": (40, 165, 60), "blue": (40, 80, 225),
    "yellow": (240, 215, 40), "purple": (145, 60, 185), "orange": (245, 135, 20),
}
SIZES = {"small": (0.09, 0.12), "large": (0.17, 0.21)}  # radius as a fraction of the side
RELATIONS = ("to the left of", "to the right of", "above", "below")
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
           "above": "below", "below": "above"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CLEAR_RATIO = 1.5   # a relation is captioned only if its axis dominates the other by this much
SPLITS = ("train", "val", "test")


# ---- geometry and truth -----------------------------------------------------------------
def relation(a: dict, b: dict) -> tuple[str, float]:
    """Relation of a to b along the dominant axis, and how clearly it dominates (>= 1)."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return ("to the left of" if dx < 0 else "to the right of"), abs(dx) / max(abs(dy), 1e-6)
    return ("above" if dy < 0 else "below"), abs(dy) / max(abs(dx), 1e-6)


def relation_holds(a: dict, b: dict, rel: str) -> bool:
    """True if `a rel b` is right along the dominant axis (the evaluation's reading)."""
    return relation(a, b)[0] == rel


def place_name(o: dict, side: int) -> str:
    col = min(int(3 * o["cx"] / side), 2)
    row = min(int(3 * o["cy"] / side), 2)
    return [["top left", "top", "top right"], ["left", "middle", "right"],
            ["bottom left", "bottom", "bottom right"]][row][col]


def _place_phrase(name: str) -> str:
    if name == "middle":
        return "in the middle of the picture"
    if name in ("left", "right"):
        return f"on the {name} of the picture"
    return f"at the {name} of the picture"


# ---- rendering --------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(r * 0.85 * math.sqrt(2), math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        pts = [(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.45 * r), -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + d * math.cos(t + angle), cy + d * math.sin(t + angle)) for d, t in pts]


def sample_scene(rng: np.random.Generator, side: int) -> dict:
    """Random objects (distinct colour+shape pairs, no overlaps) and a background."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    for _ in range(1000):
        objs, pairs = [], set()
        for _ in range(n):
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            if (shape, colour) in pairs:
                break
            size = str(rng.choice(list(SIZES)))
            r = float(rng.uniform(*SIZES[size])) * side
            margin = r + 0.02 * side
            cx, cy = (float(v) for v in rng.uniform(margin, side - margin, size=2))
            if any(math.hypot(cx - o["cx"], cy - o["cy"]) < r + o["r"] + 0.04 * side for o in objs):
                break
            pairs.add((shape, colour))
            objs.append({"shape": shape, "colour": colour, "size": size,
                         "cx": round(cx, 2), "cy": round(cy, 2), "r": round(r, 2),
                         "angle": round(float(rng.uniform(-0.25, 0.25)), 3)})
        else:
            # 2 objects must have a clear relation; with 3, at least one pair must.
            if n == 1 or any(relation(a, b)[1] >= CLEAR_RATIO
                             for i, a in enumerate(objs) for b in objs[i + 1:]):
                return {"objects": objs, "background": str(rng.choice(["dark", "light"]))}
    raise RuntimeError("could not place objects; image too small?")


def render(scene: dict, side: int, rng: np.random.Generator) -> Image.Image:
    base = rng.uniform(25, 85) if scene["background"] == "dark" else rng.uniform(170, 230)
    tint = rng.uniform(-12, 12, size=3)
    ramp = np.linspace(-1, 1, side, dtype=np.float32) * rng.uniform(-20, 20)
    grad = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    bg = np.clip(base + tint[None, None, :] + grad[..., None], 0, 255).astype(np.uint8)
    bg = np.broadcast_to(bg, (side, side, 3)).copy()
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[o["colour"]])
        cx, cy, r = o["cx"], o["cy"], o["r"]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, o["angle"]), fill=rgb)
    return img


# ---- captions ---------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: dict, with_size: bool) -> str:
    words = ([o["size"]] if with_size else []) + [o["colour"], o["shape"]]
    return f"{_article(words[0])} {' '.join(words)}"


def caption_candidates(scene: dict, side: int) -> list[str]:
    """Every true caption of the scene that the sentence patterns can make (deduplicated)."""
    objs, bg = scene["objects"], scene["background"]
    out: list[str] = []
    for ws in (True, False):
        p = [_np(o, ws) for o in objs]
        if len(objs) == 1:
            out += [p[0], f"{p[0]} on a {bg} background", f"{p[0]} {_place_phrase(place_name(objs[0], side))}",
                    f"a picture of {p[0]}", f"there is {p[0]} in the picture"]
            continue
        clear = [(i, j) for i in range(len(objs)) for j in range(len(objs))
                 if i != j and relation(objs[i], objs[j])[1] >= CLEAR_RATIO]
        count = COUNT_WORDS[len(objs)]
        listed = " and ".join([", ".join(p[:-1]), p[-1]])
        out += [f"{count} shapes : {listed}", f"{listed} on a {bg} background"]
        for i, j in clear:
            rel = relation(objs[i], objs[j])[0]
            rest = [p[k] for k in range(len(objs)) if k not in (i, j)]
            tail = f" , and {rest[0]}" if rest else ""
            out += [f"{p[i]} {rel} {p[j]}{tail}", f"there is {p[i]} {rel} {p[j]}{tail}",
                    f"{count} shapes : {p[i]} {rel} {p[j]}{tail}"]
    return list(dict.fromkeys(out))


def pick_captions(scene: dict, side: int, rng: np.random.Generator, k: int = 5) -> list[str]:
    cands = caption_candidates(scene, side)
    idx = rng.choice(len(cands), size=min(k, len(cands)), replace=False)
    return [_to_sentence(cands[i]) for i in sorted(idx)]


def _to_sentence(text: str) -> str:
    """COCO-like surface form: capitalised, ' , ' -> ', ', a full stop at the end."""
    text = text.replace(" , ", ", ").replace(" : ", ": ")
    return text[0].upper() + text[1:] + "."


# ---- parsing captions back (for content accuracy) ----------------------------------------
_OBJ = rf"(?:an?|one) (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_OBJ_RE = re.compile(_OBJ)
_REL_RE = re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")


@dataclass
class ParsedCaption:
    objects: list[tuple[str | None, str, str]]            # (size or None, colour, shape)
    relations: list[tuple[int, str, int]]                  # (index a, relation, index b)
    count_word: int | None                                 # "two shapes" -> 2


def parse_caption(text: str) -> ParsedCaption:
    """Read the objects, relations and count that a caption claims (tokenized or raw text)."""
    t = " ".join(re.findall(r"[\w']+|[^\w\s]", text.lower()))
    objects, spans = [], []
    for m in _OBJ_RE.finditer(t):
        objects.append((m.group(1), m.group(2), m.group(3)))
        spans.append(m.start())
    relations = []
    for m in _REL_RE.finditer(t):
        # The second object's article starts one space after the relation words.
        relations.append((spans.index(m.start()), m.group(4), spans.index(m.end(4) + 1)))
    cw = re.search(r"\b(one|two|three) shapes\b", t)
    count = {"one": 1, "two": 2, "three": 3}[cw.group(1)] if cw else None
    return ParsedCaption(objects, relations, count)


# ---- the dataset ------------------------------------------------------------------------
def _make_image(args) -> dict:
    out_dir, split_index, split, index, image_id, side, seed = args
    # the scene depends on its place in its split, not on its id: a larger --train leaves the val and
    # test splits as they are (and holds the smaller training set as its first images)
    rng = np.random.default_rng([seed, split_index, index])
    scene = sample_scene(rng, side)
    img = render(scene, side, rng)
    name = f"{split}_{image_id:06d}.jpg"
    img.save(Path(out_dir) / name, quality=92)
    return {"id": image_id, "file_name": name, "width": side, "height": side,
            "objects": scene["objects"], "background": scene["background"],
            "captions": pick_captions(scene, side, rng)}


UNFINISHED = ".synth-unfinished"   # in --out while generate() writes: a re-run starts the dataset over
MIN_SIZE, MAX_SIZE = 64, 4096    # below 64 px a small shape is a few pixels; above 4096 a JPEG is ~50 MB
MAX_IMAGES = 10_000_000


def check_args(out: str | os.PathLike, counts: dict[str, int], size: int, seed: int, overwrite: bool) -> None:
    """UserError (naming the flag) for anything generate() would refuse; writes nothing."""
    from prepare.errors import UserError, check_range
    check_range("--size", size, MIN_SIZE, MAX_SIZE, "the side of each square image in pixels")
    check_range("--seed", seed, 0)
    for split in SPLITS:
        check_range(f"--{split}", counts.get(split, 0), 1 if split == "train" else 0, MAX_IMAGES)
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown split(s) {', '.join(unknown)}; the dataset has {', '.join(SPLITS)}")
    check_out(out, overwrite)


def check_out(out: str | os.PathLike, overwrite: bool, what: str = "the dataset") -> None:
    """UserError unless --out is a new or empty folder, or overwrite, or a dataset left unfinished."""
    from prepare.errors import UserError
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not (out / UNFINISHED).exists():
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace {what} in it")


def begin_dataset(out: Path, overwrite: bool, log=print) -> None:
    """Make --out ready for a new dataset: after overwrite or an unfinished run (full disk, kill),
    the dataset's own files (images/<split>/, annotations/captions_<split>.json) are removed first,
    so no stale split or image is left behind; anything else in the folder is kept (and named).
    Marks the folder UNFINISHED until end_dataset."""
    import shutil
    unfinished = (out / UNFINISHED).exists()      # a run stopped part-way (full disk, kill): start over
    if out.is_dir() and (overwrite or unfinished):
        for split in SPLITS:
            (out / "annotations" / f"captions_{split}.json").unlink(missing_ok=True)
            shutil.rmtree(out / "images" / split, ignore_errors=True)
        derived = [p for p in (out / "captions.h5", out / "features") if p.exists()]
        if derived and not unfinished:
            log(f"warning: {' and '.join(map(str, derived))} were made from the replaced dataset; "
                "re-make them (prepare captions --overwrite, extract --force)")
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED).write_text("prepare is writing this dataset; re-run the same command to start over\n")


def end_dataset(out: Path) -> None:
    (out / UNFINISHED).unlink()


def generate(out: str | os.PathLike, counts: dict[str, int], size: int = 128, seed: int = 0,
             workers: int | None = None, progress: bool = True, overwrite: bool = False,
             log=print) -> dict[str, int]:
    """Write the dataset; deterministic for (counts, size, seed). Returns captions per split.

    A non-empty `out` is refused unless `overwrite` or it holds the UNFINISHED mark of a run that
    stopped part-way (full disk, kill); then the dataset's own files in it
    (images/<split>/, annotations/captions_<split>.json) are removed first, so no stale
    split or image is left behind. Anything else in the folder is kept (and named).
    """
    from prepare.cli import progress_bar

    from prepare.files import write_json_atomic
    check_args(out, counts, size, seed, overwrite)
    out = Path(out)
    begin_dataset(out, overwrite, log)
    next_id, next_ann, summary = 1, 1, {}
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for si, split in enumerate(SPLITS):
            n = counts.get(split, 0)
            if n <= 0:
                continue
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(str(img_dir), si, split, i, next_id + i, size, seed) for i in range(n)]
            next_id += n
            images, anns = [], []
            it = pool.map(_make_image, jobs, chunksize=32)
            for rec in progress_bar(progress, iterable=it, total=n, desc=f"synth {split}", unit="img"):
                for c in rec.pop("captions"):
                    anns.append({"id": next_ann, "image_id": rec["id"], "caption": c})
                    next_ann += 1
                images.append(rec)
            doc = {"info": {"description": "show-and-tell built-in synthetic shapes dataset",
                            "version": "2", "seed": seed, "size": size},
                   "licenses": [{"id": 1, "name": "CC0", "url": ""}],
                   "images": images, "annotations": anns}
            write_json_atomic(out / "annotations" / f"captions_{split}.json", doc)
            summary[split] = len(anns)
    end_dataset(out)
    return summary
