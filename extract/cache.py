"""extract_features: Inception v3 features for every image of captions.h5, cached and resumable.

Outputs in OUT:
    <split>.npy          float32 [num_images, 2048], row i = /<split>/image_ids[i] of captions.h5
    encoder.weights.h5   the exact Inception weights that made the features
    manifest.json        written last: its presence means the cache is complete

While running, OUT/.work/ holds the preallocated arrays, a progress record per split (rows done,
failed rows) and the settings. Rows are written in chunks; the progress record advances only after
the chunk is flushed, so a run killed at any moment (kill -9 too) resumes where it stopped and ends
bit-identical to an uninterrupted run (batches always start at multiples of the batch size).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from extract import encoder as enc
from prepare import captions_h5
from prepare.util import UserError, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
WEIGHTS = "encoder.weights.h5"
WORK = ".work"


def _request(captions: Path, weights: str, image_size: int, splits: list[str]) -> dict:
    w = weights if weights in ("imagenet", "none") else {"file": str(Path(weights).resolve()),
                                                         "sha256": sha256_file(weights)}
    return {"encoder": "inception_v3/avg_pool", "weights": w, "image_size": image_size,
            "captions_sha256": sha256_file(captions), "splits": splits, "dtype": "float32"}


def _differences(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: cache has {a.get(k)!r}, now {b.get(k)!r}" for k in keys)


def read_manifest(features_dir: str | os.PathLike) -> dict:
    p = Path(features_dir) / MANIFEST
    if not p.is_file():
        raise UserError(f"{p}: no feature manifest (the cache is missing or incomplete); run "
                        f"`python -m extract --captions ... --out {features_dir}` first")
    return json.loads(p.read_text())


def extract_features(captions: str | os.PathLike, out: str | os.PathLike, *, images_root=None,
                     weights: str = "imagenet", image_size: int = 299, batch_size: int = 32,
                     splits: list[str] | None = None, force: bool = False, progress: bool = True,
                     chunk_batches: int = 4, log=print) -> dict:
    """Compute (or resume, or reuse) the feature cache; returns the manifest."""
    from tqdm import tqdm
    captions, out = Path(captions), Path(out)
    root = Path(images_root) if images_root else captions.parent
    available = captions_h5.split_names(captions)
    splits = splits or available
    for s in splits:
        if s not in available:
            raise UserError(f"--splits: {captions} has no split '{s}' (has: {', '.join(available)})")
    if image_size < enc.MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {image_size} is below Inception v3's minimum of {enc.MIN_IMAGE_SIZE}")
    request = _request(captions, weights, image_size, splits)
    work = out / WORK
    if force:
        for p in [out / MANIFEST, out / WEIGHTS, *[out / f"{s}.npy" for s in available]]:
            p.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    if (out / MANIFEST).exists():
        m = read_manifest(out)
        if m["request"] == request:
            log(f"{out}: complete feature cache for these settings, reused (--force recomputes)")
            return m
        raise UserError(f"{out} holds features made with other settings ({_differences(m['request'], request)}); "
                        f"pass --force to recompute them or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    settings_path = work / "settings.json"
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        if old["request"] != request:
            raise UserError(f"{out} holds an unfinished extraction with other settings "
                            f"({_differences(old['request'], request)}); rerun with those settings to "
                            f"finish it, or pass --force to start over")
        model, _ = enc.build_encoder("none", image_size)
        enc.load_encoder_weights(model, work / WEIGHTS)
        source = old["source"]
        log(f"resuming the unfinished extraction in {out}")
    else:
        model, src = enc.build_encoder(weights, image_size)
        source = src.__dict__
        enc.save_encoder_weights(model, work / WEIGHTS)
        write_json_atomic(settings_path, {"request": request, "source": source})
    if source["kind"] == "none":
        log("WARNING: --weights none: Inception v3 has RANDOM weights. Its features still separate "
            "colours and shapes (fine for the built-in dataset and tests) but captions of real photos "
            "will be meaningless. Use --weights imagenet (or FILE) for real data.")
    forward = enc.compiled_forward(model)

    counts, failed, timing = {}, {}, {}
    for split in splits:
        sp = captions_h5.read_split(captions, split)
        paths = sp.image_paths(root)
        n = len(paths)
        counts[split] = n
        prog_path = work / f"{split}.progress.json"
        prog = json.loads(prog_path.read_text()) if prog_path.exists() else {"done": 0, "failed": {}}
        final = out / f"{split}.npy"
        t0 = time.time()
        if not (prog["done"] == n and final.exists()):
            arr_path = work / f"{split}.npy"
            arr = (np.lib.format.open_memmap(arr_path, mode="r+") if arr_path.exists() and prog["done"] > 0
                   else np.lib.format.open_memmap(arr_path, mode="w+", dtype=np.float32, shape=(n, enc.FEATURE_DIM)))
            start = prog["done"]
            if start % batch_size:
                raise UserError(f"{prog_path}: progress {start} is not a multiple of --batch-size {batch_size}; "
                                "resume with the batch size it was started with, or pass --force")
            bar = tqdm(total=n, initial=start, desc=f"extract {split}", unit="img", disable=not progress,
                       smoothing=0.1)
            row = start
            for k, (imgs, ok, why) in enumerate(enc.image_dataset(paths[start:], image_size, batch_size)):
                feats = forward(imgs).numpy()
                okn = ok.numpy()
                feats[~okn] = 0.0
                arr[row:row + len(feats)] = feats
                for j in np.flatnonzero(~okn):
                    prog["failed"][str(row + j)] = why.numpy()[j].decode()
                row += len(feats)
                bar.update(len(feats))
                if (k + 1) % chunk_batches == 0 or row == n:
                    arr.flush()
                    prog["done"] = row
                    write_json_atomic(prog_path, prog)
            bar.close()
            del arr
            os.replace(arr_path, final)
        timing[split] = time.time() - t0
        failed[split] = [{"row": int(r), "image_id": int(sp.image_ids[int(r)]),
                          "file": sp.file_names[int(r)], "reason": why}
                         for r, why in sorted(prog["failed"].items(), key=lambda kv: int(kv[0]))]

    stats = None
    if "train" in splits:
        feats = np.load(out / "train.npy", mmap_mode="r")
        good = np.ones(len(feats), bool)
        good[[f["row"] for f in failed["train"]]] = False
        acc, acc2, m = np.zeros(enc.FEATURE_DIM), np.zeros(enc.FEATURE_DIM), 0
        for i in range(0, len(feats), 4096):
            x = np.asarray(feats[i:i + 4096], np.float64)[good[i:i + 4096]]
            acc += x.sum(0)
            acc2 += (x * x).sum(0)
            m += len(x)
        mean = acc / max(m, 1)
        std = np.sqrt(np.maximum(acc2 / max(m, 1) - mean ** 2, 0.0))
        stats = {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist(),
                 "rows": int(m)}
    os.replace(work / WEIGHTS, out / WEIGHTS)
    manifest = {
        "request": request,
        "encoder": "keras.applications.InceptionV3(include_top=False, pooling='avg')",
        "feature_dim": enc.FEATURE_DIM, "dtype": "float32", "image_size": image_size,
        "preprocessing": "PIL decode, EXIF transpose, RGB (alpha over white), bilinear resize to "
                         "image_size x image_size, x/127.5-1",
        "weights": {"source": source, "file": WEIGHTS, "sha256": sha256_file(out / WEIGHTS)},
        "captions": {"path": str(captions.resolve()), "sha256": request["captions_sha256"]},
        "counts": counts, "failed": failed, "train_stats": stats,
        "seconds": {k: round(v, 2) for k, v in timing.items()},
    }
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    for split in splits:
        rate = counts[split] / timing[split] if timing[split] > 0 else 0.0
        log(f"  {split:5s}: {counts[split]} images, {len(failed[split])} failed, {timing[split]:.1f}s "
            f"({rate:.1f} img/s)")
        for f in failed[split][:5]:
            log(f"      failed: {f['file']}: {f['reason']}")
        if len(failed[split]) > 5:
            log(f"      ... and {len(failed[split]) - 5} more (all listed in {out / MANIFEST})")
    log(f"wrote {out} ({', '.join(f'{s}.npy' for s in splits)}, {MANIFEST})")
    return manifest
