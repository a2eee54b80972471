"""extract_features: encoder features for every image of captions.h5, cached and resumable.

Outputs in OUT:
    <split>.npy          float32 [num_images, D], row i = /<split>/image_ids[i] of captions.h5
                         (D from the encoder: Inception v3 2048, EfficientNet-Lite0 1280)
    <split>.grid.npy     instead, with --features grid: float16 [num_images, h*w, D], the last
                         feature map before pooling, positions row-major (Lite0 at 224 px: 7x7,
                         125 KB an image; Inception v3 at 299 px: 8x8, 262 KB, so MS-COCO's 123k
                         images take 32 GB: readers memory-map it, never load it whole)
    <split>.grid16.npy   instead, with --features grid16: the same for the last stride-16 map, ~4x the
                         positions (Lite0 at 224 px: 14x14x112, 44 KB an image; Inception v3 at
                         299 px: 17x17x768 'mixed7', 444 KB)
    encoder.weights.h5   the exact backbone weights that made the features
    manifest.json        published last: its presence means the cache is complete

While running, OUT/.work/ holds the preallocated arrays, a progress record per split (rows done,
failed rows) and the settings, and OUT/.lock keeps a second process out. Rows are written in
chunks; the progress record advances only after the chunk is flushed, so a run killed at any
moment (kill -9 too) resumes where it stopped and ends bit-identical to an uninterrupted run
(batches always start at multiples of the batch size). A split is done when its progress record
counts every row. When all are, the finished arrays, encoder.weights.h5 and manifest.json are
published together (prepare.files.publish, label "extract"), then the work folder is removed.

run_extraction is the one code path: extract_features runs it over every row into OUT; extract.shards
runs it over one shard's rows into OUT/.shards/I-of-N/, and its merge fills OUT/.work as this module
would have, then publishes it with write_manifest.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract import encoder as enc
from extract.images import image_dataset
from prepare import captions_h5
from prepare.errors import UserError, differences
from prepare.files import PENDING, exclusive_lock, fault_point, finish_pending, publish, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
WEIGHTS = "encoder.weights.h5"
WORK = ".work"
MISSING_LIMIT = 0.5          # a split with more missing image files than this is an error, not a skip
FAILED_WARN = 0.5            # a split with more failed images than this is warned about in the summary


DTYPES = {"pooled": np.float32, "grid": np.float16, "grid16": np.float16}    # a dtype for each of enc.FEATURE_KINDS


def feature_kind(manifest: dict) -> str:
    """"pooled", "grid" or "grid16" (enc.is_grid says whether it is a grid)."""
    if manifest.get("features") not in DTYPES or "storage_scale" not in manifest:
        raise UserError("a feature manifest without its feature kind or storage scale: it was made by an older "
                        "version; re-run extract with --force (and retrain on the new features)")
    return manifest["features"]


def feature_file(features_dir: str | os.PathLike, split: str, kind: str = "pooled") -> Path:
    return Path(features_dir) / (f"{split}.{kind}.npy" if enc.is_grid(kind) else f"{split}.npy")


def _output_name(spec: enc.EncoderSpec, kind: str) -> str:
    """What the features are, in the request: avg_pool, grid (the last map) or the stride-16 layer."""
    return {"pooled": "avg_pool", "grid": "grid"}.get(kind) or spec.stride16_layer


def _request(captions: Path, spec: enc.EncoderSpec, weights: str, image_size: int, splits: list[str],
             kind: str) -> dict:
    w = weights if weights in ("imagenet", "none") else {"file": str(Path(weights).resolve()),
                                                         "sha256": sha256_file(weights)}
    return {"encoder": f"{spec.name}/{_output_name(spec, kind)}", "weights": w,
            "image_size": image_size, "captions_sha256": sha256_file(captions), "splits": splits,
            "dtype": np.dtype(DTYPES[kind]).name}


def _differences(a: dict, b: dict) -> str:
    return "; ".join(differences(a, b, was="cache has"))


def read_manifest(features_dir: str | os.PathLike) -> dict:
    p = Path(features_dir) / MANIFEST
    if not p.is_file():
        raise UserError(f"{p}: no feature manifest (the cache is missing or incomplete); run "
                        f"`python -m extract --captions ... --out {features_dir}` first")
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not a valid feature manifest ({e}); re-run extract with --force") from None


def _check_args(captions: Path, spec, weights: str, image_size: int, batch_size: int, splits, available, kind):
    if kind not in DTYPES:
        raise UserError(f"--features {kind!r}: choose pooled (one vector an image), grid (the last feature map, "
                        f"for --decoder attention or transformer) or grid16 (the stride-16 map: about 4x the "
                        f"positions)")
    for s in splits:
        if s not in available:
            raise UserError(f"--splits: {captions} has no split '{s}' (has: {', '.join(available)})")
    enc.check_image_size(spec, image_size)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: no such file; pass imagenet, none or a weights FILE")


def _check_images_present(job: Job, share=None) -> None:
    """A wrong --images-root would make every image 'failed': refuse before extracting anything
    (looking only at the rows this process extracts: share, see run_extraction)."""
    captions, root = job.captions, job.root
    for split in job.splits:
        paths = _share_of(captions_h5.read_split(captions, split).image_paths(root), share)[1]
        missing = [p for p in paths if not p.exists()]
        if paths and len(missing) > MISSING_LIMIT * len(paths):
            raise UserError(f"{len(missing)} of {len(paths)} '{split}' images are missing under {root} (first: "
                            f"{missing[0]}); pass --images-root, the folder the file names in {captions.name} "
                            f"are relative to")


@dataclass(frozen=True)
class Job:
    """What the flags ask for, resolved and checked before anything is written (resolve)."""
    captions: Path
    spec: enc.EncoderSpec
    weights: str
    image_size: int
    root: Path
    available: list
    splits: list
    kind: str
    batch_size: int
    request: dict                   # the settings record a cache (or a part) is compared by


@dataclass
class Extracted:
    """What an extraction (or a merge) leaves for the manifest."""
    counts: dict
    failed: dict
    timing: dict
    source: dict
    scale: float
    row_shape: tuple


def resolve(captions: str | os.PathLike, *, encoder: str = enc.DEFAULT_ENCODER, images_root=None,
            weights: str = "imagenet", image_size: int | None = None, batch_size: int = 32,
            splits: list[str] | None = None, features: str = "pooled") -> Job:
    """The flags as a Job: defaults filled in, every value checked (UserError naming the flag)."""
    captions = Path(captions)
    spec = enc.get_spec(encoder)
    image_size = image_size or spec.default_image_size
    root = Path(images_root) if images_root else captions_h5.images_root(captions)
    available = captions_h5.split_names(captions)
    splits = splits or available
    _check_args(captions, spec, weights, image_size, batch_size, splits, available, features)
    return Job(captions, spec, weights, image_size, root, available, splits, features, batch_size,
               _request(captions, spec, weights, image_size, splits, features))


def extract_features(captions: str | os.PathLike, out: str | os.PathLike, *, encoder: str = enc.DEFAULT_ENCODER,
                     images_root=None, weights: str = "imagenet", image_size: int | None = None,
                     batch_size: int = 32, splits: list[str] | None = None, force: bool = False,
                     progress: bool = True, chunk_batches: int = 4, features: str = "pooled", log=print) -> dict:
    """Compute (or resume, or reuse) the feature cache; returns the manifest."""
    job = resolve(captions, encoder=encoder, images_root=images_root, weights=weights, image_size=image_size,
                  batch_size=batch_size, splits=splits, features=features)
    return run_extraction(Path(out), job, force=force, progress=progress, chunk_batches=chunk_batches, log=log)


def run_extraction(out: Path, job: Job, *, force: bool, progress: bool, chunk_batches: int, log,
                   share=None, finish=None) -> dict:
    """The locked, resumable extraction into `out` -> its manifest. share(n) -> the rows of a split
    of n images this process extracts, in order (None: all; extract.shards: every N-th block);
    finish(out, job, Extracted) publishes the result (default: write_manifest, the cache's)."""
    if not force and complete(out):
        return _reuse(out, job.request, log)             # a complete cache is only read: no lock needed
    with exclusive_lock(out):
        manifest = open_locked(out, job, force, log)
        if manifest is not None:
            return manifest
        _check_images_present(job, share)
        result = _extract_all(out, job, share, progress, chunk_batches, log)
        manifest = (finish or write_manifest)(out, job, result)
    report(out, job.splits, result, job.kind, log)
    return manifest


def complete(out: Path) -> bool:
    """A published cache with nothing pending (read without the lock)."""
    return (out / MANIFEST).exists() and not (out / WORK).exists() and not (out / PENDING).exists()


def open_locked(out: Path, job: Job, force: bool, log) -> dict | None:
    """With `out` locked: finish (or discard) a publication a kill interrupted, give --force its clean
    slate, and reuse a complete cache (-> its manifest; one made with other settings is refused)."""
    finish_pending(out, "extract")
    if force:
        for p in [out / MANIFEST, out / WEIGHTS, *[feature_file(out, s, k) for s in job.available for k in DTYPES]]:
            p.unlink(missing_ok=True)
        shutil.rmtree(out / WORK, ignore_errors=True)
    if (out / MANIFEST).exists():                     # complete; a kill may have left the work folder
        m = _reuse(out, job.request, log)
        shutil.rmtree(out / WORK, ignore_errors=True)
        return m
    return None


def _extract_all(out: Path, job: Job, share, progress: bool, chunk_batches: int, log) -> Extracted:
    model, source, scale = _start_or_resume(out, job.spec, job.request, job.weights, job.image_size, job.kind, log)
    forward = enc.compiled_forward(model)
    row_shape = tuple(int(d) for d in model.output.shape[1:])      # (D,) or (h*w, D)
    counts, failed, timing = {}, {}, {}
    for split in job.splits:
        t0 = time.time()
        counts[split], failed[split] = _extract_split(job, out, split, forward, row_shape, scale, share,
                                                      chunk_batches, progress)
        timing[split] = time.time() - t0
    return Extracted(counts, failed, timing, source, scale, row_shape)


def _reuse(out: Path, request: dict, log) -> dict:
    m = read_manifest(out)
    if m["request"] != request:
        raise UserError(f"{out} holds features made with other settings ({_differences(m['request'], request)}); "
                        f"pass --force to recompute them or choose another --out")
    log(f"{out}: complete feature cache for these settings, reused (--force recomputes)")
    return m


def _start_or_resume(out: Path, spec, request: dict, weights: str, image_size: int, kind: str, log):
    """-> (encoder model, weights source dict). The work folder keeps the exact weights, so a resumed
    run uses the encoder the first part was made with."""
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    settings_path = work / "settings.json"
    if settings_path.exists() and (work / WEIGHTS).exists():
        old = json.loads(settings_path.read_text())
        if old["request"] != request:
            raise UserError(f"{out} holds an unfinished extraction with other settings "
                            f"({_differences(old['request'], request)}); rerun with those settings to "
                            f"finish it, or pass --force to start over")
        if "scale" not in old:
            raise UserError(f"{out}: an unfinished extraction made by an older version; pass --force to start over")
        model, _ = enc.build_encoder(spec.name, "none", image_size, output=kind)
        enc.load_encoder_weights(model, work / WEIGHTS)
        source, scale = old["source"], old["scale"]
        log(f"resuming the unfinished extraction in {out}")
    else:
        for split in request["splits"]:        # finished splits of some other, abandoned extraction
            for k in DTYPES:
                feature_file(out, split, k).unlink(missing_ok=True)
        model, src = enc.build_encoder(spec.name, weights, image_size, output=kind)
        source = src.__dict__
        enc.save_encoder_weights(model, work / WEIGHTS)
        fault_point("extract:weights-saved")
        scale = storage_scale(model, image_size) if enc.is_grid(kind) else 1.0
        write_json_atomic(settings_path, {"request": request, "source": source, "scale": scale})
    if source["kind"] == "none":
        log(f"WARNING: --weights none: {spec.title} has RANDOM weights. Its features still separate "
            "colours and shapes (fine for the built-in dataset and tests) but captions of real photos "
            "will be meaningless. Use --weights imagenet (or FILE) for real data.")
    return model, source, scale


def storage_scale(encoder, image_size: int) -> float:
    """The power of two that float16 grid features are stored multiplied by: it brings the largest
    feature of a few probe images to about 256 (float16 holds up to 65504 and has full precision
    down to 6e-5). Random-init encoders' features are ~1e-4 (Inception v3) or ~1e-12 (Lite0): stored
    as they are, float16 would round them to 0. A power of two is exact, and readers divide it out
    (FeatureArray), so every consumer sees the encoder's own values."""
    rng = np.random.default_rng(0)
    probe = np.stack([np.full((image_size, image_size, 3), 128.0),
                      rng.uniform(0, 255, (image_size, image_size, 3)),
                      np.broadcast_to(np.linspace(0, 255, image_size)[None, :, None], (image_size, image_size, 3))])
    peak = float(np.max(np.abs(np.asarray(encoder(probe.astype(np.float32), training=False)))))
    if not np.isfinite(peak) or peak == 0.0:
        return 1.0
    return float(2.0 ** np.clip(np.round(np.log2(256.0 / peak)), -60, 120))


class FeatureArray:
    """A split's cached features as the encoder made them: float32 rows of the memory-mapped (or
    loaded) array, the storage scale divided out. rows: anything numpy indexes the first axis with."""

    def __init__(self, features_dir: str | os.PathLike, split: str, manifest: dict, in_memory_limit: int = 4 << 30):
        self.path = feature_file(features_dir, split, feature_kind(manifest))
        mmap = "r" if self.path.stat().st_size > in_memory_limit else None
        self.array = np.load(self.path, mmap_mode=mmap)
        self.scale = float(manifest["storage_scale"])   # feature_kind refused a manifest without it

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple:
        return self.array.shape

    def __getitem__(self, rows) -> np.ndarray:
        x = np.asarray(self.array[rows], np.float32)
        return x / np.float32(self.scale) if self.scale != 1.0 else x


def _share_of(paths: list, share) -> tuple[np.ndarray, list]:
    """-> (the rows this process extracts, their paths): all, or share(len(paths))."""
    rows = np.arange(len(paths)) if share is None else np.asarray(share(len(paths)), np.int64)
    return rows, [paths[int(r)] for r in rows]


def _extract_split(job: Job, out: Path, split: str, forward, row_shape: tuple, scale: float, share,
                   chunk_batches: int, progress: bool) -> tuple[int, list[dict]]:
    """Fill (or finish) OUT/<split>.npy (or .grid.npy, .grid16.npy), one row for each row of the
    split's share (all rows: the cache; a shard's: its part); -> (row count, failed images: their
    rows in the whole split)."""
    from prepare.cli import progress_bar
    sp = captions_h5.read_split(job.captions, split)
    rows, paths = _share_of(sp.image_paths(job.root), share)
    n, work, batch_size = len(paths), out / WORK, job.batch_size
    arr_path = feature_file(work, split, job.kind)
    prog_path = work / f"{split}.progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.exists() else {"done": 0, "failed": {}}
    if not (arr_path.exists() and prog["done"] == n):   # else: done, waiting in the work folder to be published
        if not (arr_path.exists() and prog["done"] > 0):
            prog = {"done": 0, "failed": {}}
        arr = (np.lib.format.open_memmap(arr_path, mode="r+") if prog["done"] > 0
               else _new_array(arr_path, DTYPES[job.kind], (n, *row_shape)))
        start = row = prog["done"]
        if start % batch_size and start != n:
            raise UserError(f"{prog_path}: progress {start} is not a multiple of --batch-size {batch_size}; "
                            "resume with the batch size it was started with, or pass --force")
        bar = progress_bar(progress, total=n, initial=start, desc=f"extract {split}", unit="img", smoothing=0.1)
        for k, (imgs, ok, why) in enumerate(image_dataset(paths[start:], job.image_size, batch_size)):
            feats, okn = forward(imgs).numpy(), ok.numpy()
            if scale != 1.0:
                feats = np.clip(feats * np.float32(scale), -65504, 65504)     # float16's range
            feats[~okn] = 0.0
            arr[row:row + len(feats)] = feats
            for j in np.flatnonzero(~okn):
                prog["failed"][str(int(rows[row + j]))] = why.numpy()[j].decode()
            row += len(feats)
            bar.update(len(feats))
            if (k + 1) % chunk_batches == 0 or row == n:
                arr.flush()
                prog["done"] = row
                write_json_atomic(prog_path, prog)
                fault_point(f"extract:{split}:chunk")
        bar.close()
        del arr
        prog["done"] = n
        write_json_atomic(prog_path, prog)
        fault_point(f"extract:{split}:done")
    return n, failed_list(sp, prog["failed"])


def failed_list(sp, failed: dict) -> list[dict]:
    """A progress record's failed rows {"row": reason} as the manifest lists them, in row order."""
    return [{"row": int(r), "image_id": int(sp.image_ids[int(r)]), "file": sp.file_names[int(r)], "reason": why}
            for r, why in sorted(failed.items(), key=lambda kv: int(kv[0]))]


def _new_array(path: Path, dtype, shape: tuple) -> np.ndarray:
    """A memory-mapped .npy of `shape`, its blocks allocated up front: a full disk fails here with
    ENOSPC naming the file (one line: run_cli) instead of killing the process with SIGBUS when a
    page is first written (a sparse file on a full tmpfs). The file is removed if that fails."""
    arr = None
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):     # else: a file system without fallocate
                raise
        finally:
            os.close(fd)
    except OSError as e:
        arr = None                                # the map closed before the file goes
        path.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return arr


def _train_stats(work: Path, failed: list[dict], kind: str, scale: float) -> dict:
    """Per-channel mean/std of the usable train features (the decoder's normalisation); for a grid
    over every position of every image."""
    feats = np.load(feature_file(work, "train", kind), mmap_mode="r")
    good = np.ones(len(feats), bool)
    good[[f["row"] for f in failed]] = False
    dim = feats.shape[-1]
    rows = max(1, (32 << 20) // (8 * int(np.prod(feats.shape[1:]))))     # ~32 MB of float64 at a time
    acc, acc2, m = np.zeros(dim), np.zeros(dim), 0
    for i in range(0, len(feats), rows):
        x = np.asarray(feats[i:i + rows], np.float64)[good[i:i + rows]].reshape(-1, dim) / scale
        acc += x.sum(0)
        acc2 += (x * x).sum(0)
        m += len(x)
    mean = acc / max(m, 1)
    std = np.sqrt(np.maximum(acc2 / max(m, 1) - mean ** 2, 0.0))
    return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist(), "rows": int(m)}


def write_manifest(out: Path, job: Job, result: Extracted, extra: dict | None = None) -> dict:
    """Publish the cache in one publication: the finished arrays and the weights (hard links to the
    work folder's, so a kill before the commit point leaves the work folder resumable), then the
    manifest (its presence marks the cache complete); then remove the work folder. `extra`: more
    manifest keys (a merge's)."""
    work, kind, spec, request, row_shape = out / WORK, job.kind, job.spec, job.request, result.row_shape
    manifest = {
        "request": request, "encoder": spec.name, "encoder_title": spec.title,
        "features": kind, "feature_dim": int(row_shape[-1]), "dtype": request["dtype"],
        "grid_positions": int(row_shape[0]) if enc.is_grid(kind) else None,
        "storage_scale": result.scale,  # stored values = features x this (a power of two; FeatureArray divides it out)
        "image_size": request["image_size"],
        "preprocessing": "PIL decode, EXIF transpose, RGB (alpha over white), bilinear resize to "
                         f"image_size x image_size, {spec.preprocessing}",
        "weights": {"source": result.source, "file": WEIGHTS, "sha256": sha256_file(work / WEIGHTS)},
        "captions": {"path": str(job.captions.resolve()), "sha256": request["captions_sha256"]},
        "images_root": str(job.root.resolve()),
        "counts": result.counts, "failed": result.failed,
        "train_stats": (_train_stats(work, result.failed["train"], kind, result.scale)
                        if "train" in result.counts else None),
        "seconds": {k: round(v, 2) for k, v in result.timing.items()},
        **(extra or {}),
    }
    publish_work(out, [feature_file(work, s, kind).name for s in result.counts] + [WEIGHTS], manifest)
    return manifest


def publish_work(out: Path, names: list[str], manifest: dict) -> None:
    """Publish the named files of OUT/.work (hard links) and then `manifest` as OUT/manifest.json
    (prepare.files.publish, label "extract"); then remove the work folder."""
    work = out / WORK
    publish(out, {**{n: (lambda p, n=n: _link_or_copy(work / n, p)) for n in names},
                  MANIFEST: lambda p: write_json_atomic(p, manifest)}, label="extract")
    shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of a large array), or a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def report(out: Path, splits, result: Extracted, kind: str, log) -> None:
    counts, failed, timing = result.counts, result.failed, result.timing
    for split in splits:
        rate = counts[split] / timing[split] if timing[split] > 0 else 0.0
        log(f"  {split:5s}: {counts[split]} images, {len(failed[split])} failed, {timing[split]:.1f}s "
            f"({rate:.1f} img/s)")
        for f in failed[split][:5]:
            log(f"      failed: {f['file']}: {f['reason']}")
        if len(failed[split]) > 5:
            log(f"      ... and {len(failed[split]) - 5} more (all listed in {out / MANIFEST})")
        if counts[split] and len(failed[split]) > FAILED_WARN * counts[split]:
            share = "every" if len(failed[split]) == counts[split] else "more than half of the"
            log(f"WARNING: {share} '{split}' image failed ({len(failed[split])} of {counts[split]}; listed under "
                f"'failed' in {out / MANIFEST}): training skips their captions; fix or replace them and re-run extract")
    log(f"wrote {out} ({', '.join(feature_file(out, s, kind).name for s in splits)}, {MANIFEST})")
