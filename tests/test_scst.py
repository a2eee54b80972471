"""model/scst.py: the self-critical phase on the shared loop."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.run import Run
from model.scst import DOCUMENT_FREQUENCIES, ScstPhase, scst
from prepare.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
quiet = {"progress": False, "log": lambda *a: None}
SMALL = {"epochs": 1, "batch_size": 8, "samples_per_image": 3, "lr": 1e-3, "checkpoint_every": 2}


def _checksums(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["files"]


def _tensorboard_tags(folder: Path) -> set:
    import tensorflow as tf
    tags = set()
    for f in folder.iterdir():
        for raw in tf.data.TFRecordDataset(str(f)):
            tags |= {v.tag for v in tf.compat.v1.Event.FromString(raw.numpy()).summary.value}
    return tags


@pytest.mark.slow
def test_scst_writes_a_run_that_keeps_the_best_and_leaves_the_source_untouched(tiny_dataset, tiny_run, tmp_path):
    before = _checksums(tiny_run)
    out = tmp_path / "scst"
    s = scst(tiny_run, tiny_dataset, out, overrides={**SMALL, "epochs": 2}, **quiet)
    assert _checksums(tiny_run) == before                        # the run it started from is never modified
    run = Run(out)
    run.verify((*("config.json", "vocab.json", "features_manifest.json", "encoder.weights.h5", "best.weights.h5"),
                DOCUMENT_FREQUENCIES))
    assert run.config()["scst"]["samples_per_image"] == 3 and run.config()["scst_from"] == str(tiny_run.resolve())
    h = s["history"]
    assert [r["epoch"] for r in h] == [1, 2] and all(r["mean_reward"] > 0 for r in h)
    assert all(0 <= r["val_degenerate"] <= 1 for r in h)
    assert {"scst/loss", "scst/val_cider", "scst/mean_reward", "scst/val_degenerate"} <= _tensorboard_tags(out / "tb")
    assert s["best_val_cider"] == max([s["start"]["val_cider"]] + [r["val_cider"] for r in h])
    from model.run import load_run
    model, vocab, config, _ = load_run(out)                      # infer can load it: a complete run directory
    assert "scst" in config and len(vocab) == len(Run(tiny_run).vocab())
    # the same command again: nothing left to do, the run is resumed, not refused or restarted
    again = scst(tiny_run, tiny_dataset, out, overrides={**SMALL, "epochs": 2}, **quiet)
    assert again["steps"] == s["steps"] and again["history"] == h


def test_a_step_raises_the_log_probability_of_a_sample_that_beat_its_baseline(tiny_dataset, tiny_run, tmp_path):
    """The policy gradient's sign: advantage +1 makes the sampled caption more likely, -1 less."""
    import tensorflow as tf
    from model.cider import CiderD
    from model.config import ScstConfig
    from model.data import CaptionSet, open_data
    from model.decoding import sample
    from model.run import load_run
    from model.steps import masked_token_loss
    model, vocab, config, manifest = load_run(tiny_run)
    captions, fdir, _ = open_data(tiny_dataset, config["data"]["features"])
    train, val = CaptionSet(captions, fdir, "train", manifest), CaptionSet(captions, fdir, "val", manifest)
    f = tf.constant(np.asarray(train.features[:2], np.float32))
    ids, lengths, _ = sample(model, f, samples=2, max_len=12, seed=5)
    full = np.concatenate([np.ones((4, 1), np.int32), ids.numpy()], axis=1)   # <start> + the sampled words
    full = np.where(np.arange(full.shape[1])[None] <= lengths.numpy()[:, None], full, 0)

    def logp() -> np.ndarray:
        return np.array([-float(masked_token_loss(model, tf.repeat(f, 2, 0)[i:i + 1], full[i:i + 1])[0])
                         for i in range(4)])
    for sign in (1.0, -1.0):
        phase = ScstPhase(Run(tmp_path / f"r{sign}"), ScstConfig(lr=1e-2, samples_per_image=2), model, vocab,
                          train, val, CiderD.from_references([]), 12, lambda *a: None)
        w0 = [w.numpy().copy() for w in model.trainable_variables]
        before = logp()
        phase._step(f, ids, lengths, tf.constant([sign, 0.0, 0.0, 0.0]))
        after = logp()
        assert (after[0] - before[0]) * sign > 0                                 # sample 0 moved the asked way
        for w, v in zip(model.trainable_variables, w0):
            w.assign(v)


def test_the_cross_entropy_term_pulls_towards_a_reference_of_each_image(tiny_dataset, tiny_run, tmp_path):
    """--xe-weight: with every advantage 0 the step is cross-entropy on one reference caption of
    each image, which becomes more likely; the references drawn are captions of those images."""
    import tensorflow as tf
    from model.cider import CiderD
    from model.config import ScstConfig
    from model.data import CaptionSet, open_data
    from model.decoding import sample
    from model.run import load_run
    from model.steps import masked_token_loss
    model, vocab, config, manifest = load_run(tiny_run)
    captions, fdir, _ = open_data(tiny_dataset, config["data"]["features"])
    train, val = CaptionSet(captions, fdir, "train", manifest), CaptionSet(captions, fdir, "val", manifest)
    phase = ScstPhase(Run(tmp_path / "r"), ScstConfig(lr=1e-2, samples_per_image=2, xe_weight=1.0), model, vocab,
                      train, val, CiderD.from_references([]), 12, lambda *a: None)
    rows = np.array([3, 0, 7])
    refs = phase.reference_ids(rows, step=4)
    own = [{tuple(train.ids[k][train.ids[k] > 0]) for k in np.flatnonzero(train.image_index == r)} for r in rows]
    assert all(tuple(ref[ref > 0]) in mine for ref, mine in zip(refs, own))
    assert (refs == phase.reference_ids(rows, step=4)).all()                  # the seed and step decide
    f = tf.constant(np.asarray(train.features[rows], np.float32))
    ids, lengths, _ = sample(model, f, samples=2, max_len=12, seed=5)
    before = float(masked_token_loss(model, f, refs)[0])
    phase._step(f, ids, lengths, tf.zeros([6]), tf.constant(refs))
    assert float(masked_token_loss(model, f, refs)[0]) < before


def test_the_mean_baseline_is_the_mean_of_the_image_s_other_samples():
    phase = ScstPhase.__new__(ScstPhase)
    from model.config import ScstConfig
    phase.cfg = ScstConfig(samples_per_image=4)
    reward = np.array([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    b = phase.baseline(np.array([0, 1]), None, reward)
    np.testing.assert_allclose(b, [11 / 3, 10 / 3, 3.0, 2.0, 4 / 3, 4 / 3, 4 / 3, 0.0])
    adv = (reward - b).reshape(2, 4)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-12)      # per image they sum to 0: no drift
    assert adv[0, 3] > 0 > adv[0, 0]                             # the best sample is pushed up, the worst down


def test_bad_flags_and_a_cache_of_another_encoder_are_refused_in_one_line(tiny_dataset, tiny_run, tmp_path):
    with pytest.raises(UserError, match="--samples-per-image 1: must be at least 2"):
        scst(tiny_run, tiny_dataset, tmp_path / "a", overrides={"samples_per_image": 1}, **quiet)
    with pytest.raises(UserError, match="--baseline best: must be mean or greedy"):
        scst(tiny_run, tiny_dataset, tmp_path / "a", overrides={"baseline": "best"}, **quiet)
    with pytest.raises(UserError, match="--out must differ from --run"):
        scst(tiny_run, tiny_dataset, tiny_run, **quiet)
    assert not (tmp_path / "a").exists()
    r = subprocess.run([sys.executable, "-m", "model", "scst", "--run", str(tiny_run), "--data", str(tiny_dataset),
                        "--out", str(tmp_path / "b"), "--temperature", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --temperature 0")
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_cnn_trains_the_encoder_from_the_images_and_commits_it_with_the_decoder(tiny_dataset, tiny_run,
                                                                                     tmp_path):
    """--train-cnn: the images are read, the policy gradient reaches the CNN, the trained encoder is
    committed with the decoder and a config naming its checksum, the old encoder's cache is then
    refused for the new run; the same command resumes; --features beside it is refused."""
    import tensorflow as tf
    from extract.encoder import compiled_forward
    from prepare.files import sha256_file
    with pytest.raises(UserError, match="--features: not read with --train-cnn"):
        scst(tiny_run, tiny_dataset, tmp_path / "x", features=tiny_dataset / "features", overrides={"train_cnn": True},
             **quiet)
    assert not (tmp_path / "x").exists()
    before = _checksums(tiny_run)
    out = tmp_path / "cnn"
    kw = {**SMALL, "train_cnn": True, "cnn_lr": 1e-2, "max_steps": 2}
    s = scst(tiny_run, tiny_dataset, out, overrides=kw, **quiet)
    assert _checksums(tiny_run) == before and s["steps"] == 2
    assert scst(tiny_run, tiny_dataset, out, overrides=kw, **quiet)["steps"] == 2      # resumed: nothing left
    run = Run(out)
    run.verify()
    assert run.config()["encoder"] == {"fine_tuned": True, "from_sha256": before["encoder.weights.h5"],
                                       "sha256": sha256_file(run.file("encoder.weights.h5"))}
    assert run.config()["scst"]["cnn_lr"] == 1e-2

    # the phase itself: a step with a non-zero advantage moves the CNN; save_best commits that CNN
    phase = _cnn_phase(tiny_run, tiny_dataset, tmp_path / "direct", kw)
    rows, images = next(iter(phase.batches(0, 0)))
    f = phase.sampling_features(images)
    from model.decoding import sample
    ids, lengths, _ = sample(phase.model, f, samples=3, max_len=12, seed=5)
    w0 = [w.numpy().copy() for w in phase.encoder.trainable_variables]
    adv = tf.constant(np.tile([1.0, -1.0, 0.0], len(rows)), tf.float32)
    phase._step(tf.constant(images), ids, lengths, adv)
    assert max(float(np.abs(w.numpy() - v).max()) for w, v in zip(phase.encoder.trainable_variables, w0)) > 0
    phase.save_best({"epoch": 1, "val_cider": 0.5})
    direct = Run(tmp_path / "direct")
    assert direct.config()["encoder"]["sha256"] == sha256_file(direct.file("encoder.weights.h5"))
    assert direct.encoder_sha256() != before["encoder.weights.h5"]
    from model.cnn import trainable_encoder
    from model.config import FinetuneConfig
    def features_of(weights: Path) -> np.ndarray:
        encoder = trainable_encoder(phase.spec, phase.size, FinetuneConfig(bn="frozen"), weights)
        return compiled_forward(encoder)(images).numpy()
    now = phase.forward(images).numpy()
    np.testing.assert_allclose(features_of(direct.file("encoder.weights.h5")), now, rtol=1e-5, atol=1e-9)
    assert not np.allclose(features_of(Run(tiny_run).file("encoder.weights.h5")), now, rtol=1e-3, atol=1e-9)
    # the cache of the encoder it started from no longer fits the run: refused, with the fix
    with pytest.raises(UserError, match="holds features of another encoder"):
        scst(direct.path, tiny_dataset, tmp_path / "again", **quiet)


def _cnn_phase(source: Path, data: Path, out: Path, overrides: dict):
    """A ScstCnnPhase writing into the new run `out`, as `scst --train-cnn` builds it."""
    import dataclasses
    from model.cider import CiderD
    from model.config import ScstConfig
    from model.data import ImageCaptionSet
    from model.run import load_run
    from model.scst import ScstCnnPhase, references
    cfg = ScstConfig(**overrides)
    model, vocab, config, manifest = load_run(source)
    captions = data / "captions.h5"
    train, val = (ImageCaptionSet(captions, s, manifest) for s in ("train", "val"))
    config = {**config, "scst": dataclasses.asdict(cfg), "encoder": {"fine_tuned": True, "sha256": None}}
    Run(out).create(config, vocab, manifest, Run(source).file("encoder.weights.h5"))
    return ScstCnnPhase(Run(out), cfg, model, vocab, train, val,
                        CiderD.from_references(references(train).values()), 12, lambda *a: None, config, Run(source))
