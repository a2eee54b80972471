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
from model.data import CaptionSet, captions_of_images, open_data, pick_captions
from model.loop import TrainingPhase, fit, open_run
from model.metrics import content_accuracy
from model.run import DECODER, ENCODER, Run, load_run
from model.steps import clip_by_global_norm, masked_token_loss, token_cross_entropy
from model.train import RESUMABLE_CHANGES, check_features_fit
from prepare.errors import UserError
from prepare.vocabulary import START_ID

DOCUMENT_FREQUENCIES = "cider_df.json.gz"


def references(cs: CaptionSet) -> dict[int, list[tuple[int, ...]]]:
    """Image row -> its reference captions as the reward sees them (words, then <end>)."""
    refs: dict[int, list] = {}
    for k, row in enumerate(cs.image_index):
        refs.setdefault(int(row), []).append(with_end(cs.ids[k, 1:int(cs.lengths[k]) - 1]))
    return refs


def scst(run, data, out, *, features=None, overrides: dict | None = None, progress: bool = True,
         log=print) -> dict:
    """Self-critical training of `run`'s decoder on the cached features into the new run `out`."""
    import keras
    source, out = Run(run), Run(out)
    if out.path.resolve() == source.path.resolve():
        raise UserError("--out must differ from --run: the run it starts from is never modified")
    cfg = override(ScstConfig(), overrides or {}, "scst config")
    model, vocab, s_config, s_manifest = load_run(source.path)
    captions, features_dir, manifest = open_data(data, features or s_config["data"]["features"])
    _check_source(source, s_config, s_manifest, manifest, features_dir)
    check_features_fit(s_config["model"]["decoder"], manifest, features_dir)
    max_len = cfg.max_len or int(s_config["data"]["train_max_length"]) + 2
    config = {**{k: v for k, v in s_config.items() if k != "scst"}, "scst": dataclasses.asdict(cfg),
              "scst_from": str(source.path.resolve())}
    trainset = CaptionSet(captions, features_dir, "train", s_manifest)
    valset = CaptionSet(captions, features_dir, "val", s_manifest)
    if not len(trainset) or not len(valset):
        raise UserError(f"{captions}: self-critical training needs train and val captions with usable images")
    keras.utils.set_random_seed(cfg.seed)
    with out.lock():
        def create() -> None:
            out.create(config, vocab, s_manifest, source.file(ENCODER))
        resume = open_run(out, config, vocab, RESUMABLE_CHANGES, create, same_kind=_is_scst)
        cider = _document_frequencies(out, trainset, log)
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
    cider = CiderD.from_references(references(trainset).values())
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
        self.train_refs, self.val_refs = references(trainset), references(valset)
        self.rows = np.array(sorted(self.train_refs), np.int64)
        super().__init__(run, cfg.epochs, cfg.max_steps, cfg.checkpoint_every,
                         -(-len(self.rows) // cfg.batch_size), cfg.batch_size)
        self.cfg, self.model, self.vocab, self.cider, self.max_len, self.log = cfg, model, vocab, cider, max_len, log
        self.trainset, self.valset = trainset, valset
        self.optimizer = FusedAdam(cfg.lr)
        self.optimizer.build(model.trainable_variables)
        self._prepared: dict[int, list] = {}            # train row -> its references as CIDEr-D vectors
        self._val_prepared = {r: cider.prepare(refs) for r, refs in self.val_refs.items()}
        self._step = self._compiled_step()
        self._rewards: list[float] = []
        self._greedy_captions: dict[int, list[int]] = {}
        self._caps_of = None                            # image row -> its captions (--xe-weight only)

    def _compiled_step(self):
        import tensorflow as tf
        model, opt, K, clip = self.model, self.optimizer, self.cfg.samples_per_image, self.cfg.clip_norm
        xe_weight = self.cfg.xe_weight

        @tf.function(reduce_retracing=True)
        def step(features, ids, lengths, advantage, references=None):
            """references [N, T+1]: one reference caption of each image, for the cross-entropy term
            (None when --xe-weight is 0)."""
            f = tf.repeat(features, K, axis=0)                                        # [n, ...], n = N*K
            inputs = tf.concat([tf.fill([tf.shape(ids)[0], 1], START_ID), ids[:, :-1]], axis=1)   # [n, T]
            mask = tf.sequence_mask(lengths, tf.shape(ids)[1])                         # the sampled words
            with tf.GradientTape() as tape:
                out, _ = model.hidden_and_penalty(f, inputs, mask, False)
                logits = tf.cast(model.project(tf.boolean_mask(out, mask)), tf.float32)   # [tokens, V]
                nll = token_cross_entropy(logits, tf.boolean_mask(ids, mask))         # -log p per token
                adv = tf.boolean_mask(tf.broadcast_to(advantage[:, None], tf.shape(ids)), mask)
                loss = tf.reduce_sum(adv * nll) / tf.cast(tf.shape(nll)[0], tf.float32)
                if references is not None:
                    xe, n = masked_token_loss(model, features, references, False)
                    loss += xe_weight * xe / n
            grads, _ = clip_by_global_norm(tape.gradient(loss, model.trainable_variables), clip)
            opt.apply_gradients(zip(grads, model.trainable_variables))
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

    def train_step(self, batch, step: int) -> float:
        import tensorflow as tf
        from model.decoding import sample
        rows, features = batch
        f = tf.constant(features)
        ids, lengths, _ = sample(self.model, f, samples=self.cfg.samples_per_image, max_len=self.max_len,
                                 seed=tf.constant([self.cfg.seed, step], tf.int64), temperature=self.cfg.temperature)
        ids, lengths = ids.numpy(), lengths.numpy()
        reward = self.rewards(rows, ids, lengths)
        advantage = (reward - self.baseline(rows, features, reward)).astype(np.float32)
        self._rewards.append(float(reward.mean()))
        refs = tf.constant(self.reference_ids(rows, step)) if self.cfg.xe_weight else None
        return float(self._step(f, tf.constant(ids), tf.constant(lengths), tf.constant(advantage), refs))

    def reference_ids(self, rows: np.ndarray, step: int) -> np.ndarray:
        """One training caption of each image (drawn by the seed and step), padded to the longest."""
        if self._caps_of is None:
            self._caps_of = captions_of_images(self.trainset.image_index, len(self.trainset.image_ids))
        ts, rng = self.trainset, np.random.default_rng([self.cfg.seed, step, 1])
        return pick_captions(self._caps_of, ts.ids, ts.lengths, rows, 1, rng)[0]

    def evaluate(self) -> dict:
        from model.decoding import greedy
        rows = np.array(sorted(self.val_refs), np.int64)
        caps: list = []
        for i in range(0, len(rows), 64):
            caps += greedy(self.model, np.asarray(self.valset.features[rows[i:i + 64]], np.float32), self.max_len)
        self._greedy_captions = dict(zip(rows.tolist(), caps))
        score = self.cider.scores([with_end(c) for c in caps], [self._val_prepared[int(r)] for r in rows])
        texts = {int(r): self.vocab.decode(c) for r, c in zip(rows, caps)}
        truth = {r: json.loads(self.valset.objects[r])["objects"] for r in texts if self.valset.objects[r]}
        content = content_accuracy({r: texts[r] for r in truth}, truth)["exact"] if truth else None
        return {"val_cider": float(score.mean()), "val_content": content}

    def describe(self, ev: dict) -> str:
        c = ev["val_content"]
        return (f"val CIDEr-D {ev['val_cider']:.3f}" + ("" if c is None else f", content accuracy {100 * c:.1f}%")
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
