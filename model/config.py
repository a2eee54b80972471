"""Typed configs of the training phases. Every field carries its help text (the CLI flags are
generated from them); unknown keys are an error; the configs are saved in every run directory and
the model is rebuilt from them (never from defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.distribute import STRATEGIES
from prepare.errors import UserError


def setting(default, help: str = ""):
    """A config field with its help text (what `--flag --help` prints) kept in the field's metadata;
    `default` dataclasses.MISSING: a required field."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = setting(dataclasses.MISSING, "words incl. the 4 special tokens (from captions.h5)")
    decoder: str = setting("show_and_tell", "show_and_tell (im2txt: the pooled vector as the first input; features "
                           "from `extract --features pooled`) attention (Show, Attend and Tell: attention over "
                           "the feature map at every word; features from `extract --features grid` or grid16) or "
                           "transformer (a pre-norm Transformer decoder: causal self-attention over the words, "
                           "cross-attention to the grid; features from `extract --features grid` or grid16)")
    feature_dim: int = setting(2048, "encoder output size (Inception v3 avg pool)")
    grid_positions: int = setting(0, "positions of the grid the attention decoder reads (from the cache)")
    embedding_size: int = setting(512, "image and word embedding size (im2txt: 512)")
    lstm_units: int = setting(512, "LSTM state size (im2txt: 512)")
    dropout: float = setting(0.3, "dropout on LSTM input and output (im2txt keeps 0.7, i.e. 0.3)")
    init_scale: float = setting(0.08, "weights start uniform in [-init_scale, init_scale] (im2txt)")
    feature_std_floor: float = setting(0.3, "each channel's std plus this x the median channel's std divides it: a "
                                       "channel nearly constant in training is not blown up (measured: 0.3 beat "
                                       "0.001 on the built-in data)")
    feature_clip: float = setting(5.0, "normalised features are clipped to +-this (0: off), so an image unlike the "
                                  "training ones (a photo, for a model of shapes) cannot feed the decoder values "
                                  "1000x their range")
    attention_units: int = setting(256, "attention decoder: size of the additive (Bahdanau) scoring layer")
    attention_reg: float = setting(0.0, "attention decoder: weight of the doubly stochastic regularisation (Show, "
                                   "Attend and Tell: every position's attention summed over the caption pushed "
                                   "towards 1)")
    attention_supervision: float = setting(0.0, "attention and transformer decoders, `model train` on a dataset that "
                                           "records where each object is (the built-in one): weight of a loss "
                                           "pulling the attention of each colour or shape word naming a true object "
                                           "into that object's box (-log of the attention mass there; 0: off)")
    supervised_heads: int = setting(0, "transformer decoder: how many heads of the last layer's cross-attention "
                                    "--attention-supervision pulls (the first ones; 0: all, their average); the "
                                    "others stay free")
    supervised_words: str = setting("names", "which words --attention-supervision pulls: names (each colour and "
                                    "shape word naming a true object, into that object's box: the words pointing "
                                    "accuracy scores) or phrases (also each size word, into its object's box, "
                                    "and each word of a relation, 'to the left of', 'above', into the box of "
                                    "the object named next, the one the relation compares with)")
    transformer_layers: int = setting(2, "transformer decoder: layers (each self-attention, cross-attention to the "
                                      "grid, feed-forward; d_model is embedding_size)")
    transformer_heads: int = setting(4, "transformer decoder: attention heads (embedding_size must be a multiple)")
    attention_dropout: float = setting(0.0, "transformer decoder: dropout on the attention weights (0: none, so "
                                       "a word never loses the object it looks at; --dropout is on the layers' "
                                       "outputs)")
    transformer_ff: int = setting(1024, "transformer decoder: hidden size of each layer's feed-forward block")
    max_positions: int = setting(40, "transformer decoder: the longest input it reads, in tokens (<start> and the "
                                 "words): the size of its word-position table and of its decoding cache")


@dataclass
class TrainConfig:
    epochs: int = setting(20, "passes over the training captions")
    batch_size: int = setting(32, "captions per step (im2txt: 32)")
    group_by_image: bool = setting(False, "batches hold each image's captions together (the images shuffled), so "
                                   "a decoder projects an image's features once for all its captions, not once "
                                   "per caption (grid decoders: fewer FLOPs a caption; ruotianluo's seq_per_img)")
    optimizer: str = setting("adam", "adam or sgd (im2txt's recipe: sgd, lr 2.0)")
    lr: float = setting(0.0, "initial learning rate; 0: by optimizer (adam 1e-3; sgd 2.0, im2txt's)")
    lr_decay_factor: float = setting(0.5, "learning rate multiplied by this ...")
    lr_decay_epochs: float = setting(8.0, "... every this many epochs (im2txt: halved every 8 epochs)")
    lr_schedule: str = setting("step", "step: the two settings above (im2txt's); cosine: from lr down to 0 over "
                               "all the run's steps, a cosine (measured best for the transformer decoder)")
    warmup_steps: int = setting(0, "with --lr-schedule cosine: the learning rate rises linearly from 0 to --lr over "
                                "this many steps, then the cosine falls to 0 over the rest (0: no warm-up)")
    clip_norm: float = setting(5.0, "gradient clipping by global norm (im2txt: 5.0)")
    seed: int = setting(0, "initialisation and data order (epoch e uses seed+e)")
    checkpoint_every: int = setting(200, "steps between checkpoints (one is also written every epoch)")
    max_steps: int = setting(0, "stop after this many steps in all (0: run all epochs)")
    samples: int = setting(3, "validation images whose greedy captions print each epoch")
    sample_max_len: int = setting(30, "max tokens of those captions")
    strategy: str = setting("default", "default, mirrored (all GPUs of one machine) or multiworker (every machine "
                            "of TF_CONFIG; docs/stages.md)")
    peer_timeout: float = setting(300.0, "multiworker: seconds to wait for every worker to join before giving up")


@dataclass
class FinetuneConfig:
    epochs: int = setting(2, "passes over the training images")
    max_steps: int = setting(0, "stop after this many steps in all (0: run all epochs)")
    batch_size: int = setting(32, "images per step")
    captions_per_image: int = setting(5, "captions of each image in a step (decoder batch = images x this)")
    lr: float = setting(0.0, "decoder learning rate (Adam); 0: the recipe's")
    cnn_lr: float = setting(0.0, "CNN learning rate; 0: the recipe's")
    cnn_optimizer: str = setting("auto", "sgd, adam or auto: the recipe's")
    bn: str = setting("auto", "BatchNorm in training mode, calibrated (train), inference mode (frozen), or auto: "
                      "the recipe's")
    augment: bool = setting(True, "random crop + brightness/contrast jitter")
    flip: bool = setting(False, "horizontal flips (off: they falsify left/right captions)")
    clip_norm: float = setting(5.0, "gradient clipping by global norm, per optimiser")
    mixed_precision: bool = setting(False, "the CNN in bfloat16 (GPUs); the decoder stays float32")
    seed: int = setting(0, "data order and augmentation")
    checkpoint_every: int = setting(100, "steps between checkpoints (also one per epoch)")
    calibration_images: int = setting(256, "--bn train: training images that re-estimate BatchNorm statistics")
    recipe: str = setting("", "filled in: pretrained or from_scratch (model/finetune.py: resolve_recipe)")
    samples: int = setting(3, "validation images whose greedy captions print each epoch")
    sample_max_len: int = setting(30, "max tokens of those captions")
    strategy: str = setting("default", "default, mirrored (all GPUs of one machine) or multiworker (every machine "
                            "of TF_CONFIG; --batch-size is the global batch of images; docs/stages.md)")
    peer_timeout: float = setting(300.0, "multiworker: seconds to wait for every worker to join before giving up")


@dataclass
class ScstConfig:
    epochs: int = setting(3, "passes over the training images")
    max_steps: int = setting(0, "stop after this many steps in all (0: run all epochs)")
    batch_size: int = setting(16, "images per step")
    samples_per_image: int = setting(5, "captions sampled per image each step (K)")
    baseline: str = setting("mean", "mean: each sample's baseline is the mean reward of the image's other samples "
                            "(new SCST); greedy: the reward of the greedy caption (Rennie et al.)")
    lr: float = setting(5e-5, "learning rate (Adam)")
    train_cnn: bool = setting(False, "also train the CNN: the images are read and run through the run's encoder "
                              "(BatchNorm frozen, no augmentation) at every step, and the trained encoder is saved "
                              "with the decoder (slow on CPU; without it: the cached features, the CNN frozen)")
    cnn_lr: float = setting(0.0, "with --train-cnn: the CNN's learning rate (Adam); 0: the decoder's --lr / 25")
    xe_weight: float = setting(0.1, "weight of a cross-entropy term on one reference caption of each image beside "
                               "the policy-gradient loss (0: pure SCST); keeps the words the references use for each "
                               "object while CIDEr-D is pushed up (measured on the built-in data: 0 loses 2-5 points "
                               "of exact content, 0.1 none, 0.25 and 1 give less CIDEr-D; docs/results.md)")
    temperature: float = setting(1.0, "sampling temperature")
    max_len: int = setting(0, "tokens of a sampled caption incl. <start>/<end>; 0: the longest training caption + 2")
    clip_norm: float = setting(5.0, "gradient clipping by global norm")
    seed: int = setting(0, "data order and the samples drawn")
    checkpoint_every: int = setting(100, "steps between checkpoints (also one per epoch)")
    samples: int = setting(3, "validation images whose greedy captions print each epoch")


DEFAULT_LR = {"adam": 1e-3, "sgd": 2.0}
DECODERS = ("show_and_tell", "attention", "transformer")
# what `extract --features` feeds each: "grid" stands for either grid kind (grid or grid16, extract.encoder.is_grid)
FEATURES_OF_DECODER = {"show_and_tell": "pooled", "attention": "grid", "transformer": "grid"}

SUPERVISED_WORDS = ("names", "phrases")   # model.metrics.grounded_objects

# Valid values, checked before anything is written: field -> (test, what it must be)
RULES = {
    "vocab_size": (lambda v: v >= 5, "at least 5 (4 special tokens and a word)"),
    "feature_dim": (lambda v: v >= 1, "at least 1"),
    "decoder": (lambda v: v in DECODERS, " or ".join(DECODERS)),
    "grid_positions": (lambda v: v >= 0, "0 or more"),
    "attention_units": (lambda v: v >= 1, "at least 1"),
    "feature_clip": (lambda v: v >= 0, "0 (off) or more"),
    "feature_std_floor": (lambda v: 0 < v <= 10, "in (0, 10]"),
    "attention_reg": (lambda v: v >= 0, "0 (off) or more"),
    "attention_supervision": (lambda v: 0 <= v < 1e6, "0 (off) or more"),
    "supervised_heads": (lambda v: v >= 0, "0 (all) or more"),
    "supervised_words": (lambda v: v in SUPERVISED_WORDS, " or ".join(SUPERVISED_WORDS)),
    "transformer_layers": (lambda v: v >= 1, "at least 1"),
    "transformer_heads": (lambda v: v >= 1, "at least 1"),
    "transformer_ff": (lambda v: v >= 1, "at least 1"),
    "max_positions": (lambda v: v >= 2, "at least 2"),
    "embedding_size": (lambda v: v >= 1, "at least 1"),
    "lstm_units": (lambda v: v >= 1, "at least 1"),
    "dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "attention_dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "init_scale": (lambda v: v > 0, "above 0"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "optimizer": (lambda v: v in DEFAULT_LR, "adam or sgd"),
    "lr": (lambda v: v >= 0 and v == v, "above 0 (0: the optimizer's default)"),
    "lr_decay_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr_decay_epochs": (lambda v: v >= 0, "0 or more"),
    "lr_schedule": (lambda v: v in ("step", "cosine"), "step or cosine"),
    "clip_norm": (lambda v: v > 0, "above 0"),
    "warmup_steps": (lambda v: v >= 0, "0 (no warm-up) or more"),
    "checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "max_steps": (lambda v: v >= 0, "0 (no limit) or more"),
    "samples": (lambda v: v >= 0, "0 or more"),
    "sample_max_len": (lambda v: v >= 2, "at least 2"),
    "strategy": (lambda v: v in STRATEGIES, " or ".join(STRATEGIES)),
    "peer_timeout": (lambda v: v > 0, "above 0"),
    "captions_per_image": (lambda v: v >= 1, "at least 1"),
    "cnn_lr": (lambda v: v >= 0 and v == v, "0 or more (0: the default, see --help)"),
    "cnn_optimizer": (lambda v: v in ("auto", "sgd", "adam"), "sgd, adam or auto"),
    "bn": (lambda v: v in ("auto", "train", "frozen"), "train, frozen or auto"),
    "calibration_images": (lambda v: v >= 1, "at least 1"),
    "samples_per_image": (lambda v: v >= 2, "at least 2 (the mean baseline needs another sample)"),
    "baseline": (lambda v: v in ("mean", "greedy"), "mean or greedy"),
    "temperature": (lambda v: v > 0, "above 0"),
    "xe_weight": (lambda v: v >= 0 and v == v, "0 (off) or more"),
    "max_len": (lambda v: v == 0 or 3 <= v <= 1000, "0 (the run's own) or 3 to 1000"),
}


def validate(cfg) -> None:
    """Every field of a config against RULES: one line naming the flag and the valid range."""
    for f in dataclasses.fields(cfg):
        rule = RULES.get(f.name)
        v = getattr(cfg, f.name)
        if rule and not rule[0](v):
            raise UserError(f"--{f.name.replace('_', '-')} {v}: must be {rule[1]}")
    if isinstance(cfg, ModelConfig) and cfg.decoder == "transformer":
        _check_transformer(cfg)
    if isinstance(cfg, ModelConfig) and cfg.supervised_words != "names" and not cfg.attention_supervision:
        raise UserError(f"--supervised-words {cfg.supervised_words}: chooses the words --attention-supervision "
                        f"pulls; add --attention-supervision (e.g. 0.5) or leave the flag out")
    if getattr(cfg, "warmup_steps", 0) and cfg.lr_schedule != "cosine":
        raise UserError(f"--warmup-steps {cfg.warmup_steps}: a warm-up belongs to the cosine schedule; add "
                        f"--lr-schedule cosine or leave the flag out")


def _check_transformer(cfg: ModelConfig) -> None:
    """What the transformer decoder needs of several fields together."""
    if cfg.embedding_size % cfg.transformer_heads:
        raise UserError(f"--transformer-heads {cfg.transformer_heads}: must divide --embedding-size "
                        f"{cfg.embedding_size} (each head gets embedding_size / heads channels)")
    if cfg.supervised_heads > cfg.transformer_heads:
        raise UserError(f"--supervised-heads {cfg.supervised_heads}: at most --transformer-heads "
                        f"{cfg.transformer_heads} (0: all)")
    side = round(cfg.grid_positions ** 0.5)
    if cfg.grid_positions and side * side != cfg.grid_positions:
        raise UserError(f"the transformer decoder needs a square grid (its position embeddings are rows + columns); "
                        f"the feature cache has {cfg.grid_positions} positions")


# Fields added after runs were made: what a saved config that lacks one meant by it (the model is
# rebuilt as it was trained, so its checkpoint fits)
EARLIER_RUNS = {
    "ModelConfig": {"attention_dropout": lambda d: d.get("dropout", 0.3)},   # was --dropout before 2026-12-02
}


def from_dict(cls, d: dict, where: str = "config"):
    d = {**{k: f(d) for k, f in EARLIER_RUNS.get(cls.__name__, {}).items() if k not in d}, **d}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**d)


def override(cfg, updates: dict, where: str = "flags"):
    """A copy of `cfg` with `updates` (None values ignored); unknown keys are an error."""
    d = dataclasses.asdict(cfg)
    d.update({k: v for k, v in updates.items() if v is not None})
    new = from_dict(type(cfg), d, where)
    validate(new)
    return new


# ---- command-line flags generated from the configs (one source of truth for defaults and help) ----
def add_flags(parser, cls, skip=(), defaults: dict | None = None) -> None:
    """One --flag per config field (underscores -> dashes), its help text and default as help.
    Every flag defaults to None ("not given"), so the config's own default applies."""
    import argparse
    shown = {f.name: f.default for f in dataclasses.fields(cls)} | (defaults or {})
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name, d = "--" + f.name.replace("_", "-"), shown[f.name]
        text = f"{f.metadata.get('help', '')} (default: {d})".replace("%", "%%")
        if isinstance(f.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(name, type=type(f.default), default=None, help=text)


def flags_of(args, cls) -> dict:
    """The values given on the command line for `cls`'s fields (None: not given)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
