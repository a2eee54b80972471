"""The attention decoder (Show, Attend and Tell, with additive attention) over grid features.

Pooled features lose where things are; this decoder reads the encoder's last feature map
[P = h*w positions, F channels] (`extract --features grid`) and, before every word, attends over it:

    values   v_p = W_g norm(x_p) + pos_p                      [P, E]  (pos_p: a learned embedding of position p)
    keys     k_p = W_k v_p                                      [P, A]  (computed once per image)
    start    h_0 = tanh(W_h mean_p v_p),  c_0 = tanh(W_c mean_p v_p)
    word t   e_tp = w_s . tanh(k_p + W_q h_{t-1});  alpha_t = softmax_p(e_t)        (what it looks at)
             z_t = sum_p alpha_tp v_p                           the context         [E]
             h_t, c_t = LSTM([embed(word_{t-1}), z_t], h_{t-1}, c_t-1)
             logits_t = W_o dropout([h_t, z_t])

It has the same faces as the Show and Tell decoder (model/decoder.py): `hidden`/`project` for
teacher forcing (the same real-token loss and loop), `initial_state`/`step` for beam search, so
infer, evaluate and fine-tuning use it unchanged. Its state for beam search is (h, c, values, keys):
the image travels with each beam. `attention(features, ids)` gives the maps [B, T, P] of a caption.

Teacher forcing runs the recurrence with tf.scan (the attention needs h_{t-1}, so no fused/cuDNN
LSTM here; the pooled decoder keeps that path). On CPU the LSTM and query products inside the
scan take their gradients from transposed weights made once per batch (model/fast_lstm.py,
matmul_t): 218 -> 184 ms a step at im2txt sizes, the same gradients (tested). Dropout is applied outside the scan: on the word
embeddings and on [h_t, z_t], as the Show and Tell decoder drops its LSTM's input and output.
With `attention_reg` > 0 training adds Show, Attend and Tell's doubly stochastic penalty
attention_reg * sum_p (1 - sum_t alpha_tp)^2 per caption (real words only).
"""
from __future__ import annotations

from keras import layers, ops

from model.config import ModelConfig
from model.decoder import Decoder
from model.fast_lstm import lstm_step, lstm_weights, matmul_t, use_fast_lstm

ATTENTION_WEIGHTS = ("grid_embedding", "position_embedding", "attention_keys", "attention_query",
                     "attention_score", "init_h", "init_c", "word_embedding", "lstm_kernel", "lstm_recurrent",
                     "logits")


class AttendAndTell(Decoder):
    INIT_WEIGHTS = ATTENTION_WEIGHTS

    def __init__(self, config: ModelConfig, seed: int | None = None, **kwargs):
        super().__init__(config, seed, name="attend_and_tell", **kwargs)
        c, init = config, self.init
        if c.grid_positions < 1:
            raise ValueError("the attention decoder needs grid_positions (from a grid feature cache)")
        E, A, H = c.embedding_size, c.attention_units, c.lstm_units
        self.grid_embedding = layers.Dense(E, kernel_initializer=init("grid_embedding"), name="grid_embedding")
        self.position_embedding = self.add_weight(shape=(c.grid_positions, E), name="position_embedding",
                                                  initializer=init("position_embedding"))
        self.attention_keys = layers.Dense(A, use_bias=False, kernel_initializer=init("attention_keys"),
                                           name="attention_keys")
        self.attention_query = layers.Dense(A, kernel_initializer=init("attention_query"), name="attention_query")
        self.attention_score = layers.Dense(1, use_bias=False, kernel_initializer=init("attention_score"),
                                            name="attention_score")
        self.init_h = layers.Dense(H, activation="tanh", kernel_initializer=init("init_h"), name="init_h")
        self.init_c = layers.Dense(H, activation="tanh", kernel_initializer=init("init_c"), name="init_c")
        self.word_embedding = layers.Embedding(c.vocab_size, E, embeddings_initializer=init("word_embedding"),
                                               name="word_embedding")
        self.cell = layers.LSTMCell(H, kernel_initializer=init("lstm_kernel"),
                                    recurrent_initializer=init("lstm_recurrent"), name="lstm_cell")
        self.drop_in = layers.Dropout(c.dropout)
        self.drop_out = layers.Dropout(c.dropout)
        self.logits = layers.Dense(c.vocab_size, kernel_initializer=init("logits"), name="logits")

    @property
    def feature_shape(self) -> tuple:
        return (self.config.grid_positions, self.config.feature_dim)

    def state_shapes(self) -> tuple:
        c = self.config
        P, E, A, H = c.grid_positions, c.embedding_size, c.attention_units, c.lstm_units
        return ((H,), (H,), (P, E), (P, A))

    # ---- the pieces -----------------------------------------------------------------------
    def initial_state(self, features):
        """[N, P, F] -> (h [N, H], c [N, H], values [N, P, E], keys [N, P, A])."""
        values = self.grid_embedding(self.normalise(features)) + self.position_embedding
        keys = self.attention_keys(values)
        mean = ops.mean(values, axis=1)
        return self.init_h(mean), self.init_c(mean), values, keys

    def attend(self, h, values, keys, query=None):
        """-> (context [N, E], alpha [N, P]). query: prepared (kernel, transpose, bias) or None."""
        if query:
            q = (matmul_t(h, query[0], query[1]) + query[2])[:, None, :]      # [N, 1, A]
        else:
            q = self.attention_query(h)[:, None, :]                           # [N, 1, A]
        e = ops.squeeze(self.attention_score(ops.tanh(keys + q)), -1)         # [N, P]
        alpha = ops.softmax(e, axis=-1)
        return ops.sum(alpha[:, :, None] * values, axis=1), alpha

    def _advance(self, x, h, c, values, keys, fast=None):
        """One word: embedded input x [N, E] -> (h, c, output [N, H + E], alpha). fast: the
        prepared weights of the training path (_fast_weights): the same maths, quicker gradients."""
        z, alpha = self.attend(h, values, keys, fast and fast["query"])
        inp = ops.concatenate([x, z], axis=-1)
        if fast:
            h, c = lstm_step(inp, h, c, fast["lstm"])
            out = h
        else:
            out, (h, c) = self.cell(inp, [h, c], training=False)
        return h, c, ops.concatenate([out, z], axis=-1), alpha

    def _fast_weights(self, dtype):
        """Weights and transposes for the recurrence's backward pass (CPU only; on a GPU the Keras
        layers' own products are as fast), built once per batch outside the scan."""
        import tensorflow as tf
        if not use_fast_lstm() or self.cell.activation.__name__ != "tanh" \
                or self.cell.recurrent_activation.__name__ != "sigmoid":
            return None
        q, E, H = self.attention_query, self.config.embedding_size, self.config.lstm_units
        if not q.built:                                     # the first call (build_all) builds them here
            q.build((None, H))
        if not self.cell.built:
            self.cell.build((None, 2 * E))
        wq = tf.cast(tf.convert_to_tensor(q.kernel), dtype)
        return {"lstm": lstm_weights(self.cell, dtype),
                "query": (wq, tf.transpose(wq), tf.cast(tf.convert_to_tensor(q.bias), dtype))}

    # ---- teacher forcing --------------------------------------------------------------------
    def hidden(self, features, input_ids, training=False, return_attention=False, owner=None):
        """[U, P, F], [B, T] -> outputs [B, T, H + E] (after dropout) [, attention [B, T, P]]. owner
        [B]: the image row of each caption (None: U = B); the grid's values and keys are made once
        per image."""
        import tensorflow as tf
        h0, c0, values, keys = (self.per_caption(s, owner) for s in self.initial_state(features))
        words = self.drop_in(self.word_embedding(input_ids), training=training)       # [B, T, E]
        zeros_out = tf.zeros_like(ops.concatenate([h0, values[:, 0]], axis=-1))     # [B, H + E]: scan's shapes
        zeros_alpha = tf.zeros_like(values[:, :, 0])                                 # [B, P]

        fast = self._fast_weights(values.dtype)
        steps = tf.transpose(words, [1, 0, 2])                                       # [T, B, E]

        def fn(carry, x):
            h, c, _, _ = carry
            return self._advance(x, h, c, values, keys, fast)
        _, _, outs, alphas = tf.scan(fn, steps, initializer=(h0, c0, zeros_out, zeros_alpha))
        out = self.drop_out(tf.transpose(outs, [1, 0, 2]), training=training)          # [B, T, H + E]
        return (out, tf.transpose(alphas, [1, 0, 2])) if return_attention else out

    def project(self, h):
        return self.logits(h)

    def attention(self, features, input_ids):
        """Attention maps of a given caption: [B, P, F], [B, T] -> [B, T, P] (inference mode)."""
        return self.hidden(features, input_ids, training=False, return_attention=True)[1]

    def hidden_and_penalty(self, features, input_ids, mask, training=False, cells=None, owner=None):
        """In training: with attention_reg > 0 the doubly stochastic penalty, summed over captions
        (mask [B, T] marks the real words); with attention_supervision > 0 and cells, the grounding
        penalty (Decoder.grounding_penalty)."""
        grounded = cells is not None and self.config.attention_supervision > 0
        if not (training and (self.config.attention_reg or grounded)):
            return self.hidden(features, input_ids, training=training, owner=owner), 0.0
        out, alphas = self.hidden(features, input_ids, training=training, return_attention=True, owner=owner)
        total = ops.sum(alphas * ops.cast(mask, alphas.dtype)[:, :, None], axis=1)      # [B, P]
        penalty = self.config.attention_reg * ops.sum((1.0 - total) ** 2)
        return out, penalty + (self.grounding_penalty(alphas, cells) if grounded else 0.0)

    # ---- decoding ----------------------------------------------------------------------------
    def step_logits(self, word_ids, state):
        """word_ids [N], state (h, c, values, keys) -> (logits [N, V], new state)."""
        h, c, values, keys = state
        h, c, out, _ = self._advance(self.word_embedding(word_ids), h, c, values, keys)
        return self.project(out), (h, c, values, keys)
