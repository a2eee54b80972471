"""The Transformer decoder over grid features (model/transformer.py): its step against teacher
forcing, the in-graph beam search and greedy decoding through its fixed-shape state, attention
maps, its config checks, and a tiny run trained, loaded by infer and captioning an image."""
import json

import numpy as np
import pytest
import tensorflow as tf

from infer.beam_search import beam_search_batch
from infer.captioner import numpy_decoding
from model import decoding
from model.config import ModelConfig, override
from model.decoders import build_decoder
from model.decoding import compiled_decoding
from model.steps import masked_token_loss
from model.train import train
from prepare.errors import UserError
from prepare.vocabulary import END_ID, START_ID
from tests.conftest import savedmodel_captions_like_infer_caption
from tests.test_decoding import assert_same_beams

quiet = dict(progress=False, log=lambda *a: None)
TINY = dict(decoder="transformer", embedding_size=8, transformer_layers=2, transformer_heads=2, transformer_ff=16,
            max_positions=10, dropout=0.0)


def _model(vocab=13, sharp=1.0, seed=3, **kw):
    m = build_decoder(ModelConfig(vocab_size=vocab, feature_dim=6, grid_positions=4, **{**TINY, **kw}), seed=seed)
    rng = np.random.default_rng(0)
    m.set_feature_stats(rng.normal(size=6), np.abs(rng.normal(size=6)) + 0.5)
    m.logits.kernel.assign(m.logits.kernel * sharp)     # peaked distributions: no near-ties in the searches
    feats = np.random.default_rng(seed).normal(size=(5, 4, 6)).astype(np.float32) * 2
    return m, feats


@pytest.mark.parametrize("attention_dropout", [0.0, 0.2])   # 0.2: MultiHeadAttention's explicit-scores path
def test_step_run_t_times_reproduces_teacher_forcing_and_maps_are_distributions(attention_dropout):
    m, f = _model(attention_dropout=attention_dropout)
    ids = np.random.default_rng(1).integers(1, 13, size=(5, 10)).astype(np.int32)     # T = max_positions
    full = m(f, ids).numpy()                                                           # [5, 10, 13]
    init, step = compiled_decoding(m)
    state = init(f)
    # per layer the grid's projected keys and values [P, H, D], then per layer the key and value caches
    # [M, H, D] (2 layers, 2 heads of 4 channels), then the position
    shapes = ((4, 2, 4),) * 4 + ((10, 2, 4),) * 4 + ((1,),)
    assert [tuple(s.shape) for s in state] == [(5, *s) for s in shapes] and m.state_shapes() == shapes
    for t in range(10):
        logp, state = step(ids[:, t], state)
        np.testing.assert_allclose(logp.numpy(), full[:, t], atol=1e-5)
        assert (state[-1].numpy() == t + 1).all()
    # causal: the logits of a prefix do not depend on the words after it
    np.testing.assert_allclose(m(f, ids[:, :4]).numpy(), full[:, :4], atol=1e-5)
    maps = m.attention(f, ids).numpy()
    assert maps.shape == (5, 10, 4) and np.allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert (maps > 0).all() and maps.std() > 1e-4
    f2 = f.copy()
    f2[0] = f2[0][::-1]
    assert not np.allclose(m.attention(f2, ids).numpy()[0], maps[0])      # another image, another map


@pytest.mark.parametrize("supervised", [False, True])
def test_the_loss_packs_the_real_words_and_equals_the_padded_computation(supervised):
    """Training runs each layer's per-token products over the real positions only (Words): the
    outputs, the loss and every gradient equal those of the padded [B, T] computation, and the
    positions past each caption come out 0 (with attention supervision: its penalty included)."""
    m, f = _model(attention_supervision=1.0 if supervised else 0.0, supervised_heads=1)
    rng = np.random.default_rng(2)
    ids = np.zeros((5, 9), np.int32)                       # <start> w ... <end>, then pads
    for i, k in enumerate((3, 9, 6, 2, 5)):
        ids[i, :k] = [START_ID, *rng.integers(4, 13, k - 2), END_ID]
    mask = ids[:, 1:] > 0
    cells = np.zeros((5, 8, 4), np.float32)
    cells[:, ::2, 1] = 1.0
    cells *= mask[:, :, None]
    packed = m.hidden(f, ids[:, :-1], mask=tf.constant(mask)).numpy()
    padded = m.hidden(f, ids[:, :-1]).numpy()
    np.testing.assert_allclose(packed[mask], padded[mask], atol=1e-5)
    assert (packed[~mask] == 0).all() and (padded[~mask] != 0).all()

    inputs, targets = tf.constant(ids[:, :-1]), tf.constant(ids[:, 1:])

    def padded_loss():      # the computation over every position [B, T], then the real targets picked
        out, scores = m._teacher_forced(tf.constant(f), inputs, True, supervised)
        h = tf.boolean_mask(out, mask)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.boolean_mask(targets, mask), m.project(h))
        penalty = m.grounding_penalty(tf.reduce_mean(scores[:, :1], axis=1), cells) if supervised else 0.0
        return tf.reduce_sum(ce) + penalty, tf.cast(tf.shape(ce)[0], tf.float32)

    def loss_and_grads(loss_fn):
        with tf.GradientTape() as tape:
            loss, n = loss_fn()
        return float(loss), float(n), tape.gradient(loss, m.trainable_variables)
    lp, n_p, gp = loss_and_grads(lambda: masked_token_loss(m, tf.constant(f), tf.constant(ids), True,
                                                           tf.constant(cells) if supervised else None))
    ld, n_d, gd = loss_and_grads(padded_loss)
    assert n_p == n_d == mask.sum() and lp == pytest.approx(ld, rel=1e-5)
    for a, b in zip(gp, gd):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), atol=1e-5)


def test_each_weight_has_its_own_seed_and_the_same_seed_the_same_model():
    m, _ = _model(seed=5)
    att = m.blocks[0]["self"]
    kernels = [getattr(att, f"{p}_dense").kernel.numpy() for p in ("query", "key", "value")]
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
    assert not np.allclose(m.blocks[0]["self"].query_dense.kernel.numpy(), m.blocks[1]["self"].query_dense.kernel.numpy())
    again, _ = _model(seed=5)
    for a, b in zip(m.variables, again.variables):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert all(v.path.startswith("transformer/") for v in m.variables)


def test_dropout_is_used_in_training_only():
    m, f = _model(dropout=0.3)
    ids = np.array([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]], np.int32)
    s_eval, n = masked_token_loss(m, f[:2], ids, training=False)
    s_eval2, _ = masked_token_loss(m, f[:2], ids, training=False)
    s_train, _ = masked_token_loss(m, f[:2], ids, training=True)
    assert float(n) == 6 and float(s_eval) == float(s_eval2) and float(s_train) != float(s_eval)
    logp = m(f[:2], ids[:, :-1]).numpy()
    nll = -sum(logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(5) if ids[b, t + 1] > 0)
    np.testing.assert_allclose(float(s_eval), nll, rtol=1e-5)


@pytest.mark.parametrize("beam,max_len", [(1, 6), (3, 8)])
def test_graph_beam_search_equals_the_python_one(beam, max_len):
    m, feats = _model(sharp=25.0, seed=5)        # a draw whose five images get different beams
    init, step = numpy_decoding(m)
    want = beam_search_batch(step, init(feats), start_id=START_ID, end_id=END_ID, beam_size=beam, max_len=max_len)
    ids, lengths, lps, complete = decoding.beam_search(m, tf.constant(feats), beam_size=beam, max_len=max_len)
    assert_same_beams(want, ids, lengths, lps, complete)


def test_greedy_is_the_argmax_of_teacher_forcing_word_by_word():
    m, feats = _model(sharp=25.0, seed=5)        # a draw whose five images get different beams
    max_len = 9
    ids = np.full((len(feats), 1), START_ID, np.int32)
    for _ in range(max_len - 1):                               # teacher forcing on each row's own prefix
        best = m(feats, ids).numpy()[:, -1].argmax(-1).astype(np.int32)
        ids = np.concatenate([ids, best[:, None]], axis=1)
    want = []
    for row in ids[:, 1:].tolist():
        want.append(row[:row.index(END_ID)] if END_ID in row else row)
    assert decoding.greedy(m, feats, max_len) == want
    assert len({tuple(c) for c in want}) > 1


def test_config_checks_heads_and_grid_before_anything_is_built():
    base = ModelConfig(vocab_size=13, feature_dim=6, grid_positions=4)
    with pytest.raises(UserError, match="--transformer-heads 3: must divide --embedding-size 512"):
        override(base, {"decoder": "transformer", "transformer_heads": 3})
    with pytest.raises(UserError, match="square grid.*6 positions"):
        override(base, {"decoder": "transformer", "grid_positions": 6})
    with pytest.raises(UserError, match="--max-positions 1: must be at least 2"):
        override(base, {"decoder": "transformer", "max_positions": 1})
    override(base, {"decoder": "attention", "grid_positions": 6, "transformer_heads": 3})   # not the transformer's


# ---- a tiny run: trained on a grid cache, loaded by infer ------------------------------------
TINY_RUN = {"decoder": "transformer", "embedding_size": 16, "transformer_heads": 2, "transformer_ff": 32,
            "dropout": 0.0}


def test_a_transformer_run_trains_and_captions_with_attention(tiny_dataset, tiny_grid, tmp_path):
    from infer.caption import caption_images
    from infer.captioner import Captioner
    with pytest.raises(UserError, match="--max-positions 4: .* pass --max-positions"):
        train(tiny_dataset, tmp_path / "short", features=tiny_grid, model_overrides={**TINY_RUN, "max_positions": 4},
              train_overrides={"epochs": 1}, **quiet)
    assert not (tmp_path / "short").exists()
    run = tmp_path / "run"
    train(tiny_dataset, run, features=tiny_grid, model_overrides=TINY_RUN,
          train_overrides={"epochs": 3, "batch_size": 16, "lr": 5e-3, "samples": 1}, **quiet)
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    cfg = json.loads((run / "config.json").read_text())["model"]
    assert (cfg["decoder"], cfg["grid_positions"], cfg["transformer_layers"], cfg["max_positions"]) == \
        ("transformer", 4, 2, 40)
    cap = Captioner(run)
    assert cap.features_kind == "grid" and cap.has_attention
    imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:2]
    res = cap.caption_files(imgs, progress=False, attention=True)
    for r in res:
        assert r.captions and r.captions[0].ids[0] == START_ID
        assert r.attention.shape == (len(r.captions[0].ids) - 1, 4) and np.allclose(r.attention.sum(-1), 1, atol=1e-5)
    out = caption_images(run, [str(imgs[0])], tmp_path / "cap", attention=True, **quiet)
    assert out["captioned"] == 1
    row = json.loads((tmp_path / "cap" / "captions.jsonl").read_text().splitlines()[0])
    assert row["captions"][0]["caption"] == cap.text(res[0].captions[0])


@pytest.mark.slow
def test_savedmodel_of_a_transformer_run_captions_like_infer_caption(tiny_dataset, tiny_grid, tmp_path):
    """The exported graph carries the transformer's cached decoding (its state: the grid's keys and
    values, the self-attention caches) and captions image bytes as infer caption does."""
    run = tmp_path / "run"
    train(tiny_dataset, run, features=tiny_grid, model_overrides=TINY_RUN,
          train_overrides={"epochs": 3, "batch_size": 16, "lr": 5e-3, "samples": 0}, **quiet)
    imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:6]
    savedmodel_captions_like_infer_caption(run, imgs, tmp_path, at_least=5)


def test_bench_times_the_transformer_beside_the_pooled_decoder():
    from model import bench
    lines = []
    r = bench.run(vocab=40, size=8, batch=4, max_len=8, mean_len=6.0, steps=1, decoder="transformer", positions=4,
                  grid_dim=6, log=lines.append)
    name = "transformer decoder (4 positions x 6), ours"
    assert r[name]["real_tokens_s"] > 0 and r[name]["ms_per_step"] > 0
    assert any(x.startswith("  transformer decoder / pooled decoder: ") for x in lines)


def test_bench_groups_captions_by_image_sets_the_layers_and_width_and_its_flags_are_checked(capsys):
    from model import bench
    from model.__main__ import main
    from prepare.cli import run_cli
    batches = bench._random_batches(np.random.default_rng(0), 2, 6, 8, 6.0, 40, False, (4, 3), per_image=3)
    f, ids, n, owner = batches[0]
    assert f.shape == (2, 4, 3) and ids.shape[0] == 6 and owner.tolist() == [0, 0, 0, 1, 1, 1]
    assert n == int((ids[:, 1:] > 0).sum())
    r = bench.run(vocab=40, size=8, batch=4, max_len=8, mean_len=6.0, steps=1, decoder="transformer", positions=4,
                  grid_dim=6, per_image=2, layers=1, log=lambda *a: None)
    one_layer = r["transformer decoder (4 positions x 6, 1 layer, 2 captions per image), ours"]
    assert one_layer["real_tokens_s"] > 0
    wide = bench.run(vocab=40, size=8, batch=4, max_len=8, mean_len=6.0, steps=1, decoder="transformer", positions=4,
                     grid_dim=6, per_image=2, layers=1, transformer_size=16, log=lambda *a: None)
    pooled = "ours: dynamic padding, real-token logits"
    assert wide[pooled]["params"] == r[pooled]["params"]          # --transformer-size leaves the LSTM at --size
    assert wide["transformer decoder (4 positions x 6, d_model 16, 1 layer, 2 captions per image), ours"]["params"] \
        > one_layer["params"]
    for argv, err in ((["--batch-size", "32", "--captions-per-image", "5"],
                       "--captions-per-image 5: must divide --batch-size 32"),
                      (["--decoder", "transformer", "--transformer-size", "250"],
                       "--transformer-heads 4: must divide --transformer-size 250"),
                      (["--decoder", "transformer", "--size", "510"], "--transformer-heads 4: must divide --size 510"),
                      (["--decoder", "transformer", "--positions", "50"],
                       "the transformer decoder needs a square grid (its position embeddings are rows + columns); "
                       "--positions 50")):
        with pytest.raises(SystemExit) as e:
            run_cli(main, ["bench", *argv])
        assert e.value.code == 2 and err in capsys.readouterr().err


def test_a_run_saved_before_attention_dropout_existed_is_rebuilt_with_its_dropout():
    """Runs made before --attention-dropout used --dropout on the attention weights: their saved
    config (without the key) must rebuild that model, or the checkpoint would not fit."""
    import dataclasses
    from model.config import from_dict
    saved = {k: v for k, v in dataclasses.asdict(ModelConfig(vocab_size=13, dropout=0.25)).items()
             if k != "attention_dropout"}
    assert from_dict(ModelConfig, saved).attention_dropout == 0.25
    assert from_dict(ModelConfig, {**saved, "attention_dropout": 0.0}).attention_dropout == 0.0
    assert ModelConfig(vocab_size=13).attention_dropout == 0.0                 # a new run's default
