"""Stage 2: re-attach the CNN (Inception v3 or EfficientNet-Lite0) and train encoder and decoder
jointly, from images.

Starts from a trained stage-1 run directory (never modified) and writes a new one whose
encoder.weights.h5 is the fine-tuned CNN; `infer` then runs that encoder on images.

Choices (see the README for the measurements behind them):
* BatchNorm, `--bn train` (im2txt's choice; the default from scratch and for Inception v3): the CNN's
  BatchNorm layers use batch statistics
  in training and their moving statistics at evaluation and inference. Their moving statistics are
  re-estimated from training images (calibrate_batchnorm) before the first step and before every
  evaluation: with random-init weights they start at 0/1, ~1000x off, and moving averages lag the
  weights as they change. Because that changes the features, the decoder's feature normalisation is
  re-fitted to the calibrated encoder before the first step and then kept fixed (an affine map the
  CNN learns to feed). `--bn frozen` keeps statistics, beta and gamma fixed and trains only the
  convolutions. Measured with random-init weights: frozen BatchNorm either does not move (SGD 5e-4)
  or collapses every image to one caption (SGD 5e-2, or Adam 1e-5: it moves every parameter by ~lr
  while this network's activations are ~1e-4); in training mode without calibration the LSTM
  saturates on ~1000x larger features and the CNN gets exactly zero gradient.
* Two optimisers with their own learning rates, from a recipe chosen by where the stage-1 encoder's
  weights came from (resolve_recipe): after ImageNet weights, the encoder's own recipe from the
  registry (Inception v3: im2txt's SGD 0.0005, BatchNorm training; EfficientNet-Lite0: Adam 3e-5,
  BatchNorm frozen); after random init, Adam 1e-3 on both, which has to learn from scratch.
  Gradient clipping per optimiser.
* Augmentation: random crops and brightness/contrast jitter only; no hue or saturation changes
  (colours are content) and no horizontal flips unless `--flip` (they falsify "left"/"right").
* The best pair (lowest validation loss, the stage-1 pair included) is what the run directory keeps.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract import encoder as enc
from extract.cache import feature_kind
from extract.images import image_dataset
from model import checkpoint
from model.config import override
from model.loop import Stage, fit, new_state, perplexity
from model.run import CHECKPOINT, CONFIG, DECODER, ENCODER, HISTORY, Run, load_run
from model.train import RESUMABLE_CHANGES, clip_by_global_norm, masked_token_loss
from prepare import captions_h5
from prepare.synth import content_accuracy
from prepare.errors import UserError
from prepare.files import sha256_file, write_json_atomic
from prepare.vocabulary import END_ID, START_ID


@dataclass
class FinetuneConfig:
    epochs: int = 2                  # passes over the training images
    max_steps: int = 0               # stop after this many steps in all (0: run all epochs)
    batch_size: int = 32             # images per step
    captions_per_image: int = 5      # captions of each image in a step (decoder batch = images x this)
    lr: float = 0.0                  # decoder learning rate (Adam); 0: the recipe's (RECIPES)
    cnn_lr: float = 0.0              # CNN learning rate; 0: the recipe's
    cnn_optimizer: str = "auto"      # "sgd", "adam" or "auto": the recipe's
    bn: str = "auto"                 # BatchNorm in training mode, calibrated ("train"), inference mode ("frozen"),
                                     # or "auto": the recipe's
    augment: bool = True             # random crop + brightness/contrast jitter
    flip: bool = False               # horizontal flips (off: they falsify "left"/"right" captions)
    clip_norm: float = 5.0           # gradient clipping by global norm, per optimiser
    mixed_precision: bool = False    # the CNN in bfloat16 (GPUs); the decoder stays float32
    seed: int = 0                    # data order and augmentation
    checkpoint_every: int = 100      # steps between checkpoints (also one per epoch)
    calibration_images: int = 256   # --bn train: training images that re-estimate BatchNorm statistics
    recipe: str = ""                 # filled in: "pretrained" or "from_scratch" (see resolve_recipe)
    samples: int = 3                 # validation images whose greedy captions print each epoch
    sample_max_len: int = 30         # max tokens of those captions


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


class ImageCaptionSet:
    """A split's images (failed ones excluded) with their captions, for joint training."""

    def __init__(self, captions_path: Path, split: str, manifest: dict):
        sp = captions_h5.read_split(captions_path, split)
        bad = {f["row"] for f in manifest["failed"].get(split, [])}
        self.paths = sp.image_paths(manifest.get("images_root") or captions_path.parent)
        self.rows = np.array([r for r in range(len(sp.image_ids)) if r not in bad], np.int64)
        self.caps_of: dict[int, np.ndarray] = {}
        order = np.argsort(sp.image_index, kind="stable")
        starts = np.searchsorted(sp.image_index[order], np.arange(len(sp.image_ids) + 1))
        for r in range(len(sp.image_ids)):
            self.caps_of[r] = order[starts[r]:starts[r + 1]]
        self.ids, self.lengths, self.split = sp.captions, sp.lengths, split
        self.file_names = sp.file_names
        self.truth = {r: json.loads(sp.objects[r])["objects"] for r in self.rows if sp.objects[r]}  # synth only

    def epoch_rows(self, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
        return self.rows[np.random.default_rng([seed, epoch]).permutation(len(self.rows))] if shuffle else self.rows

    def captions_for(self, rows: np.ndarray, k: int, rng: np.random.Generator | None):
        """-> ids [N, T] trimmed to the longest, cap_img [N] (position of each caption's image in rows)."""
        picks, owner = [], []
        for j, r in enumerate(rows):
            c = self.caps_of[int(r)]
            if len(c) > k:
                c = c[:k] if rng is None else rng.choice(c, size=k, replace=False)
            picks += list(c)
            owner += [j] * len(c)
        picks = np.asarray(picks)
        t = int(self.lengths[picks].max())
        return self.ids[picks, :t], np.asarray(owner, np.int32)


def calibrate_batchnorm(encoder, batches) -> int:
    """Set every BatchNorm layer's moving mean/variance to the average of its batch statistics over
    `batches` (uint8/float image batches), each computed in a training-mode forward pass, so inference
    mode computes what training mode does. Returns the number of images used.

    Needed twice with --bn train: before the first step (random-init moving statistics are 0/1, ~1000x
    off) and before every evaluation (moving averages lag the weights as they change)."""
    import tensorflow as tf
    bns = enc.batchnorm_layers(encoder)
    saved = [(x.momentum, x.trainable) for x in bns]
    n = 0
    try:
        for i, images in enumerate(batches):
            for x in bns:                 # moving = moving * m + batch * (1 - m): a running average
                x.momentum, x.trainable = i / (i + 1), True
            encoder(tf.cast(images, tf.float32), training=True)
            n += int(images.shape[0])
    finally:
        for x, (m, t) in zip(bns, saved):
            x.momentum, x.trainable = m, t
    return n


def fit_feature_normalisation(decoder, forward, batches) -> None:
    """Re-fit the decoder's per-dimension feature mean/std to what `forward` now produces."""
    f = np.concatenate([forward(images).numpy() for images in batches]).astype(np.float64)
    f = f.reshape(-1, f.shape[-1])                    # a grid: every position of every image
    decoder.set_feature_stats(f.mean(0), f.std(0))


def _check_stage1(stage1: Run, force: bool) -> tuple:
    """-> (decoder, vocab, config, manifest) of a trained stage-1 run whose encoder is the one that
    made the features its decoder was trained on."""
    enc_file = stage1.file(ENCODER)
    manifest = stage1.manifest() if stage1.is_run() else {}
    want = stage1.encoder_sha256() or manifest.get("weights", {}).get("sha256")
    if stage1.is_run() and (not enc_file.is_file() or sha256_file(enc_file) != want):
        raise UserError(f"{enc_file}: is not the encoder that made the features this decoder was trained on "
                        f"(checksum differs from {str(want)[:12]}...); restore the run directory from its training")
    model, vocab, config, manifest = load_run(stage1.path)
    hist = stage1.file(HISTORY)
    if not force and (not hist.is_file() or not json.loads(hist.read_text())):
        raise UserError(f"{stage1.path}: its decoder has not finished an epoch of stage-1 training. Fine-tuning the "
                        "CNN under a random LSTM corrupts it (Show and Tell, 2016); train it first with "
                        "`python -m model train`, or pass --force")
    return model, vocab, config, manifest


def _check_data(data: Path, stage1: Run, s1config: dict) -> Path:
    captions = data / "captions.h5"
    if not captions.is_file():
        raise UserError(f"{captions}: not found; pass the --data folder the stage-1 run was trained on")
    if sha256_file(captions) != s1config["data"]["captions_sha256"]:
        raise UserError(f"{captions} is not the captions.h5 that {stage1.path} was trained on (checksum differs)")
    return captions


def _open_run(out: Run, config: dict, vocab, manifest: dict, stage1: Run) -> bool:
    """Create the fine-tune's run directory, or check an existing one is this fine-tune. True: resume."""
    if out.is_run():
        if "finetune" not in out.config():
            raise UserError(f"{out.path} holds a stage-1 run, not a fine-tune; choose a new --out")
        out.check_resume(config, vocab, RESUMABLE_CHANGES | {"encoder"})
        config["encoder"] = out.config()["encoder"]
        return out.file(CHECKPOINT).exists()
    if not out.is_free_for_new_run():
        raise UserError(f"{out.path} exists and is not a fine-tune run directory; choose a new --out")
    out.create(config, vocab, manifest, stage1.file(ENCODER))
    return False


def _trainable_encoder(spec, size: int, cfg: FinetuneConfig, weights: Path, kind: str = "pooled"):
    """The stage-1 encoder, trainable; kind "grid" (attention decoder): its last feature map."""
    import keras
    if cfg.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        encoder, _ = enc.build_encoder(spec.name, "none", size, trainable=True, output=kind)
    finally:
        keras.config.set_dtype_policy("float32")
    enc.load_encoder_weights(encoder, weights)
    if cfg.bn == "frozen":
        # Statistics *and* beta/gamma fixed. With random-init weights the CNN's activations are tiny
        # (Inception's features ~1e-4), and Adam moves every parameter by ~lr a step: trainable beta
        # offsets of that size drown the image signal and every image gets the same caption (measured).
        for layer in enc.batchnorm_layers(encoder):
            layer.trainable = False
    return encoder


def augment(x, seed, size: int, flip: bool):
    """Random crop (85-100% of the side) and brightness/contrast jitter; flips only if asked.
    x float32 [B, S, S, 3] in 0..255; seed int32 [2]."""
    import tensorflow as tf
    b = tf.shape(x)[0]
    s = tf.random.stateless_uniform([b, 4], seed=seed)
    frac = 0.85 + 0.15 * s[:, 0:1]
    y0, x0 = (1 - frac) * s[:, 1:2], (1 - frac) * s[:, 2:3]
    boxes = tf.concat([y0, x0, y0 + frac, x0 + frac], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(b), [size, size])
    if flip:
        x = tf.where((s[:, 3] < 0.5)[:, None, None, None], x[:, :, ::-1], x)
    bc = tf.random.stateless_uniform([b, 2], seed=seed + 1)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * (0.8 + 0.4 * bc[:, 0])[:, None, None, None] + mean + (bc[:, 1] - 0.5)[:, None, None, None] * 40
    return tf.clip_by_value(x, 0.0, 255.0)


def finetune(run, data, out, *, overrides: dict | None = None, force: bool = False, progress: bool = True,
             log=print) -> dict:
    import keras
    stage1, out, data = Run(run), Run(out), Path(data)
    if out.path.resolve() == stage1.path.resolve():
        raise UserError("--out must differ from --run: the stage-1 run directory is never modified")
    cfg = override(FinetuneConfig(), overrides or {}, "finetune config")
    keras.utils.set_random_seed(cfg.seed)       # dropout masks (their generator states are checkpointed)
    decoder, vocab, s1config, manifest = _check_stage1(stage1, force)
    captions = _check_data(data, stage1, s1config)
    cfg = resolve_recipe(cfg, manifest)
    config = {"model": s1config["model"], "train": s1config["train"], "finetune": dataclasses.asdict(cfg),
              "data": s1config["data"], "stage1_run": str(stage1.path.resolve()),
              "encoder": {"fine_tuned": True, "from_sha256": sha256_file(stage1.file(ENCODER)), "sha256": None}}
    with out.lock():
        resume = _open_run(out, config, vocab, manifest, stage1)
        job = _Joint(out, config, cfg, decoder, vocab, manifest, captions, stage1, log)
        state = new_state()
        if resume:
            state = checkpoint.load(out.file(CHECKPOINT), [decoder, job.encoder], job.optimizers)
            log(f"resuming {out.path} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
        log(f"recipe {cfg.recipe}: decoder Adam {cfg.lr:g}, {job.spec.title} {cfg.cnn_optimizer} {cfg.cnn_lr:g}, "
            f"BatchNorm {'training mode (calibrated)' if job.bn_train else 'frozen'}")
        t_start = time.time()
        if state["best_val"] is None:
            job.measure_start(state)
        state = fit(job.stage(), state, progress, log)
    log(f"fine-tuned run directory {out.path}: best val perplexity {perplexity(state['best_val']):.2f} "
        f"(stage 1 on images: {perplexity(state['start']['val_loss']):.2f})")
    return {"run": str(out.path), "steps": state["step"], "history": state["history"], "start": state["start"],
            "calibrated": state.get("calibrated"), "best_val": state["best_val"],
            "seconds": round(time.time() - t_start, 1)}


class _Joint:
    """Stage 2 for the shared loop: images through the trainable CNN into the decoder."""

    def __init__(self, out: Run, config: dict, cfg: FinetuneConfig, decoder, vocab, manifest: dict, captions: Path,
                 stage1: Run, log):
        import keras
        self.out, self.config, self.cfg, self.decoder, self.vocab, self.log = out, config, cfg, decoder, vocab, log
        self.spec, self.size = enc.spec_of_manifest(manifest), int(manifest["image_size"])
        self.encoder = _trainable_encoder(self.spec, self.size, cfg, stage1.file(ENCODER), feature_kind(manifest))
        self.bn_train = cfg.bn == "train"
        self.trainset = ImageCaptionSet(captions, "train", manifest)
        self.valset = ImageCaptionSet(captions, "val", manifest)
        from model.optim import FusedAdam
        opt_dec = FusedAdam(cfg.lr)
        opt_cnn = keras.optimizers.SGD(cfg.cnn_lr) if cfg.cnn_optimizer == "sgd" else FusedAdam(cfg.cnn_lr)
        self.dec_vars, self.cnn_vars = decoder.trainable_variables, self.encoder.trainable_variables
        opt_dec.build(self.dec_vars)
        opt_cnn.build(self.cnn_vars)
        self.optimizers = [opt_dec, opt_cnn]
        self.forward = enc.compiled_forward(self.encoder)
        self._step = self._compiled_step()
        self._calib: list = []               # the first training images, unaugmented, decoded once
        from model.decoder import compiled_decoding
        self._init, self._dstep = compiled_decoding(decoder)

    def _compiled_step(self):
        import tensorflow as tf
        cfg, (opt_dec, opt_cnn) = self.cfg, self.optimizers

        @tf.function(reduce_retracing=True)
        def train_step(images, ids, cap_img, seed):
            x = tf.cast(images, tf.float32)
            if cfg.augment:
                x = augment(x, seed, self.size, cfg.flip)
            with tf.GradientTape() as tape:
                f = tf.cast(self.encoder(x, training=self.bn_train), tf.float32)        # [B, D] or [B, P, D]
                loss_sum, n = masked_token_loss(self.decoder, tf.gather(f, cap_img), ids, True)
                loss = loss_sum / n
            g = tape.gradient(loss, self.dec_vars + self.cnn_vars)
            gd, _ = clip_by_global_norm(g[:len(self.dec_vars)], cfg.clip_norm)
            gc, _ = clip_by_global_norm(g[len(self.dec_vars):], cfg.clip_norm)
            opt_dec.apply_gradients(zip(gd, self.dec_vars))
            opt_cnn.apply_gradients(zip(gc, self.cnn_vars))
            return loss

        @tf.function(reduce_retracing=True)
        def eval_loss(f, ids):
            return masked_token_loss(self.decoder, f, ids, False)
        self._eval_loss = eval_loss
        return train_step

    # ---- data ------------------------------------------------------------------------------
    def batches(self, epoch: int, start: int):
        """(images, caption ids, caption -> image, rng seed) of one epoch from batch `start` on;
        captions of an image unreadable now sit the step out."""
        cfg, ts = self.cfg, self.trainset
        order = ts.epoch_rows(epoch, cfg.seed)
        paths = [ts.paths[r] for r in order[start * cfg.batch_size:]]
        for b, (imgs, ok, _) in enumerate(image_dataset(paths, self.size, cfg.batch_size), start=start):
            rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            ids, owner = ts.captions_for(rows, cfg.captions_per_image, np.random.default_rng([cfg.seed, epoch, b]))
            readable = ok.numpy()[owner]
            yield imgs, ids[readable], owner[readable]

    def train_step(self, batch, step: int) -> float:
        import tensorflow as tf
        imgs, ids, owner = batch
        if not len(ids):
            return 0.0
        return float(self._step(imgs, ids, owner, tf.constant([self.cfg.seed, step], tf.int32)))

    def calibration_batches(self) -> list:
        if not self._calib:
            paths = [self.trainset.paths[r] for r in self.trainset.rows[:self.cfg.calibration_images]]
            self._calib.extend(imgs for imgs, _, _ in image_dataset(paths, self.size, self.cfg.batch_size))
        return self._calib

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, calibrate: bool | None = None) -> dict:
        from model.decoder import greedy_decode
        vs, cfg = self.valset, self.cfg
        if self.bn_train if calibrate is None else calibrate:
            calibrate_batchnorm(self.encoder, self.calibration_batches())
        paths = [vs.paths[r] for r in vs.rows]
        feats = np.concatenate([self.forward(imgs).numpy() for imgs, _, _ in image_dataset(paths, self.size, cfg.batch_size)])
        tot = cnt = 0.0
        for i in range(0, len(vs.rows), 64):
            ids, owner = vs.captions_for(vs.rows[i:i + 64], 1000, None)
            s_, n_ = self._eval_loss(feats[i:i + 64][owner], ids)
            tot, cnt = tot + float(s_), cnt + float(n_)
        self.captions = greedy_decode(self._init, self._dstep, feats, START_ID, END_ID, cfg.sample_max_len)
        texts = {r: self.vocab.decode(c) for r, c in zip(vs.rows, self.captions) if r in vs.truth}
        return {"val_loss": tot / max(cnt, 1.0), "distinct_captions": len({tuple(c) for c in self.captions}),
                "val_content": content_accuracy(texts, vs.truth)["exact"] if texts else None}

    def describe(self, ev: dict) -> str:
        c = ev["val_content"]
        return (f"val loss {ev['val_loss']:.3f} (perplexity {perplexity(ev['val_loss']):.2f}), "
                f"{ev['distinct_captions']} distinct greedy captions of {len(self.valset.rows)} val images"
                + ("" if c is None else f", content accuracy {100 * c:.1f}%"))

    def samples(self) -> None:
        for r, ids in list(zip(self.valset.rows, self.captions))[:self.cfg.samples]:
            self.log(f"    {Path(self.valset.file_names[r]).name}: {self.vocab.decode(ids)!r}")

    def measure_start(self, state: dict) -> None:
        """The starting point is the stage-1 pair: measure it, keep it as the best so far, then (BatchNorm
        in training mode) re-estimate BatchNorm statistics and the decoder's normalisation."""
        ev = state["start"] = self.evaluate(calibrate=False)
        self.log(f"stage-1 model on images: {self.describe(ev)}")
        self.save_best({})
        state["best_val"] = ev["val_loss"]
        if self.bn_train:
            n = calibrate_batchnorm(self.encoder, self.calibration_batches())
            fit_feature_normalisation(self.decoder, self.forward, self.calibration_batches())
            ev = state["calibrated"] = self.evaluate(calibrate=False)
            self.log(f"BatchNorm statistics and the decoder's feature normalisation re-estimated on {n} training "
                     f"images: {self.describe(ev)}")

    def save_best(self, _rec: dict) -> None:
        """Encoder, decoder and the config naming the encoder's checksum: one atomic commit."""
        def config(p: Path) -> None:
            self.config["encoder"]["sha256"] = sha256_file(p.parent / ENCODER)
            write_json_atomic(p, self.config)
        self.out.commit({ENCODER: lambda p: enc.save_encoder_weights(self.encoder, p),
                         DECODER: lambda p: checkpoint.save(p, self.decoder), CONFIG: config})

    def stage(self) -> Stage:
        cfg = self.cfg
        return Stage(
            name="finetune", run=self.out, epochs=cfg.epochs, max_steps=cfg.max_steps,
            checkpoint_every=cfg.checkpoint_every, steps_per_epoch=math.ceil(len(self.trainset.rows) / cfg.batch_size),
            batch_size=cfg.batch_size, batches=self.batches, train_step=self.train_step, evaluate=self.evaluate,
            describe=self.describe, after_epoch=self.samples, save_best=self.save_best,
            save_checkpoint=lambda state: checkpoint.save(self.out.file(CHECKPOINT), [self.decoder, self.encoder],
                                                          self.optimizers, state),
            nan_hint="lower --cnn-lr/--lr")
