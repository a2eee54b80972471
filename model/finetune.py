"""Stage 2: re-attach the CNN (Inception v3 or EfficientNet-Lite0) and train encoder and decoder
jointly, from images.

Starts from a trained stage-1 run directory (never modified) and writes a new one whose
encoder.weights.h5 is the fine-tuned CNN; `infer` then runs that encoder on images. Reading order:
`finetune` (checks, recipe, run directory) -> FinetunePhase driven by model/loop.py's `fit`; the
trainable CNN, its BatchNorm and augmentation are model/cnn.py (measurements: docs/results.md).

* Two optimisers with their own learning rates, from a recipe chosen by where the stage-1 encoder's
  weights came from (resolve_recipe): after ImageNet weights, the encoder's own recipe from the
  registry (Inception v3: im2txt's SGD 0.0005, BatchNorm training; EfficientNet-Lite0: Adam 3e-5,
  BatchNorm frozen); after random init, Adam 1e-3 on both, which has to learn from scratch.
  Gradient clipping per optimiser.
* With BatchNorm in training mode the decoder's feature normalisation is re-fitted to the
  calibrated encoder before the first step and then kept fixed (an affine map the CNN learns to
  feed). Measured with random-init weights: frozen BatchNorm either does not move (SGD 5e-4) or
  collapses every image to one caption (SGD 5e-2, or Adam 1e-5: it moves every parameter by ~lr
  while this network's activations are ~1e-4); in training mode without calibration the LSTM
  saturates on ~1000x larger features and the CNN gets exactly zero gradient.
* The best pair (lowest validation loss, the stage-1 pair included) is what the run directory keeps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from extract import encoder as enc
from extract.cache import feature_kind
from extract.images import image_dataset
from model import checkpoint
from model.cnn import augment, calibrate_batchnorm, fit_feature_normalisation, trainable_encoder
from model.config import FinetuneConfig, override
from model.data import ImageCaptionSet
from model.distribute import dataset_of_pieces, local_replicas, make_strategy, replica_rows, worker_role
from model.loop import TrainingPhase, fit, open_run, perplexity
from model.metrics import content_accuracy
from model.run import CHECKPOINT, CONFIG, DECODER, ENCODER, HISTORY, Run, load_run
from model.steps import all_reduce_gradients, clip_by_global_norm, masked_token_loss, summed_gradients
from model.train import RESUMABLE_CHANGES
from prepare.errors import UserError
from prepare.files import sha256_file, write_json_atomic


# A random-init encoder (--weights none) must learn from scratch: Adam for both, BatchNorm in
# training mode (measured). After ImageNet weights (or a weights file), each encoder's own recipe
# from the registry (extract/encoder.py: EncoderSpec.pretrained_recipe).
FROM_SCRATCH = {"lr": 1e-3, "cnn_lr": 1e-3, "cnn_optimizer": "adam", "bn": "train"}


def resolve_recipe(cfg: "FinetuneConfig", manifest: dict) -> "FinetuneConfig":
    """Fill the settings left at 'auto' (0 / "auto") from the recipe; returns a new config."""
    scratch = manifest["weights"]["source"]["kind"] == "none"
    r = FROM_SCRATCH if scratch else enc.spec_of_manifest(manifest).pretrained_recipe
    auto = lambda v, key: r[key] if v in (0, 0.0, "auto") else v  # noqa: E731
    return dataclasses.replace(cfg, recipe="from_scratch" if scratch else "pretrained", lr=auto(cfg.lr, "lr"),
                               cnn_lr=auto(cfg.cnn_lr, "cnn_lr"), bn=auto(cfg.bn, "bn"),
                               cnn_optimizer=auto(cfg.cnn_optimizer, "cnn_optimizer"))


def _check_stage1(stage1: Run, force: bool) -> None:
    """UserError unless `stage1` is a trained stage-1 run whose encoder is the one that made the
    features its decoder was trained on (file checks only: no TensorFlow operation yet)."""
    enc_file = stage1.file(ENCODER)
    manifest = stage1.manifest() if stage1.is_run() else {}
    want = stage1.encoder_sha256() or manifest.get("weights", {}).get("sha256")
    if stage1.is_run() and (not enc_file.is_file() or sha256_file(enc_file) != want):
        raise UserError(f"{enc_file}: is not the encoder that made the features this decoder was trained on "
                        f"(checksum differs from {str(want)[:12]}...); restore the run directory from its training")
    stage1.verify()
    hist = stage1.file(HISTORY)
    if not force and (not hist.is_file() or not json.loads(hist.read_text())):
        raise UserError(f"{stage1.path}: its decoder has not finished an epoch of stage-1 training. Fine-tuning the "
                        "CNN under a random LSTM corrupts it (Show and Tell, 2016); train it first with "
                        "`python -m model train`, or pass --force")


def check_data(data: Path, stage1: Run, s1config: dict) -> Path:
    captions = data / "captions.h5"
    if not captions.is_file():
        raise UserError(f"{captions}: not found; pass the --data folder the stage-1 run was trained on")
    if sha256_file(captions) != s1config["data"]["captions_sha256"]:
        raise UserError(f"{captions} is not the captions.h5 that {stage1.path} was trained on (checksum differs)")
    return captions


def _is_finetune(run: Run) -> None:
    if "finetune" not in run.config():
        raise UserError(f"{run.path} holds a stage-1 run, not a fine-tune; choose a new --out")


def finetune(run, data, out, *, overrides: dict | None = None, force: bool = False, progress: bool = True,
             log=print) -> dict:
    import keras
    stage1, out, data = Run(run), Run(out), Path(data)
    if out.path.resolve() == stage1.path.resolve():
        raise UserError("--out must differ from --run: the stage-1 run directory is never modified")
    cfg = override(FinetuneConfig(), overrides or {}, "finetune config")
    _check_stage1(stage1, force)
    s1config, manifest = stage1.config(), stage1.manifest()
    captions = check_data(data, stage1, s1config)
    cfg = resolve_recipe(cfg, manifest)
    # multiworker: TF_CONFIG is checked here, before anything is written and before any TensorFlow operation
    strategy = make_strategy(cfg.strategy, cfg.peer_timeout)
    chief, log = worker_role(strategy, out.path, log)        # only the chief writes the run directory
    keras.utils.set_random_seed(cfg.seed)       # dropout masks (their generator states are checkpointed)
    with strategy.scope():                      # the decoder's variables: mirrored over the replicas
        decoder, vocab, _, _ = load_run(stage1.path)
    config = {"model": s1config["model"], "train": s1config["train"], "finetune": dataclasses.asdict(cfg),
              "data": s1config["data"], "stage1_run": str(stage1.path.resolve()),
              "encoder": {"fine_tuned": True, "from_sha256": sha256_file(stage1.file(ENCODER)), "sha256": None}}
    with out.lock() if chief else contextlib.nullcontext():
        resume = (open_run(out, config, vocab, RESUMABLE_CHANGES | {"encoder"}, same_kind=_is_finetune,
                           kept=("encoder",), create=lambda: out.create(config, vocab, manifest, stage1.file(ENCODER)))
                  if chief else out.file(CHECKPOINT).is_file())
        phase = FinetunePhase(out, config, cfg, decoder, vocab, manifest, captions, stage1, log, strategy)
        log(f"recipe {cfg.recipe}: decoder Adam {cfg.lr:g}, {phase.spec.title} {cfg.cnn_optimizer} {cfg.cnn_lr:g}, "
            f"BatchNorm {'training mode (calibrated)' if phase.bn_train else 'frozen'}")
        t_start = time.time()
        state = fit(phase, resume, progress and chief, log)
    if chief:
        log(f"fine-tuned run directory {out.path}: best val perplexity {perplexity(state['best_val']):.2f} "
            f"(stage 1 on images: {perplexity(state['start']['val_loss']):.2f})")
    return {"run": str(out.path), "steps": state["step"], "history": state["history"], "start": state["start"],
            "calibrated": state.get("calibrated"), "best_val": state["best_val"],
            "seconds": round(time.time() - t_start, 1)}


def commit_trained_encoder(run: Run, config: dict, encoder, decoder, meta: dict | None = None) -> None:
    """A trained CNN's run (finetune, scst --train-cnn): encoder, decoder and the config naming the
    encoder's checksum (config["encoder"]["sha256"], filled in here), in one atomic commit."""
    def write_config(p: Path) -> None:
        config["encoder"]["sha256"] = sha256_file(p.parent / ENCODER)
        write_json_atomic(p, config)
    run.commit({ENCODER: lambda p: enc.save_encoder_weights(encoder, p),
                DECODER: lambda p: checkpoint.save(p, decoder, None, meta), CONFIG: write_config})


class ImageStream:
    """Decoded images of `paths` in order (extract.images.image_dataset, batches of `batch`), taken
    `m` at a time: (uint8 [m, S, S, 3], ok [m])."""

    def __init__(self, paths: list, size: int, batch: int):
        self.size, self.it = size, iter(image_dataset(paths, size, batch)) if paths else iter(())
        self.imgs, self.ok = np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool)

    def take(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self.ok) < m:
            imgs, ok, _ = next(self.it)
            self.imgs, self.ok = np.concatenate([self.imgs, imgs.numpy()]), np.concatenate([self.ok, ok.numpy()])
        out = self.imgs[:m], self.ok[:m]
        self.imgs, self.ok = self.imgs[m:], self.ok[m:]
        return out


class FinetunePhase(TrainingPhase):
    """Stage 2: images through the trainable CNN into the decoder, two optimisers; evaluation by
    validation loss, distinct greedy captions and (built-in data) content accuracy."""
    name = "finetune"
    nan_hint = "lower --cnn-lr/--lr"

    def __init__(self, out: Run, config: dict, cfg: FinetuneConfig, decoder, vocab, manifest: dict, captions: Path,
                 stage1: Run, log, strategy):
        import keras
        self.trainset = ImageCaptionSet(captions, "train", manifest)
        self.valset = ImageCaptionSet(captions, "val", manifest)
        super().__init__(out, cfg.epochs, cfg.max_steps, cfg.checkpoint_every,
                         math.ceil(len(self.trainset.rows) / cfg.batch_size), cfg.batch_size, strategy)
        self.out, self.config, self.cfg, self.decoder, self.vocab, self.log = out, config, cfg, decoder, vocab, log
        self.spec, self.size = enc.spec_of_manifest(manifest), int(manifest["image_size"])
        self.bn_train = cfg.bn == "train"
        from model.optim import FusedAdam
        with strategy.scope():
            self.encoder = trainable_encoder(self.spec, self.size, cfg, stage1.file(ENCODER), feature_kind(manifest))
            opt_dec = FusedAdam(cfg.lr)
            opt_cnn = keras.optimizers.SGD(cfg.cnn_lr) if cfg.cnn_optimizer == "sgd" else FusedAdam(cfg.cnn_lr)
            self.dec_vars, self.cnn_vars = decoder.trainable_variables, self.encoder.trainable_variables
            opt_dec.build(self.dec_vars)
            opt_cnn.build(self.cnn_vars)
        self.optimizers = [opt_dec, opt_cnn]
        if strategy.num_replicas_in_sync > 1:    # the step sums the replicas' gradients itself, before clipping
            for opt in self.optimizers:
                summed_gradients(opt)
        self.forward = enc.compiled_forward(self.encoder)
        self._step = self._compiled_step()
        self._calib: list = []               # the first training images, unaugmented, decoded once

    def _compiled_step(self):
        """One step over a (distributed) batch: each replica runs the CNN on its own images and the
        decoder on their captions; its loss is its token-loss sum over the global batch's token count,
        the gradients are summed over the replicas before each optimiser's clipping (as model/steps.py's
        step). Augmentation draws from (seed, step, replica); BatchNorm in training mode normalises
        each replica's images by their own statistics (not synchronised, as PyTorch DDP without SyncBN;
        --bn train recalibrates the moving statistics on whole batches before every evaluation)."""
        import tensorflow as tf
        cfg, (opt_dec, opt_cnn), strategy = self.cfg, self.optimizers, self.strategy
        variables = self.dec_vars + self.cnn_vars

        def replica_step(images, ids, cap_img, seed):
            ctx = tf.distribute.get_replica_context()
            x = tf.cast(images, tf.float32)
            if cfg.augment:
                x = augment(x, tf.stack([seed[0], seed[1] * ctx.num_replicas_in_sync + ctx.replica_id_in_sync_group]),
                            self.size, cfg.flip)
            with tf.GradientTape() as tape:
                f = tf.cast(self.encoder(x, training=self.bn_train), tf.float32)        # [B, D] or [B, P, D]
                loss_sum, n = masked_token_loss(self.decoder, f, ids, True, None, cap_img)   # each image projected once
                loss = loss_sum / tf.maximum(ctx.all_reduce(tf.distribute.ReduceOp.SUM, n), 1.0)
            g = tape.gradient(loss, variables)
            if ctx.num_replicas_in_sync > 1:
                g = all_reduce_gradients(ctx, g)
            gd, _ = clip_by_global_norm(g[:len(self.dec_vars)], cfg.clip_norm)
            gc, _ = clip_by_global_norm(g[len(self.dec_vars):], cfg.clip_norm)
            opt_dec.apply_gradients(zip(gd, self.dec_vars))
            opt_cnn.apply_gradients(zip(gc, self.cnn_vars))
            return loss

        @tf.function(reduce_retracing=True)
        def train_step(batch, seed):
            per = strategy.run(replica_step, args=(*batch, seed))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per, axis=None)

        @tf.function(reduce_retracing=True)
        def eval_loss(f, ids, owner):
            return masked_token_loss(self.decoder, f, ids, False, None, owner)
        self._eval_loss = eval_loss
        return train_step

    # ---- data ------------------------------------------------------------------------------
    def batches(self, epoch: int, start: int):
        """(images, caption ids, caption -> image) of one epoch from batch `start` on, as this
        process's replicas' pieces of each global batch (model/distribute.py: replica_rows; one
        process: the whole batch). The captions of each global batch are drawn as one process draws
        them, then each replica takes its images' captions; captions of an image unreadable now sit
        the step out."""
        import tensorflow as tf
        cfg, ts, B = self.cfg, self.trainset, self.cfg.batch_size
        order = ts.epoch_rows(epoch, cfg.seed)
        n, mine = self.strategy.num_replicas_in_sync, local_replicas(self.strategy)
        steps = range(start, self.steps_per_epoch)
        pieces_of = {b: replica_rows(np.arange(len(order[b * B:(b + 1) * B])), n) for b in steps}
        mine_paths = [ts.paths[order[b * B + i]] for b in steps for k in mine for i in pieces_of[b][k]]

        def pieces():
            images = ImageStream(mine_paths, self.size, B)
            for b in steps:
                rows = order[b * B:(b + 1) * B]
                ids, owner = ts.captions_for(rows, cfg.captions_per_image, np.random.default_rng([cfg.seed, epoch, b]))
                for k in mine:
                    part = pieces_of[b][k]
                    imgs, ok = images.take(len(part))
                    sel = np.isin(owner, part)
                    own = (owner[sel] - (part[0] if len(part) else 0)).astype(np.int32)
                    readable = ok[own]
                    yield imgs, ids[sel][readable], own[readable]
        spec = (tf.TensorSpec([None, self.size, self.size, 3], tf.uint8), tf.TensorSpec([None, None], tf.int32),
                tf.TensorSpec([None], tf.int32))
        return dataset_of_pieces(self.strategy, pieces, spec, 2)

    def train_step(self, batch, step: int) -> float:
        import tensorflow as tf
        if self.strategy.num_replicas_in_sync == 1 and not batch[1].shape[0]:
            return 0.0                     # every image of the batch unreadable (with replicas: a zero step)
        return float(self._step(batch, tf.constant([self.cfg.seed, step], tf.int32)))

    def calibration_batches(self) -> list:
        if not self._calib:
            paths = [self.trainset.paths[r] for r in self.trainset.rows[:self.cfg.calibration_images]]
            self._calib.extend(imgs for imgs, _, _ in image_dataset(paths, self.size, self.cfg.batch_size))
        return self._calib

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, calibrate: bool | None = None) -> dict:
        from model.decoding import greedy
        vs, cfg = self.valset, self.cfg
        if self.bn_train if calibrate is None else calibrate:
            calibrate_batchnorm(self.encoder, self.calibration_batches())
        paths = [vs.paths[r] for r in vs.rows]
        feats = np.concatenate([self.forward(imgs).numpy() for imgs, _, _ in image_dataset(paths, self.size, cfg.batch_size)])
        tot = cnt = 0.0
        for i in range(0, len(vs.rows), 64):
            ids, owner = vs.captions_for(vs.rows[i:i + 64], 1000, None)
            s_, n_ = self._eval_loss(feats[i:i + 64], ids, owner)
            tot, cnt = tot + float(s_), cnt + float(n_)
        self.captions = greedy(self.decoder, feats, cfg.sample_max_len)
        texts = {r: self.vocab.decode(c) for r, c in zip(vs.rows, self.captions) if r in vs.truth}
        return {"val_loss": tot / max(cnt, 1.0), "distinct_captions": len({tuple(c) for c in self.captions}),
                "val_content": content_accuracy(texts, vs.truth)["exact"] if texts else None}

    def describe(self, ev: dict) -> str:
        c = ev["val_content"]
        return (f"val loss {ev['val_loss']:.3f} (perplexity {perplexity(ev['val_loss']):.2f}), "
                f"{ev['distinct_captions']} distinct greedy captions of {len(self.valset.rows)} val images"
                + ("" if c is None else f", content accuracy {100 * c:.1f}%"))

    def after_epoch(self) -> None:
        for r, ids in list(zip(self.valset.rows, self.captions))[:self.cfg.samples]:
            self.log(f"    {Path(self.valset.file_names[r]).name}: {self.vocab.decode(ids)!r}")

    def start(self, state: dict) -> None:
        """The starting point is the stage-1 pair: measure it, keep it as the best so far, then (BatchNorm
        in training mode) re-estimate BatchNorm statistics and the decoder's normalisation."""
        ev = state["start"] = self.evaluate(calibrate=False)
        self.log(f"stage-1 model on images: {self.describe(ev)}")
        if self.writes:                   # multiworker: the chief
            self.save_best({})
        state["best_val"] = ev["val_loss"]
        if self.bn_train:
            n = calibrate_batchnorm(self.encoder, self.calibration_batches())
            fit_feature_normalisation(self.decoder, self.forward, self.calibration_batches())
            ev = state["calibrated"] = self.evaluate(calibrate=False)
            self.log(f"BatchNorm statistics and the decoder's feature normalisation re-estimated on {n} training "
                     f"images: {self.describe(ev)}")

    def save_best(self, _rec: dict) -> None:
        commit_trained_encoder(self.out, self.config, self.encoder, self.decoder)

    def checkpointed(self) -> tuple[list, list]:
        return [self.decoder, self.encoder], self.optimizers
