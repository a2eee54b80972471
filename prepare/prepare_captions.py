"""prepare_captions: COCO-format caption JSON -> one captions.h5 (see captions_h5.py)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from prepare import captions_h5, coco
from prepare.errors import UserError, check_range
from prepare.files import sha256_file
from prepare.vocabulary import SPECIALS, TOKENIZERS, Vocabulary

MAX_LEN = 1000   # tokens per caption; COCO's longest is ~60


def _check_args(out: Path, vocab_size, min_count, max_len, val_fraction, test_fraction, seed, tokenizer,
                overwrite) -> None:
    check_range("--max-len", max_len, 3, MAX_LEN, "tokens per caption incl. <start> and <end>")
    if vocab_size is not None:
        check_range("--vocab-size", vocab_size, len(SPECIALS) + 1, None,
                    f"it counts the {len(SPECIALS)} special tokens, so at least one word needs {len(SPECIALS) + 1}")
    check_range("--min-count", min_count, 1)
    check_range("--val-fraction", val_fraction, 0.0, 0.5)
    check_range("--test-fraction", test_fraction, 0.0, 0.5)
    check_range("--seed", seed, 0)
    if tokenizer not in TOKENIZERS:
        raise UserError(f"--tokenizer must be one of {', '.join(TOKENIZERS)} (got {tokenizer!r})")
    if out.is_dir():
        raise UserError(f"{out} is a folder; --out names the captions file to write (e.g. {out / 'captions.h5'})")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")


def _load_records(pairs, karpathy, images_root, skipped: Counter, checksums: dict) -> dict[str, list]:
    """{split: records} from the Karpathy file and the (split, annotations, images) pairs; counts
    skips into `skipped` and each source file's sha256 into `checksums`."""
    records: dict[str, list] = {}
    if karpathy:
        if not images_root:
            raise UserError("--karpathy needs --images-root (the folder that holds train2014/ and val2014/)")
        records = coco.load_karpathy(karpathy, images_root, skipped)
        checksums[str(Path(karpathy).resolve())] = sha256_file(karpathy)
    for split, ann, img_dir in pairs or []:
        if split in records:
            raise UserError(f"split '{split}' given twice; pass one --annotations/--images pair per split")
        if not Path(img_dir).is_dir():
            raise UserError(f"{img_dir}: image folder not found; check --images")
        records[split] = coco.load_coco(ann, img_dir, skipped)
        checksums[str(Path(ann).resolve())] = sha256_file(ann)
    if "train" not in records or not records["train"]:
        raise UserError("no usable training images: give a train split (the first --annotations/--images "
                        "pair, or a Karpathy file with split 'train')")
    return records


def _check_disjoint(records: dict[str, list]) -> None:
    seen: dict[int, str] = {}
    for split, recs in records.items():
        for r in recs:
            if r[0] in seen:
                raise UserError(f"image id {r[0]} is in both the '{seen[r[0]]}' and '{split}' splits; "
                                "splits must not share images")
            seen[r[0]] = split


def _report(out: Path, vocab, splits, stats, skipped: Counter, info: Counter, max_len: int, tokenizer: str,
            log) -> dict:
    """Logs what was written and returns the summary (per split counts and length histograms, warnings)."""
    root = captions_h5.images_root(out)
    summary = {"output": str(out), "vocabulary": len(vocab), "tokenizer": tokenizer, "splits": {},
               "skipped": dict(skipped), "notes": dict(info), "images_root": str(root), "warnings": []}
    log(f"wrote {out}")
    if root != out.parent:
        log(f"  the images are not under {out.parent}: file names are relative to {root} "
            "(recorded in the file; readers use it)")
    log(f"  vocabulary: {len(vocab)} words (incl. 4 special tokens) from "
        f"{len(splits['train'].captions)} training captions, tokenizer {tokenizer}")
    for name, s in stats.items():
        lens = s.pop("lengths")
        hist = np.bincount(lens, minlength=max_len + 1)
        s["length_mean"] = float(lens.mean()) if len(lens) else 0.0
        s["length_hist"] = {int(k): int(v) for k, v in enumerate(hist) if v}
        summary["splits"][name] = s
        log(f"  {name:5s}: {s['images']} images, {s['captions']} captions, <unk> rate "
            f"{100 * s['unk_rate']:.2f}%, truncated {100 * s['truncated']:.2f}%, "
            f"mean length {s['length_mean']:.1f} tokens (with <start>/<end>)")
    for reason, n in sorted(skipped.items()):
        log(f"  skipped: {n} x {reason}")
    for reason, n in sorted(info.items()):
        log(f"  note: {n} x {reason}")
    summary["warnings"] = _warnings(splits, summary["splits"], tokenizer)
    for w in summary["warnings"]:
        log(f"warning: {w}")
    return summary


def prepare_captions(out: str | os.PathLike, *, pairs: list[tuple[str, str, str]] | None = None,
                     karpathy: str | None = None, images_root: str | None = None,
                     vocab_size: int | None = 12000, min_count: int = 1, max_len: int = 20,
                     val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                     tokenizer: str = "words", overwrite: bool = False, log=print) -> dict:
    """`pairs`: [(split, annotation json, image folder)]. Missing val/test are carved from train.
    `tokenizer`: "words" or "chars" (each character of a script written without spaces is a token).

    Returns the summary it prints: per split counts, skips by reason, vocabulary stats, warnings.
    """
    out = Path(out)
    _check_args(out, vocab_size, min_count, max_len, val_fraction, test_fraction, seed, tokenizer, overwrite)
    skipped: Counter = Counter()
    checksums: dict[str, str] = {}
    records = _load_records(pairs, karpathy, images_root, skipped, checksums)
    _check_disjoint(records)
    carve = {k: f for k, f in (("val", val_fraction), ("test", test_fraction)) if k not in records and f > 0}
    if carve:
        records.update(coco.carve_splits(records.pop("train"), carve, seed))
    info: Counter = Counter()
    splits = {name: coco.to_split_data(recs, info, tokenizer) for name, recs in records.items()}
    vocab = Vocabulary.build(splits["train"].captions, max_size=vocab_size, min_count=min_count,
                             max_len=max_len, tokenizer=tokenizer)
    config = {"vocab_size": vocab_size, "min_count": min_count, "max_len": max_len, "seed": seed,
              "tokenizer": tokenizer, "val_fraction": val_fraction, "test_fraction": test_fraction,
              "carved": sorted(carve), "sources": [list(p) for p in pairs or []], "karpathy": karpathy}
    stats = captions_h5.write(out, splits, vocab, max_len, config, checksums, overwrite=overwrite)
    return _report(out, vocab, splits, stats, skipped, info, max_len, tokenizer, log)


def _warnings(splits: dict, stats: dict, tokenizer: str) -> list[str]:
    """Splits the model cannot learn from or be scored on as they are: one line each, with the fix."""
    out = []
    for name, sd in splits.items():
        if tokenizer == "words" and sd.no_space:
            out.append(f"{name}: {sd.no_space} captions are in a script written without spaces (Chinese, "
                       "Japanese, Thai...), so each run of such text became a single token; pass --tokenizer "
                       "chars to make each of its characters a token")
    for name, s in stats.items():
        if name != "train" and s["captions"] and s["unk_rate"] == 1.0:
            out.append(f"{name}: every caption is only <unk> (none of its words is in the vocabulary built from "
                       "train); pass a larger --vocab-size, or give captions in the same language as the "
                       "training split")
    return out
