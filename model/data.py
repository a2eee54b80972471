"""Training data: captions.h5 + the feature cache, checked to belong together, batched with
dynamic padding (each batch padded only to its own longest caption): CaptionSet (cached features,
stage 1) and ImageCaptionSet (image files with their captions, fine-tuning)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from extract.cache import MANIFEST, FeatureArray, feature_file, feature_kind, read_manifest
from prepare import captions_h5
from prepare.errors import UserError
from prepare.files import sha256_file

IN_MEMORY_LIMIT = 4 << 30   # feature arrays up to 4 GiB are loaded; larger ones are memory-mapped


class CaptionSet:
    """One split: features [M, F] or grid [M, P, F] (memory or mmap), caption ids [N, L], image row per caption."""

    def __init__(self, captions_path, features_dir, split: str, manifest: dict):
        sp = captions_h5.read_split(captions_path, split)
        fpath = feature_file(features_dir, split, feature_kind(manifest))
        if not fpath.is_file():
            raise UserError(f"{fpath}: missing; the feature cache has no '{split}' split (extract it with "
                            f"--splits including {split})")
        self.features = FeatureArray(features_dir, split, manifest, IN_MEMORY_LIMIT)
        if self.features.shape[0] != len(sp.image_ids):
            raise UserError(f"{fpath}: {self.features.shape[0]} rows but {captions_path} has "
                            f"{len(sp.image_ids)} '{split}' images; re-run extract for this captions.h5")
        bad_rows = {f["row"] for f in manifest["failed"].get(split, [])}
        keep = ~np.isin(sp.image_index, list(bad_rows)) if bad_rows else np.ones(len(sp.image_index), bool)
        self.skipped = int((~keep).sum())
        self.failed_images, self.num_images = len(bad_rows), len(sp.image_ids)
        self.manifest_path = Path(features_dir) / MANIFEST
        self.ids = sp.captions[keep]                   # [N, L] int32
        self.image_index = sp.image_index[keep]        # [N]
        self.lengths = sp.lengths[keep]                # [N]
        self.image_ids = sp.image_ids
        self.file_names = sp.file_names
        self.objects = sp.objects
        self.image_paths = lambda: sp.image_paths(manifest.get("images_root") or Path(captions_path).parent)
        self.split = split
        self.word_object = self.object_cells = None     # attention supervision's targets (ground)

    def ground(self, vocab, side: int, phrases: bool = False) -> int:
        """Attention supervision's targets: for each target word of each caption, the index of the
        true object it names (model.metrics.grounded_objects: colour and shape words, with phrases
        also size words and relations; -1: none), and
        each image's object cells on the side x side grid (model.metrics.box_cells); an image of
        unknown size (model.metrics.image_size_of) names none. From then on `batch` also returns the
        cells of each target word [B, T, side * side]. -> words named."""
        from model.metrics import box_cells, grounded_objects, image_size_of
        truths = [json.loads(t) if t else {} for t in self.objects]
        k = max([len(t.get("objects", [])) for t in truths] + [1])
        self.object_cells = np.zeros((len(truths), k, side * side), np.float32)
        paths = self.image_paths() if any(t.get("objects") and not (isinstance(t.get("width"), int) and isinstance(t.get("height"), int))
                                           for t in truths) else None
        for r, t in enumerate(truths):
            size = image_size_of(t, paths and paths[r]) if t.get("objects") else None
            if size is None:
                t["objects"] = []
            for j, o in enumerate(t["objects"] if size else []):
                self.object_cells[r, j] = box_cells(o, *size, side)
        self.word_object = np.full(self.ids.shape, -1, np.int8)
        for i, (ids, img) in enumerate(zip(self.ids, self.image_index)):
            objs = truths[img].get("objects")
            if objs:
                named = grounded_objects([vocab.words[w] for w in ids[1:]], objs, phrases)
                index = {id(o): j for j, o in enumerate(objs)}
                self.word_object[i, :-1] = [-1 if o is None else index[id(o)] for o in named]
        return int((self.word_object >= 0).sum())

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: np.ndarray, grouped: bool = False) -> tuple:
        """-> features [B, F] (or [B, P, F]) float32, ids [B, T+1] int32 trimmed to the batch's longest
        caption (B may be 0: a replica's share of a last batch smaller than the replicas); once
        grounded, also the cells of the object each target word names [B, T, P] float32 (0: none).
        grouped: features [U, ...] of the batch's U distinct images and, after ids, owner [B] int32
        (the row of features each caption describes), so a decoder projects each image once."""
        if not len(rows):
            empty = (np.zeros((0, *self.features.shape[1:]), np.float32), np.zeros((0, 2), np.int32),
                     *([np.zeros((0,), np.int32)] if grouped else []))
            return empty if self.word_object is None else (*empty, np.zeros((0, 1, self.object_cells.shape[2]),
                                                                              np.float32))
        t, image = int(self.lengths[rows].max()), self.image_index[rows]             # image: [B]
        if grouped:
            images, owner = np.unique(image, return_inverse=True)
            out = self.features[images], self.ids[rows, :t], owner.astype(np.int32).reshape(-1)
        else:
            out = self.features[image], self.ids[rows, :t]
        if self.word_object is None:
            return out
        named = self.word_object[rows, :t - 1].astype(np.int64)                         # [B, T]
        cells = self.object_cells[image[:, None], np.maximum(named, 0)]                    # [B, T, P]
        return (*out, cells * (named >= 0)[:, :, None])

    def epoch_rows(self, epoch: int, batch_size: int, seed: int, start: int = 0, shuffle: bool = True,
                   grouped: bool = False):
        """The caption rows of each batch of epoch `epoch` from batch number `start` on; the order
        depends on (seed, epoch) only. grouped: the images in a random order, each image's captions
        together (in a random order; without shuffle: image by image), so a batch of 32 holds the
        captions of about 32 / (captions per image) images (ruotianluo's seq_per_img)."""
        rng = np.random.default_rng([seed, epoch])
        if grouped:
            rank = rng.permutation(self.num_images)[self.image_index] if shuffle else self.image_index
            order = np.lexsort((rng.random(len(self)) if shuffle else np.arange(len(self)), rank))
        else:
            order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for b in range(start, self.num_batches(batch_size)):
            yield order[b * batch_size:(b + 1) * batch_size]

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size


class ImageCaptionSet:
    """A split's images (failed ones excluded) with their captions, for joint training."""

    def __init__(self, captions_path: Path, split: str, manifest: dict):
        sp = captions_h5.read_split(captions_path, split)
        bad = {f["row"] for f in manifest["failed"].get(split, [])}
        self.paths = sp.image_paths(manifest.get("images_root") or captions_path.parent)
        self.rows = np.array([r for r in range(len(sp.image_ids)) if r not in bad], np.int64)
        self.caps_of = captions_of_images(sp.image_index, len(sp.image_ids))
        self.ids, self.lengths, self.split = sp.captions, sp.lengths, split
        self.image_index = sp.image_index              # [N]: the image row of each caption
        self.file_names = sp.file_names
        self.truth = {r: json.loads(sp.objects[r])["objects"] for r in self.rows if sp.objects[r]}  # synth only

    def epoch_rows(self, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
        return self.rows[np.random.default_rng([seed, epoch]).permutation(len(self.rows))] if shuffle else self.rows

    def captions_for(self, rows: np.ndarray, k: int, rng: np.random.Generator | None):
        """-> ids [N, T] trimmed to the longest, cap_img [N] (position of each caption's image in rows)."""
        return pick_captions(self.caps_of, self.ids, self.lengths, rows, k, rng)


def captions_of_images(image_index: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Image row -> the indices of its captions (image_index[i]: the image row of caption i)."""
    order = np.argsort(image_index, kind="stable")
    starts = np.searchsorted(image_index[order], np.arange(n_images + 1))
    return [order[starts[r]:starts[r + 1]] for r in range(n_images)]


def pick_captions(caps_of, ids, lengths, rows: np.ndarray, k: int, rng: np.random.Generator | None):
    """Up to k captions of each image of `rows` (the first k without rng, else k drawn by it) ->
    ids [N, T] trimmed to the longest, owner [N] (position of each caption's image in rows)."""
    picks, owner = [], []
    for j, r in enumerate(rows):
        c = caps_of[int(r)]
        if len(c) > k:
            c = c[:k] if rng is None else rng.choice(c, size=k, replace=False)
        picks += list(c)
        owner += [j] * len(c)
    picks = np.asarray(picks)
    t = int(lengths[picks].max())
    return ids[picks, :t], np.asarray(owner, np.int32)


def open_data(data_dir, features_dir=None, captions=None):
    """-> (captions path, features dir, manifest), after checking they belong together."""
    data_dir = Path(data_dir)
    captions = Path(captions) if captions else data_dir / "captions.h5"
    features_dir = Path(features_dir) if features_dir else data_dir / "features"
    if not captions.is_file():
        raise UserError(f"{captions}: not found; run `python -m prepare captions` (or pass --captions)")
    manifest = read_manifest(features_dir)
    if manifest["captions"]["sha256"] != sha256_file(captions):
        raise UserError(f"{features_dir} was extracted for a different captions.h5 "
                        f"({manifest['captions']['path']}); re-run `python -m extract --captions {captions} "
                        f"--out {features_dir} --force`")
    if not manifest.get("train_stats"):
        raise UserError(f"{features_dir}/manifest.json has no train feature statistics; extract the train split")
    return captions, features_dir, manifest
