"""Stage 1: train the decoder on cached features (the CNN never runs here).

Reading order: `train` (configs checked, data opened, the run directory created or resumed) ->
DecoderPhase (this phase's batches, step, evaluation and saves) driven by model/loop.py's `fit`;
the step's mathematics is model/steps.py. Writes a self-contained run directory (layout, lock and
checksums: model/run.py); a killed run resumes with the same step, learning-rate schedule and
data order by re-running the command.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

from model import checkpoint
from model.config import DEFAULT_LR, FEATURES_OF_DECODER, ModelConfig, TrainConfig, override
from model.data import CaptionSet, open_data
from model.distribute import dataset_of_pieces, local_replicas, make_strategy, replica_rows, worker_role
from model.decoders import build_decoder
from model.loop import TrainingPhase, fit, open_run, perplexity
from model.run import CHECKPOINT, DECODER, Run
from model.steps import make_steps
from prepare import captions_h5
from prepare.errors import UserError
from prepare.vocabulary import END_ID, PAD_ID, START_ID, UNK_ID

# Training settings that may change when a run is resumed (the rest must match the run's config).
RESUMABLE_CHANGES = {"epochs", "max_steps", "checkpoint_every", "samples", "sample_max_len",
                     "train_max_length",   # (derived from captions.h5, whose checksum is compared)
                     "strategy", "peer_timeout"}   # any number of replicas computes the same steps


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    """The optimizer and its learning-rate schedule (cfg.lr_schedule), over the optimizer's step count
    (restored with it: a resumed run continues the schedule where it was)."""
    import keras
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        total = cfg.max_steps or cfg.epochs * steps_per_epoch
        warm = min(cfg.warmup_steps, total)
        lr = (keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, total - warm), warmup_target=cfg.lr,
                                                     warmup_steps=warm) if warm
              else keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=max(1, total)))
    elif cfg.lr_decay_factor != 1.0 and cfg.lr_decay_epochs > 0:
        lr = keras.optimizers.schedules.ExponentialDecay(
            cfg.lr, decay_steps=max(1, int(cfg.lr_decay_epochs * steps_per_epoch)),
            decay_rate=cfg.lr_decay_factor, staircase=True)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr)
    if cfg.optimizer == "adam":
        from model.optim import FusedAdam
        return FusedAdam(lr)
    raise UserError(f"--optimizer {cfg.optimizer!r}: choose adam or sgd")


def _same_encoder(manifest: dict, features_dir: Path):
    """A resumed run's features must come from the encoder that made its first epochs'."""
    def check(run: Run) -> None:
        old = run.manifest()
        if (old.get("weights", {}).get("sha256"), old.get("encoder")) != (manifest["weights"]["sha256"], manifest["encoder"]):
            raise UserError(f"{run.path} was trained on features of another encoder ({_encoder_words(old)}); "
                            f"{features_dir} holds {_encoder_words(manifest)} features. Resume with the run's own "
                            f"feature cache ({old.get('request', {}).get('encoder', '?')}) or choose a new --out")
    return check


def _encoder_words(manifest: dict) -> str:
    from extract.encoder import spec_of_manifest
    w = manifest.get("weights", {})
    return f"{spec_of_manifest(manifest).title}, {w.get('source', {}).get('kind', '?')} weights {str(w.get('sha256'))[:12]}"


def _configs(vocab, manifest: dict, model_overrides: dict | None, train_overrides: dict | None):
    """Typed configs from defaults + flags, every value checked (before anything is written)."""
    mcfg = override(ModelConfig(vocab_size=len(vocab), feature_dim=manifest["feature_dim"],
                                grid_positions=int(manifest.get("grid_positions") or 0)),
                    model_overrides or {}, "model config")
    tcfg = override(TrainConfig(), train_overrides or {}, "train config")
    if not tcfg.lr:
        tcfg = dataclasses.replace(tcfg, lr=DEFAULT_LR[tcfg.optimizer])
    return mcfg, tcfg


def check_features_fit(decoder: str, manifest: dict, features_dir) -> None:
    """The attention and transformer decoders read grid features (grid or grid16), the Show and Tell
    decoder pooled ones."""
    from extract.cache import feature_kind
    from extract.encoder import is_grid
    need, have = FEATURES_OF_DECODER[decoder], feature_kind(manifest)
    family = "grid" if is_grid(have) else "pooled"
    if need != family:
        raise UserError(f"--decoder {decoder} reads {need} features but {features_dir} holds {have} features; "
                        f"extract a cache with `python -m extract ... --features {need}"
                        f"{' (or grid16)' if need == 'grid' else ''}` (into another --out) "
                        f"or pass --decoder {next(d for d, k in FEATURES_OF_DECODER.items() if k == family)}")


def check_positions_fit(mcfg: ModelConfig, captions: Path) -> None:
    """The transformer decoder reads at most max_positions input tokens (a caption less its <end>;
    past them it reuses its last position, model/transformer.py)."""
    if mcfg.decoder != "transformer":
        return
    longest = captions_h5.max_length(captions, "train")
    if longest - 1 > mcfg.max_positions:
        raise UserError(f"--max-positions {mcfg.max_positions}: {captions} has training captions of {longest} "
                        f"tokens, which the transformer decoder reads as {longest - 1} inputs; pass --max-positions "
                        f"{longest - 1} or more")


def only_unknown_words(ids: np.ndarray) -> bool:
    """Are all the words of these captions (ids [N, L] with <start>, <end>, <pad>) <unk>?"""
    words = ids[(ids != PAD_ID) & (ids != START_ID) & (ids != END_ID)]
    return bool(len(ids)) and bool(np.all(words == UNK_ID))


def _check_splits(trainset: CaptionSet, valset: CaptionSet, captions: Path) -> None:
    for s in (trainset, valset):          # captions there, but every image failed: extract's fault, not prepare's
        if len(s) == 0 and s.skipped:
            raise UserError(f"every {s.split} image failed extraction ({s.failed_images} of {s.num_images}; see "
                            f"{s.manifest_path} 'failed'): fix or replace them and re-run extract")
    if len(trainset) == 0:
        raise UserError(f"{captions}: no training captions with usable images")
    if len(valset) == 0:
        raise UserError(f"{captions}: no validation captions with usable images; the best model is chosen by "
                        f"validation loss: re-run `python -m prepare captions` with a val split")


def train(data, out, *, features=None, captions=None, model_overrides: dict | None = None,
          train_overrides: dict | None = None, progress: bool = True, log=print) -> dict:
    """Stage 1 into the run directory `out` (created, or resumed when it holds this run)."""
    import keras
    captions, features_dir, manifest = open_data(data, features, captions)
    vocab = captions_h5.read_vocab(captions)
    mcfg, tcfg = _configs(vocab, manifest, model_overrides, train_overrides)
    check_features_fit(mcfg.decoder, manifest, features_dir)
    check_positions_fit(mcfg, captions)
    config = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
              "data": {"captions": str(captions.resolve()), "features": str(features_dir.resolve()),
                       "captions_sha256": manifest["captions"]["sha256"],
                       "encoder_sha256": manifest["weights"]["sha256"],
                       "train_max_length": captions_h5.max_length(captions, "train")}}
    trainset = CaptionSet(captions, features_dir, "train", manifest)
    valset = CaptionSet(captions, features_dir, "val", manifest)
    _check_splits(trainset, valset, captions)
    if mcfg.attention_supervision:
        _ground(trainset, mcfg, vocab, captions, log)
    if only_unknown_words(valset.ids):
        log(f"warning: every val caption of {captions} is only <unk> (none of its words is in the vocabulary), so "
            f"the best model is chosen by its loss on <unk> targets; re-run `python -m prepare captions` with a "
            f"larger --vocab-size, or with val captions in the training split's language")
    # multiworker: TF_CONFIG is checked here, before anything is written and before any TensorFlow operation
    strategy = make_strategy(tcfg.strategy, tcfg.peer_timeout)
    chief, log = worker_role(strategy, out, log)    # another worker reads the chief's checkpoint and writes nothing
    run = Run(out)
    t_start = time.time()
    with run.lock() if chief else contextlib.nullcontext():
        resume = (open_run(run, config, vocab, RESUMABLE_CHANGES, same_kind=_same_encoder(manifest, features_dir),
                           create=lambda: run.create(config, vocab, manifest, features_dir / manifest["weights"]["file"]))
                  if chief else run.file(CHECKPOINT).is_file())
        keras.utils.set_random_seed(tcfg.seed)
        phase = DecoderPhase(run, mcfg, tcfg, manifest, trainset, valset, vocab, log, strategy)
        if trainset.skipped or valset.skipped:
            log(f"skipping captions of images that failed extraction: {trainset.skipped} train, {valset.skipped} val")
        state = fit(phase, resume, progress and chief, log)
    if state["history"] and chief:
        log(f"best validation perplexity {perplexity(state['best_val']):.2f}; run directory {out}")
    return {"run": str(out), "steps": state["step"], "epochs": state["epoch"], "best_val_loss": state["best_val"],
            "seconds": round(time.time() - t_start, 1), "history": state["history"]}


def _ground(trainset: CaptionSet, mcfg: ModelConfig, vocab, captions: Path, log) -> None:
    """Attention supervision's targets for the training captions (CaptionSet.ground), or the reason
    there can be none."""
    from extract.encoder import grid_side
    flag = f"--attention-supervision {mcfg.attention_supervision}"
    if FEATURES_OF_DECODER[mcfg.decoder] != "grid":
        raise UserError(f"{flag}: the {mcfg.decoder} decoder has no attention; pass --decoder attention or "
                        f"transformer, or leave the flag out")
    words = trainset.ground(vocab, grid_side(mcfg.grid_positions), mcfg.supervised_words == "phrases")
    if not words:
        raise UserError(f"{flag}: {captions} records no objects with their places for the training images (or no "
                        f"caption names one), so there is nothing to point at; it needs a dataset like the built-in "
                        f"one (`python -m prepare synth`), or leave the flag out")
    log(f"attention supervision: {words} words of {len(trainset)} training captions name an object whose cells "
        f"they are pulled to (weight {mcfg.attention_supervision}; {mcfg.supervised_words})")


class DecoderPhase(TrainingPhase):
    """Stage 1: batches of cached features, the (distributed) compiled step, the validation loss;
    prints greedy captions of a few validation images after each epoch."""
    name = "train"

    def __init__(self, run: Run, mcfg, tcfg: TrainConfig, manifest: dict, trainset: CaptionSet, valset: CaptionSet,
                 vocab, log, strategy):
        super().__init__(run, tcfg.epochs, tcfg.max_steps, tcfg.checkpoint_every,
                         trainset.num_batches(tcfg.batch_size), tcfg.batch_size, strategy)
        self.tcfg, self.trainset, self.valset, self.vocab, self.log = tcfg, trainset, valset, vocab, log
        with self.strategy.scope():
            self.model = build_decoder(mcfg, manifest)
            self.optimizer = make_optimizer(tcfg, self.steps_per_epoch)
            self.optimizer.build(self.model.trainable_variables)
        self._train_step, self._eval_step = make_steps(self.model, self.optimizer, self.strategy, tcfg.clip_norm,
                                                       tcfg.group_by_image)
        self.nan_hint = (f"the learning rate ({tcfg.lr}) is probably too high for {tcfg.optimizer}, or the features "
                         f"hold NaN/inf")
        n = len(valset.image_ids)
        self.sample_rows = np.linspace(0, n - 1, min(tcfg.samples, n)).astype(int)

    @property
    def grouped(self) -> bool:
        """--group-by-image: batches of each image's captions, its features once (CaptionSet.batch)."""
        return self.tcfg.group_by_image

    def _distributed(self, data: CaptionSet, rows):
        """The batches of `rows` (each step's global batch) as this process's replicas' pieces
        (model/distribute.py: replica_rows)."""
        import tensorflow as tf
        spec = (tf.TensorSpec([None, *self.model.feature_shape], tf.float32), tf.TensorSpec([None, None], tf.int32))
        if self.grouped:                        # the row of the features each caption describes
            spec += (tf.TensorSpec([None], tf.int32),)
        if data.word_object is not None:        # attention supervision: the cells each target word names
            spec += (tf.TensorSpec([None, None, data.object_cells.shape[2]], tf.float32),)
        n, mine = self.strategy.num_replicas_in_sync, local_replicas(self.strategy)

        def pieces():
            for r in rows:
                parts = replica_rows(r, n)
                for k in mine:
                    yield data.batch(parts[k], self.grouped)
        return dataset_of_pieces(self.strategy, pieces, spec, 4)

    def batches(self, epoch: int, start: int):
        t = self.tcfg
        return self._distributed(self.trainset, self.trainset.epoch_rows(epoch, t.batch_size, t.seed, start=start,
                                                                         grouped=self.grouped))

    def train_step(self, batch, step: int) -> float:
        return float(self._train_step(batch))

    def evaluate(self) -> dict:
        tot = cnt = 0.0
        for batch in self._distributed(self.valset, self.valset.epoch_rows(0, self.tcfg.batch_size, 0, shuffle=False,
                                                                                grouped=self.grouped)):
            s, n = self._eval_step(batch)
            tot, cnt = tot + float(s), cnt + float(n)
        return {"val_loss": tot / max(cnt, 1.0)}

    def after_epoch(self) -> None:
        from model.decoding import greedy
        if not len(self.sample_rows) or not self.writes:
            return
        vs, rows = self.valset, self.sample_rows
        for r, ids in zip(rows, greedy(self.model, np.asarray(vs.features[rows], np.float32), self.tcfg.sample_max_len)):
            ref = next((self.vocab.decode(vs.ids[k]) for k in np.flatnonzero(vs.image_index == r)), "-")
            self.log(f"    {Path(vs.file_names[r]).name}: {self.vocab.decode(ids)!r}   (reference: {ref!r})")

    def record_extra(self) -> dict:
        import keras
        return {"lr": float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))}

    def save_best(self, record: dict) -> None:
        meta = {"epoch": record["epoch"], "val_loss": record["val_loss"]}
        self.run.commit({DECODER: lambda p: checkpoint.save(p, self.model, None, meta)})

    def checkpointed(self) -> tuple[list, list]:
        return [self.model], [self.optimizer]
