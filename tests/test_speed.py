"""The training step's fast parts compute what the plain TensorFlow / Keras ops compute: the
hand-written LSTM (outputs and every gradient), the fused Adam, the token cross-entropy and the
gradient clipping. Speed itself lives in `python -m model bench`, never in a test."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from model.config import ModelConfig
from model.decoder import ShowAndTell
from model.fast_lstm import lstm_sequence, run_lstm
from model.optim import FusedAdam
from model.steps import clip_by_global_norm, masked_token_loss, token_cross_entropy


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * max(1.0, float(np.max(np.abs(b)))), np.max(np.abs(a - b))


@pytest.mark.parametrize("T", [1, 2, 7])
def test_fast_lstm_matches_keras_lstm_outputs_and_gradients(T):
    rng = np.random.default_rng(T)
    layer = keras.layers.LSTM(6, return_sequences=True, bias_initializer="random_normal")
    x = tf.constant(rng.normal(size=(3, T, 5)).astype(np.float32))
    layer(x)
    w = tf.constant(rng.normal(size=(3, T, 6)).astype(np.float32))     # a loss that weighs every output

    def both(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fn(x)
            loss = tf.reduce_sum(out * w) + tf.reduce_sum(out[:, -1] ** 2)
        return [out] + tape.gradient(loss, [x] + layer.trainable_variables)
    ref = both(lambda v: layer(v))
    got = both(lambda v: lstm_sequence(v, *layer.trainable_variables))
    assert len(ref) == 5
    for r, g in zip(ref, got):
        _close(g, r, 1e-5)
    assert np.abs(ref[2]).sum() > 0 and (np.abs(ref[3]).sum() > 0) == (T > 1)   # h0 = 0: no recurrent gradient at T=1


def test_fast_lstm_skips_trailing_pads_exactly():
    rng = np.random.default_rng(7)
    layer = keras.layers.LSTM(6, return_sequences=True, bias_initializer="random_normal")
    x = tf.constant(rng.normal(size=(4, 5, 3)).astype(np.float32))
    layer(x)
    lengths = tf.constant([5, 1, 3, 2])
    keep = (np.arange(5)[None, :] < lengths.numpy()[:, None])[:, :, None]
    w = tf.constant(rng.normal(size=(4, 5, 6)).astype(np.float32) * keep)     # no gradient from pads

    def run(n):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = lstm_sequence(x, *layer.trainable_variables, lengths=n)
            loss = tf.reduce_sum(out * w)
        return [out] + tape.gradient(loss, [x] + layer.trainable_variables)
    full, packed = run(None), run(lengths)
    _close(packed[0], full[0].numpy() * keep, 1e-6)           # real steps equal, pads 0
    _close(packed[1], full[1].numpy() * keep, 1e-5)           # no gradient into the pads' inputs
    for a, b in zip(packed[2:], full[2:]):
        _close(a, b, 1e-5)


def test_run_lstm_uses_the_layer_when_the_fast_path_would_differ():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32))
    odd = keras.layers.LSTM(5, return_sequences=True, activation="relu")
    odd(x)
    _close(run_lstm(odd, x), odd(x), 0)                        # relu: not the fast LSTM's maths
    plain = keras.layers.LSTM(5, return_sequences=True)
    out = run_lstm(plain, x)                                  # builds the layer on first use
    assert plain.built
    _close(out, plain(x), 1e-6)


def test_decoder_teacher_forcing_is_the_same_with_the_fast_lstm(monkeypatch):
    m = ShowAndTell(ModelConfig(vocab_size=11, embedding_size=8, lstm_units=6, dropout=0.0))
    m.build_all()
    rng = np.random.default_rng(1)
    f = rng.normal(size=(4, 2048)).astype(np.float32)
    ids = np.array([[1, 5, 6, 7, 2, 0], [1, 4, 2, 0, 0, 0], [1, 9, 9, 9, 9, 2], [1, 3, 2, 0, 0, 0]], np.int32)
    fast = m.hidden(f, ids[:, :-1])
    monkeypatch.setattr("model.fast_lstm.use_fast_lstm", lambda: False)
    _close(fast, m.hidden(f, ids[:, :-1]), 1e-6)


def test_fused_adam_follows_keras_adam():
    rng = np.random.default_rng(2)
    init = [rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    grads = [[tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in init] for _ in range(5)]
    # one embedding-style sparse gradient too
    grads[2][0] = tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)).astype(np.float32)),
                                   tf.constant([1, 4]), tf.constant([7, 3]))
    out = []
    for opt in (keras.optimizers.Adam(0.01), FusedAdam(0.01)):
        vs = [tf.Variable(v) for v in init]
        opt.build(vs)
        step = tf.function(lambda g, opt=opt, vs=vs: opt.apply_gradients(zip(g, vs)))
        for g in grads:
            step(g)
        out.append([v.numpy() for v in vs] + [v.numpy() for v in opt.variables[1:]])
    assert not np.allclose(out[0][0], init[0])
    for a, b in zip(*out):
        _close(b, a, 1e-6)


def test_token_cross_entropy_and_its_gradient_match_tensorflow():
    rng = np.random.default_rng(3)
    logits = tf.constant((rng.normal(size=(6, 9)) * 4).astype(np.float32))
    labels = tf.constant([0, 8, 3, 3, 5, 1])
    dy = tf.constant(rng.uniform(0.5, 2, 6).astype(np.float32))
    res = []
    for fn in (lambda l: tf.nn.sparse_softmax_cross_entropy_with_logits(labels, l),
               lambda l: token_cross_entropy(l, labels)):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            ce = fn(logits)
            loss = tf.reduce_sum(ce * dy)
        res.append((ce, tape.gradient(loss, logits)))
    _close(res[1][0], res[0][0], 1e-6)
    _close(res[1][1], res[0][1], 1e-6)


@pytest.mark.parametrize("scale", [0.1, 10.0, np.inf])
def test_gradient_clipping_matches_tf_clip_by_global_norm(scale):
    rng = np.random.default_rng(4)
    dense = tf.constant(rng.normal(size=(4, 3)).astype(np.float32) * scale)
    sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)).astype(np.float32)), tf.constant([0, 5]),
                              tf.constant([6, 3]))
    got, norm = clip_by_global_norm([dense, None, sparse], 5.0)
    ref, ref_norm = tf.clip_by_global_norm([dense, None, sparse], 5.0)
    assert got[1] is None and isinstance(got[2], tf.IndexedSlices)
    if not np.isfinite(scale):                                 # TensorFlow's answer: NaN everywhere
        for g, r in ((got[0], ref[0]), (got[2].values, ref[2].values)):
            assert np.isnan(g).all() and np.isnan(r).all()
        return
    _close(norm, ref_norm, 1e-6)
    assert (float(norm) > 5.0) == (scale == 10.0)              # both branches are exercised
    _close(got[0], ref[0], 1e-6)
    _close(got[2].values, ref[2].values, 1e-6)


def test_masked_token_loss_equals_the_plain_formula():
    m = ShowAndTell(ModelConfig(vocab_size=11, embedding_size=8, lstm_units=6, dropout=0.0))
    m.build_all()
    f = np.random.default_rng(5).normal(size=(2, 2048)).astype(np.float32)
    ids = np.array([[1, 5, 6, 2, 0], [1, 4, 4, 4, 2]], np.int32)
    s, n = masked_token_loss(m, f, ids)
    logp = m(f, ids[:, :-1]).numpy()
    tgt = ids[:, 1:]
    want = -sum(logp[b, t, tgt[b, t]] for b in range(2) for t in range(4) if tgt[b, t])
    assert int(n) == 7
    _close(s, want, 1e-5)


def test_attention_decoder_gradients_are_the_same_on_the_fast_path(monkeypatch):
    from model.decoders import build_decoder
    m = build_decoder(ModelConfig(vocab_size=13, decoder="attention", feature_dim=6, grid_positions=4,
                                  embedding_size=8, lstm_units=5, attention_units=7, dropout=0.0), seed=3)
    rng = np.random.default_rng(8)
    f = rng.normal(size=(3, 4, 6)).astype(np.float32)
    ids = np.array([[1, 5, 6, 7, 2], [1, 4, 2, 0, 0], [1, 9, 9, 2, 0]], np.int32)

    def grads():
        with tf.GradientTape() as tape:
            s, n = masked_token_loss(m, f, ids)
        return [s] + tape.gradient(s, m.trainable_variables)
    fast = grads()
    monkeypatch.setattr("model.attention.use_fast_lstm", lambda: False)
    plain = grads()
    assert len(fast) == len(m.trainable_variables) + 1
    for a, b in zip(fast, plain):
        _close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), 1e-5)
