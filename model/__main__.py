"""python -m model train | finetune | scst | bench  (each has --help; flags come from the typed configs)"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from prepare.cli import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from model.config import FinetuneConfig, ModelConfig, ScstConfig, TrainConfig, add_flags
    p = argparse.ArgumentParser(prog="python -m model", description="train the Show and Tell decoder")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="stage 1: train the decoder on cached features")
    t.add_argument("--data", required=True, help="dataset folder holding captions.h5 (and features/)")
    t.add_argument("--captions", help="captions.h5 (default DATA/captions.h5)")
    t.add_argument("--features", help="feature cache folder (default DATA/features)")
    t.add_argument("--out", required=True, help="run directory (created; an existing run is resumed)")
    add_flags(t, ModelConfig, skip=("vocab_size", "feature_dim", "grid_positions"))
    add_flags(t, TrainConfig)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    f = sub.add_parser("finetune", help="stage 2: train the CNN and the decoder jointly, from images")
    f.add_argument("--run", required=True, help="a trained stage-1 run directory (never modified)")
    f.add_argument("--data", required=True, help="the dataset folder it was trained on (captions.h5, images)")
    f.add_argument("--out", required=True, help="new run directory (an existing fine-tune is resumed)")
    add_flags(f, FinetuneConfig, skip=("recipe",))
    f.add_argument("--force", action="store_true", help="fine-tune even an untrained decoder (not advised)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("scst", help="self-critical training: sampled captions rewarded by CIDEr-D, on cached features "
                       "(--train-cnn: on the images, the CNN trained too)")
    s.add_argument("--run", required=True, help="a trained run directory to start from (never modified)")
    s.add_argument("--data", required=True, help="the dataset folder it was trained on (captions.h5, images)")
    s.add_argument("--features", help="feature cache folder of the run's encoder (default: the run's own)")
    s.add_argument("--out", required=True, help="new run directory (an existing self-critical run is resumed)")
    add_flags(s, ScstConfig)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("bench-reward", help="CIDEr-D rewards per second (batches of 16 images x 5 samples)")
    b = sub.add_parser("bench", help="decoder training throughput on random data (im2txt sizes by default)")
    b.add_argument("--vocab", type=int, default=12000, help="vocabulary size (default 12000)")
    b.add_argument("--size", type=int, default=512, help="embedding and LSTM size (default 512)")
    b.add_argument("--batch-size", type=int, default=32, help="captions per step (default 32)")
    b.add_argument("--max-len", type=int, default=20, help="longest caption in tokens (default 20)")
    b.add_argument("--mean-len", type=float, default=12.5, help="mean caption length (default 12.5)")
    b.add_argument("--steps", type=int, default=12, help="timed steps per variant (default 12)")
    b.add_argument("--decoder", default="show_and_tell", choices=("show_and_tell", "attention", "transformer"),
                   help="attention or transformer: also time that grid decoder beside the pooled one (same sizes)")
    b.add_argument("--positions", type=int, default=49, help="grid decoders: grid positions (default 49: 7x7)")
    b.add_argument("--grid-dim", type=int, default=1280, help="grid decoders: grid channels (default 1280: Lite0)")
    b.add_argument("--captions-per-image", type=int, default=1,
                   help="grid decoders: batches of K captions of each image, as --group-by-image trains "
                        "(COCO: 5; default 1, an image per caption)")
    b.add_argument("--transformer-layers", type=int, default=0,
                   help="transformer: its layers (default 0: the decoder's default)")
    b.add_argument("--transformer-size", type=int, default=0,
                   help="transformer: its d_model (default 0: --size), e.g. 256 to time the width a recipe "
                        "trains beside the pooled LSTM at im2txt's 512")
    return p


def main(argv=None) -> int:
    from model.config import ModelConfig, TrainConfig, flags_of
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if a.cmd == "train":
        from model.train import train
        train(a.data, a.out, features=a.features, captions=a.captions, model_overrides=flags_of(a, ModelConfig),
              train_overrides=flags_of(a, TrainConfig), progress=not a.quiet)
    elif a.cmd == "finetune":
        from model.config import FinetuneConfig
        from model.finetune import finetune
        finetune(a.run, a.data, a.out, overrides=flags_of(a, FinetuneConfig), force=a.force, progress=not a.quiet)
    elif a.cmd == "scst":
        from model.config import ScstConfig
        from model.scst import scst
        scst(a.run, a.data, a.out, features=a.features, overrides=flags_of(a, ScstConfig), progress=not a.quiet)
    elif a.cmd == "bench-reward":
        from model.cider import bench as reward_bench
        reward_bench()
    else:
        from model import bench
        from prepare.errors import UserError, check_range
        for flag, v, lo in (("--vocab", a.vocab, 5), ("--size", a.size, 1), ("--batch-size", a.batch_size, 1),
                            ("--max-len", a.max_len, 5), ("--steps", a.steps, 1), ("--positions", a.positions, 1),
                            ("--grid-dim", a.grid_dim, 1), ("--captions-per-image", a.captions_per_image, 1),
                            ("--transformer-layers", a.transformer_layers, 0),
                            ("--transformer-size", a.transformer_size, 0)):
            check_range(flag, v, lo)
        bench.check_grid_decoder(a.vocab, a.size, a.decoder, a.positions, a.grid_dim, a.transformer_layers,
                                 a.transformer_size)
        if a.batch_size % a.captions_per_image:
            raise UserError(f"--captions-per-image {a.captions_per_image}: must divide --batch-size {a.batch_size}")
        bench.run(a.vocab, a.size, a.batch_size, a.max_len, a.mean_len, a.steps, a.decoder, a.positions, a.grid_dim,
                  a.captions_per_image, a.transformer_layers, a.transformer_size)
    return 0


if __name__ == "__main__":
    run_cli(main)
