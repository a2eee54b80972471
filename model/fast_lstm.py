"""A whole-sequence LSTM for teacher forcing on CPU, with a hand-written backward pass.

The same mathematics as Keras' LSTM layer (gates i, f, c, o from x @ kernel + h @ recurrent_kernel
+ bias; sigmoid gates, tanh cell activation; zero initial state) and the same weights, so a
decoder swaps it in for `layers.LSTM(...)(seq)` without changing a single weight or checkpoint.

Why: on CPU, Keras' LSTM runs its time loop as a tf.while_loop whose automatic gradient costs
5-6x the forward pass (measured: forward 7.6 ms, forward + backward 50 ms at im2txt sizes). Here
the input projection of every time step is one large matmul before the loop; the backward loop
does only what must be sequential (one [B, 4H] x [4H, H] product per step), and the three weight
and input gradients are then three large matmuls over all time steps at once, the way cuDNN does
it. On a GPU the decoders keep Keras' layer, which takes the cuDNN kernel.
"""
from __future__ import annotations


def lstm_sequence(x, kernel, recurrent_kernel, bias, lengths=None):
    """x [B, T, E] -> outputs h [B, T, H] of an LSTM started from a zero state.

    lengths [B] (optional): row b's steps from lengths[b] on are trailing pads whose outputs nobody
    needs; they come back as 0 (with no gradient) and the input projection and the three gradient
    products skip them (exact: a trailing step cannot change an earlier output)."""
    import tensorflow as tf

    def loop(n, body, outputs, carry, reverse=False):
        """for t in range(n) (or reversed): carry, out_t = body(t, carry); -> carry, stacked outs.
        Inputs are read by slicing the tensors the body closes over (no per-step list copies)."""
        arrays = tuple(tf.TensorArray(dt, size=n) for dt in outputs)

        def step(i, carry, arrays):
            t = n - 1 - i if reverse else i
            carry, outs = body(t, carry)
            return i + 1, carry, tuple(a.write(t, o) for a, o in zip(arrays, outs))
        _, carry, arrays = tf.while_loop(lambda i, *_: i < n, step, (0, carry, arrays))
        return carry, tuple(a.stack() for a in arrays)

    @tf.custom_gradient
    def run(x, wx, wh, b):
        B, T, E = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        H = tf.shape(wh)[0]
        xs = tf.transpose(x, [1, 0, 2])                                         # [T, B, E] time-major
        if lengths is None:
            real = None
            x_real = tf.reshape(xs, [-1, E])
            xp = tf.reshape(tf.matmul(x_real, wx) + b, [T, B, 4 * H])
        else:                         # the (time, row) places of the real steps: a prefix of each row
            keep = tf.range(T)[:, None] < tf.cast(lengths, tf.int32)[None, :]  # [T, B]
            real = tf.where(keep)
            x_real = tf.gather_nd(xs, real)                                     # [n, E]
            xp = tf.scatter_nd(real, tf.matmul(x_real, wx) + b, [T, B, 4 * H])   # pads: 0 (never read)
        zero = tf.zeros([B, H], x.dtype)

        def cell(t, carry):                       # the sequential part only; gates are kept as z
            h, c = carry
            z = xp[t] + tf.matmul(h, wh)
            s = tf.sigmoid(z)
            c = s[:, H:2 * H] * c + s[:, :H] * tf.tanh(z[:, 2 * H:3 * H])
            h = s[:, 3 * H:] * tf.tanh(c)
            return (h, c), (h, c, z)

        _, (hs, cs, zs) = loop(T, cell, (x.dtype,) * 3, (zero, zero))        # [T, B, H|H|4H]
        out = tf.transpose(hs if real is None else tf.where(keep[:, :, None], hs, 0.0), [1, 0, 2])  # [B, T, H]

        def grad(d_out):
            # every factor of the chain rule that does not depend on the backward carry, for all
            # steps at once: what is left in the loop is two adds, three products and one matmul
            sig = tf.sigmoid(zs)
            i, f, o = sig[..., :H], sig[..., H:2 * H], sig[..., 3 * H:]
            g = tf.tanh(zs[..., 2 * H:3 * H])
            tc = tf.tanh(cs)
            c_prev = tf.concat([zero[None], cs[:-1]], axis=0)
            a = o * (1.0 - tc * tc)                                             # dc += dh * a
            p = tf.stack([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g)], axis=2)  # [T, B, 3, H]
            q = tc * o * (1.0 - o)                                              # dz_o = dh * q
            d_hs = tf.transpose(d_out, [1, 0, 2])                               # [T, B, H]
            if real is not None:          # the pads' outputs are constant 0: no gradient flows in,
                d_hs = tf.where(keep[:, :, None], d_hs, 0.0)    # so every dz of a pad step is 0
            # oneDNN's small matmuls run ~4x slower with transpose_b than on a transposed copy
            wh_t = tf.transpose(wh)

            def back(t, carry):
                dh_next, dc_next = carry
                dh = d_hs[t] + dh_next
                dc = dc_next + dh * a[t]
                dz = tf.concat([tf.reshape(dc[:, None, :] * p[t], [B, 3 * H]), dh * q[t]], axis=-1)
                return (tf.matmul(dz, wh_t), dc * f[t]), (dz,)

            _, (dzs,) = loop(T, back, (x.dtype,), (zero, zero), reverse=True)
            h_prev = tf.concat([zero[None], hs[:-1]], axis=0)                   # [T, B, H]
            if real is None:
                dz2, h_prev = tf.reshape(dzs, [-1, 4 * H]), tf.reshape(h_prev, [-1, H])    # [T*B, ...]
            else:
                dz2, h_prev = tf.gather_nd(dzs, real), tf.gather_nd(h_prev, real)          # [n, ...]
            d_wx = tf.matmul(x_real, dz2, transpose_a=True)
            d_wh = tf.matmul(h_prev, dz2, transpose_a=True)
            d_b = tf.reduce_sum(dz2, axis=0)
            d_x = tf.matmul(dz2, wx, transpose_b=True)
            d_x = tf.reshape(d_x, [T, B, E]) if real is None else tf.scatter_nd(real, d_x, [T, B, E])
            d_x = tf.transpose(d_x, [1, 0, 2])
            return d_x, d_wx, d_wh, d_b
        return out, grad

    x = tf.convert_to_tensor(x)
    return run(x, *(tf.cast(tf.convert_to_tensor(w), x.dtype) for w in (kernel, recurrent_kernel, bias)))


def use_fast_lstm() -> bool:
    """The hand-written LSTM on CPU-only machines; Keras' layer (cuDNN) wherever a GPU is visible."""
    import tensorflow as tf
    return not tf.config.list_logical_devices("GPU")


def run_lstm(layer, seq, training=False, lengths=None):
    """`layer(seq)` for a Keras LSTM layer with return_sequences=True: the hand-written LSTM where it
    computes the same thing (CPU only, default activations, no dropout inside the layer), the
    layer itself everywhere else. lengths: see lstm_sequence (the layer computes the pads too)."""
    c = layer.cell
    same = (c.activation.__name__ == "tanh" and c.recurrent_activation.__name__ == "sigmoid" and c.use_bias
            and not c.dropout and not c.recurrent_dropout and layer.return_sequences
            and not layer.go_backwards and not layer.return_state)
    if not (same and use_fast_lstm()):
        return layer(seq, training=training)
    if not layer.built:
        layer.build(tuple(seq.shape))
    return lstm_sequence(seq, c.kernel, c.recurrent_kernel, c.bias, lengths)


def matmul_t(x, w, w_t):
    """x @ w whose gradient multiplies by w_t, w's transpose made once outside a loop, instead of
    the transpose_b products automatic differentiation writes (~4x slower for small batches on
    oneDNN). For recurrences written step by step (the attention decoder)."""
    import tensorflow as tf

    @tf.custom_gradient
    def product(x, w, w_t):
        def grad(dy):
            return tf.matmul(dy, w_t), tf.matmul(tf.transpose(x), dy), None
        return tf.matmul(x, w), grad
    return product(x, w, w_t)


def lstm_step(x, h, c, weights):
    """One step of Keras' LSTMCell maths (gates i, f, c, o; sigmoid, tanh) on prepared weights
    (lstm_weights): -> (h, c)."""
    import tensorflow as tf
    kernel, kernel_t, recurrent, recurrent_t, bias = weights
    H = recurrent.shape[0]
    z = matmul_t(x, kernel, kernel_t) + matmul_t(h, recurrent, recurrent_t) + bias
    s = tf.sigmoid(z)
    c = s[:, H:2 * H] * c + s[:, :H] * tf.tanh(z[:, 2 * H:3 * H])
    return s[:, 3 * H:] * tf.tanh(c), c


def lstm_weights(cell, dtype):
    """An LSTMCell's weights and their transposes for lstm_step, built once outside the loop.
    (Taking the input words' share of the kernel out of the loop as one large product was
    measured too: no faster.)"""
    import tensorflow as tf
    k, r, b = (tf.cast(tf.convert_to_tensor(w), dtype) for w in (cell.kernel, cell.recurrent_kernel, cell.bias))
    return k, tf.transpose(k), r, tf.transpose(r), b
