"""Write and read the one HDF5 file that holds the prepared captions.

Layout (N captions, M images, L = max_len):
    /<split>/captions     int32 [N, L]  padded ids, <start> first, <end> last real token
    /<split>/lengths      int32 [N]     tokens including <start> and <end>
    /<split>/image_index  int32 [N]     row of the caption's image in /<split>/image_ids
    /<split>/image_ids    int64 [M]
    /<split>/file_names   utf-8 [M]     relative to the images root: the directory of this file, or
                                        attrs["images_root"] when the images are not under it
                                        (never absolute, never with `..`: readers refuse those)
    /<split>/objects      utf-8 [M]     ground truth JSON per image ("" when unknown)
    /<split>/texts        utf-8 [N]     the original caption text (references for evaluation)
    /vocab/words          utf-8 [V]     id order; /vocab/counts int64 [V]; /vocab attrs tokenizer
                                        ("words" or "chars"; absent in older files: "words")
    attrs: config (JSON), checksums (JSON: input file -> sha256), format_version,
           images_root (absolute folder; only when the images are not under this file's folder)

Example: L=6, caption "a red star" -> [<start>, a, red, star, <end>, <pad>], length 5.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from prepare.errors import UserError
from prepare.files import atomic_path, h5_written, inside, not_inside
from prepare.vocabulary import Vocabulary

FORMAT_VERSION = 1
_STR = h5py.string_dtype("utf-8")


def _rel(path: Path, base: str) -> str | None:
    """path relative to base (both absolute, normalised, symlinks not followed), None if outside."""
    rel = os.path.relpath(os.path.normpath(os.path.abspath(path)), base)
    return None if rel == os.curdir or rel.split(os.sep)[0] == os.pardir else rel


def images_root_for(path: str | os.PathLike, file_paths) -> str | None:
    """None when every image is under the folder of `path` (file names relative to it), else the
    deepest folder holding them all (file names relative to it, recorded as attrs images_root)."""
    base = os.path.normpath(os.path.abspath(Path(path).parent))
    files = [os.path.normpath(os.path.abspath(p)) for p in file_paths]
    if all(_rel(p, base) is not None for p in files):
        return None
    return os.path.commonpath([os.path.dirname(p) for p in files])


def write(path: str | os.PathLike, splits: dict, vocab: Vocabulary, max_len: int,
          config: dict, checksums: dict, overwrite: bool = False) -> dict:
    """Encode and write atomically. Returns per split stats (unk and truncation counts)."""
    path = Path(path)
    stats = {}
    root = images_root_for(path, [p for sd in splits.values() for p in sd.file_paths])
    base = root or os.path.normpath(os.path.abspath(path.parent))
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5_written(tmp) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            if root:
                f.attrs["images_root"] = root
            f.attrs["config"] = json.dumps(config)
            f.attrs["checksums"] = json.dumps(checksums)
            g = f.create_group("vocab")
            g.create_dataset("words", data=np.array(vocab.words, dtype=object), dtype=_STR)
            g.create_dataset("counts", data=np.asarray(vocab.counts, dtype=np.int64))
            g.attrs["tokenizer"] = vocab.tokenizer
            for name, sd in splits.items():
                n = len(sd.captions)
                ids = np.zeros((n, max_len), np.int32)
                lengths = np.zeros(n, np.int32)
                unk = total = trunc = 0
                for i, toks in enumerate(sd.captions):
                    row = vocab.encode(toks, max_len)
                    ids[i] = row
                    lengths[i] = int(np.count_nonzero(row))
                    trunc += len(toks) + 2 > max_len
                    real = row[1:lengths[i] - 1]
                    unk += int(np.sum(real == 3))
                    total += len(real)
                s = f.create_group(name)
                s.create_dataset("captions", data=ids, compression="gzip", compression_opts=4)
                s.create_dataset("lengths", data=lengths)
                s.create_dataset("image_index", data=np.asarray(sd.image_index, np.int32))
                s.create_dataset("image_ids", data=np.asarray(sd.image_ids, np.int64))
                s.create_dataset("file_names", dtype=_STR,
                                 data=np.array([_rel(p, base) for p in sd.file_paths], dtype=object))
                s.create_dataset("objects", dtype=_STR, data=np.array(sd.objects, dtype=object))
                s.create_dataset("texts", dtype=_STR, data=np.array(sd.raw, dtype=object))
                stats[name] = {"images": len(sd.image_ids), "captions": n,
                               "unk_rate": unk / max(total, 1), "truncated": trunc / max(n, 1),
                               "lengths": lengths}
    return stats


@dataclass
class Split:
    captions: np.ndarray      # int32 [N, L]
    lengths: np.ndarray       # int32 [N]
    image_index: np.ndarray   # int32 [N]
    image_ids: np.ndarray     # int64 [M]
    file_names: list[str]     # [M]
    objects: list[str]        # [M] JSON or ""
    texts: list[str]          # [N] original caption text
    source: str = ""          # "<captions.h5>:/<split>", for messages
    file_dir: Path | None = None     # folder of the captions file
    recorded_root: Path | None = None  # attrs images_root, when prepare recorded one

    def image_paths(self, root: str | os.PathLike | None = None) -> list[Path]:
        """root/<file name> for every image. `root` is the folder the names are relative to; None
        or the captions file's own folder mean its images root (attrs images_root when recorded).
        A name that would leave root (absolute, `..`: a file not written by prepare, or tampered
        with) is a UserError, never a path outside root."""
        if root is None or (self.recorded_root is not None and self.file_dir is not None
                            and os.path.abspath(root) == os.path.abspath(self.file_dir)):
            root = self.recorded_root or self.file_dir or Path(".")
        out = []
        for i, f in enumerate(self.file_names):
            p = inside(root, f)
            if p is None:
                raise UserError(f"{self.source or 'captions.h5'}/file_names[{i}] is {f!r}, which {not_inside(root, f)}: "
                                f"not a path inside the images folder {root}; the file was not written by `python -m prepare "
                                "captions` or was modified: re-create it with `python -m prepare captions --overwrite`")
            out.append(p)
        return out


def read_vocab(path: str | os.PathLike) -> Vocabulary:
    with _open(path) as f:
        tokenizer = f["vocab"].attrs.get("tokenizer", "words")
        try:
            return Vocabulary([w.decode() if isinstance(w, bytes) else w for w in f["vocab/words"][()]],
                              [int(c) for c in f["vocab/counts"][()]],
                              tokenizer.decode() if isinstance(tokenizer, bytes) else str(tokenizer))
        except ValueError as e:
            raise UserError(f"{path}: its vocabulary is damaged ({e}); re-create it with "
                            f"`python -m prepare captions --overwrite`") from None


def split_names(path: str | os.PathLike) -> list[str]:
    with _open(path) as f:
        names = [k for k in f.keys() if k != "vocab"]
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(names, key=lambda k: (order.get(k, 3), k))


def read_split(path: str | os.PathLike, split: str) -> Split:
    with _open(path) as f:
        if split not in f:
            raise UserError(f"{path}: no split '{split}' (has: {', '.join(k for k in f if k != 'vocab')})")
        g = f[split]
        dec = lambda a: [x.decode() if isinstance(x, bytes) else x for x in a]  # noqa: E731
        return Split(g["captions"][()], g["lengths"][()], g["image_index"][()], g["image_ids"][()],
                     dec(g["file_names"][()]), dec(g["objects"][()]), dec(g["texts"][()]), f"{path}:/{split}",
                     Path(path).parent, _recorded_root(f, path))


def max_length(path: str | os.PathLike, split: str = "train") -> int:
    """The longest caption of `split` in tokens, <start> and <end> included (0 if none)."""
    with _open(path) as f:
        if split not in f:
            raise UserError(f"{path}: no split '{split}'")
        lengths = f[split]["lengths"][()]
    return int(lengths.max()) if len(lengths) else 0


def read_attrs(path: str | os.PathLike) -> dict:
    with _open(path) as f:
        return {"config": json.loads(f.attrs["config"]), "checksums": json.loads(f.attrs["checksums"]),
                "format_version": int(f.attrs["format_version"]), "images_root": images_root(path)}


def images_root(path: str | os.PathLike) -> Path:
    """The folder the file names of `path` are relative to: attrs images_root, else its folder."""
    with _open(path) as f:
        return _recorded_root(f, path) or Path(path).parent


def _recorded_root(f, path) -> Path | None:
    root = f.attrs.get("images_root")
    if root is None:
        return None
    root = root.decode() if isinstance(root, bytes) else str(root)
    if not root or "\0" in root or not os.path.isabs(root) or os.path.normpath(root) != root:
        raise UserError(f"{path}: attribute images_root {root!r} is not a normalised absolute folder; the file "
                        "was modified: re-create it with `python -m prepare captions --overwrite`")
    return Path(root)


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: captions file not found; run `python -m prepare captions` first")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e}); re-run `python -m prepare captions`")
    version = f.attrs.get("format_version")
    if version != FORMAT_VERSION:
        f.close()
        fix = "re-create it with `python -m prepare captions --overwrite`"
        if version is not None and int(version) > FORMAT_VERSION:
            raise UserError(f"{path}: format version {int(version)}, newer than this version reads "
                            f"({FORMAT_VERSION}); update this project, or {fix}")
        raise UserError(f"{path}: made by an older version (format version {version}, this version reads "
                        f"{FORMAT_VERSION}); {fix}")
    return f
