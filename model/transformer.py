"""The Transformer decoder over grid features (`--decoder transformer`): a small pre-norm
Transformer decoder built from Keras' own layers (MultiHeadAttention, LayerNormalization, Dense,
Dropout, Embedding), d_model = embedding_size.

    memory   m_p = LayerNorm(W_g norm(x_p) + row[p // s] + col[p % s])      [P, E]   (s = sqrt(P))
    words    x_t = embed(word_t) + pos[t]                                   [T, E]   (t < max_positions)
    layer    x += Dropout(SelfAttention(LN(x)), causal)                              each of
             x += Dropout(CrossAttention(LN(x), m))                                  transformer_layers
             x += Dropout(W_2 Dropout(relu(W_1 LN(x))))                              (pre-norm)
    logits   W_o LN(x_t)

It has the faces of the other decoders (model/decoder.py): `hidden`/`project` for teacher forcing
(the one real-token loss and loop), `initial_state`/`step_logits` for the in-graph beam search,
greedy decoding, sampling and the SavedModel; `attention(features, ids)` gives the maps [B, T, P]
(the last layer's cross-attention, averaged over heads).

Its decoding state has fixed shapes, one row per caption, so beam search can repeat and gather it:

    (memory [N, P, E],  cache_1 [N, M, E], ..., cache_L [N, M, E],  position [N, 1] float)

cache_l holds, at each position already read, layer l's self-attention input LN(x) (the keys and
values MultiHeadAttention projects); a step writes the new word's row at `position` (a one-hot
blend) and lets the new word attend to positions <= `position` only. M = max_positions: past that,
the last position is reused (a caption that long is beyond what the decoder was trained for).
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from extract.encoder import grid_side
from model.config import ModelConfig
from model.decoder import Decoder, init_seeds

ATTENTION_PARTS = ("query", "key", "value", "output")


def transformer_weights(n_layers: int) -> tuple:
    """The names of the randomly initialised weights, each of which gets its own seed."""
    per_layer = [f"layer{i}_{block}_{part}" for i in range(n_layers) for block in ("self", "cross")
                 for part in ATTENTION_PARTS] + [f"layer{i}_ff{j}" for i in range(n_layers) for j in (1, 2)]
    return ("grid_embedding", "word_embedding", "position_embedding",
            *per_layer, "logits")


def grid_position_tables(side: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sine position tables of a side x side grid for `size` dimensions -> (rows [side, size],
    columns [side, size]): a row's code sin/cos(r w_k), w_k = 10000^(-k / half), in the first half
    of the dimensions and zeros in the second, a column's the other way round, so row + column
    tells (r, c) apart from (c, r)."""
    half = size // 2
    k = np.arange(half // 2, dtype=np.float64)
    w = 10000.0 ** (-2.0 * k / max(half, 1))
    angle = np.arange(side, dtype=np.float64)[:, None] * w[None]              # [side, half // 2]
    code = np.zeros((side, half))
    code[:, 0:2 * len(k):2], code[:, 1:2 * len(k):2] = np.sin(angle), np.cos(angle)
    rows, cols = np.zeros((side, size), np.float32), np.zeros((side, size), np.float32)
    rows[:, :half], cols[:, half:2 * half] = code, code
    return rows, cols


class Words:
    """Where a layer's per-token products (the projections, the feed-forward block) run: over every
    position of the words [N, T, ...] (mask None), or packed over the positions of a mask [B, T]
    only, [n, ...] row by row (training: the real targets, a prefix of each row, so that causal
    attention reading up to a position never reads a pad); the attention itself runs over [N, T]."""

    def __init__(self, mask=None):
        self.packed = mask is not None
        if self.packed:
            self.shape = ops.shape(mask)
            self.where = ops.nonzero(ops.reshape(mask, (-1,)))[0]                        # [n]

    def pack(self, x):
        """[B, T, ...] -> [n, ...] (as it is when not packed)."""
        if not self.packed:
            return x
        return ops.take(ops.reshape(x, (self.shape[0] * self.shape[1], *x.shape[2:])), self.where, axis=0)

    def unpack(self, y):
        """[n, ...] -> [B, T, ...], zeros at the positions not packed (as it is when not packed)."""
        if not self.packed:
            return y
        flat = ops.scatter(self.where[:, None], y, (self.shape[0] * self.shape[1], *y.shape[1:]))
        return ops.reshape(flat, (self.shape[0], self.shape[1], *y.shape[1:]))

    def project(self, dense, x):
        """A MultiHeadAttention projection (an EinsumDense over [N, T, ...]) of the words x."""
        return dense(x[None])[0] if self.packed else dense(x)


ALL_WORDS = Words()


class TransformerDecoder(Decoder):
    def __init__(self, config: ModelConfig, seed: int | None = None, **kwargs):
        super().__init__(config, seed, name="transformer", **kwargs)
        c = config
        if c.grid_positions < 1:
            raise ValueError("the transformer decoder needs grid_positions (from a grid feature cache)")
        self.side = grid_side(c.grid_positions)
        if c.embedding_size % c.transformer_heads:
            raise ValueError(f"embedding_size {c.embedding_size} is not a multiple of {c.transformer_heads} heads")
        self._seeds = init_seeds(self.init_seed, transformer_weights(c.transformer_layers))   # depends on the layers
        self._build_layers()

    def _build_layers(self) -> None:
        c, init, E = self.config, self.init, self.config.embedding_size
        self.grid_embedding = layers.Dense(E, kernel_initializer=init("grid_embedding"), name="grid_embedding")
        # the grid's 2-D position: learned, starting from a sine table (rows in the first half of the
        # dimensions, columns in the second), so that where an attended object is travels with it in
        # the values from the first step (a small random start left it ~3% of the signal and the
        # relations left/right/above/below near chance: docs/results.md)
        rows, cols = grid_position_tables(self.side, E)
        self.row_embedding = layers.Embedding(self.side, E, embeddings_initializer=keras.initializers.Constant(rows),
                                              name="row_embedding")
        self.column_embedding = layers.Embedding(self.side, E,
                                                 embeddings_initializer=keras.initializers.Constant(cols),
                                                 name="column_embedding")
        self.memory_norm = layers.LayerNormalization(epsilon=1e-6, name="memory_norm")
        self.word_embedding = layers.Embedding(c.vocab_size, E, embeddings_initializer=init("word_embedding"),
                                               name="word_embedding")
        self.position_embedding = layers.Embedding(c.max_positions, E,
                                                   embeddings_initializer=init("position_embedding"),
                                                   name="position_embedding")
        self.blocks = [self._block(i) for i in range(c.transformer_layers)]
        self.final_norm = layers.LayerNormalization(epsilon=1e-6, name="final_norm")
        self.drop = layers.Dropout(c.dropout)
        self.logits = layers.Dense(c.vocab_size, kernel_initializer=init("logits"), name="logits")

    def _block(self, i: int) -> dict:
        c, init, E = self.config, self.init, self.config.embedding_size
        block = {}
        for kind in ("self", "cross"):
            mha = layers.MultiHeadAttention(c.transformer_heads, E // c.transformer_heads, dropout=c.attention_dropout,
                                            name=f"layer{i}_{kind}_attention")
            with keras.name_scope(self.name):               # its variables' paths like the other layers'
                mha.build((None, None, E), (None, None, E))
            # MultiHeadAttention clones one initializer for its four products: with a seed that
            # gives them the same values, so each gets its own seeded draw here
            for part in ATTENTION_PARTS:
                kernel = getattr(mha, f"{part}_dense").kernel
                kernel.assign(init(f"layer{i}_{kind}_{part}")(kernel.shape))
            block[kind] = mha
            block[f"{kind}_norm"] = layers.LayerNormalization(epsilon=1e-6, name=f"layer{i}_{kind}_norm")
        block["ff_norm"] = layers.LayerNormalization(epsilon=1e-6, name=f"layer{i}_ff_norm")
        block["ff1"] = layers.Dense(c.transformer_ff, activation="relu", kernel_initializer=init(f"layer{i}_ff1"),
                                    name=f"layer{i}_ff1")
        block["ff2"] = layers.Dense(E, kernel_initializer=init(f"layer{i}_ff2"), name=f"layer{i}_ff2")
        return block

    @property
    def feature_shape(self) -> tuple:
        return (self.config.grid_positions, self.config.feature_dim)

    def state_shapes(self) -> tuple:
        c = self.config
        P, M, L = c.grid_positions, c.max_positions, c.transformer_layers
        H = c.transformer_heads
        D = c.embedding_size // H
        return (*[(P, H, D)] * (2 * L), *[(M, H, D)] * (2 * L), (1,))

    # ---- the pieces -----------------------------------------------------------------------
    def memory(self, features):
        """[N, P, F] -> the grid the words attend to [N, P, E], with its 2-D position embeddings."""
        p = ops.arange(self.config.grid_positions, dtype="int32")
        pos = self.row_embedding(p // self.side) + self.column_embedding(p % self.side)     # [P, E]
        return self.memory_norm(self.grid_embedding(self.normalise(features)) + pos)

    def embed(self, word_ids, positions, training=False):
        """word ids [N, T], positions int [T] or [N, T] -> [N, T, E] (the last position reused past the table)."""
        positions = ops.minimum(positions, self.config.max_positions - 1)
        return self.drop(self.word_embedding(word_ids) + self.position_embedding(positions), training=training)

    def _layer(self, block, x, grid_kv, words=ALL_WORDS, training=False, return_attention=False):
        """One pre-norm layer over the words x: [N, T, E], or packed [n, E] (words: Words).
        grid_kv: the grid's keys and values for this layer's cross-attention (grid_keys_values)."""
        sa = block["self"]
        h = block["self_norm"](x)
        q, k, v = (words.unpack(words.project(d, h)) for d in (sa.query_dense, sa.key_dense, sa.value_dense))
        att, _ = sa._compute_attention(q, k, v, None, training, use_causal_mask=True)
        x = x + self.drop(words.project(sa.output_dense, words.pack(att)), training=training)
        att, scores = self._cross_attend(block, x, *grid_kv, training, return_attention, words)
        x = x + self.drop(att, training=training)
        return x + self._feed_forward(block, x, training), scores

    def _cross_attend(self, block, x, keys, values, training=False, scores=False, words=ALL_WORDS):
        """The cross-attention of LN(x) (x [N, T, E], or packed [n, E]: Words) over a grid's
        projected keys and values [N, P, H, D]: MultiHeadAttention.call's computation with the grid's
        projections done beforehand (once per image, not per caption or per step) -> (output shaped
        like x, per-head weights [N, H, T, P] or None)."""
        ca = block["cross"]
        q = words.unpack(words.project(ca.query_dense, block["cross_norm"](x)))
        att, weights = ca._compute_attention(q, keys, values, None, training, scores)
        return words.project(ca.output_dense, words.pack(att)), weights

    def grid_keys_values(self, features, owner=None) -> list:
        """[U, P, F] -> each layer's cross-attention (keys, values) of the grid, [N, P, H, D] each:
        projected once per image, then repeated for each caption (owner [N]: the image row of each
        caption; None: one caption per image)."""
        memory = self.memory(features)
        return [(self.per_caption(b["cross"].key_dense(memory), owner),
                 self.per_caption(b["cross"].value_dense(memory), owner)) for b in self.blocks]

    def _feed_forward(self, block, x, training=False):
        return self.drop(block["ff2"](self.drop(block["ff1"](block["ff_norm"](x)), training=training)),
                         training=training)

    # ---- teacher forcing --------------------------------------------------------------------
    def hidden(self, features, input_ids, training=False, return_attention=False, owner=None, mask=None):
        """[U, P, F], [B, T] -> outputs [B, T, E] (after the final LayerNorm) [, attention [B, T, P]].
        owner [B]: the image row of each caption (None: U = B, one caption per image). mask [B, T]
        (optional): the positions whose outputs are read (a prefix of each row, as the loss's real
        targets are); the others come out 0 and cost no per-token products."""
        out, scores = self._teacher_forced(features, input_ids, training, return_attention, owner, mask)
        return (out, ops.mean(scores, axis=1)) if return_attention else out     # heads averaged: [B, T, P]

    def _teacher_forced(self, features, input_ids, training=False, scores=False, owner=None, mask=None):
        """-> outputs [B, T, E], the last layer's cross-attention per head [B, H, T, P] (or None).
        With a mask the words run packed (Words)."""
        grid = self.grid_keys_values(features, owner)
        words = Words(mask)
        x = words.pack(self.embed(input_ids, ops.arange(ops.shape(input_ids)[1], dtype="int32"), training))
        att = None
        for i, block in enumerate(self.blocks):
            last = scores and i == len(self.blocks) - 1
            x, att = self._layer(block, x, grid[i], words, training, last)
        return words.unpack(self.final_norm(x)), att

    def hidden_and_penalty(self, features, input_ids, mask, training=False, cells=None, owner=None):
        """In training with attention_supervision > 0 and cells: the grounding penalty on the last
        layer's cross-attention averaged over its first `supervised_heads` heads (0: all of them, the
        maps `attention` draws); the other heads stay free (e.g. to look at the object a relation
        compares with)."""
        c = self.config
        if not (training and cells is not None and c.attention_supervision > 0):
            return self.hidden(features, input_ids, training=training, owner=owner, mask=mask), 0.0
        out, scores = self._teacher_forced(features, input_ids, training, True, owner, mask)
        k = c.supervised_heads or c.transformer_heads
        return out, self.grounding_penalty(ops.mean(scores[:, :k], axis=1), cells)

    def project(self, h):
        return self.logits(h)

    def attention(self, features, input_ids):
        """Attention maps of a given caption: [B, P, F], [B, T] -> [B, T, P] (inference mode): the last
        layer's cross-attention weights, averaged over heads."""
        return self.hidden(features, input_ids, training=False, return_attention=True)[1]

    # ---- decoding ----------------------------------------------------------------------------
    def initial_state(self, features):
        """[N, P, F] -> (each layer's cross-attention keys and values of the grid [N, P, H, D], projected
        once here; each layer's self-attention key and value cache [N, M, H, D], empty; position [N, 1] = 0)."""
        n, c = ops.shape(features)[0], self.config
        H = c.transformer_heads
        grid = [t for kv in self.grid_keys_values(features) for t in kv]
        empty = ops.zeros((n, c.max_positions, H, c.embedding_size // H), dtype=grid[0].dtype)
        return (*grid, *[empty] * (2 * c.transformer_layers), ops.zeros((n, 1), dtype=grid[0].dtype))

    def step_logits(self, word_ids, state):
        """word_ids [N], state (grid keys/values..., caches..., position) -> (logits [N, V], new state).
        Each step projects only the new word: its key and value go into the caches at its position
        (the caches hold projected keys and values, the grid's are projected once by initial_state),
        and MultiHeadAttention's own attention (_compute_attention, the method Keras documents for
        overriding) reads them; the result equals teacher forcing (tests/test_transformer.py)."""
        L, M = self.config.transformer_layers, self.config.max_positions
        grid, caches, position = state[:2 * L], state[2 * L:4 * L], state[-1]
        pos = ops.minimum(ops.cast(position[:, 0], "int32"), M - 1)                         # [N]
        write = ops.one_hot(pos, M, dtype=position.dtype)[:, :, None, None]                 # [N, M, 1, 1]
        visible = (ops.arange(M, dtype="int32")[None, :] <= pos[:, None])[:, None, :]      # [N, 1, M]
        x = self.embed(word_ids[:, None], pos[:, None])                                      # [N, 1, E]
        new_caches = []
        for i, block in enumerate(self.blocks):
            sa = block["self"]
            h = block["self_norm"](x)
            keys = caches[2 * i] * (1.0 - write) + sa.key_dense(h) * write                  # [N, M, H, D]
            values = caches[2 * i + 1] * (1.0 - write) + sa.value_dense(h) * write
            new_caches += [keys, values]
            att, _ = sa._compute_attention(sa.query_dense(h), keys, values, visible, training=False)
            x = x + sa.output_dense(att)
            x = x + self._cross_attend(block, x, grid[2 * i], grid[2 * i + 1])[0]
            x = x + self._feed_forward(block, x)
        logits = self.project(self.final_norm(x)[:, 0])
        return logits, (*grid, *new_caches, position + 1.0)
