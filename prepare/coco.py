"""Load and validate COCO-format caption files (and Karpathy's dataset_coco.json).

What happens to bad input (also in the README):
  error (one line, naming file/key/fix): missing or unreadable file, malformed JSON, a
      missing top-level or per-entry key, a wrong type, an image id given twice with
      different file names, an image id present in two splits.
  skipped and counted: captions whose image id is unknown, empty or white-space-only
      captions, repeated annotation ids (first kept), images without captions, images
      whose file does not exist, images whose file name is absolute or leaves its images
      folder (`/etc/passwd`, `../x.jpg`, any `..` component): never opened.
  kept and counted: captions with non-ASCII text (accents are folded, see vocabulary.py).
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prepare.errors import UserError
from prepare.files import inside
from prepare.vocabulary import tokenize


@dataclass
class SplitData:
    """One split: images in a fixed order and each caption's tokens and image row."""
    image_ids: list[int] = field(default_factory=list)
    file_paths: list[Path] = field(default_factory=list)          # absolute, inside their images folder
    objects: list[str] = field(default_factory=list)              # JSON per image, "" if none
    captions: list[list[str]] = field(default_factory=list)       # tokenized
    raw: list[str] = field(default_factory=list)                  # original caption text
    image_index: list[int] = field(default_factory=list)          # row in image_ids


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found; check --annotations")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); is this the caption JSON?")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
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
    return v


OUTSIDE = "image file name outside its images folder (absolute or '..')"


def _skip_outside(skipped: Counter, n_captions: int) -> None:
    skipped[OUTSIDE] += 1
    skipped["captions of images outside their folder"] += n_captions


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
        objs = json.dumps({"objects": im["objects"], "background": im.get("background")}) \
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
        if aid in seen_ann:
            skipped["duplicate annotation id"] += 1
            continue
        seen_ann.add(aid)
        if iid not in images:
            skipped["caption of unknown image id"] += 1
            continue
        if not text.strip():
            skipped["empty caption"] += 1
            continue
        caps[iid].append((aid, text))
    out = []
    for iid in sorted(images):
        fname, objs = images[iid]
        if not caps.get(iid):
            skipped["image without captions"] += 1
            continue
        path = inside(images_dir, fname)
        if path is None:
            _skip_outside(skipped, len(caps[iid]))
            continue
        if not path.is_file():
            skipped["image file missing"] += 1
            skipped["captions of missing images"] += len(caps[iid])
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
        if not isinstance(iid, int):
            raise UserError(f"{where}: missing key 'cocoid' (or 'imgid')")
        if iid in seen:
            raise UserError(f"{where}: image id {iid} appears twice")
        seen.add(iid)
        texts = [(j, s.get("raw", "")) for j, s in enumerate(sents) if isinstance(s, dict)]
        texts_ok = [(j, t) for j, t in texts if isinstance(t, str) and t.strip()]
        skipped["empty caption"] += len(texts) - len(texts_ok)
        if not texts_ok:
            skipped["image without captions"] += 1
            continue
        sub = im.get("filepath", "")
        p = inside(root, os.path.join(sub, fname)) if isinstance(sub, str) and not os.path.isabs(sub) else None
        if p is None:
            _skip_outside(skipped, len(texts_ok))
            continue
        if not p.is_file():
            skipped["image file missing"] += 1
            skipped["captions of missing images"] += len(texts_ok)
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


def to_split_data(records: list, stats: Counter) -> SplitData:
    sd = SplitData()
    for iid, path, objs, caps in records:
        row = len(sd.image_ids)
        sd.image_ids.append(iid)
        sd.file_paths.append(path)
        sd.objects.append(objs)
        for _, text in caps:
            if not text.isascii():
                stats["non-ASCII captions (kept, accents folded)"] += 1
            tokens = tokenize(text)
            if not tokens:
                stats["skipped: caption with no words"] += 1
                continue
            sd.captions.append(tokens)
            sd.raw.append(text)
            sd.image_index.append(row)
    return sd
