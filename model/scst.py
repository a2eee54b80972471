"""Self-critical sequence training (Rennie et al. 2017): the third training phase, on cached
features, from a trained run (never modified) into a new run directory.

Each step samples K captions per image in the graph (model/decoding.py `sample`), rewards each with
CIDEr-D against the image's references (model/cider.py; document frequencies of the training
references, computed once and stored with the run as cider_df.json.gz), subtracts a baseline (the
mean reward of the image's other samples, "new SCST", or the greedy caption's reward) and raises
the log-probability of the captions that beat it:

    loss = - sum_i sum_t (r_i - b_i) log p(w_it | w_i<t, image) / (number of sampled tokens)

The log-probabilities are recomputed by teacher forcing on the sampled captions, in inference mode
(no dropout): the gradient is that of the policy that drew them. The best model is the one with
the highest validation CIDEr-D (greedy captions), the starting model included. Reading order:
`scst` (checks, run directory) -> ScstPhase driven by model/loop.py's `fit`.

--train-cnn: ScstCnnPhase reads the images instead of the cache and runs them through the run's
encoder at every step (BatchNorm frozen, no augmentation: the policy that samples is the one the
gradient is taken of), a second Adam for the CNN (--cnn-lr, clipped on its own); the best encoder
is committed with the decoder and the config naming its checksum, as a fine-tune's is.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from extract.cache import feature_kind
from model import checkpoint
from model.cider import CiderD, with_end
from model.config import ScstConfig, override
from model.finetune import ImageStream, check_data, commit_trained_encoder
from model.data import CaptionSet, ImageCaptionSet, captions_of_images, open_data, pick_captions
from model.loop import TrainingPhase, fit, open_run
from model.metrics import content_accuracy, count_degenerate
from model.run import DECODER, ENCODER, Run, load_run
from model.steps import clip_by_global_norm, masked_token_loss, token_cross_entropy
from model.train import RESUMABLE_CHANGES, check_features_fit
from prepare.errors import UserError
from prepare.vocabulary import START_ID

DOCUMENT_FREQUENCIES = "cider_df.json.gz"


def references(cs, rows=None) -> dict[int, list[tuple[int, ...]]]:
    """Image row -> its reference captions as the reward sees them (words, then <end>); cs a
    CaptionSet or an ImageCaptionSet (image_index, ids, lengths), only the image rows `rows` if given."""
    keep = None if rows is None else {int(r) for r in rows}
    refs: dict[int, list] = {}
    for k, row in enumerate(cs.image_index):
        if keep is None or int(row) in keep:
            refs.setdefault(int(row), []).append(with_end(cs.ids[k, 1:int(cs.lengths[k]) - 1]))
    return refs


def scst(run, data, out, *, features=None, overrides: dict | None = None, progress: bool = True,
         log=print) -> dict:
    """Self-critical training of `run`'s decoder into the new run `out`: on the cached features, or
    (--train-cnn) on the images, with the run's CNN trained too."""
    import keras
    source, out = Run(run), Run(out)
    if out.path.resolve() == source.path.resolve():
        raise UserError("--out must differ from --run: the run it starts from is never modified")
    cfg = override(ScstConfig(), overrides or {}, "scst config")
    if cfg.train_cnn and features:
        raise UserError("--features: not read with --train-cnn (the images are); drop one of the two")
    if cfg.train_cnn and not cfg.cnn_lr:
        cfg = dataclasses.replace(cfg, cnn_lr=cfg.lr / 25)
    model, vocab, s_config, s_manifest = load_run(source.path)
    max_len = cfg.max_len or int(s_config["data"]["train_max_length"]) + 2
    config = {**{k: v for k, v in s_config.items() if k not in ("scst", "encoder")}, "scst": dataclasses.asdict(cfg),
              "scst_from": str(source.path.resolve())}
    if cfg.train_cnn:
        captions = check_data(Path(data), source, s_config)
        trainset, valset = (ImageCaptionSet(captions, split, s_manifest) for split in ("train", "val"))
        empty = not len(trainset.rows) or not len(valset.rows)
        config["encoder"] = {"fine_tuned": True, "from_sha256": source.encoder_sha256(), "sha256": None}
    else:
        if "encoder" in s_config:
            config["encoder"] = s_config["encoder"]
        captions, features_dir, manifest = open_data(data, features or s_config["data"]["features"])
        _check_source(source, s_config, s_manifest, manifest, features_dir)
        check_features_fit(s_config["model"]["decoder"], manifest, features_dir)
        trainset = CaptionSet(captions, features_dir, "train", s_manifest)
        valset = CaptionSet(captions, features_dir, "val", s_manifest)
        empty = not len(trainset) or not len(valset)
    if empty:
        raise UserError(f"{captions}: self-critical training needs train and val captions with usable images")
    keras.utils.set_random_seed(cfg.seed)
    with out.lock():
        def create() -> None:
            out.create(config, vocab, s_manifest, source.file(ENCODER))
        resume = open_run(out, config, vocab, RESUMABLE_CHANGES | {"encoder"}, create, same_kind=_is_scst,
                          kept=("encoder",) if cfg.train_cnn else ())
        cider = _document_frequencies(out, trainset, log)
        if cfg.train_cnn:
            phase = ScstCnnPhase(out, cfg, model, vocab, trainset, valset, cider, max_len, log, config, source)
        else:
            phase = ScstPhase(out, cfg, model, vocab, trainset, valset, cider, max_len, log)
        t_start = time.time()
        state = fit(phase, resume, progress, log)
    log(f"self-critical run directory {out.path}: best validation CIDEr-D {state['best_val']:.3f} "
        f"(the run it started from: {state['start']['val_cider']:.3f})")
    return {"run": str(out.path), "steps": state["step"], "history": state["history"], "start": state["start"],
            "best_val_cider": state["best_val"], "seconds": round(time.time() - t_start, 1)}


def _check_source(source: Run, s_config: dict, s_manifest: dict, manifest: dict, features_dir: Path) -> None:
    """The cache must hold features of the run's own encoder (a fine-tuned run has its own)."""
    if source.encoder_sha256() != manifest["weights"]["sha256"] or s_manifest["encoder"] != manifest["encoder"]:
        raise UserError(f"{features_dir} holds features of another encoder than {source.file(ENCODER)}"
                        f"{' (the run is a fine-tune: its CNN changed)' if 'finetune' in s_config else ''}; extract "
                        f"a cache with it (`python -m extract --captions ... --weights {source.file(ENCODER)} "
                        f"--features {feature_kind(s_manifest)} --out NEW`) "
                        f"and pass --features NEW")


def _is_scst(run: Run) -> None:
    if "scst" not in run.config():
        raise UserError(f"{run.path} holds another kind of run, not a self-critical one; choose a new --out")


def _document_frequencies(run: Run, trainset: CaptionSet, log) -> CiderD:
    """The run's CIDEr-D document frequencies: computed from the training references once, then read."""
    path = run.file(DOCUMENT_FREQUENCIES)
    if path.is_file() and DOCUMENT_FREQUENCIES in run.record()["files"]:
        run.verify((DOCUMENT_FREQUENCIES,))
        return CiderD.load(path)
    cider = CiderD.from_references(references(trainset, getattr(trainset, "rows", None)).values())
    run.commit({DOCUMENT_FREQUENCIES: cider.save})
    log(f"CIDEr-D document frequencies of {cider.num_docs} training images' references -> {path}")
    return cider


class ScstPhase(TrainingPhase):
    """Batches of training images; a step samples, rewards and takes one policy-gradient step;
    evaluation: the validation images' greedy captions scored by CIDEr-D (and content accuracy)."""
    name = "scst"
    best_key = "val_cider"
    higher_is_better = True
    nan_hint = "lower --lr"

    def __init__(self, run: Run, cfg: ScstConfig, model, vocab, trainset: CaptionSet, valset: CaptionSet,
                 cider: CiderD, max_len: int, log):
        from model.optim import FusedAdam
        # image rows with references (an ImageCaptionSet's: those not failed in extraction)
        self.train_refs, self.val_refs = (references(cs, getattr(cs, "rows", None)) for cs in (trainset, valset))
        self.rows = np.array(sorted(self.train_refs), np.int64)
        super().__init__(run, cfg.epochs, cfg.max_steps, cfg.checkpoint_every,
                         -(-len(self.rows) // cfg.batch_size), cfg.batch_size)
        self.cfg, self.model, self.vocab, self.cider, self.max_len, self.log = cfg, model, vocab, cider, max_len, log
        self.trainset, self.valset = trainset, valset
        self.optimizer = FusedAdam(cfg.lr)
        self.optimizer.build(model.trainable_variables)
        # (variables, their optimizer), each group clipped on its own
        self.groups = [(model.trainable_variables, self.optimizer), *self.more_groups()]
        self._prepared: dict[int, list] = {}            # train row -> its references as CIDEr-D vectors
        self._val_prepared = {r: cider.prepare(refs) for r, refs in self.val_refs.items()}
        self.val_rows = np.array(sorted(self.val_refs), np.int64)
        truth = (valset.truth if isinstance(valset, ImageCaptionSet)                # what the images show (synth)
                 else {r: json.loads(valset.objects[r])["objects"] for r in self.val_refs if valset.objects[r]})
        self.truth = {r: t for r, t in truth.items() if r in self.val_refs}
        self._step, self._sample = self._compiled_step(), self._compiled_sampler()
        self._rewards: list[float] = []
        self._greedy_captions: dict[int, list[int]] = {}
        self._caps_of = None                            # image row -> its captions (--xe-weight only)

    def more_groups(self) -> list:
        """Variables trained beside the decoder's, with their optimizer (the cache: none)."""
        return []

    def encode(self, inputs):
        """A batch's inputs -> the decoder's features, inside the step (the cache: as they are)."""
        return inputs

    def _compiled_step(self):
        import tensorflow as tf
        model, K, clip = self.model, self.cfg.samples_per_image, self.cfg.clip_norm
        xe_weight, groups = self.cfg.xe_weight, self.groups
        variables = [v for vs, _ in groups for v in vs]

        @tf.function(reduce_retracing=True)
        def step(inputs, ids, lengths, advantage, references=None):
            """inputs: the batch's features (or images: encode); references [N, T+1]: one reference
            caption of each image, for the cross-entropy term (None when --xe-weight is 0)."""
            words = tf.concat([tf.fill([tf.shape(ids)[0], 1], START_ID), ids[:, :-1]], axis=1)    # [n, T]
            mask = tf.sequence_mask(lengths, tf.shape(ids)[1])                         # the sampled words
            with tf.GradientTape() as tape:
                features = self.encode(inputs)
                owner = tf.repeat(tf.range(tf.shape(features)[0]), K)                # [n]: sample -> its image
                out, _ = model.hidden_and_penalty(features, words, mask, False, None, owner)
                logits = tf.cast(model.project(tf.boolean_mask(out, mask)), tf.float32)   # [tokens, V]
                nll = token_cross_entropy(logits, tf.boolean_mask(ids, mask))         # -log p per token
                adv = tf.boolean_mask(tf.broadcast_to(advantage[:, None], tf.shape(ids)), mask)
                loss = tf.reduce_sum(adv * nll) / tf.cast(tf.shape(nll)[0], tf.float32)
                if references is not None:
                    xe, n = masked_token_loss(model, features, references, False)
                    loss += xe_weight * xe / n
            grads, start = tape.gradient(loss, variables), 0
            for vs, opt in groups:
                g, _ = clip_by_global_norm(grads[start:start + len(vs)], clip)
                opt.apply_gradients(zip(g, vs))
                start += len(vs)
            return loss
        return step

    # ---- the phase -------------------------------------------------------------------------
    def batches(self, epoch: int, start: int):
        order = self.rows[np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))]
        for b in range(start, self.steps_per_epoch):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield rows, np.asarray(self.trainset.features[rows], np.float32)

    def rewards(self, rows: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """CIDEr-D of each sampled caption (row i*K + k is image rows[i]'s k-th sample)."""
        K = self.cfg.samples_per_image
        for r in rows:
            if int(r) not in self._prepared:
                self._prepared[int(r)] = self.cider.prepare(self.train_refs[int(r)])
        return self.cider.scores([ids[i, :lengths[i]] for i in range(len(ids))],
                                 [self._prepared[int(rows[i // K])] for i in range(len(ids))])

    def baseline(self, rows: np.ndarray, features: np.ndarray, reward: np.ndarray) -> np.ndarray:
        K = self.cfg.samples_per_image
        if self.cfg.baseline == "mean":                 # the mean of the image's other samples
            per_image = reward.reshape(-1, K)
            return ((per_image.sum(1, keepdims=True) - per_image) / (K - 1)).reshape(-1)
        from model.decoding import greedy
        caps = greedy(self.model, features, self.max_len)
        greedy_reward = self.cider.scores([with_end(c) for c in caps], [self._prepared[int(r)] for r in rows])
        return np.repeat(greedy_reward, K)

    def sampling_features(self, inputs):
        """The features the captions are sampled from (the cache: the batch's own)."""
        import tensorflow as tf
        return tf.constant(inputs)

    def _compiled_sampler(self):
        """model.decoding.sample as one graph (run eagerly, its while-loop runs op by op from Python:
        measured 2026-12-03, most of a Transformer step's time)."""
        import tensorflow as tf
        from model.decoding import sample
        cfg = self.cfg

        @tf.function(reduce_retracing=True)
        def draw(features, seed):
            ids, lengths, _ = sample(self.model, features, samples=cfg.samples_per_image, max_len=self.max_len,
                                     seed=seed, temperature=cfg.temperature)
            return ids, lengths
        return draw

    def train_step(self, batch, step: int) -> float:
        import tensorflow as tf
        rows, inputs = batch
        if not len(rows):
            return 0.0                   # every image of the batch unreadable now (--train-cnn)
        f = self.sampling_features(inputs)
        ids, lengths = self._sample(f, tf.constant([self.cfg.seed, step], tf.int64))
        ids, lengths = ids.numpy(), lengths.numpy()
        reward = self.rewards(rows, ids, lengths)
        advantage = (reward - self.baseline(rows, f, reward)).astype(np.float32)
        self._rewards.append(float(reward.mean()))
        refs = tf.constant(self.reference_ids(rows, step)) if self.cfg.xe_weight else None
        return float(self._step(tf.constant(inputs), tf.constant(ids), tf.constant(lengths), tf.constant(advantage),
                                refs))

    def reference_ids(self, rows: np.ndarray, step: int) -> np.ndarray:
        """One training caption of each image (drawn by the seed and step), padded to the longest."""
        if self._caps_of is None:
            self._caps_of = captions_of_images(self.trainset.image_index, len(self.trainset.image_ids))
        ts, rng = self.trainset, np.random.default_rng([self.cfg.seed, step, 1])
        return pick_captions(self._caps_of, ts.ids, ts.lengths, rows, 1, rng)[0]

    def val_features(self):
        """(image rows, features) of the validation images, in blocks of 64."""
        rows = self.val_rows
        for i in range(0, len(rows), 64):
            yield rows[i:i + 64], np.asarray(self.valset.features[rows[i:i + 64]], np.float32)

    def evaluate(self) -> dict:
        from model.decoding import greedy
        done, caps = [], []
        for rows, feats in self.val_features():
            done += rows.tolist()
            caps += greedy(self.model, feats, self.max_len)
        self._greedy_captions = dict(zip(done, caps))
        score = self.cider.scores([with_end(c) for c in caps], [self._val_prepared[r] for r in done])
        texts = {r: self.vocab.decode(c) for r, c in zip(done, caps)}
        truth = {r: t for r, t in self.truth.items() if r in texts}
        content = content_accuracy({r: texts[r] for r in truth}, truth)["exact"] if truth else None
        return {"val_cider": float(score.mean()), "val_content": content,
                "val_degenerate": count_degenerate(texts.values()) / max(len(texts), 1)}

    def describe(self, ev: dict) -> str:
        c = ev["val_content"]
        return (f"val CIDEr-D {ev['val_cider']:.3f}" + ("" if c is None else f", content accuracy {100 * c:.1f}%")
                + f", degenerate {100 * ev['val_degenerate']:.1f}%"
                + (f", mean reward {np.mean(self._rewards):.3f}" if self._rewards else ""))

    def record_extra(self) -> dict:
        mean = float(np.mean(self._rewards)) if self._rewards else None
        self._rewards = []
        return {"mean_reward": mean}

    def after_epoch(self) -> None:
        for r, c in list(self._greedy_captions.items())[:self.cfg.samples]:
            self.log(f"    {Path(self.valset.file_names[r]).name}: {self.vocab.decode(c)!r}")

    def start(self, state: dict) -> None:
        """The run it starts from is the first best: measured, kept unless beaten."""
        ev = state["start"] = self.evaluate()
        self.log(f"the run it starts from: {self.describe(ev)}")
        self.save_best({"epoch": 0, **ev})
        state["best_val"] = ev["val_cider"]

    def save_best(self, record: dict) -> None:
        meta = {"epoch": record.get("epoch"), "val_cider": record["val_cider"]}
        self.run.commit({DECODER: lambda p: checkpoint.save(p, self.model, None, meta)})

    def checkpointed(self) -> tuple[list, list]:
        return [self.model], [self.optimizer]


class ScstCnnPhase(ScstPhase):
    """--train-cnn: the batches are the training images, run through the trainable encoder inside
    the step; evaluation runs the validation images through it (unreadable images sit out)."""
    nan_hint = "lower --lr/--cnn-lr"

    def __init__(self, run: Run, cfg: ScstConfig, model, vocab, trainset: ImageCaptionSet,
                 valset: ImageCaptionSet, cider: CiderD, max_len: int, log, config: dict, source: Run):
        from extract import encoder as enc
        from model.cnn import trainable_encoder
        from model.config import FinetuneConfig
        from model.optim import FusedAdam
        manifest = source.manifest()
        self.spec, self.size, self.config = enc.spec_of_manifest(manifest), int(manifest["image_size"]), config
        self.encoder = trainable_encoder(self.spec, self.size, FinetuneConfig(bn="frozen"), source.file(ENCODER),
                                         feature_kind(manifest))
        self.forward = enc.compiled_forward(self.encoder)
        self.cnn_optimizer = FusedAdam(cfg.cnn_lr)
        self.cnn_optimizer.build(self.encoder.trainable_variables)
        super().__init__(run, cfg, model, vocab, trainset, valset, cider, max_len, log)
        self._caps_of = trainset.caps_of

    def more_groups(self) -> list:
        return [(self.encoder.trainable_variables, self.cnn_optimizer)]

    def encode(self, inputs):
        import tensorflow as tf
        return tf.cast(self.encoder(tf.cast(inputs, tf.float32), training=False), tf.float32)

    def sampling_features(self, inputs):
        import tensorflow as tf
        return tf.cast(self.forward(inputs), tf.float32)

    def batches(self, epoch: int, start: int):
        """(image rows, uint8 images) of each batch; images unreadable now are left out of it."""
        order = self.rows[np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))]
        B = self.batch_size
        images = ImageStream([self.trainset.paths[r] for r in order[start * B:]], self.size, B)
        for b in range(start, self.steps_per_epoch):
            rows = order[b * B:(b + 1) * B]
            imgs, ok = images.take(len(rows))
            yield rows[ok], imgs[ok]

    def val_features(self):
        from extract.images import image_dataset
        rows = self.val_rows
        paths, at = [self.valset.paths[r] for r in rows], 0
        for imgs, ok, _ in image_dataset(paths, self.size, 64):
            ok, block = ok.numpy(), rows[at:at + len(ok)]
            at += len(ok)
            yield block[ok], self.forward(imgs).numpy()[ok]

    def save_best(self, record: dict) -> None:
        commit_trained_encoder(self.run, self.config, self.encoder, self.model,
                               {"epoch": record.get("epoch"), "val_cider": record["val_cider"]})

    def checkpointed(self) -> tuple[list, list]:
        return [self.model, self.encoder], [self.optimizer, self.cnn_optimizer]
