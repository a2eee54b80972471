"""python -m model train | finetune | bench  (each has --help)"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from prepare.util import run_cli  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        b = argparse.ArgumentParser(prog="python -m model bench", description="decoder training throughput")
        b.add_argument("--vocab", type=int, default=12000)
        b.add_argument("--size", type=int, default=512, help="embedding and LSTM size")
        b.add_argument("--batch-size", type=int, default=32)
        b.add_argument("--max-len", type=int, default=20)
        b.add_argument("--mean-len", type=float, default=12.5)
        b.add_argument("--steps", type=int, default=12)
        a = b.parse_args(argv[1:])
        from model import bench
        bench.run(a.vocab, a.size, a.batch_size, a.max_len, a.mean_len, a.steps)
        return 0
    p = argparse.ArgumentParser(prog="python -m model", description="train the Show and Tell decoder")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="stage 1: train the decoder on cached features")
    t.add_argument("--data", required=True, help="dataset folder holding captions.h5 (and features/)")
    t.add_argument("--captions", help="captions.h5 (default DATA/captions.h5)")
    t.add_argument("--features", help="feature cache folder (default DATA/features)")
    t.add_argument("--out", required=True, help="run directory (created; an existing run is resumed)")
    for name, typ, hlp in [
        ("epochs", int, "passes over the training captions (default 20)"),
        ("batch-size", int, "captions per step (default 32)"),
        ("optimizer", str, "adam (default) or sgd (im2txt's recipe)"),
        ("lr", float, "initial learning rate (default by optimizer: adam 1e-3, sgd 2.0)"),
        ("lr-decay-factor", float, "multiply the learning rate by this ... (default 0.5)"),
        ("lr-decay-epochs", float, "... every this many epochs (default 8)"),
        ("clip-norm", float, "gradient clipping by global norm (default 5.0)"),
        ("seed", int, "initialisation and data order"),
        ("checkpoint-every", int, "steps between checkpoints (default 200; also every epoch)"),
        ("max-steps", int, "stop after this many steps in all (resume later with more)"),
        ("strategy", str, "default | mirrored (all GPUs of this machine)"),
        ("embedding-size", int, "image and word embedding size (default 512)"),
        ("lstm-units", int, "LSTM size (default 512)"),
        ("dropout", float, "dropout on LSTM input and output (default 0.3)"),
    ]:
        t.add_argument(f"--{name}", type=typ, help=hlp)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    f = sub.add_parser("finetune", help="stage 2: train the CNN and the decoder jointly, from images")
    f.add_argument("--run", required=True, help="a trained stage-1 run directory (never modified)")
    f.add_argument("--data", required=True, help="the dataset folder it was trained on (captions.h5, images)")
    f.add_argument("--out", required=True, help="new run directory (an existing fine-tune is resumed)")
    for name, typ, hlp in [
        ("epochs", int, "passes over the training images (default 2)"),
        ("max-steps", int, "stop after this many steps in all"),
        ("batch-size", int, "images per step (default 32)"),
        ("captions-per-image", int, "captions of each image per step (default 5)"),
        ("lr", float, "decoder learning rate (Adam; default 2e-4 after a pretrained encoder, 1e-3 after a random one)"),
        ("cnn-lr", float, "Inception learning rate (default 5e-4, im2txt's, after a pretrained encoder; 1e-3 after a random one)"),
        ("cnn-optimizer", str, "sgd or adam for Inception (default sgd after a pretrained encoder, adam after a random one)"),
        ("bn", str, "train (BatchNorm batch statistics in training, re-estimated before each evaluation), "
                    "frozen (inference mode, only the convolutions learn) or auto (default: the recipe's)"),
        ("clip-norm", float, "gradient clipping by global norm (default 5.0)"),
        ("seed", int, "data order and augmentation"),
        ("checkpoint-every", int, "steps between checkpoints (default 100)"),
    ]:
        f.add_argument(f"--{name}", type=typ, help=hlp)
    f.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random crops / brightness-contrast jitter")
    f.add_argument("--flip", action="store_true", default=None, help="random horizontal flips (off by default: "
                   "they make 'left of'/'right of' captions false)")
    f.add_argument("--mixed-precision", action="store_true", default=None, help="Inception in bfloat16 (GPUs)")
    f.add_argument("--force", action="store_true", help="fine-tune even an untrained decoder (not advised)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.cmd == "train":
        from model.train import train
        v = vars(a)
        model_keys = ("embedding_size", "lstm_units", "dropout")
        train_keys = ("epochs", "batch_size", "optimizer", "lr", "lr_decay_factor", "lr_decay_epochs", "clip_norm",
                      "seed", "checkpoint_every", "max_steps", "strategy")
        train(a.data, a.out, features=a.features, captions=a.captions,
              model_overrides={k: v[k] for k in model_keys}, train_overrides={k: v[k] for k in train_keys},
              progress=not a.quiet)
    elif a.cmd == "finetune":
        from model.finetune import finetune
        keys = ("epochs", "max_steps", "batch_size", "captions_per_image", "lr", "cnn_lr", "cnn_optimizer", "bn", "clip_norm", "seed",
                "checkpoint_every", "augment", "flip", "mixed_precision")
        finetune(a.run, a.data, a.out, overrides={k: getattr(a, k) for k in keys}, force=a.force,
                 progress=not a.quiet)
    return 0


if __name__ == "__main__":
    run_cli(main)
