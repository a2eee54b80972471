"""Sharded extraction: N processes (machines, array-job tasks) each extract every N-th block of every
split into their own part, and a merge assembles the ordinary feature cache from the parts,
bit-identical to a single-process run with the same flags.

    python -m extract ... --num-shards N --shard-index I      # one part: OUT/.shards/I-of-N/
    python -m extract ... --num-shards N --merge              # OUT/<split>.npy ..., manifest.json

A block is --batch-size rows: shard I extracts blocks I, I+N, I+2N, ... (rows I*B..(I+1)*B-1,
(I+N)*B..., ...), so each of its batches holds exactly the images of one batch of a single-process
run, and gives the same features bit for bit.

A part is a cache folder of its own, OUT/.shards/I-of-N/, made by the one extraction code path
(extract.cache.run_extraction: its own lock, OUT/.shards/I-of-N/.work with the preallocated arrays
and progress records, resumable after kill -9, published with prepare.files.publish). It holds
<split>.npy with the part's rows only (in order), encoder.weights.h5, and manifest.json: the
settings record of a single-process run plus num_shards, shard_index and batch_size, the weights'
and each array's sha256, the failed rows (numbered in the whole split). Inside OUT rather than
beside it: one --out names everything, the parts live on the file system the cache goes to (the
merge moves data, never across file systems), N in the name keeps parts of another count apart,
and the dot keeps every reader's view of OUT an ordinary cache.

The merge (OUT locked) checks that every part is finished and was made with the same settings
(including the captions.h5 checksum) and the same encoder weights, then fills OUT/.work as a
single-process run would have left it: the same settings record, the weights, each split's array
and progress record. It copies each part's rows into place with plain writes (a full disk is an
error naming the file, never SIGBUS) into an array that grows as it is filled, verifying the
part array's checksum on the way, records the part as merged (OUT/.work/<split>.progress.json,
"merged") and only then deletes that part array: extra disk at any moment is one part's array of
one split, never a second copy of the cache. A killed merge resumes at the first part not recorded.
The finished work folder is published by the single-process run's own code (write_manifest: train
statistics, manifest.json last); the parts are removed after that.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from extract import cache
from extract.cache import DTYPES, MANIFEST, WEIGHTS, WORK, feature_file
from prepare import captions_h5
from prepare.errors import UserError, check_range, differences
from prepare.files import atomic_path, exclusive_lock, fault_point, sha256_file, write_json_atomic

SHARDS = ".shards"


def part_folder(out: str | os.PathLike, index: int, count: int) -> Path:
    return Path(out) / SHARDS / f"{index}-of-{count}"


def shard_rows(n: int, block: int, index: int, count: int) -> np.ndarray:
    """The rows of a split of n images that shard `index` of `count` extracts: every count-th block
    of `block` rows, starting with block `index`, in order."""
    rows = np.arange(n, dtype=np.int64)
    return rows[(rows // block) % count == index]


def part_request(request: dict, batch_size: int, index: int, count: int) -> dict:
    """A part's settings record: the single-process run's, plus what makes its share of rows."""
    return {**request, "num_shards": count, "shard_index": index, "batch_size": batch_size}


def check_shard_flags(num_shards: int | None, shard_index: int | None, merge: bool) -> None:
    """The flag combinations, checked before anything is read or written (UserError naming the flag)."""
    if num_shards is None:
        if merge:
            raise UserError("--merge needs --num-shards N: the count the parts were extracted with")
        if shard_index is not None:
            raise UserError(f"--shard-index {shard_index} needs --num-shards N (the number of parts)")
        return
    check_range("--num-shards", num_shards, 1, why="the number of parts the extraction is split into")
    if merge and shard_index is not None:
        raise UserError(f"--merge assembles every part: drop --shard-index {shard_index} (or drop --merge "
                        f"to extract that part)")
    if not merge and shard_index is None:
        raise UserError(f"--num-shards {num_shards}: pass --shard-index I (0 to {num_shards - 1}) to extract "
                        f"one part, or --merge to assemble the finished parts")
    if shard_index is not None:
        check_range("--shard-index", shard_index, 0, num_shards - 1,
                    why=f"the parts of --num-shards {num_shards} are numbered from 0")


def extract_sharded(captions: str | os.PathLike, out: str | os.PathLike, *, num_shards: int | None,
                    shard_index: int | None = None, merge: bool = False, force: bool = False,
                    progress: bool = True, chunk_batches: int = 4, log=print, **flags) -> dict:
    """One part (shard_index) or the merge (merge=True); flags: extract.cache.resolve's (encoder,
    images_root, weights, image_size, batch_size, splits, features). -> the manifest written."""
    check_shard_flags(num_shards, shard_index, merge)
    job = cache.resolve(captions, **flags)
    out = Path(out)
    if merge:
        return merge_parts(out, job, num_shards, force=force, log=log)
    return extract_part(out, job, shard_index, num_shards, force=force, progress=progress,
                        chunk_batches=chunk_batches, log=log)


def extract_part(out: Path, job: cache.Job, index: int, count: int, *, force: bool, progress: bool,
                 chunk_batches: int, log) -> dict:
    """Extract shard `index` of `count` into its part folder (resumable; reused when complete)."""
    if not force and cache.complete(out):                     # merged already: a re-run task has nothing to do
        m = cache.read_manifest(out)
        if m.get("request") != job.request:
            raise UserError(f"{out} holds a finished cache made with other settings "
                            f"({'; '.join(differences(m.get('request', {}), job.request, was='cache has'))}); "
                            f"pass --force to extract the parts of a new one (and --force to the merge), or "
                            f"choose another --out")
        log(f"{out}: the merged cache for these settings is complete; --shard-index {index} has nothing to do "
            f"(--force extracts its part anyway)")
        return m
    part = part_folder(out, index, count)
    part_job = dataclasses.replace(job, request=part_request(job.request, job.batch_size, index, count))
    m = cache.run_extraction(part, part_job, force=force, progress=progress, chunk_batches=chunk_batches, log=log,
                             share=lambda n: shard_rows(n, job.batch_size, index, count), finish=_publish_part)
    log(f"part {index} of {count} is complete; once every part is, run the same command with --merge "
        f"instead of --shard-index {index}")
    return m


def _publish_part(part: Path, job: cache.Job, result: cache.Extracted) -> dict:
    """A part's manifest: what the merge checks (settings, weights, checksums) and copies (failed rows)."""
    work = part / WORK
    names = [feature_file(work, s, job.kind).name for s in result.counts]
    manifest = {
        "request": job.request, "features": job.kind, "storage_scale": result.scale,
        "row_shape": list(result.row_shape), "dtype": job.request["dtype"],
        "weights": {"source": result.source, "file": WEIGHTS, "sha256": sha256_file(work / WEIGHTS)},
        "counts": result.counts, "failed": result.failed,
        "seconds": {k: round(v, 2) for k, v in result.timing.items()},
        "files": {n: sha256_file(work / n) for n in names},
    }
    cache.publish_work(part, names + [WEIGHTS], manifest)
    return manifest


def merge_parts(out: Path, job: cache.Job, count: int, *, force: bool, log) -> dict:
    """Assemble OUT from its `count` finished parts and publish it (OUT locked; resumable)."""
    with exclusive_lock(out):
        manifest = cache.open_locked(out, job, force, log)
        if manifest is not None:                  # merged already (a kill may have left the parts)
            _remove_parts(out, count)
            return manifest
        parts = _read_parts(out, job, count)
        source, scale, row_shape = _start_merge(out, job, parts, count, log)
        counts, failed, timing = {}, {}, {}
        for split in job.splits:
            counts[split], failed[split] = _merge_split(out, job, split, parts, row_shape)
            timing[split] = sum(p["seconds"].get(split, 0.0) for p in parts)
        result = cache.Extracted(counts, failed, timing, source, scale, row_shape)
        manifest = cache.write_manifest(out, job, result, extra={
            "merged_from": {"num_shards": count, "batch_size": job.batch_size}})
        _remove_parts(out, count)
    cache.report(out, job.splits, result, job.kind, log)
    return manifest


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (sbatch --array's syntax)."""
    out, start = [], None
    for k, i in enumerate(indices):
        start = i if start is None else start
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(f"{start}-{i}" if i > start else f"{i}")
            start = None
    return ",".join(out)


def _read_parts(out: Path, job: cache.Job, count: int) -> list[dict]:
    """Every part's manifest, checked: finished, made with the merge's settings, the same weights."""
    missing = [i for i in range(count) if not (part_folder(out, i, count) / MANIFEST).is_file()]
    if missing:
        raise UserError(_missing_message(out, count, missing))
    parts = [cache.read_manifest(part_folder(out, i, count)) for i in range(count)]
    for i, m in enumerate(parts):
        want = part_request(job.request, job.batch_size, i, count)
        if m.get("request") != want:
            why = "; ".join(differences(m.get("request") or {}, want, was="part has"))
            raise UserError(f"--merge: the part of --shard-index {i} ({part_folder(out, i, count)}) was made with "
                            f"other settings ({why}); merge with the flags the parts were made with, or re-run "
                            f"that shard with the merge's flags and --force")
    first = parts[0]
    for i, m in enumerate(parts):
        if (m["weights"]["sha256"], m["storage_scale"]) != (first["weights"]["sha256"], first["storage_scale"]):
            raise UserError(f"--merge: the encoder weights of --shard-index {i} differ from those of --shard-index 0 "
                            f"({WEIGHTS} sha256 {m['weights']['sha256'][:12]}... vs "
                            f"{first['weights']['sha256'][:12]}...): give every shard the same weights (--weights "
                            f"FILE) and re-run the odd ones with --force")
    return parts


def _missing_message(out: Path, count: int, missing: list[int]) -> str:
    started = [i for i in missing if part_folder(out, i, count).exists()]
    others = sorted(p.name for p in (out / SHARDS).glob("*-of-*") if not p.name.endswith(f"-of-{count}")) \
        if (out / SHARDS).is_dir() else []
    return (f"--merge: {len(missing)} of {count} parts are not finished: --shard-index {_ranges(missing)}"
            + (f" (started, unfinished or still running: {_ranges(started)})" if started else "")
            + f"; run those with the same flags and --num-shards {count} (an unfinished one resumes), then "
            f"--merge again" + (f" ({out / SHARDS} also holds parts {', '.join(others)}: another --num-shards?)"
                                if others else ""))


def _start_merge(out: Path, job: cache.Job, parts: list[dict], count: int, log) -> tuple[dict, float, tuple]:
    """OUT/.work as a single-process run makes it (settings.json, encoder.weights.h5), or the one an
    interrupted merge of the same parts left. -> (weights source, storage scale, row shape)."""
    work, first = out / WORK, parts[0]
    settings = {"request": job.request, "source": first["weights"]["source"], "scale": first["storage_scale"],
                "merge": {"num_shards": count, "batch_size": job.batch_size, "weights_sha256": first["weights"]["sha256"]}}
    path = work / "settings.json"
    if path.is_file() and json.loads(path.read_text()) == settings and (work / WEIGHTS).is_file():
        log(f"resuming the unfinished merge in {out}")
    else:
        if work.exists():
            log(f"discarding {work} (an unfinished extraction or merge of other parts): the parts cover every row")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with atomic_path(work / WEIGHTS) as tmp:
            shutil.copyfile(part_folder(out, 0, count) / WEIGHTS, tmp)
        if sha256_file(work / WEIGHTS) != settings["merge"]["weights_sha256"]:
            raise UserError(f"{part_folder(out, 0, count) / WEIGHTS} does not match its part's manifest (changed "
                            f"or damaged): re-run --shard-index 0 with --force, then --merge again")
        write_json_atomic(path, settings)            # last: its presence says the weights are complete
    return first["weights"]["source"], first["storage_scale"], tuple(first["row_shape"])


def _merge_split(out: Path, job: cache.Job, split: str, parts: list[dict], row_shape: tuple) -> tuple[int, list]:
    """OUT/.work/<split>.npy from the parts' arrays, then the progress record of a finished split."""
    sp = captions_h5.read_split(job.captions, split)
    n, work, count = len(sp.image_ids), out / WORK, len(parts)
    final, prog_path = feature_file(work, split, job.kind), work / f"{split}.progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.exists() else {"done": 0, "failed": {}}
    if not (final.exists() and prog["done"] == n):
        merged = list(prog.get("merged", [])) if final.exists() else []
        if not merged:
            np.lib.format.open_memmap(final, mode="w+", dtype=DTYPES[job.kind], shape=(n, *row_shape))
        offset = np.lib.format.open_memmap(final, mode="r").offset
        fd = os.open(final, os.O_WRONLY)
        try:
            for i in [i for i in range(count) if i not in merged]:
                src = feature_file(part_folder(out, i, count), split, job.kind)
                _copy_rows(src, fd, final, offset, shard_rows(n, job.batch_size, i, count), job, row_shape,
                           parts[i]["files"].get(src.name), i)
                os.fsync(fd)
                merged.append(i)
                write_json_atomic(prog_path, {"done": 0, "failed": {}, "merged": merged})
                fault_point(f"extract:merge:{split}:part")
                src.unlink()                          # recorded as merged: its rows are in the final array
        finally:
            os.close(fd)
        failed = sorted((f["row"], f["reason"]) for p in parts for f in p["failed"].get(split, []))
        prog = {"done": n, "failed": {str(r): why for r, why in failed}}
        write_json_atomic(prog_path, prog)
    return n, cache.failed_list(sp, prog["failed"])


def _copy_rows(src: Path, fd: int, final: Path, offset: int, rows: np.ndarray, job: cache.Job, row_shape: tuple,
               sha256: str | None, index: int) -> None:
    """Write a part array's rows (block by block) to their rows of the final array (fd; data from
    `offset`), checking the part's shape, dtype and sha256 on the way."""
    again = f"re-run --shard-index {index} with the merge's flags and --force, then --merge again"
    dtype = np.dtype(DTYPES[job.kind])
    try:
        f = open(src, "rb")
    except FileNotFoundError:
        raise UserError(f"{src} is missing (deleted, or merged by a merge whose work folder is gone): {again}") from None
    with f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dt = read_header(f)
        if shape != (len(rows), *row_shape) or fortran or dt != dtype:
            raise UserError(f"{src} holds {dt} {shape}, not the {dtype} {(len(rows), *row_shape)} of its part: {again}")
        digest = hashlib.sha256()
        head = f.tell()
        f.seek(0)
        digest.update(f.read(head))
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        for k in range(0, len(rows), job.batch_size):          # a block: consecutive rows of the split
            data = f.read(min(job.batch_size, len(rows) - k) * row_bytes)
            digest.update(data)
            _pwrite_all(fd, data, offset + int(rows[k]) * row_bytes, final)
        digest.update(f.read())
    if digest.hexdigest() != sha256:
        raise UserError(f"{src} does not match the checksum its part recorded (changed or damaged): {again}")


def _pwrite_all(fd: int, data: bytes, at: int, path: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _remove_parts(out: Path, count: int) -> None:
    for i in range(count):
        shutil.rmtree(part_folder(out, i, count), ignore_errors=True)
    try:
        (out / SHARDS).rmdir()                    # only when no other parts are left in it
    except OSError:
        pass

