"""Load and validate COCO-format caption files (and Karpathy's dataset_coco.json).

What happens to bad input (also in the README):
  error (one line, naming file/key/fix): missing or unreadable file, malformed JSON, JSON
      nested too deeply, a missing top-level or per-entry key, a wrong type, an id outside
      the 64-bit range, text holding a lone surrogate (or a caption holding a NUL), an image
      id given twice with different file names, an image id present in two splits.
  skipped and counted: captions whose image id is unknown, empty, white-space-only or
      invisible-only captions, repeated annotation ids (first kept), images without
      captions, images whose file does not exist or cannot be looked up (a name too long
      for the file system), images whose file name is absolute or leaves its images folder
      (`/etc/passwd`, `../x.jpg`, any `..` component) or holds a NUL byte: never opened.
  kept and counted: captions with non-ASCII text (accents of Latin letters are folded, other
      scripts kept as written, see vocabulary.py).
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prepare.errors import UserError
from prepare.files import OUTSIDE_REASONS, inside, not_inside
from prepare.vocabulary import folds_accents, has_no_space_script, is_blank, tokenize


@dataclass
class SplitData:
    """One split: images in a fixed order and each caption's tokens and image row."""
    image_ids: list[int] = field(default_factory=list)
    file_paths: list[Path] = field(default_factory=list)          # absolute, inside their images folder
    objects: list[str] = field(default_factory=list)              # JSON per image, "" if none
    captions: list[list[str]] = field(default_factory=list)       # tokenized
    raw: list[str] = field(default_factory=list)                  # original caption text
    image_index: list[int] = field(default_factory=list)          # row in image_ids
    no_space: int = 0          # captions in a script written without spaces (Chinese, Japanese...)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found; check --annotations")
    try:
        with open(path, encoding="utf-8-sig") as f:      # a UTF-8 BOM (Windows editors) is fine
            doc = json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); is this the caption JSON?")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply (lists or objects inside each other more than "
                        f"~{sys.getrecursionlimit()} levels); a caption file is a few levels deep: is this the caption JSON?") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})")
    if not isinstance(doc, dict):
        raise UserError(f"{path}: top level must be a JSON object with 'images' and 'annotations'")
    return doc


def _need(entry, key: str, typ, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise UserError(f"{where}: missing key '{key}'; every entry needs it (COCO caption format)")
    v = entry[key]
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise UserError(f"{where}: key '{key}' should be {typ.__name__}, got {type(v).__name__} {v!r:.40}")
    if typ is int:
        _check_id(v, where, key)
    if typ is str:
        _check_text(v, where, key)
    return v


def _check_id(v: int, where: str, key: str) -> None:
    if not -2 ** 63 <= v < 2 ** 63:
        raise UserError(f"{where}: key '{key}' is {v}, outside the range of the 64-bit ids captions.h5 "
                        "stores (-2^63 .. 2^63-1); give the entry a smaller id")


def _check_text(v: str, where: str, key: str, nul: bool = False) -> None:
    """UserError unless `v` can be stored as UTF-8 (a lone surrogate such as the JSON escape
    "\\ud800" cannot) and, with `nul`, holds no NUL character (HDF5 strings cannot)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: key '{key}' holds the lone surrogate {v[e.start]!r} at character {e.start} "
                        "(half of a UTF-16 pair, not a character; the JSON has a broken \\u escape): fix that "
                        "text") from None
    if nul and "\0" in v:
        raise UserError(f"{where}: key '{key}' holds a NUL character at character {v.index(chr(0))}: remove it")


OUTSIDE = "image file name outside its images folder (absolute or '..')"


def _image_file(folder: Path, name, skipped: Counter, n_captions: int) -> Path | None:
    """folder/name when it names an existing file inside folder; else None, the image and its
    captions counted in `skipped` under the true reason."""
    why = not_inside(folder, name)
    if why in OUTSIDE_REASONS:
        skipped[OUTSIDE] += 1
        skipped["captions of images outside their folder"] += n_captions
        return None
    if why is not None:
        skipped[f"image file name {why}"] += 1
        skipped["captions of images with unusable file names"] += n_captions
        return None
    path = inside(folder, name)
    try:
        ok = path.is_file()
    except OSError as e:                   # a name too long for the file system, ...
        skipped[f"image file name unusable ({e.strerror})"] += 1
        skipped["captions of images with unusable file names"] += n_captions
        return None
    if not ok:
        skipped["image file missing"] += 1
        skipped["captions of missing images"] += n_captions
        return None
    return path


def load_coco(ann_path: str | os.PathLike, images_dir: str | os.PathLike,
              skipped: Counter) -> list[tuple[int, Path, str, list[tuple[int, str]]]]:
    """-> [(image_id, file path, objects JSON, [(annotation id, caption text)])] in id order."""
    ann_path, images_dir = Path(ann_path), Path(images_dir)
    doc = _load_json(ann_path)
    for key in ("images", "annotations"):
        if key not in doc:
            raise UserError(f"{ann_path}: missing top-level key '{key}'; is this a COCO *captions* file?")
        if not isinstance(doc[key], list):
            raise UserError(f"{ann_path}: '{key}' must be a list")
    images: dict[int, tuple[str, str]] = {}
    for i, im in enumerate(doc["images"]):
        where = f"{ann_path}: images[{i}]"
        iid = _need(im, "id", int, where)
        fname = _need(im, "file_name", str, where)
        objs = json.dumps({"objects": im["objects"], "background": im.get("background"),
                           **{k: im[k] for k in ("width", "height") if isinstance(im.get(k), int)}}) \
            if "objects" in im else ""
        if iid in images:
            if images[iid][0] != fname:
                raise UserError(f"{where}: image id {iid} appears twice with different file names "
                                f"({images[iid][0]!r}, {fname!r}); ids must be unique")
            skipped["duplicate image entry"] += 1
            continue
        images[iid] = (fname, objs)
    caps: dict[int, list[tuple[int, str]]] = defaultdict(list)
    seen_ann: set[int] = set()
    for i, a in enumerate(doc["annotations"]):
        where = f"{ann_path}: annotations[{i}]"
        aid = _need(a, "id", int, where)
        iid = _need(a, "image_id", int, where)
        text = _need(a, "caption", str, where)
        _check_text(text, where, "caption", nul=True)
        if aid in seen_ann:
            skipped["duplicate annotation id"] += 1
            continue
        seen_ann.add(aid)
        if iid not in images:
            skipped["caption of unknown image id"] += 1
            continue
        if is_blank(text):                 # white space and invisible characters only
            skipped["empty caption"] += 1
            continue
        caps[iid].append((aid, text))
    out = []
    for iid in sorted(images):
        fname, objs = images[iid]
        if not caps.get(iid):
            skipped["image without captions"] += 1
            continue
        path = _image_file(images_dir, fname, skipped, len(caps[iid]))
        if path is None:
            continue
        out.append((iid, path, objs, caps[iid]))
    return out


def load_karpathy(path: str | os.PathLike, images_root: str | os.PathLike,
                  skipped: Counter) -> dict[str, list]:
    """Karpathy's dataset_coco.json -> per split records ('restval' joins 'train')."""
    path, root = Path(path), Path(images_root)
    doc = _load_json(path)
    if not isinstance(doc.get("images"), list):
        raise UserError(f"{path}: missing top-level list 'images'; is this Karpathy's dataset_coco.json?")
    splits: dict[str, list] = defaultdict(list)
    seen: set[int] = set()
    for i, im in enumerate(doc["images"]):
        where = f"{path}: images[{i}]"
        fname = _need(im, "filename", str, where)
        split = _need(im, "split", str, where)
        sents = _need(im, "sentences", list, where)
        iid = im.get("cocoid", im.get("imgid"))
        if not isinstance(iid, int) or isinstance(iid, bool):
            raise UserError(f"{where}: missing key 'cocoid' (or 'imgid')")
        _check_id(iid, where, "cocoid" if "cocoid" in im else "imgid")
        if iid in seen:
            raise UserError(f"{where}: image id {iid} appears twice")
        seen.add(iid)
        texts = [(j, s.get("raw", "")) for j, s in enumerate(sents) if isinstance(s, dict)]
        for j, t in texts:
            if isinstance(t, str):
                _check_text(t, f"{where}: sentences[{j}]", "raw", nul=True)
        texts_ok = [(j, t) for j, t in texts if isinstance(t, str) and not is_blank(t)]
        skipped["empty caption"] += len(texts) - len(texts_ok)
        if not texts_ok:
            skipped["image without captions"] += 1
            continue
        sub = im.get("filepath", "")
        if isinstance(sub, str):
            _check_text(sub, where, "filepath")
        p = _image_file(root, os.path.join(sub, fname) if isinstance(sub, str) else None, skipped, len(texts_ok))
        if p is None:
            continue
        splits["train" if split == "restval" else split].append((iid, p, "", texts_ok))
    return dict(splits)


def carve_splits(records: list, fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Seeded split of one record list by image id (im2txt carves val/test from val2014)."""
    order = sorted(records, key=lambda r: r[0])
    perm = np.random.default_rng(seed).permutation(len(order))
    out, start = {}, 0
    for name, frac in fractions.items():
        n = int(round(frac * len(order)))
        out[name] = [order[k] for k in sorted(perm[start:start + n])]
        start += n
    out["train"] = [order[k] for k in sorted(perm[start:])]
    return out


def to_split_data(records: list, stats: Counter, tokenizer: str = "words") -> SplitData:
    sd = SplitData()
    for iid, path, objs, caps in records:
        row = len(sd.image_ids)
        sd.image_ids.append(iid)
        sd.file_paths.append(path)
        sd.objects.append(objs)
        for _, text in caps:
            if not text.isascii():
                stats["non-ASCII captions (kept, accents folded)" if folds_accents(text)
                      else "non-ASCII captions (kept as written)"] += 1
            tokens = tokenize(text, tokenizer)
            if not tokens:
                stats["skipped: caption with no words"] += 1
                continue
            sd.no_space += has_no_space_script(text)
            sd.captions.append(tokens)
            sd.raw.append(text)
            sd.image_index.append(row)
    return sd
