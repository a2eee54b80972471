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
  registry (Inception v3: im2txt's SGD 0.0005, BatchNorm training; EfficientNet-Lite0: Adam 1e-4,
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
from extract.images import image_dataset
from model import checkpoint
from model.config import override
from model.train import RESUMABLE_CHANGES, load_run, masked_token_loss, perplexity, plot_history
from prepare import captions_h5
from prepare.synth import content_accuracy
from prepare.util import UserError, sha256_file, write_json_atomic
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
    decoder.set_feature_stats(f.mean(0), f.std(0))


def _check_stage1(run: Path, force: bool) -> tuple:
    model, vocab, config, manifest = load_run(run)
    hist = run / "history.json"
    if not force and (not hist.is_file() or not json.loads(hist.read_text())):
        raise UserError(f"{run}: its decoder has not finished an epoch of stage-1 training. Fine-tuning the CNN "
                        "under a random LSTM corrupts it (Show and Tell, 2016); train it first with "
                        "`python -m model train`, or pass --force")
    enc_file = run / "encoder.weights.h5"
    want = config.get("encoder", {}).get("sha256") or manifest["weights"]["sha256"]
    if not enc_file.is_file() or sha256_file(enc_file) != want:
        raise UserError(f"{enc_file}: is not the encoder that made the features this decoder was trained on "
                        f"(checksum differs from {want[:12]}...); restore the run directory from its training")
    return model, vocab, config, manifest


def finetune(run, data, out, *, overrides: dict | None = None, force: bool = False, progress: bool = True,
             log=print) -> dict:
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from model.decoder import compiled_decoding, greedy_decode
    run, data, out = Path(run), Path(data), Path(out)
    if out.resolve() == run.resolve():
        raise UserError("--out must differ from --run: the stage-1 run directory is never modified")
    cfg = override(FinetuneConfig(), overrides or {}, "finetune config")
    if cfg.bn not in ("frozen", "train", "auto"):
        raise UserError(f"--bn {cfg.bn!r}: choose frozen, train or auto")
    keras.utils.set_random_seed(cfg.seed)       # dropout masks (their generator states are checkpointed)
    decoder, vocab, s1config, manifest = _check_stage1(run, force)
    captions = data / "captions.h5"
    if not captions.is_file():
        raise UserError(f"{captions}: not found; pass the --data folder the stage-1 run was trained on")
    if sha256_file(captions) != s1config["data"]["captions_sha256"]:
        raise UserError(f"{captions} is not the captions.h5 that {run} was trained on (checksum differs)")
    cfg = resolve_recipe(cfg, manifest)
    if cfg.cnn_optimizer not in ("sgd", "adam"):
        raise UserError(f"--cnn-optimizer {cfg.cnn_optimizer!r}: choose sgd, adam or auto")
    size = int(manifest["image_size"])
    spec = enc.spec_of_manifest(manifest)
    config = {"model": s1config["model"], "train": s1config["train"], "finetune": dataclasses.asdict(cfg),
              "data": s1config["data"], "stage1_run": str(run.resolve()),
              "encoder": {"fine_tuned": True, "from_sha256": sha256_file(run / "encoder.weights.h5"), "sha256": None}}

    resume = (out / "config.json").exists()
    if resume:
        old = json.loads((out / "config.json").read_text())
        diffs = [k for k in config["finetune"]
                 if k not in RESUMABLE_CHANGES and old["finetune"].get(k) != config["finetune"][k]]
        if old["stage1_run"] != config["stage1_run"] or diffs:
            raise UserError(f"{out} holds a fine-tune with other settings ({', '.join(diffs) or 'stage1_run'}); "
                            "resume with the same settings or choose a new --out")
        config["encoder"] = old["encoder"]
        resume = (out / "checkpoints" / "latest.h5").exists()
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a fine-tune run directory; choose a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        vocab.save(out / "vocab.json")
        write_json_atomic(out / "features_manifest.json", manifest)
    write_json_atomic(out / "config.json", config)

    if cfg.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        encoder, _ = enc.build_encoder(spec.name, "none", size, trainable=True)
    finally:
        keras.config.set_dtype_policy("float32")
    enc.load_encoder_weights(encoder, run / "encoder.weights.h5")
    if cfg.bn == "frozen":
        # Statistics *and* beta/gamma fixed. With random-init weights Inception's activations are
        # tiny (features ~1e-4), and Adam moves every parameter by ~lr a step: trainable beta offsets
        # of that size drown the image signal and every image gets the same caption (measured).
        for layer in enc.batchnorm_layers(encoder):
            layer.trainable = False
    trainset = ImageCaptionSet(captions, "train", manifest)
    valset = ImageCaptionSet(captions, "val", manifest)
    steps_per_epoch = math.ceil(len(trainset.rows) / cfg.batch_size)
    opt_dec = keras.optimizers.Adam(cfg.lr)
    opt_cnn = (keras.optimizers.SGD(cfg.cnn_lr) if cfg.cnn_optimizer == "sgd" else keras.optimizers.Adam(cfg.cnn_lr))
    dec_vars, cnn_vars = decoder.trainable_variables, encoder.trainable_variables
    opt_dec.build(dec_vars)
    opt_cnn.build(cnn_vars)
    state = {"step": 0, "epoch": 0, "batch": 0, "best_val": None, "history": [], "epoch_losses": []}
    if resume:
        state = checkpoint.load(out / "checkpoints" / "latest.h5", [decoder, encoder], [opt_dec, opt_cnn])
        log(f"resuming {out} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    bn_train = cfg.bn == "train"
    log(f"recipe {cfg.recipe}: decoder Adam {cfg.lr:g}, {spec.title} {cfg.cnn_optimizer} {cfg.cnn_lr:g}, "
        f"BatchNorm {'training mode (calibrated)' if bn_train else 'frozen'}")

    def augment(x, seed):                                    # x float32 [B, S, S, 3] in 0..255
        b = tf.shape(x)[0]
        s = tf.random.stateless_uniform([b, 4], seed=seed)
        frac = 0.85 + 0.15 * s[:, 0:1]                      # crop side 85-100%
        y0, x0 = (1 - frac) * s[:, 1:2], (1 - frac) * s[:, 2:3]
        boxes = tf.concat([y0, x0, y0 + frac, x0 + frac], axis=1)
        x = tf.image.crop_and_resize(x, boxes, tf.range(b), [size, size])
        if cfg.flip:
            x = tf.where((s[:, 3] < 0.5)[:, None, None, None], x[:, :, ::-1], x)
        bc = tf.random.stateless_uniform([b, 2], seed=seed + 1)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * (0.8 + 0.4 * bc[:, 0])[:, None, None, None] + mean + (bc[:, 1] - 0.5)[:, None, None, None] * 40
        return tf.clip_by_value(x, 0.0, 255.0)

    @tf.function(reduce_retracing=True)
    def train_step(images, ids, cap_img, seed):
        x = tf.cast(images, tf.float32)
        if cfg.augment:
            x = augment(x, seed)
        with tf.GradientTape() as tape:
            f = tf.cast(encoder(x, training=bn_train), tf.float32)               # [B, D]
            loss_sum, n = masked_token_loss(decoder, tf.gather(f, cap_img), ids, True)
            loss = loss_sum / n
        g = tape.gradient(loss, dec_vars + cnn_vars)
        gd, _ = tf.clip_by_global_norm(g[:len(dec_vars)], cfg.clip_norm)
        gc, _ = tf.clip_by_global_norm(g[len(dec_vars):], cfg.clip_norm)
        opt_dec.apply_gradients(zip(gd, dec_vars))
        opt_cnn.apply_gradients(zip(gc, cnn_vars))
        return loss

    forward = enc.compiled_forward(encoder)
    init, step = compiled_decoding(decoder)

    def val_features() -> np.ndarray:
        paths = [valset.paths[r] for r in valset.rows]
        return np.concatenate([forward(imgs).numpy() for imgs, _, _ in image_dataset(paths, size, cfg.batch_size)])

    calib: list = []                       # the first training images, unaugmented, decoded once

    def calibration_batches() -> list:
        if not calib:
            paths = [trainset.paths[r] for r in trainset.rows[:cfg.calibration_images]]
            calib.extend(imgs for imgs, _, _ in image_dataset(paths, size, cfg.batch_size))
        return calib

    @tf.function(reduce_retracing=True)
    def eval_loss(f, ids):
        return masked_token_loss(decoder, f, ids, False)

    def evaluate(calibrate: bool = bn_train):
        if calibrate:
            calibrate_batchnorm(encoder, calibration_batches())
        feats = val_features()
        tot = cnt = 0.0
        for i in range(0, len(valset.rows), 64):
            ids, owner = valset.captions_for(valset.rows[i:i + 64], 1000, None)
            s_, n_ = eval_loss(feats[i:i + 64][owner], ids)
            tot, cnt = tot + float(s_), cnt + float(n_)
        caps = greedy_decode(init, step, feats, START_ID, END_ID, cfg.sample_max_len)
        texts = {r: vocab.decode(c) for r, c in zip(valset.rows, caps) if r in valset.truth}
        return {"val_loss": tot / max(cnt, 1.0), "distinct_captions": len({tuple(c) for c in caps}),
                "val_content": content_accuracy(texts, valset.truth)["exact"] if texts else None}, caps

    def describe(ev) -> str:
        c = ev["val_content"]
        return (f"val loss {ev['val_loss']:.3f} (perplexity {perplexity(ev['val_loss']):.2f}), "
                f"{ev['distinct_captions']} distinct greedy captions of {len(valset.rows)} val images"
                + ("" if c is None else f", content accuracy {100 * c:.1f}%"))

    def save_best(val):
        save_encoder_and_decoder(out, encoder, decoder, config)
        state["best_val"] = val

    writer = tf.summary.create_file_writer(str(out / "tb"))
    (out / "checkpoints").mkdir(exist_ok=True)
    if state["best_val"] is None:         # the starting point is the stage-1 model: measure it
        ev, _ = evaluate(calibrate=False)     # stage 1 as it was, with its own statistics
        state["start"] = ev
        log(f"stage-1 model on images: {describe(ev)}")
        save_best(ev["val_loss"])
        if bn_train:
            n = calibrate_batchnorm(encoder, calibration_batches())
            fit_feature_normalisation(decoder, forward, calibration_batches())
            ev, _ = evaluate(calibrate=False)      # just calibrated
            state["calibrated"] = ev
            log(f"BatchNorm statistics and the decoder's feature normalisation re-estimated on {n} training "
                f"images: {describe(ev)}")
    t_start, stopped = time.time(), False
    while state["epoch"] < cfg.epochs and not stopped:
        epoch = state["epoch"]
        order = trainset.epoch_rows(epoch, cfg.seed)
        start = state["batch"]
        bar = tqdm(total=steps_per_epoch, initial=start, desc=f"finetune {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress)
        t0, seen = time.time(), 0
        paths = [trainset.paths[r] for r in order[start * cfg.batch_size:]]
        for b, (imgs, ok, _) in enumerate(image_dataset(paths, size, cfg.batch_size), start=start):
            rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            rng = np.random.default_rng([cfg.seed, epoch, b])
            ids, owner = trainset.captions_for(rows, cfg.captions_per_image, rng)
            readable = ok.numpy()[owner]          # an image unreadable now: its captions sit this step out
            ids, owner = ids[readable], owner[readable]
            if not len(ids):
                state["batch"] = b + 1
                continue
            loss = float(train_step(imgs, ids, owner, tf.constant([cfg.seed, state["step"]], tf.int32)))
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at fine-tune step {state['step'] + 1}; lower --cnn-lr/--lr. "
                                f"The last good checkpoint is kept in {out / 'checkpoints'}")
            state["step"] += 1
            state["batch"] = b + 1
            state["epoch_losses"].append(loss)
            seen += len(rows)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / (time.time() - t0):.1f}")
            with writer.as_default():
                tf.summary.scalar("finetune/loss", loss, step=state["step"])
            if state["step"] % cfg.checkpoint_every == 0:
                checkpoint.save(out / "checkpoints" / "latest.h5", [decoder, encoder], [opt_dec, opt_cnn], state)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stopped = True
                break
        bar.close()
        if stopped and state["batch"] < steps_per_epoch:
            checkpoint.save(out / "checkpoints" / "latest.h5", [decoder, encoder], [opt_dec, opt_cnn], state)
            log(f"stopped at --max-steps {cfg.max_steps}")
        ev, caps = evaluate()
        val = ev["val_loss"]
        rec = {"epoch": epoch + 1 if not stopped else epoch + state["batch"] / steps_per_epoch,
               "step": state["step"], "train_loss": float(np.mean(state["epoch_losses"] or [np.nan])),
               **ev, "val_perplexity": perplexity(val),
               "images_per_s": seen / max(time.time() - t0, 1e-9), "seconds": round(time.time() - t0, 2)}
        state["history"].append(rec)
        if not stopped:
            state["epoch"], state["batch"], state["epoch_losses"] = epoch + 1, 0, []
        log(f"fine-tune epoch {rec['epoch']:.2f}: train loss {rec['train_loss']:.3f}, {describe(ev)}, "
            f"{rec['images_per_s']:.1f} img/s")
        for r, ids in list(zip(valset.rows, caps))[:cfg.samples]:
            log(f"    {Path(valset.file_names[r]).name}: {vocab.decode(ids)!r}")
        with writer.as_default():
            tf.summary.scalar("finetune/val_loss", val, step=state["step"])
        if val < state["best_val"]:
            save_best(val)
        checkpoint.save(out / "checkpoints" / "latest.h5", [decoder, encoder], [opt_dec, opt_cnn], state)
        write_json_atomic(out / "history.json", state["history"])
        plot_history(state["history"], out / "training_curve.png")
    writer.flush()
    log(f"fine-tuned run directory {out}: best val perplexity {perplexity(state['best_val']):.2f} "
        f"(stage 1 on images: {perplexity(state['start']['val_loss']):.2f})")
    return {"run": str(out), "steps": state["step"], "history": state["history"], "start": state["start"],
            "calibrated": state.get("calibrated"), "best_val": state["best_val"],
            "seconds": round(time.time() - t_start, 1)}


def save_encoder_and_decoder(out: Path, encoder, decoder, config: dict) -> None:
    """The best pair: encoder first, decoder second, then the config naming the encoder's checksum."""
    enc.save_encoder_weights(encoder, out / "encoder.weights.h5")
    checkpoint.save(out / "best.weights.h5", decoder)
    config["encoder"]["sha256"] = sha256_file(out / "encoder.weights.h5")
    write_json_atomic(out / "config.json", config)
