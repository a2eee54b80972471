"""python -m prepare {synth,synth-coco,captions} ...  (see README)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from prepare.cli import run_cli
from prepare.errors import UserError


def _synth(a) -> None:
    from prepare import synth
    t0 = time.time()
    counts = {"train": a.train, "val": a.val, "test": a.test}
    out = synth.generate(a.out, counts, size=a.size, seed=a.seed, progress=not a.quiet, overwrite=a.overwrite)
    n = sum(counts.values())
    dt = time.time() - t0
    print(f"wrote {n} images ({', '.join(f'{k} {v}' for k, v in counts.items())}) and "
          f"{sum(out.values())} captions to {a.out} in {dt:.1f}s ({n / dt:.0f} images/s)")


def _synth_coco(a) -> None:
    from prepare import synth_coco
    t0 = time.time()
    counts = synth_coco.generate(a.out, synth_coco.parse_fraction(a.fraction), seed=a.seed,
                                 progress=not a.quiet, overwrite=a.overwrite)
    n = sum(counts.values())
    print(f"wrote {n} placeholder images ({', '.join(f'{k} {v}' for k, v in counts.items())}) and "
          f"{n * synth_coco.CAPTIONS_PER_IMAGE} captions to {a.out} in {time.time() - t0:.1f}s")


def _captions(a) -> None:
    from prepare.prepare_captions import prepare_captions
    pairs = []
    if a.dataset:
        d = Path(a.dataset)
        for split in ("train", "val", "test"):
            ann = d / "annotations" / f"captions_{split}.json"
            if ann.exists():
                pairs.append((split, str(ann), str(d / "images" / split)))
        if not pairs:
            raise UserError(f"{d}: no annotations/captions_<split>.json found; is this a dataset folder "
                            "made by `python -m prepare synth`?")
    if len(a.annotations or []) != len(a.images or []):
        raise UserError("give one --images folder for each --annotations file, in the same order")
    names = a.split_names.split(",") if a.split_names else ["train", "val", "test"]
    if len(a.annotations or []) > len(names):
        raise UserError(f"{len(a.annotations)} --annotations files but only {len(names)} --split-names")
    pairs += [(names[i], ann, img) for i, (ann, img) in enumerate(zip(a.annotations or [], a.images or []))]
    if not pairs and not a.karpathy:
        raise UserError("nothing to prepare: pass --dataset DIR, --annotations/--images pairs, or --karpathy")
    out = a.out or (Path(a.dataset) / "captions.h5" if a.dataset else None)
    if out is None:
        raise UserError("pass --out FILE (e.g. data/coco/captions.h5)")
    t0 = time.time()
    prepare_captions(out, pairs=pairs, karpathy=a.karpathy, images_root=a.images_root,
                     vocab_size=a.vocab_size, min_count=a.min_count, max_len=a.max_len,
                     val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed,
                     tokenizer=a.tokenizer, overwrite=a.overwrite)
    print(f"  took {time.time() - t0:.1f}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prepare", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the built-in synthetic COCO-format dataset")
    s.add_argument("--out", required=True, help="dataset folder to create")
    s.add_argument("--train", type=int, default=3000, help="training images (default 3000)")
    s.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    s.add_argument("--test", type=int, default=300, help="test images (default 300)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels, 64-4096 (default 128)")
    s.add_argument("--seed", type=int, default=0, help="non-negative; the dataset is a function of counts, size and seed")
    s.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    sc = sub.add_parser("synth-coco", help="a caption set of MS-COCO 2014's size and shape (placeholder images), "
                        "for rehearsing the stages at scale")
    sc.add_argument("--out", required=True, help="dataset folder to create")
    sc.add_argument("--fraction", default="1", help="share of the full size (113,287 / 5,000 / 5,000 images): "
                    "e.g. 1/16, 1/4, 1 (default)")
    sc.add_argument("--seed", type=int, default=0, help="non-negative")
    sc.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("captions", help="caption JSON -> captions.h5 (vocabulary, padded ids, splits)")
    c.add_argument("--dataset", help="a folder with annotations/captions_<split>.json and images/<split>/")
    c.add_argument("--annotations", action="append", help="COCO caption JSON; repeat once per split")
    c.add_argument("--images", action="append", help="image folder of the matching --annotations")
    c.add_argument("--split-names", help="names for the --annotations pairs in order (default train,val,test)")
    c.add_argument("--karpathy", help="Karpathy's dataset_coco.json instead of COCO files")
    c.add_argument("--images-root", help="with --karpathy: folder holding its 'filepath' folders")
    c.add_argument("--out", help="output file (default DATASET/captions.h5)")
    c.add_argument("--vocab-size", type=int, default=12000, help="keep the N most frequent words, incl. "
                   "the 4 special tokens (default 12000, im2txt's)")
    c.add_argument("--min-count", type=int, default=1, help="drop words seen fewer times in train")
    c.add_argument("--max-len", type=int, default=20, help="tokens per caption incl. <start>/<end>; "
                   "longer ones are truncated (default 20)")
    c.add_argument("--val-fraction", type=float, default=0.05, help="carved from train when no val is given")
    c.add_argument("--test-fraction", type=float, default=0.05, help="carved from train when no test is given")
    c.add_argument("--seed", type=int, default=0, help="seed of the carved split")
    c.add_argument("--tokenizer", default="words",
                   help="words (default), or chars: each character of a script written without spaces "
                   "(Chinese, Japanese, Thai...) is its own token; stored with the vocabulary")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    {"synth": _synth, "synth-coco": _synth_coco, "captions": _captions}[a.cmd](a)
    return 0


if __name__ == "__main__":
    run_cli(main)
