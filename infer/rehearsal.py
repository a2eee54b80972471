"""A COCO-size rehearsal of every stage: `python -m infer rehearse --out DIR --fractions 1/16,1/4,1`.

For each fraction of MS-COCO 2014's size (prepare.synth_coco: 113,287 / 5,000 / 5,000 images,
5 captions each) it runs, each in its own process, timed (wall seconds) and measured (the peak
resident memory of the largest process of the stage, its Java helpers included):
    write     `python -m prepare synth-coco` (placeholder images, Zipf pseudo-word captions)
    prepare   `python -m prepare captions`
    extract   `python -m extract` with EfficientNet-Lite0 at 224 px (ImageNet weights, offline) on the
              placeholder images: only up to --extract-up-to (default 1/16); above it the table
              gives the time extrapolated from the measured rate (marked ~)
    features  a synthetic grid cache of the real shape (--grid lite0: 49 x 1,280 float16 a row;
              inception: 64 x 2,048), written in chunks; its size on disk
    datapath  one training epoch's data path without the model: model.data.CaptionSet batches of
              32 captions in the epoch's shuffled order from that grid (memory-mapped above 4 GiB,
              as training reads it); median batches/s of 10 blocks
    scoring   infer.evaluate's scoring of the test split (all three columns: the standard score, the
              model leave-one-out and the human ceiling; 11 pycocoevalcap scorings) against a
              caption per image (another image's reference: a realistic low score)
Results: DIR/rehearsal.json and a Markdown table on stdout. Each fraction's data is removed when
its stages are done unless --keep. A machine's page cache shapes the datapath figure: the grid
just written is partly cached (the table says how big it was beside the memory).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from prepare.errors import UserError

STAGES = ("write", "prepare", "extract", "features", "datapath", "scoring")
GRIDS = {"lite0": (49, 1280), "inception": (64, 2048)}      # positions, channels of the real caches
BATCH, BLOCKS, BLOCK_BATCHES = 32, 10, 20


def _label(fraction: float) -> str:
    from fractions import Fraction
    f = Fraction(fraction).limit_denominator(4096)
    return "full" if f == 1 else f"{f.numerator}/{f.denominator}"


def check_args(out: Path, fractions: list[float], stages: list[str], grid: str, overwrite: bool) -> None:
    """UserError naming the flag for anything rehearse() would refuse; writes nothing."""
    from prepare.synth import check_out
    from prepare.synth_coco import split_counts
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage {bad[0]!r}; choose from {','.join(STAGES)}")
    if grid not in GRIDS:
        raise UserError(f"--grid must be one of {', '.join(GRIDS)} (got {grid!r})")
    if "datapath" in stages and "features" not in stages:
        raise UserError("--stages: datapath reads the grid that the features stage writes; add features")
    check_out(out, overwrite, "the rehearsal")
    if "features" in stages:
        p, c = GRIDS[grid]
        need = max(sum(split_counts(f).values()) for f in fractions) * p * c * 2
        probe = out if out.is_dir() else next(q for q in [out, *out.parents] if q.exists())
        free = shutil.disk_usage(probe).free
        if free < need * 1.1:
            raise UserError(f"--out {out}: the largest fraction's {grid} grid needs {need / 1e9:.1f} GB and "
                            f"{free / 1e9:.1f} GB are free; free space, or choose smaller --fractions or --grid lite0")


def _run(argv: list[str], log_path: Path) -> dict:
    """Run a command in its own process -> wall seconds and the peak RSS (GB) of its largest process."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"rehearsal stage `{' '.join(argv[2:5])} ...` failed (exit {p.returncode}): {tail[0]} "
                        f"(whole log: {log_path})")
    return {"seconds": round(wall, 2), "peak_gb": round(ru.ru_maxrss / 2 ** 20, 3)}


def _stage(name: str, args: dict, log_path: Path) -> dict:
    """An in-process stage of this module, run in a child process -> its timing and what it reports."""
    res_path = log_path.with_suffix(f".{name}.json")
    out = _run([sys.executable, "-m", "infer.rehearsal", name, json.dumps({**args, "result": str(res_path)})], log_path)
    return {**out, **json.loads(res_path.read_text())}


# ---- the in-process stages (run as `python -m infer.rehearsal STAGE JSON`) ----------------------------

def write_grid(data: str, grid: str, result: str) -> None:
    """Synthetic grid features of the real shape for every split (rows: random float16, written in
    chunks through a memory map, as extract writes them) and the manifest entries CaptionSet reads."""
    from prepare import captions_h5
    p, c = GRIDS[grid]
    feats = Path(data) / f"features-synthetic-{grid}"
    feats.mkdir(exist_ok=True)
    rng, nbytes = np.random.default_rng(0), 0
    for split in ("train", "val", "test"):
        n = len(captions_h5.read_split(Path(data) / "captions.h5", split).image_ids)
        arr = np.lib.format.open_memmap(feats / f"{split}.grid.npy", "w+", np.float16, (n, p, c))
        for i in range(0, n, 256):
            arr[i:i + 256] = rng.random((min(256, n - i), p, c), np.float32).astype(np.float16)
        arr.flush()
        del arr
        nbytes += (feats / f"{split}.grid.npy").stat().st_size
    manifest = {"features": "grid", "storage_scale": 1.0, "failed": {}, "synthetic": True, "grid": grid}
    (feats / "manifest.json").write_text(json.dumps(manifest))
    Path(result).write_text(json.dumps({"features_gb": round(nbytes / 1e9, 2), "dir": str(feats)}))


def datapath(data: str, grid: str, result: str) -> None:
    """Median batches/s of model.data.CaptionSet over the first blocks of the epochs' shuffled order."""
    from model.data import IN_MEMORY_LIMIT, CaptionSet
    feats = Path(data) / f"features-synthetic-{grid}"
    t0 = time.perf_counter()
    cs = CaptionSet(Path(data) / "captions.h5", feats, "train", json.loads((feats / "manifest.json").read_text()))
    opened = time.perf_counter() - t0
    rows = (r for epoch in itertools.count() for r in cs.epoch_rows(epoch, BATCH, seed=0))   # small sets: next epochs
    rates = []
    for _ in range(BLOCKS):
        t = time.perf_counter()
        for _, r in zip(range(BLOCK_BATCHES), rows):
            cs.batch(r)
        rates.append(BLOCK_BATCHES / (time.perf_counter() - t))
    size = cs.features.path.stat().st_size
    Path(result).write_text(json.dumps({
        "batches_per_s": round(float(np.median(rates)), 1),
        "open_seconds": round(opened, 2), "mapped": size > IN_MEMORY_LIMIT, "train_grid_gb": round(size / 1e9, 2),
        "captions": len(cs), "batches_per_epoch": cs.num_batches(BATCH)}))


def scoring(data: str, result: str) -> None:
    """infer.evaluate's three score columns for the test split; each image's caption is the first
    reference of the next image."""
    from collections import defaultdict

    from infer.evaluate import _scores, java_available
    from prepare import captions_h5
    sp = captions_h5.read_split(Path(data) / "captions.h5", "test")
    refs: dict[int, list[str]] = defaultdict(list)
    for text, row in zip(sp.texts, sp.image_index):
        refs[int(sp.image_ids[row])].append(str(text))
    ids = sorted(refs)
    hyp = {i: refs[ids[(k + 1) % len(ids)]][0] for k, i in enumerate(ids)}
    s = _scores(dict(refs), hyp, {})
    Path(result).write_text(json.dumps({"images": len(ids), "java": java_available(),
                                        "cider_human": round(s["human_ceiling"].get("CIDEr", float("nan")), 3)}))


# ---- the driver --------------------------------------------------------------------------------------

def rehearse(out, fractions: list[float], *, stages=STAGES, grid: str = "lite0", extract_up_to: float = 1 / 16,
             keep: bool = False, overwrite: bool = False, log=print) -> dict:
    from prepare.synth_coco import split_counts
    out = Path(out)
    stages = list(stages)
    check_args(out, fractions, stages, grid, overwrite)
    if out.is_dir() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    py = sys.executable
    report = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "grid": grid, "fractions": []}
    rate = None                                               # extraction images/s, for the extrapolation
    for f in sorted(fractions):
        label, counts = _label(f), split_counts(f)
        data, lg = out / f"coco-{label.replace('/', '-')}", out / f"coco-{label.replace('/', '-')}.log"
        row = {"fraction": f, "label": label, "images": counts, "stages": {}}
        log(f"rehearsal at {label} ({sum(counts.values())} images): {', '.join(stages)}")
        if "write" in stages or not data.exists():
            row["stages"]["write"] = _run([py, "-m", "prepare", "synth-coco", "--out", str(data), "--fraction", str(f),
                                           "--quiet", "--overwrite"], lg)
        if "prepare" in stages or not (data / "captions.h5").exists():
            row["stages"]["prepare"] = _run([py, "-m", "prepare", "captions", "--dataset", str(data), "--max-len", "20",
                                             "--overwrite"], lg)
        if "extract" in stages:
            n = sum(counts.values())
            if f <= extract_up_to + 1e-12:
                r = _run([py, "-m", "extract", "--captions", str(data / "captions.h5"), "--out",
                          str(data / "features-lite0"), "--encoder", "efficientnet_lite0", "--weights", "imagenet",
                          "--image-size", "224", "--features", "pooled", "--quiet"], lg)
                rate = n / r["seconds"]
                row["stages"]["extract"] = {**r, "images_per_s": round(rate, 1)}
            elif rate:
                row["stages"]["extract"] = {"seconds": round(n / rate, 1), "extrapolated": True}
        if "features" in stages:
            row["stages"]["features"] = _stage("write_grid", {"data": str(data), "grid": grid}, lg)
        if "datapath" in stages:
            row["stages"]["datapath"] = _stage("datapath", {"data": str(data), "grid": grid}, lg)
        if "scoring" in stages:
            row["stages"]["scoring"] = _stage("scoring", {"data": str(data)}, lg)
        report["fractions"].append(row)
        (out / "rehearsal.json").write_text(json.dumps(report, indent=2) + "\n")
        if not keep:
            shutil.rmtree(data)
    log(format_table(report))
    return report


def format_table(report: dict) -> str:
    rows = report["fractions"]
    head = "| stage | " + " | ".join(f"{r['label']} ({sum(r['images'].values()):,} images)" for r in rows) + " |"
    lines = [head, "|" + " --- |" * (len(rows) + 1)]
    for st in STAGES:
        if not any(st in r["stages"] for r in rows):
            continue
        cells = []
        for r in rows:
            s = r["stages"].get(st)
            if s is None:
                cells.append("")
                continue
            t = f"~{s['seconds']:.0f} s (extrapolated)" if s.get("extrapolated") else f"{s['seconds']:.1f} s, {s['peak_gb']:.2f} GB"
            if st == "extract" and "images_per_s" in s:
                t += f", {s['images_per_s']:.0f} images/s"
            if st == "features":
                t += f", {s['features_gb']:.1f} GB on disk"
            if st == "datapath":
                t = (f"{s['batches_per_s']} batches/s ({'mapped' if s['mapped'] else 'in memory'}, "
                     f"{s['train_grid_gb']:.1f} GB grid), {s['peak_gb']:.2f} GB")
            if st == "scoring":
                t += f", {s['images']:,} images" + ("" if s["java"] else " (no Java: no METEOR)")
            cells.append(t)
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    stage, args = sys.argv[1], json.loads(sys.argv[2])
    {"write_grid": write_grid, "datapath": datapath, "scoring": scoring}[stage](**args)
