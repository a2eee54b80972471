"""Typed configs. Every field has a comment; unknown keys are an error; both are saved in
every run directory and the model is rebuilt from them (never from defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prepare.util import UserError


@dataclass
class ModelConfig:
    vocab_size: int                  # words incl. the 4 special tokens (from captions.h5)
    feature_dim: int = 2048          # encoder output size (Inception v3 avg pool)
    embedding_size: int = 512        # image and word embedding size (im2txt: 512)
    lstm_units: int = 512            # LSTM state size (im2txt: 512)
    dropout: float = 0.3             # dropout on LSTM input and output (im2txt keeps 0.7, i.e. 0.3)
    init_scale: float = 0.08         # weights start uniform in [-init_scale, init_scale] (im2txt)


@dataclass
class TrainConfig:
    epochs: int = 20                 # passes over the training captions
    batch_size: int = 32             # captions per step (im2txt: 32)
    optimizer: str = "adam"          # "adam" or "sgd" (im2txt's recipe: sgd, lr 2.0)
    lr: float = 1e-3                 # initial learning rate (sgd: 2.0 is im2txt's)
    lr_decay_factor: float = 0.5     # learning rate multiplied by this ...
    lr_decay_epochs: float = 8.0     # ... every this many epochs (im2txt: halved every 8 epochs)
    clip_norm: float = 5.0           # gradient clipping by global norm (im2txt: 5.0)
    seed: int = 0                    # initialisation and data order (epoch e uses seed+e)
    checkpoint_every: int = 200      # steps between checkpoints (one is also written every epoch)
    max_steps: int = 0               # stop after this many steps in all (0: run all epochs)
    samples: int = 3                 # validation images whose greedy captions print each epoch
    sample_max_len: int = 30         # max tokens of those captions
    strategy: str = "default"        # "default", "mirrored" (GPUs of one machine), "multiworker" (TF_CONFIG)


def from_dict(cls, d: dict, where: str = "config"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**d)


def override(cfg, updates: dict, where: str = "flags"):
    """A copy of `cfg` with `updates` (None values ignored); unknown keys are an error."""
    d = dataclasses.asdict(cfg)
    d.update({k: v for k, v in updates.items() if v is not None})
    return from_dict(type(cfg), d, where)
