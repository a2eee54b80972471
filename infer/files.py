"""Files infer's commands read and write: input listing (files, folders, globs), printable names,
COCO image ids from file names, the --out folder check, JSON Lines."""
from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from prepare.errors import UserError
from prepare.files import atomic_path

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Only COCO-style names carry an image id: COCO 2014 (COCO_val2014_000000123456.jpg), COCO 2017
# (000000123456.jpg: 12 digits) and the built-in dataset's (val_000042.jpg). IMG_2023.jpg has none.
_ID_NAMES = [re.compile(r"COCO_[a-z]+\d{4}_(\d{12})"), re.compile(r"(\d{12})"),
             re.compile(r"(?:train|val|test)_(\d{6,})")]


def image_id_from_name(path: str | os.PathLike) -> int | None:
    """COCO_val2014_000000123456.jpg -> 123456; 000000123456.jpg -> 123456; val_000042.jpg -> 42;
    any other name (IMG_2023.jpg, 1.jpg, photo.png) -> None."""
    stem = Path(path).stem
    for pat in _ID_NAMES:
        m = pat.fullmatch(stem)
        if m:
            return int(m.group(1))
    return None


def display_name(path: str | os.PathLike) -> str:
    """A file name (or path) as text that can always be printed and stored in UTF-8 JSON: bytes that
    are not UTF-8 (a Latin-1 'caf\\xe9.jpg') become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def check_out_folder(out: Path, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {display_name(out)} is an existing file; {flag} names a folder (new or existing)")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str], list[tuple[str, str]]]:
    """Files, folders (their image files) and globs -> (paths, inputs that matched nothing,
    [(path, what it is)] for entries that are not regular files: a FIFO, a directory named d.jpg
    inside a folder or a folder given with no image files in it, a symlink loop, a link to
    /dev/zero). Those are counted, never opened (a FIFO would block the reader forever); a folder's
    entries without an image suffix are ignored."""
    from extract.images import not_regular
    paths, missing, irregular = [], [], []

    def take(q: Path, counted: bool, found: list) -> None:
        what = not_regular(q)
        if what is None and q.is_file():
            found.append(q)
        elif what is not None and counted:
            irregular.append((str(q), what))

    for item in items:
        p = Path(item)
        found, before = [], len(irregular)
        if p.is_dir():
            for q in sorted(p.iterdir()):
                if q.suffix.lower() in IMAGE_EXT:
                    take(q, True, found)
            if not found and len(irregular) == before:
                irregular.append((item, "a directory with no image files"))
        elif os.path.lexists(p):
            take(p, True, found)
        else:
            for q in sorted(Path(q) for q in glob.glob(item, recursive=True)):
                take(q, not q.is_dir() or q.suffix.lower() in IMAGE_EXT, found)   # not every folder `**` matches
        if not found and len(irregular) == before:
            missing.append(item)
        paths += found
    irregular = list(dict.fromkeys(irregular))
    return list(dict.fromkeys(paths)), missing, irregular


