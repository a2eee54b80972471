"""The Show and Tell decoder (im2txt's model without the CNN), and what every decoder shares
(the attention decoder over grid features is model/attention.py; model/decoders.py builds either).

Two faces that share every weight:
  call(features, input_ids)   teacher forcing: log-probs [B, T, V] (or `hidden` + `project` for real tokens)
  initial_state(features)     the image fed as the LSTM's first input from a zero state -> (h, c)
  step(word_ids, state)       one word per row -> (log_probs [N, V], new state)

Input/target shift and mask (im2txt's dynamic padding; `0` is <pad>):
    caption    : <start>  a   red  star  <end>  <pad>
    input_ids  : <start>  a   red  star  <end>            ids[:, :-1]   [B, T]
    targets    :    a    red  star <end> <pad>            ids[:, 1:]    [B, T]
    mask       :    1     1    1    1     0               targets != 0
The LSTM sees [image, <start>, a, red, star, <end>]; its output after the image is dropped.
"""
from __future__ import annotations

import random

import keras
import numpy as np
from keras import layers, ops

from model.config import ModelConfig
from model.fast_lstm import run_lstm


INIT_WEIGHTS = ("image_embedding", "word_embedding", "lstm_kernel", "lstm_recurrent", "logits")


def init_seeds(seed: int, names=INIT_WEIGHTS) -> dict[str, int]:
    """One integer seed per randomly initialised weight, all derived from `seed` (deterministic)."""
    draws = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(names))
    return {name: int(x) for name, x in zip(names, draws)}


class Decoder(keras.Model):
    """What every decoder shares: per-weight seeded initialisation, the feature normalisation
    (train mean / inverse std per channel, from the feature manifest; not trained), and the
    decoding interface beam search, infer, evaluate and fine-tuning use:

        feature_shape            one image's features: (F,) pooled or (P, F) grid
        initial_state(features)  -> state, a tuple of arrays with one row per image
        step(word_ids, state)    -> (log_probs [N, V], new state)   (step_logits: the logits)
        state_shapes()           the shape of each state array without its row axis
        hidden / project         teacher forcing (training's real-token loss)
    """
    INIT_WEIGHTS: tuple = ()

    def __init__(self, config: ModelConfig, seed: int | None = None, name: str = "decoder", **kwargs):
        super().__init__(name=name, **kwargs)
        self.config = config
        self.init_seed = random.randrange(2**31 - 1) if seed is None else int(seed)
        self._seeds = init_seeds(self.init_seed, self.INIT_WEIGHTS)
        self.feat_mean = self.add_weight(shape=(config.feature_dim,), initializer="zeros", trainable=False,
                                         name="feature_mean")
        self.feat_inv_std = self.add_weight(shape=(config.feature_dim,), initializer="ones", trainable=False,
                                            name="feature_inv_std")

    def init(self, weight: str):
        """Weight `weight`'s own initializer (Keras 3: an initializer with seed=None, or one instance
        shared by several weights, gives the same values on every call)."""
        c = self.config
        return keras.initializers.RandomUniform(-c.init_scale, c.init_scale, seed=self._seeds[weight])

    def set_feature_stats(self, mean, std) -> None:
        std = np.asarray(std, np.float64)
        live = std[std > 0]
        # An epsilon relative to the features' own scale (random-init Inception's are ~1e-4): a
        # near-constant dimension cannot blow up by 1/std; a constant (dead) one is ignored.
        # feature_std_floor: the fraction of the median channel's std added to every std.
        eps = self.config.feature_std_floor * float(np.median(live)) if live.size else 1.0
        inv = np.where(std > 0, 1.0 / (std + eps), 0.0).astype(np.float32)
        self.feat_mean.assign(np.asarray(mean, np.float32))
        self.feat_inv_std.assign(inv)

    def normalise(self, features):
        z = (features - self.feat_mean) * self.feat_inv_std
        c = self.config.feature_clip
        return ops.clip(z, -c, c) if c else z

    @property
    def feature_shape(self) -> tuple:
        return (self.config.feature_dim,)

    def hidden_and_penalty(self, features, input_ids, mask, training=False, cells=None, owner=None):
        """Teacher forcing for the loss: (outputs [B, T, H], a regularisation term summed over the
        batch, added to the loss sum in training only). No penalty here. cells [B, T, P]: see
        grounding_penalty (the grid decoders'). owner [B] (optional): the row of features [U, ...]
        that caption b describes, so an image's features are projected once for all its captions."""
        return self.hidden(features, input_ids, training=training, owner=owner), 0.0

    @staticmethod
    def per_caption(x, owner):
        """x [U, ...] (one row per image) -> [B, ...] (one per caption: owner [B] the image row of
        each); owner None: x as it is (one caption per image)."""
        return x if owner is None else ops.take(x, owner, axis=0)

    def grounding_penalty(self, attention, cells):
        """Attention supervision: attention [B, T, P] (the maps `attention` draws), cells [B, T, P]
        (1 on the cells of the object target word t names, all 0 where it names none) ->
        attention_supervision x the sum over named words of -log(the attention mass on their object)."""
        a = ops.cast(attention, "float32")
        mass = ops.sum(a * cells, axis=-1)                                           # [B, T]
        named = ops.cast(ops.max(cells, axis=-1) > 0, "float32")
        return self.config.attention_supervision * ops.sum(-ops.log(mass + 1e-6) * named)

    def call(self, features, input_ids, training=False):
        return ops.log_softmax(self.project(self.hidden(features, input_ids, training)), axis=-1)  # [B, T, V]

    def step(self, word_ids, state):
        """word_ids [N] int, state -> (log_probs [N, V], new state)."""
        logits, state = self.step_logits(word_ids, state)
        return ops.log_softmax(logits, axis=-1), state

    def build_all(self) -> None:
        """Create every weight (call once before loading weights)."""
        f = np.zeros((1, *self.feature_shape), np.float32)
        self(f, np.ones((1, 2), np.int32))
        self.step(np.ones((1,), np.int32), self.initial_state(f))


class ShowAndTell(Decoder):
    """`seed`: initialisation seed. None draws it from Python's `random` module, which
    keras.utils.set_random_seed(s) seeds: models built after the same set_random_seed are identical."""
    INIT_WEIGHTS = INIT_WEIGHTS

    def __init__(self, config: ModelConfig, seed: int | None = None, **kwargs):
        super().__init__(config, seed, name="show_and_tell", **kwargs)
        c, init = config, self.init
        self.image_embedding = layers.Dense(c.embedding_size, kernel_initializer=init("image_embedding"),
                                            name="image_embedding")
        self.word_embedding = layers.Embedding(c.vocab_size, c.embedding_size,
                                               embeddings_initializer=init("word_embedding"), name="word_embedding")
        self.lstm = layers.LSTM(c.lstm_units, return_sequences=True, kernel_initializer=init("lstm_kernel"),
                                recurrent_initializer=init("lstm_recurrent"), name="lstm")
        self.drop_in = layers.Dropout(c.dropout)
        self.drop_out = layers.Dropout(c.dropout)
        self.logits = layers.Dense(c.vocab_size, kernel_initializer=init("logits"), name="logits")

    def state_shapes(self) -> tuple:
        H = self.config.lstm_units
        return ((H,), (H,))

    def embed_image(self, features):                                   # [B, F] -> [B, E]
        return self.image_embedding(self.normalise(features))

    # ---- teacher forcing ----------------------------------------------------------------
    def hidden(self, features, input_ids, training=False, lengths=None, owner=None):
        """LSTM outputs for each input word: [B, T, H] (after output dropout). lengths [B]
        (optional): only row b's first lengths[b] outputs are needed (the rest may come back 0).
        owner [B] (optional): the row of features each caption describes (Decoder.per_caption)."""
        img = self.per_caption(self.embed_image(features), owner)[:, None, :]     # [B, 1, E]
        words = self.word_embedding(input_ids)                         # [B, T, E]
        seq = self.drop_in(ops.concatenate([img, words], axis=1), training=training)  # [B, T+1, E]
        steps = None if lengths is None else lengths + 1               # the image's step too
        out = run_lstm(self.lstm, seq, training, steps)                # [B, T+1, H]
        return self.drop_out(out[:, 1:], training=training)            # [B, T, H]

    def hidden_and_penalty(self, features, input_ids, mask, training=False, cells=None, owner=None):
        # the loss reads the outputs of real targets only: the LSTM skips the steps after a row's last
        T = ops.shape(mask)[1]
        lengths = ops.max(ops.cast(mask, "int32") * ops.arange(1, T + 1, dtype="int32")[None, :], axis=1)
        return self.hidden(features, input_ids, training, lengths, owner), 0.0

    def project(self, h):
        """[..., H] -> logits [..., V]. Training calls it on real (non-pad) positions only."""
        return self.logits(h)

    # ---- decoding -----------------------------------------------------------------------
    def initial_state(self, features):
        """[N, F] -> (h [N, H], c [N, H]): the LSTM state after seeing the image."""
        img = self.embed_image(features)
        zeros = ops.zeros((ops.shape(features)[0], self.config.lstm_units), dtype=img.dtype)
        _, (h, c) = self.lstm.cell(img, [zeros, zeros], training=False)
        return h, c

    def step_logits(self, word_ids, state):
        """word_ids [N] int, state (h, c) -> (logits [N, V], (h, c))."""
        x = self.word_embedding(word_ids)                              # [N, E]
        out, (h, c) = self.lstm.cell(x, list(state), training=False)   # [N, H]
        return self.project(out), (h, c)
