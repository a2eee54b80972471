"""model/checkpoint.py: variables keyed by path (a reordered model loads by name, another model is
refused naming the variables), Keras' made-up name numbers ignored, optimizer and RNG states kept."""
import h5py
import keras
import numpy as np
import pytest

from model import checkpoint
from prepare.errors import UserError


class Pair(keras.Model):
    """Two named layers created in either order, unnamed (auto-numbered) ones, dropout."""

    def __init__(self, swap=False, head="head"):
        super().__init__(name="pair")
        names = ["first", "second"][::-1] if swap else ["first", "second"]
        made = {n: keras.layers.Dense(3, name=n) for n in names}
        self.a, self.b = made["first"], made["second"]
        self.c = keras.layers.Dense(3)                  # dense_<N>: Keras numbers it
        self.drop = keras.layers.Dropout(0.5)
        self.head = keras.layers.Dense(2, name=head)

    def call(self, x, training=False):
        return self.head(self.drop(self.c(self.b(self.a(x))), training=training))


def _built(**kw):
    m = Pair(**kw)
    m(np.ones((1, 4), np.float32))
    return m


def _trained(m):
    opt = keras.optimizers.Adam(1e-2)
    opt.build(m.trainable_variables)
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(m(np.ones((2, 4), np.float32), training=True) ** 2)
    opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))
    return opt


def test_a_reordered_renumbered_model_loads_by_name_with_optimizer_and_rng(tmp_path):
    src = _built()
    opt = _trained(src)
    checkpoint.save(tmp_path / "c.h5", src, opt, {"epoch": 3})
    dst = _built(swap=True)                        # other creation order, other auto numbers
    assert [v.path for v in dst.variables] != [v.path for v in src.variables]
    opt2 = keras.optimizers.Adam(1e-2)
    opt2.build(dst.trainable_variables)
    assert checkpoint.load(tmp_path / "c.h5", dst, opt2) == {"epoch": 3}
    for name in ("first", "second", "head"):
        for a, b in zip(src.get_layer(name).weights, dst.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(src.c.kernel.numpy(), dst.c.kernel.numpy())
    rng = [v for v in src.variables if "seed_generator" in v.path]
    assert rng and all(np.array_equal(v.numpy(), w.numpy()) for v, w in
                       zip(rng, [v for v in dst.variables if "seed_generator" in v.path]))
    by_path = {v.path.split("/", 1)[1]: v.numpy() for v in opt.variables}
    assert int(opt2.iterations.numpy()) == 1
    for v in opt2.variables:                       # the slot of `first`'s kernel is the one it had
        if "first_kernel" in v.path:
            np.testing.assert_array_equal(v.numpy(), by_path[v.path.split("/", 1)[1]])


def test_another_model_is_refused_naming_the_variables(tmp_path):
    checkpoint.save(tmp_path / "c.h5", _built())
    with pytest.raises(UserError, match=r"2 missing \(pair/logits/bias, pair/logits/kernel\); "
                                        r"2 unexpected \(pair/head/bias, pair/head/kernel\)"):
        checkpoint.load(tmp_path / "c.h5", _built(head="logits"))
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        del f["model/pair/head/kernel"]
        f["model/pair/head"].create_dataset("kernel", data=np.zeros((3, 5), np.float32))
    with pytest.raises(UserError, match=r"model variable pair/head/kernel has shape \(3, 5\), the model expects \(3, 2\)"):
        checkpoint.load(tmp_path / "c.h5", _built())
    checkpoint.save(tmp_path / "c.h5", _built())
    m = _built()
    with pytest.raises(UserError, match=r"holds no optimizer variables"):
        checkpoint.load(tmp_path / "c.h5", m, _trained(m))


def test_a_positional_checkpoint_of_an_older_version_is_refused(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.create_group("model").create_dataset("0", data=np.zeros(3))
        f.attrs["state"] = "{}"
    with pytest.raises(UserError, match=r"old.h5: a checkpoint made by an older version .*retrain"):
        checkpoint.load(tmp_path / "old.h5", _built())
