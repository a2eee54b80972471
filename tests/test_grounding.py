"""Attention supervision (`--attention-supervision`): the cells of an object's box (the same ones
pointing accuracy counts), the per-word targets built from a dataset that records its objects, the
penalty, that it pulls attention where it should, and the refusals."""
import json

import numpy as np
import pytest
import tensorflow as tf

from model.config import ModelConfig
from model.data import CaptionSet, open_data
from model.decoders import build_decoder
from model.metrics import box_cells, grounded_objects, named_objects, pointing
from model.steps import masked_token_loss
from model.train import _ground, train
from prepare import captions_h5
from prepare.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)


def test_box_cells_are_those_whose_centre_is_in_the_box_and_always_the_centre_cell():
    # 100 x 100 px on a 4 x 4 grid: cell centres at 12.5, 37.5, 62.5, 87.5
    big = box_cells({"cx": 40, "cy": 60, "r": 25}, 100, 100, 4)
    assert np.flatnonzero(big).tolist() == [5, 6, 9, 10]            # rows 1-2, columns 1-2
    tiny = box_cells({"cx": 90, "cy": 5, "r": 2}, 100, 100, 4)       # no cell centre inside: its own cell
    assert np.flatnonzero(tiny).tolist() == [3]
    wide = box_cells({"cx": 150, "cy": 50, "r": 10}, 200, 100, 4)   # cells scale per axis
    assert np.flatnonzero(wide).tolist() == [11]
    # pointing counts a hit exactly on those cells
    objects = [{"colour": "red", "shape": "star", "cx": 40, "cy": 60, "r": 25}]
    for peak in range(16):
        maps = np.full((3, 16), 0.01)
        maps[:, peak] = 1.0
        assert pointing(["a", "red", "star"], maps, objects, 100, 100) == (int(big[peak]) * 2, 2)


def _trainset(tiny_dataset, tiny_grid):
    captions, feats, manifest = open_data(tiny_dataset, tiny_grid)
    return CaptionSet(captions, feats, "train", manifest), captions_h5.read_vocab(captions)


@pytest.mark.parametrize("phrases", [False, True])
def test_ground_marks_the_colour_and_shape_words_with_their_objects_cells(tiny_dataset, tiny_grid, phrases):
    ts, vocab = _trainset(tiny_dataset, tiny_grid)
    named = ts.ground(vocab, 2, phrases)
    assert ts.object_cells.shape == (len(ts.image_ids), 3, 4) and ts.word_object.shape == ts.ids.shape
    marked = 0
    for i in range(len(ts)):
        truth = json.loads(ts.objects[ts.image_index[i]])["objects"]
        words = [vocab.words[w] for w in ts.ids[i, 1:]]
        expect = [-1 if o is None else truth.index(o) for o in grounded_objects(words, truth, phrases)]
        assert ts.word_object[i, :-1].tolist() == expect
        for t, j in enumerate(expect):
            if j >= 0 and not phrases:
                assert words[t] in (truth[j]["colour"], truth[j]["shape"])
        marked += sum(j >= 0 for j in expect)
    assert marked == named and named >= 2 * len(ts)                 # every caption names an object
    if phrases:                                                       # more words than the names alone
        assert named > _trainset(tiny_dataset, tiny_grid)[0].ground(vocab, 2)
    rows = np.arange(5)
    f, ids, cells = ts.batch(rows)
    assert cells.shape == (5, ids.shape[1] - 1, 4) and cells.dtype == np.float32
    for b, r in enumerate(rows):
        for t in range(ids.shape[1] - 1):
            j = ts.word_object[r, t]
            want = ts.object_cells[ts.image_index[r], j] if j >= 0 else np.zeros(4)
            np.testing.assert_array_equal(cells[b, t], want)
    assert ts.batch(np.zeros(0, int))[2].shape == (0, 1, 4)


def _tiny(weight: float, decoder: str = "transformer"):
    extra = (dict(transformer_layers=1, transformer_heads=2, transformer_ff=16, max_positions=8)
             if decoder == "transformer" else dict(lstm_units=8, attention_units=8))
    m = build_decoder(ModelConfig(vocab_size=9, feature_dim=6, grid_positions=4, decoder=decoder, embedding_size=8,
                                  dropout=0.0, attention_supervision=weight, **extra), seed=1)
    m.set_feature_stats(np.zeros(6), np.ones(6))
    return m


def _problem():
    """Random grids and captions; words 5 and 6 name the object in the cell where the grid holds
    the marker channel 0 high."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(16, 4, 6)).astype(np.float32)
    where = rng.integers(0, 4, size=16)
    f[np.arange(16), where, 0] += 3.0
    ids = rng.integers(3, 9, size=(16, 7)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    named = np.isin(ids[:, 1:], (5, 6))
    cells = (np.eye(4, dtype=np.float32)[where][:, None, :] * named[:, :, None]).astype(np.float32)
    return f, ids, cells, named


@pytest.mark.parametrize("decoder", ["transformer", "attention"])
def test_supervision_pulls_the_attention_of_named_words_onto_their_object(decoder):
    f, ids, cells, named = _problem()

    def mass(m):
        maps = m.attention(f, ids[:, :-1]).numpy()
        return float((maps * cells).sum(-1)[named].mean())

    result = {}
    for weight in (0.0, 1.0):
        m = _tiny(weight, decoder)
        opt = tf.keras.optimizers.Adam(0.02)
        for _ in range(60):
            with tf.GradientTape() as tape:
                s, n = masked_token_loss(m, f, ids, True, cells)
                loss = s / n
            opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))
        result[weight] = mass(m)
    assert result[1.0] > 0.8 and result[1.0] > result[0.0] + 0.3, result


def test_the_penalty_is_minus_log_of_the_mass_on_the_object_in_training_only():
    f, ids, cells, named = _problem()
    m = _tiny(0.5)
    plain, n = masked_token_loss(m, f, ids, True)
    supervised, n2 = masked_token_loss(m, f, ids, True, cells)
    maps = m.attention(f, ids[:, :-1]).numpy()
    expect = 0.5 * float(-np.log((maps * cells).sum(-1)[named] + 1e-6).sum())
    assert float(n) == float(n2)
    np.testing.assert_allclose(float(supervised) - float(plain), expect, rtol=1e-4)
    np.testing.assert_allclose(float(masked_token_loss(m, f, ids, False, cells)[0]), float(plain), rtol=1e-5)
    assert float(masked_token_loss(_tiny(0.0), f, ids, True, cells)[0]) == \
        pytest.approx(float(masked_token_loss(_tiny(0.0), f, ids, True)[0]), rel=1e-6)


def test_a_supervised_run_trains_and_records_its_weight(tiny_dataset, tiny_grid, tmp_path):
    tiny = {"decoder": "transformer", "embedding_size": 8, "transformer_layers": 1, "transformer_heads": 2,
            "transformer_ff": 16, "dropout": 0.0}
    losses = {}
    for weight in (0.0, 2.0):
        out = tmp_path / f"w{weight}"
        train(tiny_dataset, out, features=tiny_grid, model_overrides={**tiny, "attention_supervision": weight},
              train_overrides={"epochs": 1, "max_steps": 2, "batch_size": 8, "samples": 0}, **quiet)
        assert json.loads((out / "config.json").read_text())["model"]["attention_supervision"] == weight
        losses[weight] = json.loads((out / "history.json").read_text())[-1]
    assert losses[2.0]["train_loss"] > losses[0.0]["train_loss"]        # the penalty is in the training loss
    assert losses[2.0]["val_loss"] == pytest.approx(losses[0.0]["val_loss"], rel=0.05)   # not in validation's


def test_attention_supervision_is_refused_where_there_is_nothing_to_point_at(tiny_dataset, tiny_grid, tiny_features,
                                                                           tmp_path):
    with pytest.raises(UserError, match=r"--attention-supervision 1.0: the show_and_tell decoder has no attention"):
        train(tiny_dataset, tmp_path / "pooled", features=tiny_features,
              model_overrides={"attention_supervision": 1.0}, train_overrides={"epochs": 1}, **quiet)
    assert not (tmp_path / "pooled").exists()
    with pytest.raises(UserError, match=r"--attention-supervision -1: must be 0 \(off\) or more"):
        train(tiny_dataset, tmp_path / "neg", features=tiny_grid,
              model_overrides={"decoder": "attention", "attention_supervision": -1}, **quiet)
    ts, vocab = _trainset(tiny_dataset, tiny_grid)
    ts.objects = [""] * len(ts.objects)                                  # a COCO caption set: no places
    cfg = ModelConfig(vocab_size=len(vocab), decoder="attention", grid_positions=4, attention_supervision=1.0)
    with pytest.raises(UserError, match=r"records no objects with their places .* prepare synth"):
        _ground(ts, cfg, vocab, tiny_dataset / "captions.h5", lambda *a: None)


def test_phrases_also_ground_the_size_words_and_the_relations_onto_the_object_named_next():
    star, circle, square = ({"colour": c, "shape": s} for c, s in (("red", "star"), ("blue", "circle"),
                                                                     ("green", "square")))
    words = "a small red star to the left of a large blue circle , and a green square . <end>".split()
    marks = lambda phrases: "".join("-" if o is None else o["shape"][1] for o in
                                    grounded_objects(words, [star, circle, square], phrases))
    assert marks(False) == "--tt------ii---qq--"                       # named_objects: colour and shape words
    assert grounded_objects(words, [star, circle, square]) == named_objects(words, [star, circle, square])
    assert marks(True) == "-tttiiii-iii---qq--"                         # "small", the relation, "large" too
    above = "there is a blue circle above a red star".split()
    assert "".join("-" if o is None else o["shape"][1] for o in grounded_objects(above, [star, circle], True)) == \
        "---iit-tt"
    # a relation with no true object named after it (a caption's words cut short, or naming a wrong one)
    dangling = "a red star to the left of a pink moon".split()
    assert [o is not None for o in grounded_objects(dangling, [star], True)] == [False, True, True] + [False] * 7


def test_supervised_words_is_checked_and_needs_the_supervision():
    from model.config import override
    base = ModelConfig(vocab_size=9, decoder="transformer", grid_positions=4, embedding_size=8,
                       transformer_heads=2, attention_supervision=0.5)
    assert override(base, {"supervised_words": "phrases"}).supervised_words == "phrases"
    with pytest.raises(UserError, match=r"--supervised-words sentences: must be names or phrases"):
        override(base, {"supervised_words": "sentences"})
    with pytest.raises(UserError, match=r"--supervised-words phrases: .* add --attention-supervision"):
        override(base, {"supervised_words": "phrases", "attention_supervision": 0.0})


def test_supervised_heads_pulls_only_the_first_heads_and_is_checked():
    f, ids, cells, named = _problem()
    m = _tiny(0.5)
    m.config.supervised_heads = 1
    plain, _ = masked_token_loss(m, f, ids, True)
    supervised, _ = masked_token_loss(m, f, ids, True, cells)
    _, scores = m._teacher_forced(f, ids[:, :-1], False, True)              # [B, H, T, P]
    head0 = (scores.numpy()[:, 0] * cells).sum(-1)[named]
    both = (scores.numpy().mean(1) * cells).sum(-1)[named]
    assert not np.allclose(head0, both)                                     # the heads differ: the test can fail
    np.testing.assert_allclose(float(supervised) - float(plain), 0.5 * float(-np.log(head0 + 1e-6).sum()), rtol=1e-4)
    from model.config import override
    with pytest.raises(UserError, match=r"--supervised-heads 3: at most --transformer-heads 2"):
        override(m.config, {"supervised_heads": 3})


def test_ground_reads_the_size_from_the_image_where_the_captions_file_does_not_record_it(tiny_dataset, tiny_grid):
    ts, vocab = _trainset(tiny_dataset, tiny_grid)
    named = ts.ground(vocab, 2)
    cells = ts.object_cells.copy()
    old, _ = _trainset(tiny_dataset, tiny_grid)                      # an older captions.h5: no width, height
    old.objects = [json.dumps({k: v for k, v in json.loads(t).items() if k not in ("width", "height")})
                   for t in old.objects]
    assert old.ground(vocab, 2) == named
    np.testing.assert_array_equal(old.object_cells, cells)
