"""Stage 1: train the decoder on cached features (the CNN never runs here).

Run directory (self-contained; `infer` needs nothing else):
    config.json               model + training config, data paths and fingerprints
    vocab.json                the vocabulary (copied from captions.h5)
    features_manifest.json    the feature cache's manifest (encoder, weights checksum, train stats)
    encoder.weights.h5        the Inception weights that made the features
    checkpoints/latest.h5     model + optimizer + loop state, written atomically
    best.weights.h5           model weights with the lowest validation loss so far
    history.json, training_curve.png, tb/ (TensorBoard)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from model import checkpoint
from model.config import ModelConfig, TrainConfig, from_dict, override
from model.data import CaptionSet, link_or_copy, open_data
from prepare import captions_h5
from prepare.util import UserError, atomic_path, write_json_atomic
from prepare.vocabulary import END_ID, START_ID, Vocabulary

RESUMABLE_CHANGES = {"epochs", "max_steps", "checkpoint_every", "samples", "sample_max_len"}


def make_strategy(name: str):
    import tensorflow as tf
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multiworker needs the TF_CONFIG environment variable (cluster and task)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"--strategy {name!r}: choose default, mirrored or multiworker")


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
        return keras.optimizers.Adam(lr)
    raise UserError(f"--optimizer {cfg.optimizer!r}: choose sgd or adam")


def _prepare_run_dir(out: Path, config: dict, vocab: Vocabulary, manifest: dict, features_dir: Path) -> bool:
    """Create the run directory, or check that an existing one is this run. Returns True to resume."""
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if Vocabulary.load(out / "vocab.json").words != vocab.words:
            raise UserError(f"{out} was trained with another vocabulary; choose a new --out "
                            "(resuming would scramble the word ids)")
        diffs = []
        for part in ("model", "train", "data"):
            for k in sorted(set(old[part]) | set(config[part])):
                if old[part].get(k) != config[part].get(k) and not (part == "train" and k in RESUMABLE_CHANGES):
                    diffs.append(f"{part}.{k}: run has {old[part].get(k)!r}, now {config[part].get(k)!r}")
        if diffs:
            raise UserError(f"{out} holds a run with another config ({'; '.join(diffs)}); resume it with the "
                            f"same settings or choose a new --out")
        write_json_atomic(cfg_path, config)   # epochs / max_steps may have been extended
        return (out / "checkpoints" / "latest.h5").exists()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a run directory (no config.json); choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / "vocab.json")
    write_json_atomic(out / "features_manifest.json", manifest)
    link_or_copy(features_dir / manifest["weights"]["file"], out / "encoder.weights.h5")
    write_json_atomic(cfg_path, config)
    return False


def perplexity(loss_per_token: float) -> float:
    return math.exp(min(loss_per_token, 50.0))


def masked_token_loss(model, features, ids, training=False):
    """Cross-entropy summed over real (non-pad) target tokens, and their count.

    ids [B, T+1] -> inputs ids[:, :-1], targets ids[:, 1:]; logits are computed for real tokens
    only, so pads cost nothing and cannot leak into the mean (sum / count is a true per-token mean).
    """
    import tensorflow as tf
    inp, tgt = ids[:, :-1], ids[:, 1:]                                          # [B, T], [B, T]
    mask = tgt > 0
    h = tf.boolean_mask(model.hidden(features, inp, training=training), mask)   # [n, H]
    logits = model.project(h)                                                   # [n, V]
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.boolean_mask(tgt, mask), logits)
    return tf.reduce_sum(ce), tf.cast(tf.shape(ce)[0], tf.float32)


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
        grads, _ = tf.clip_by_global_norm(grads, clip_norm)
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


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss per token (nats)"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [h["val_perplexity"] for h in history], "o-", color="C1")
    b.set_xlabel("epoch"), b.set_ylabel("validation perplexity"), b.grid(alpha=0.3)
    fig.suptitle("Show and Tell decoder training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def build_model(mcfg: ModelConfig, manifest: dict):
    from model.decoder import ShowAndTell
    m = ShowAndTell(mcfg)
    m.build_all()
    m.set_feature_stats(manifest["train_stats"]["mean"], manifest["train_stats"]["std"])
    return m


def train(data, out, *, features=None, captions=None, model_overrides: dict | None = None,
          train_overrides: dict | None = None, progress: bool = True, log=print) -> dict:
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from model.decoder import compiled_decoding, greedy_decode
    out = Path(out)
    captions, features_dir, manifest = open_data(data, features, captions)
    vocab = captions_h5.read_vocab(captions)
    mcfg = override(ModelConfig(vocab_size=len(vocab), feature_dim=manifest["feature_dim"]),
                    model_overrides or {}, "model config")
    tcfg = override(TrainConfig(), train_overrides or {}, "train config")
    config = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg),
              "data": {"captions": str(captions.resolve()), "features": str(features_dir.resolve()),
                       "captions_sha256": manifest["captions"]["sha256"],
                       "encoder_sha256": manifest["weights"]["sha256"]}}
    trainset = CaptionSet(captions, features_dir, "train", manifest)
    valset = CaptionSet(captions, features_dir, "val", manifest)
    if len(trainset) == 0:
        raise UserError(f"{captions}: no training captions with usable images")
    resume = _prepare_run_dir(out, config, vocab, manifest, features_dir)
    steps_per_epoch = trainset.num_batches(tcfg.batch_size)

    strategy = make_strategy(tcfg.strategy)
    keras.utils.set_random_seed(tcfg.seed)
    with strategy.scope():
        model = build_model(mcfg, manifest)
        optimizer = make_optimizer(tcfg, steps_per_epoch)
        optimizer.build(model.trainable_variables)
    state = {"step": 0, "epoch": 0, "batch": 0, "best_val": None, "history": []}
    if resume:
        state = checkpoint.load(out / "checkpoints" / "latest.h5", model, optimizer)
        log(f"resuming {out} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    if trainset.skipped or valset.skipped:
        log(f"skipping captions of images that failed extraction: {trainset.skipped} train, {valset.skipped} val")

    spec = (tf.TensorSpec([None, mcfg.feature_dim], tf.float32), tf.TensorSpec([None, None], tf.int32))

    train_step, eval_step = make_steps(model, optimizer, strategy, tcfg.clip_norm)

    def distributed(gen):
        ds = tf.data.Dataset.from_generator(lambda: gen, output_signature=spec).prefetch(4)
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return strategy.experimental_distribute_dataset(ds.with_options(opts))

    def evaluate() -> float:
        tot = cnt = 0.0
        for batch in distributed(valset.epoch_batches(0, tcfg.batch_size, 0, shuffle=False)):
            s, n = eval_step(batch)
            tot, cnt = tot + float(s), cnt + float(n)
        return tot / max(cnt, 1.0)

    init, step = compiled_decoding(model)
    sample_rows = np.linspace(0, len(valset.image_ids) - 1, min(tcfg.samples, len(valset.image_ids))).astype(int)
    writer = tf.summary.create_file_writer(str(out / "tb"))
    (out / "checkpoints").mkdir(exist_ok=True)

    def save_latest():
        checkpoint.save(out / "checkpoints" / "latest.h5", model, optimizer, state)

    t_start = time.time()
    stopped = False
    while state["epoch"] < tcfg.epochs and not stopped:
        epoch = state["epoch"]
        bar = tqdm(total=steps_per_epoch, initial=state["batch"], desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                   unit="step", disable=not progress)
        losses, seen, t0 = state.setdefault("epoch_losses", []), 0, time.time()
        for batch in distributed(trainset.epoch_batches(epoch, tcfg.batch_size, tcfg.seed, start=state["batch"])):
            loss = float(train_step(batch))
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {state['step'] + 1} (epoch {epoch + 1}); the learning "
                                f"rate ({tcfg.lr}) is probably too high for {tcfg.optimizer}, or the features hold NaN/inf. The last good checkpoint "
                                f"is kept in {out / 'checkpoints'}; lower --lr and start a new --out")
            state["step"] += 1
            state["batch"] += 1
            losses.append(loss)
            seen += tcfg.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", ex_s=f"{seen / (time.time() - t0):.0f}")
            with writer.as_default():
                tf.summary.scalar("train/loss", loss, step=state["step"])
            if state["step"] % tcfg.checkpoint_every == 0:
                save_latest()
            if tcfg.max_steps and state["step"] >= tcfg.max_steps:
                stopped = True
                break
        bar.close()
        if stopped and state["batch"] < steps_per_epoch:
            save_latest()
            log(f"stopped at --max-steps {tcfg.max_steps}; run the same command with more steps to continue")
            break
        val = evaluate()
        rec = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)),
               "val_loss": val, "val_perplexity": perplexity(val),
               "lr": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
               "seconds": round(time.time() - t0, 2)}
        state["history"].append(rec)
        state["epoch"], state["batch"], state["epoch_losses"] = epoch + 1, 0, []
        log(f"epoch {epoch + 1}: train loss {rec['train_loss']:.3f}, val loss {val:.3f}, "
            f"val perplexity {rec['val_perplexity']:.2f}")
        feats = np.asarray(valset.features[sample_rows], np.float32)
        for r, ids in zip(sample_rows, greedy_decode(init, step, feats, START_ID, END_ID, tcfg.sample_max_len)):
            ref = next((vocab.decode(valset.ids[k]) for k in np.flatnonzero(valset.image_index == r)), "-")
            log(f"    {Path(valset.file_names[r]).name}: {vocab.decode(ids)!r}   (reference: {ref!r})")
        with writer.as_default():
            tf.summary.scalar("val/loss", val, step=state["step"])
            tf.summary.scalar("val/perplexity", rec["val_perplexity"], step=state["step"])
        if state["best_val"] is None or val < state["best_val"]:
            state["best_val"] = val
            checkpoint.save(out / "best.weights.h5", model, None, {"epoch": epoch + 1, "val_loss": val})
        save_latest()
        write_json_atomic(out / "history.json", state["history"])
        plot_history(state["history"], out / "training_curve.png")
    writer.flush()
    summary = {"run": str(out), "steps": state["step"], "epochs": state["epoch"],
               "best_val_loss": state["best_val"], "seconds": round(time.time() - t_start, 1),
               "history": state["history"]}
    if state["history"]:
        log(f"best validation perplexity {perplexity(state['best_val']):.2f}; run directory {out}")
    return summary


def load_run(run_dir):
    """-> (model with best weights, vocab, config dict, feature manifest) from a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json); pass the --out of `model train`")
    config = json.loads(cfg_path.read_text())
    mcfg = from_dict(ModelConfig, config["model"], f"{cfg_path} model")
    manifest = json.loads((run_dir / "features_manifest.json").read_text())
    vocab = Vocabulary.load(run_dir / "vocab.json")
    weights = run_dir / "best.weights.h5"
    if not weights.is_file():
        raise UserError(f"{run_dir}: no best.weights.h5 yet; train at least one epoch")
    model = build_model(mcfg, manifest)
    checkpoint.load(weights, model)
    return model, vocab, config, manifest
