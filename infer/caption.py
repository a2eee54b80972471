"""python -m infer caption: caption image files, print them, write annotated copies and JSON."""
from __future__ import annotations

import math
import time
from pathlib import Path

from infer.annotate import annotate
from infer.files import check_out_folder, display_name, expand_inputs, image_id_from_name, write_jsonl
from infer.options import check_flags, run_max_len
from prepare.errors import UserError
from prepare.files import Publication, exclusive_lock, fault_point, finish_pending, write_json_atomic


def caption_images(run, inputs: list[str], out, *, beam_size: int = 3, max_len: int | None = None, top: int = 3,
                   batch_size: int = 32, length_norm: float = 0.0, overwrite: bool = False,
                   attention: bool = False, progress: bool = True, guards=None, log=print) -> dict:
    """Caption files, folders and globs; write OUT/annotated/<name>.jpg, OUT/captions.jsonl and,
    when every captioned file's name carries a distinct COCO image id, OUT/results.json; with
    `attention` (attention-decoder runs) also OUT/attention/<name>.png, a heat map per word.

    max_len None: the run's own (run_max_len). Every flag and --out are checked before anything is
    read or written. File names need not be UTF-8: they are shown, stored and used for output
    names with the undecodable bytes as U+FFFD (display_name). An image that cannot be read, or
    whose annotated copy cannot be made, is listed with its reason; it never stops the others.
    All outputs are published together (prepare.files.Publication, label "caption", captions.jsonl
    last): a killed run leaves the old outputs or the new ones, and the same command finishes it.
    guards: model.decoding.Guards (None: the defaults, on); captions the model rates unlikely are
    marked ("unsure": true in captions.jsonl, "(unsure)" printed and on the annotated copy), and the
    summary counts the degenerate best captions (model.metrics.degenerate)."""
    from infer.captioner import Captioner
    check_flags(beam_size=beam_size, top=top, max_len=max_len, batch_size=batch_size)
    out = Path(out)
    check_out_folder(out)
    paths, missing, irregular = _inputs(inputs, log)
    names = _output_names(paths)
    with exclusive_lock(out):                  # one process writes this --out at a time
        targets = [out / "captions.jsonl", out / "results.json"] + [out / "annotated" / n for n in names] + \
            ([out / "attention" / strip_name(n) for n in names] if attention else [])
        interrupted = finish_pending(out, "caption")       # a run of ours that a kill interrupted: finish it
        clash = [t for t in targets if t.exists()]
        if interrupted:
            log(f"finishing the interrupted run in {display_name(out)} (its outputs are replaced)")
        elif clash and not overwrite:
            raise UserError(f"{display_name(clash[0])} already exists ({len(clash)} output files would be replaced); "
                            "pass --overwrite or choose another --out")
        if max_len is None:
            max_len, why = run_max_len(run)
            log(f"--max-len {max_len}: {why}")
        cap = Captioner(run, beam_size=max(beam_size, top), max_len=max_len, length_norm=length_norm, guards=guards)
        if attention:
            cap.check_attention()
        t0 = time.time()
        results = cap.caption_files(paths, batch_size, progress, attention=attention)
        seconds = time.time() - t0
        with Publication(out, "caption") as pub:
            rows, coco, bad, not_annotated = _annotate_all(cap, results, names, out, top, log, pub)
            write_results = _write_results(pub, rows, coco, log)
            write_jsonl(pub.path("captions.jsonl"), rows)
    degenerate = sum(bool(r["captions"]) and cap.degenerate(r["captions"][0]["caption"]) for r in rows)
    unsure = sum(bool(r["captions"]) and r["captions"][0]["unsure"] for r in rows)
    log(f"captioned {len(rows)} images in {seconds:.1f}s ({len(rows) / max(seconds, 1e-9):.1f} img/s); "
        f"{len(bad)} unreadable, {len(not_annotated)} without annotated copy, {len(missing)} inputs not found, "
        f"{len(irregular)} not regular files; best captions: {degenerate} degenerate, {unsure} unsure")
    log(f"wrote {display_name(out / 'annotated')}/, {display_name(out / 'captions.jsonl')}" +
        (f", {display_name(out / 'results.json')}" if write_results else ""))
    return {"captioned": len(rows), "unreadable": bad, "not_annotated": not_annotated, "missing": missing,
            "not_regular": irregular, "seconds": seconds, "results_json": write_results, "max_len": max_len,
            "degenerate": degenerate, "unsure": unsure}


def _inputs(inputs: list[str], log) -> tuple[list[Path], list, list]:
    """The image files of the inputs; those not found or not regular files (FIFOs, devices,
    folders, symlink loops: never opened) are warned about and skipped; none left is an error."""
    paths, missing, irregular = expand_inputs(inputs)
    for m in missing:
        log(f"warning: {display_name(m)}: no such file, folder or matching images; skipped")
    for m, what in irregular:
        log(f"warning: {display_name(m)}: not a regular file ({what}); skipped")
    if not paths and irregular:
        more = f" (and {len(irregular) - 1} more such inputs)" if len(irregular) > 1 else ""
        raise UserError(f"no images to caption: {display_name(irregular[0][0])} is not a regular file "
                        f"({irregular[0][1]}){more}; pass image files, folders or globs")
    if not paths:
        raise UserError("no images to caption: pass image files, folders or globs")
    return paths, missing, irregular


def _output_names(paths: list[Path]) -> list[str]:
    """Unique output names even for same-named files from different folders."""
    names, seen = [], set()
    for p in paths:
        base = display_name(p.stem)
        stem, k = base, 1
        while stem in seen:
            stem, k = f"{base}-{k}", k + 1
        seen.add(stem)
        names.append(f"{stem}.jpg")
    return names


def _annotate_all(cap, results, names: list[str], out: Path, top: int, log, pub: Publication):
    """Print each image's captions, stage its annotated copy in `pub`; -> (rows, coco, unreadable,
    not annotated). Rows name the files where they are published (in `out`)."""
    rows, coco, bad, not_annotated = [], [], [], []
    for r, name in zip(results, names):
        shown = display_name(r.path)
        if r.error:
            bad.append((shown, r.error))
            log(f"warning: {shown}: skipped ({r.error})")
            continue
        best = r.captions[:top]
        log(f"Captions for image {display_name(Path(r.path).name)}:")
        shown_texts = [cap.text(c) + (" (unsure)" if cap.unsure(c) else "") for c in best]
        for i, c in enumerate(best):
            log(f"  {i}) {shown_texts[i]} (p={math.exp(c.logprob):.6f})")
        dst = out / "annotated" / name
        try:
            annotate(r.path, [(t, math.exp(c.logprob)) for t, c in zip(shown_texts, best)],
                     pub.path(f"annotated/{name}"))
        except Exception as e:  # noqa: BLE001 - one picture must never stop the batch
            why = f"{type(e).__name__}: {e}"
            not_annotated.append((shown, why))
            log(f"warning: {shown}: no annotated copy ({why}); its captions are kept")
            dst = None
        fault_point("caption:annotated")
        strip = _attention_strip(cap, r, pub, f"attention/{strip_name(name)}", shown, not_annotated, log)
        strip = None if strip is None else out / strip
        iid = image_id_from_name(r.path)
        rows.append({"file": shown, "image_id": iid, "annotated": None if dst is None else display_name(dst),
                     "captions": [{"caption": cap.text(c), "logprob": c.logprob, "unsure": cap.unsure(c)}
                                  for c in best]} |
                    ({"attention": display_name(strip)} if strip else {}))
        if iid is not None:
            coco.append({"image_id": iid, "caption": cap.text(best[0]), "file": shown})
    return rows, coco, bad, not_annotated


def strip_name(annotated_name: str) -> str:
    return Path(annotated_name).stem + ".png"


def _attention_strip(cap, r, pub: Publication, name: str, shown: str, not_annotated: list, log) -> str | None:
    """The best caption's attention strip staged as `name`, when computed; -> `name` (None when not
    made: a picture that fails is listed, never fatal)."""
    if r.attention is None:
        return None
    from infer.attention_maps import attention_strip, caption_words
    try:
        attention_strip(r.path, caption_words(cap.vocab, r.captions[0].ids, len(r.attention)), r.attention,
                        pub.path(name))
    except Exception as e:  # noqa: BLE001 - one picture must never stop the batch
        why = f"{type(e).__name__}: {e}"
        not_annotated.append((shown, f"attention strip: {why}"))
        log(f"warning: {shown}: no attention strip ({why})")
        return None
    return name


def _write_results(pub: Publication, rows: list[dict], coco: list[dict], log) -> bool:
    """COCO results (one caption per image id) when every file carries a distinct id; never a stale one."""
    by_id: dict[int, list[str]] = {}
    for c in coco:
        by_id.setdefault(c["image_id"], []).append(c["file"])
    dups = {i: f for i, f in by_id.items() if len(f) > 1}
    write_results = bool(rows) and len(coco) == len(rows) and not dups
    if write_results:
        write_json_atomic(pub.path("results.json"),
                          [{"image_id": c["image_id"], "caption": c["caption"]} for c in coco])
    else:
        if dups:
            i, files = next(iter(dups.items()))
            log(f"warning: results.json not written: {len(dups)} image id(s) given by more than one file "
                f"(id {i}: {', '.join(files)}); COCO results need one caption per image id")
        pub.discard("results.json")            # only there with --overwrite: never leave a stale one
    return write_results
