"""Grouped batches (`model train --group-by-image`): each image's captions in one batch, its features
projected once. The loss and gradients equal those of the same captions with the features repeated
per caption, for every decoder (with attention supervision too); the epoch order keeps an image's
captions together and depends on (seed, epoch) only; a run trains and resumes on them."""
import json

import numpy as np
import pytest
import tensorflow as tf

from model.config import ModelConfig
from model.data import CaptionSet, open_data
from model.decoders import build_decoder
from model.steps import masked_token_loss
from model.train import train

quiet = dict(progress=False, log=lambda *a: None)
DECODERS = {
    "show_and_tell": dict(embedding_size=8, lstm_units=8),
    "attention": dict(grid_positions=4, embedding_size=8, lstm_units=8, attention_units=6),
    "transformer": dict(grid_positions=4, embedding_size=8, transformer_layers=2, transformer_heads=2,
                        transformer_ff=16, max_positions=10),
}


def _problem(decoder: str, supervised: bool):
    cfg = ModelConfig(vocab_size=11, feature_dim=6, decoder=decoder, dropout=0.0,
                      attention_supervision=1.0 if supervised else 0.0, **DECODERS[decoder])
    m = build_decoder(cfg, seed=2)
    m.set_feature_stats(np.zeros(6), np.ones(6))
    rng = np.random.default_rng(0)
    shape = (6,) if decoder == "show_and_tell" else (4, 6)
    images = rng.normal(size=(3, *shape)).astype(np.float32)               # U = 3 images
    owner = np.array([0, 0, 1, 2, 2, 2, 1], np.int32)                       # B = 7 captions
    ids = rng.integers(3, 11, size=(7, 8)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, -1] = 2
    ids[1, 5:] = 0                                                          # shorter captions: pads
    ids[1, 4] = ids[4, 6] = 2
    ids[4, 7] = 0
    cells = (rng.random((7, 7, 4)) < 0.3).astype(np.float32) if supervised else None
    return m, images, owner, ids, cells


@pytest.mark.parametrize("decoder,supervised", [("show_and_tell", False), ("attention", False),
                                                ("transformer", False), ("attention", True),
                                                ("transformer", True)])
def test_grouped_loss_and_gradients_equal_the_features_repeated_per_caption(decoder, supervised):
    m, images, owner, ids, cells = _problem(decoder, supervised)
    out = {}
    for grouped in (False, True):
        with tf.GradientTape() as tape:
            f = images if grouped else images[owner]
            s, n = masked_token_loss(m, f, ids, True, cells, owner if grouped else None)
        out[grouped] = (float(s), float(n), tape.gradient(s, m.trainable_variables))
    assert out[True][1] == out[False][1] == float((ids[:, 1:] > 0).sum())
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5) and out[True][0] > 0
    for a, b, v in zip(out[True][2], out[False][2], m.trainable_variables):
        if b is None:
            assert a is None, v.path
            continue
        a, b = (tf.convert_to_tensor(g).numpy() for g in (a, b))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=v.path)
    # the grid's projection is among the weights those gradients reach
    assert any("embedding" in v.path and np.abs(tf.convert_to_tensor(g).numpy()).sum() > 0
               for g, v in zip(out[True][2], m.trainable_variables) if g is not None)


def test_grouped_epoch_order_keeps_each_images_captions_together(tiny_dataset, tiny_features):
    captions, fdir, manifest = open_data(tiny_dataset, tiny_features)
    ts = CaptionSet(captions, fdir, "train", manifest)
    batches = list(ts.epoch_rows(3, 16, seed=5, grouped=True))
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(len(ts)))                   # every caption once
    imgs = ts.image_index[order]
    assert (np.diff(imgs) != 0).sum() == len(np.unique(imgs)) - 1           # each image's run is contiguous
    assert len(batches) == ts.num_batches(16)
    again = np.concatenate(list(ts.epoch_rows(3, 16, seed=5, grouped=True)))
    other = np.concatenate(list(ts.epoch_rows(4, 16, seed=5, grouped=True)))
    assert (again == order).all() and not (other == order).all()
    resumed = np.concatenate(list(ts.epoch_rows(3, 16, seed=5, start=2, grouped=True)))
    assert (resumed == order[32:]).all()
    # a batch: the distinct images' features once, owner pointing each caption at its image's row
    rows = batches[1]
    f, ids, owner = ts.batch(rows, grouped=True)
    assert len(f) == len(np.unique(ts.image_index[rows])) < len(rows)
    np.testing.assert_array_equal(f[owner], ts.batch(rows)[0])
    np.testing.assert_array_equal(ids, ts.batch(rows)[1])
    assert [a.shape[0] for a in ts.batch(np.zeros(0, int), grouped=True)] == [0, 0, 0]


def test_a_grouped_run_records_it_and_a_stopped_one_resumes_on_the_same_curve(tiny_dataset, tiny_grid, tmp_path):
    kw = dict(features=tiny_grid, model_overrides={"decoder": "transformer", "embedding_size": 8,
                                                   "transformer_layers": 1, "transformer_heads": 2,
                                                   "transformer_ff": 16, "dropout": 0.0})
    t = {"epochs": 2, "batch_size": 16, "lr": 5e-3, "samples": 0, "group_by_image": True}
    ref = train(tiny_dataset, tmp_path / "whole", train_overrides=t, **kw, **quiet)
    train(tiny_dataset, tmp_path / "cut", train_overrides={**t, "max_steps": 20}, **kw, **quiet)   # mid epoch 2
    res = train(tiny_dataset, tmp_path / "cut", train_overrides=t, **kw, **quiet)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["train"]["group_by_image"] is True
    assert res["steps"] == ref["steps"] == 2 * 15                           # 48 images x 5 captions / 16
    ends = [h for h in res["history"] if h["step"] in (15, 30)]          # (a stop by max_steps records its own)
    for a, b in zip(ends, ref["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
