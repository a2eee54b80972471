"""python -m infer caption: caption image files, print them, write annotated copies and JSON."""
from __future__ import annotations

import glob
import math
import time
from pathlib import Path

from infer.annotate import annotate
from infer.captioner import Captioner, image_id_from_name, write_jsonl
from prepare.util import UserError, write_json_atomic

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their image files) and globs -> (paths, inputs that matched nothing)."""
    paths, missing = [], []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXT)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).is_file())
        if not found:
            missing.append(item)
        paths += found
    return list(dict.fromkeys(paths)), missing


def caption_images(run, inputs: list[str], out, *, beam_size: int = 3, max_len: int = 20, top: int = 3,
                   batch_size: int = 32, length_norm: float = 0.0, overwrite: bool = False,
                   progress: bool = True, log=print) -> dict:
    out = Path(out)
    paths, missing = expand_inputs(inputs)
    for m in missing:
        log(f"warning: {m}: no such file, folder or matching images; skipped")
    if not paths:
        raise UserError("no images to caption: pass image files, folders or globs")
    names, seen = [], set()
    for p in paths:           # unique output names even for same-named files from different folders
        stem, k = p.stem, 1
        while stem in seen:
            stem, k = f"{p.stem}-{k}", k + 1
        seen.add(stem)
        names.append(f"{stem}.jpg")
    targets = [out / "captions.jsonl", out / "results.json"] + [out / "annotated" / n for n in names]
    clash = [t for t in targets if t.exists()]
    if clash and not overwrite:
        raise UserError(f"{clash[0]} already exists ({len(clash)} output files would be replaced); "
                        "pass --overwrite or choose another --out")
    cap = Captioner(run, beam_size=max(beam_size, top), max_len=max_len, length_norm=length_norm)
    t0 = time.time()
    results = cap.caption_files(paths, batch_size, progress)
    seconds = time.time() - t0
    rows, coco, bad = [], [], []
    for r, name in zip(results, names):
        if r.error:
            bad.append((r.path, r.error))
            log(f"warning: {r.path}: skipped ({r.error})")
            continue
        best = r.captions[:top]
        log(f"Captions for image {Path(r.path).name}:")
        for i, c in enumerate(best):
            log(f"  {i}) {cap.text(c)} (p={math.exp(c.logprob):.6f})")
        annotate(r.path, [(cap.text(c), math.exp(c.logprob)) for c in best], out / "annotated" / name)
        iid = image_id_from_name(r.path)
        rows.append({"file": r.path, "image_id": iid, "annotated": str(out / "annotated" / name),
                     "captions": [{"caption": cap.text(c), "logprob": c.logprob} for c in best]})
        if iid is not None:
            coco.append({"image_id": iid, "caption": cap.text(best[0])})
    write_jsonl(out / "captions.jsonl", rows)
    if rows and len(coco) == len(rows):
        write_json_atomic(out / "results.json", coco)
    log(f"captioned {len(rows)} images in {seconds:.1f}s ({len(rows) / max(seconds, 1e-9):.1f} img/s); "
        f"{len(bad)} unreadable, {len(missing)} inputs not found")
    log(f"wrote {out / 'annotated'}/, {out / 'captions.jsonl'}" +
        (f", {out / 'results.json'}" if rows and len(coco) == len(rows) else ""))
    return {"captioned": len(rows), "unreadable": bad, "missing": missing, "seconds": seconds}
