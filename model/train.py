"""Stage 1: train the decoder on cached features (the CNN never runs here).

Writes a self-contained run directory (layout, lock and checksums: model/run.py); a killed run
resumes with the same step, learning-rate schedule and data order by re-running the command.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from model import checkpoint
from model.config import DEFAULT_LR, FEATURES_OF_DECODER, ModelConfig, TrainConfig, override
from model.data import CaptionSet, open_data
from model.loop import Stage, fit, new_state, perplexity
from model.run import CHECKPOINT, CONFIG, DECODER, Run, build_decoder
from prepare import captions_h5
from prepare.errors import UserError
from prepare.files import write_json_atomic
from prepare.vocabulary import END_ID, START_ID

# Training settings that may change when a run is resumed (the rest must match the run's config).
RESUMABLE_CHANGES = {"epochs", "max_steps", "checkpoint_every", "samples", "sample_max_len",
                     "train_max_length"}   # (derived from captions.h5, whose checksum is compared)


def make_strategy(name: str):
    import tensorflow as tf
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise UserError(f"--strategy {name!r}: choose default or mirrored")


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    import keras
    lr = cfg.lr
    if cfg.lr_decay_factor != 1.0 and cfg.lr_decay_epochs > 0:
        lr = keras.optimizers.schedules.ExponentialDecay(
            cfg.lr, decay_steps=max(1, int(cfg.lr_decay_epochs * steps_per_epoch)),
            decay_rate=cfg.lr_decay_factor, staircase=True)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr)
    if cfg.optimizer == "adam":
        from model.optim import FusedAdam
        return FusedAdam(lr)
    raise UserError(f"--optimizer {cfg.optimizer!r}: choose adam or sgd")


def _open_run(run: Run, config: dict, vocab, manifest: dict, features_dir: Path) -> bool:
    """Create the run directory, or check that an existing one is this run. Returns True to resume."""
    if run.is_run():
        old = run.manifest()
        if (old.get("weights", {}).get("sha256"), old.get("encoder")) != (manifest["weights"]["sha256"], manifest["encoder"]):
            raise UserError(f"{run.path} was trained on features of another encoder ({_encoder_words(old)}); "
                            f"{features_dir} holds {_encoder_words(manifest)} features. Resume with the run's own "
                            f"feature cache ({old.get('request', {}).get('encoder', '?')}) or choose a new --out")
        run.check_resume(config, vocab, RESUMABLE_CHANGES)
        if run.config() != config:                   # epochs / max_steps may have been extended
            run.commit({CONFIG: lambda p: write_json_atomic(p, config)})
        return run.file(CHECKPOINT).exists()
    if not run.is_free_for_new_run():
        raise UserError(f"{run.path} exists and is not a run directory (no config.json); choose a new --out")
    run.create(config, vocab, manifest, features_dir / manifest["weights"]["file"])
    return False


def _encoder_words(manifest: dict) -> str:
    from extract.encoder import spec_of_manifest
    w = manifest.get("weights", {})
    return f"{spec_of_manifest(manifest).title}, {w.get('source', {}).get('kind', '?')} weights {str(w.get('sha256'))[:12]}"


def masked_token_loss(model, features, ids, training=False):
    """Cross-entropy summed over real (non-pad) target tokens, and their count.

    ids [B, T+1] -> inputs ids[:, :-1], targets ids[:, 1:]; logits are computed for real tokens
    only, so pads cost nothing and cannot leak into the mean (sum / count is a true per-token mean).
    """
    import tensorflow as tf
    inp, tgt = ids[:, :-1], ids[:, 1:]                                          # [B, T], [B, T]
    mask = tgt > 0
    out, penalty = model.hidden_and_penalty(features, inp, mask, training)     # penalty: training only
    h = tf.boolean_mask(out, mask)                                              # [n, H]
    logits = tf.cast(model.project(h), tf.float32)                              # [n, V]
    ce = token_cross_entropy(logits, tf.boolean_mask(tgt, mask))
    return tf.reduce_sum(ce) + penalty, tf.cast(tf.shape(ce)[0], tf.float32)


def token_cross_entropy(logits, labels):
    """tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits) [n], with the same gradient
    (softmax - one_hot), in fewer passes over the [n, V] logits: the softmax kernel (oneDNN's,
    a third of the time of tf.exp alone), kept for the backward pass, and the one-hot subtracted at
    n places only. log-sum-exp = max logit - log(max probability): that probability,
    1 / sum(exp(logits - max)), is at least 1/V, so its log is precise."""
    import tensorflow as tf

    @tf.custom_gradient
    def xent(logits):
        p = tf.nn.softmax(logits)
        rows = tf.stack([tf.range(tf.shape(labels)[0]), tf.cast(labels, tf.int32)], axis=1)
        lse = tf.reduce_max(logits, axis=-1) - tf.math.log(tf.reduce_max(p, axis=-1))
        loss = lse - tf.gather_nd(logits, rows)

        def grad(dy):
            return tf.tensor_scatter_nd_sub(p * dy[:, None], rows, dy)
        return loss, grad
    return xent(logits)


def clip_by_global_norm(grads, clip_norm: float):
    """tf.clip_by_global_norm's result (NaN everywhere when the norm is not finite), but the norm
    from multi-threaded sums of squares (its L2Loss kernel runs on one core: 6.3 ms for the 6 M
    embedding alone) and no multiply at all when the norm is within clip_norm."""
    import tensorflow as tf
    kept = [g for g in grads if g is not None]
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g,
                                                             tf.float32))) for g in kept]))

    def scaled():
        scale = tf.where(tf.math.is_finite(norm), clip_norm / tf.maximum(norm, clip_norm), np.nan)
        return [tf.IndexedSlices(g.values * tf.cast(scale, g.dtype), g.indices, g.dense_shape)
                if isinstance(g, tf.IndexedSlices) else g * tf.cast(scale, g.dtype) for g in kept]
    out = iter(tf.cond(norm <= clip_norm, lambda: kept, scaled))
    return [None if g is None else next(out) for g in grads], norm


def make_steps(model, optimizer, strategy, clip_norm: float):
    """Compiled (train_step, eval_step) over (possibly distributed) batches (features, ids).

    Each replica's loss is its token-loss sum divided by the token count of the *global* batch,
    so the gradients the optimizer sums across replicas are those of the global per-token mean.
    Gradient clipping applies to each replica's gradient before that sum.
    """
    import tensorflow as tf

    def replica_train(features, ids):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            loss_sum, n = masked_token_loss(model, features, ids, True)
            loss = loss_sum / ctx.all_reduce(tf.distribute.ReduceOp.SUM, n)
        grads = tape.gradient(loss, model.trainable_variables)
        grads, _ = clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(reduce_retracing=True)      # batches differ in length: dynamic padding
    def train_step(batch):
        per = strategy.run(replica_train, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per, axis=None)

    @tf.function(reduce_retracing=True)
    def eval_step(batch):
        s, n = strategy.run(lambda f, i: masked_token_loss(model, f, i, False), args=batch)
        return strategy.reduce("SUM", s, axis=None), strategy.reduce("SUM", n, axis=None)
    return train_step, eval_step


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
    """The attention decoder reads grid features, the Show and Tell decoder pooled ones."""
    from extract.cache import feature_kind
    need, have = FEATURES_OF_DECODER[decoder], feature_kind(manifest)
    if need != have:
        raise UserError(f"--decoder {decoder} reads {need} features but {features_dir} holds {have} features; "
                        f"extract a cache with `python -m extract ... --features {need}` (into another --out) "
                        f"or pass --decoder {next(d for d, k in FEATURES_OF_DECODER.items() if k == have)}")


def train(data, out, *, features=None, captions=None, model_overrides: dict | None = None,
          train_overrides: dict | None = None, progress: bool = True, log=print) -> dict:
    import keras
    captions, features_dir, manifest = open_data(data, features, captions)
    vocab = captions_h5.read_vocab(captions)
    mcfg, tcfg = _configs(vocab, manifest, model_overrides, train_overrides)
    check_features_fit(mcfg.decoder, manifest, features_dir)
    config = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
              "data": {"captions": str(captions.resolve()), "features": str(features_dir.resolve()),
                       "captions_sha256": manifest["captions"]["sha256"],
                       "encoder_sha256": manifest["weights"]["sha256"],
                       "train_max_length": captions_h5.max_length(captions, "train")}}
    trainset = CaptionSet(captions, features_dir, "train", manifest)
    valset = CaptionSet(captions, features_dir, "val", manifest)
    if len(trainset) == 0:
        raise UserError(f"{captions}: no training captions with usable images")
    if len(valset) == 0:
        raise UserError(f"{captions}: no validation captions with usable images; the best model is chosen by "
                        f"validation loss: re-run `python -m prepare captions` with a val split")
    run = Run(out)
    with run.lock():
        resume = _open_run(run, config, vocab, manifest, features_dir)
        strategy = make_strategy(tcfg.strategy)
        keras.utils.set_random_seed(tcfg.seed)
        with strategy.scope():
            model = build_decoder(mcfg, manifest)
            optimizer = make_optimizer(tcfg, trainset.num_batches(tcfg.batch_size))
            optimizer.build(model.trainable_variables)
        state = new_state()
        if resume:
            state = checkpoint.load(run.file(CHECKPOINT), model, optimizer)
            log(f"resuming {out} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
        if trainset.skipped or valset.skipped:
            log(f"skipping captions of images that failed extraction: {trainset.skipped} train, {valset.skipped} val")
        t_start = time.time()
        state = fit(_stage(run, model, optimizer, strategy, tcfg, trainset, valset, vocab, log), state, progress, log)
    if state["history"]:
        log(f"best validation perplexity {perplexity(state['best_val']):.2f}; run directory {out}")
    return {"run": str(out), "steps": state["step"], "epochs": state["epoch"], "best_val_loss": state["best_val"],
            "seconds": round(time.time() - t_start, 1), "history": state["history"]}


def _stage(run: Run, model, optimizer, strategy, tcfg: TrainConfig, trainset, valset, vocab, log) -> Stage:
    """Stage 1 for the shared loop: batches of cached features, the distributed step, val loss."""
    import keras
    import tensorflow as tf
    from model.decoder import compiled_decoding, greedy_decode
    spec = (tf.TensorSpec([None, *model.feature_shape], tf.float32), tf.TensorSpec([None, None], tf.int32))
    train_step, eval_step = make_steps(model, optimizer, strategy, tcfg.clip_norm)

    def distributed(gen):
        ds = tf.data.Dataset.from_generator(lambda: gen, output_signature=spec).prefetch(4)
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return strategy.experimental_distribute_dataset(ds.with_options(opts))

    def evaluate() -> dict:
        tot = cnt = 0.0
        for batch in distributed(valset.epoch_batches(0, tcfg.batch_size, 0, shuffle=False)):
            s, n = eval_step(batch)
            tot, cnt = tot + float(s), cnt + float(n)
        return {"val_loss": tot / max(cnt, 1.0)}

    init, step = compiled_decoding(model)
    rows = np.linspace(0, len(valset.image_ids) - 1, min(tcfg.samples, len(valset.image_ids))).astype(int)

    def samples() -> None:
        feats = np.asarray(valset.features[rows], np.float32)
        for r, ids in zip(rows, greedy_decode(init, step, feats, START_ID, END_ID, tcfg.sample_max_len)):
            ref = next((vocab.decode(valset.ids[k]) for k in np.flatnonzero(valset.image_index == r)), "-")
            log(f"    {Path(valset.file_names[r]).name}: {vocab.decode(ids)!r}   (reference: {ref!r})")

    def save_best(rec: dict) -> None:
        run.commit({DECODER: lambda p: checkpoint.save(p, model, None, {"epoch": rec["epoch"], "val_loss": rec["val_loss"]})})

    return Stage(
        name="train", run=run, epochs=tcfg.epochs, max_steps=tcfg.max_steps, checkpoint_every=tcfg.checkpoint_every,
        steps_per_epoch=trainset.num_batches(tcfg.batch_size), batch_size=tcfg.batch_size,
        batches=lambda epoch, start: distributed(trainset.epoch_batches(epoch, tcfg.batch_size, tcfg.seed, start=start)),
        train_step=lambda batch, _: float(train_step(batch)), evaluate=evaluate,
        describe=lambda ev: f"val loss {ev['val_loss']:.3f}, val perplexity {perplexity(ev['val_loss']):.2f}",
        save_checkpoint=lambda state: checkpoint.save(run.file(CHECKPOINT), model, optimizer, state),
        save_best=save_best, after_epoch=samples if len(rows) else (lambda: None),
        record_extra=lambda: {"lr": float(keras.ops.convert_to_numpy(optimizer.learning_rate))},
        nan_hint=(f"the learning rate ({tcfg.lr}) is probably too high for {tcfg.optimizer}, or the features hold "
                  f"NaN/inf"))
