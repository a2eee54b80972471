"""The training step's mathematics, shared by every phase: the real-token cross-entropy, clipping
by global norm and the compiled (distributed) step of stage 1.

Each is the plain TensorFlow form's result with fewer passes over memory (tests compare them):
`token_cross_entropy` equals tf.nn.sparse_softmax_cross_entropy_with_logits, `clip_by_global_norm`
equals tf.clip_by_global_norm.
"""
from __future__ import annotations

import numpy as np


def masked_token_loss(model, features, ids, training=False, cells=None, owner=None):
    """Cross-entropy summed over real (non-pad) target tokens, and their count.

    ids [B, T+1] -> inputs ids[:, :-1], targets ids[:, 1:]; logits are computed for real tokens
    only, so pads cost nothing and cannot leak into the mean (sum / count is a true per-token mean).
    cells [B, T, P] (optional): the grid cells of the object each target word names, for attention
    supervision (the decoder's penalty; training only). owner [B] (optional): the row of features
    [U, ...] each caption describes (grouped batches: an image's features projected once).
    """
    import tensorflow as tf
    inp, tgt = ids[:, :-1], ids[:, 1:]                                          # [B, T], [B, T]
    mask = tgt > 0
    out, penalty = model.hidden_and_penalty(features, inp, mask, training, cells, owner)   # penalty: training only
    h = tf.boolean_mask(out, mask)                                              # [n, H]
    logits = tf.cast(model.project(h), tf.float32)                              # [n, V]
    ce = token_cross_entropy(logits, tf.boolean_mask(tgt, mask))
    return tf.reduce_sum(ce) + penalty, tf.cast(tf.shape(ce)[0], tf.float32)


def token_cross_entropy(logits, labels):
    """tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits) [n], with the same gradient
    (softmax - one_hot), in fewer passes over the [n, V] logits: the softmax kernel (oneDNN's,
    a third of the time of tf.exp alone), kept for the backward pass, and the one-hot subtracted at
    n places only. log-sum-exp = max logit - log(max probability): that probability,
    1 / sum(exp(logits - max)), is at least 1/V, so its log is precise."""
    import tensorflow as tf

    @tf.custom_gradient
    def xent(logits):
        p = tf.nn.softmax(logits)
        rows = tf.stack([tf.range(tf.shape(labels)[0]), tf.cast(labels, tf.int32)], axis=1)
        lse = tf.reduce_max(logits, axis=-1) - tf.math.log(tf.reduce_max(p, axis=-1))
        loss = lse - tf.gather_nd(logits, rows)

        def grad(dy):
            return tf.tensor_scatter_nd_sub(p * dy[:, None], rows, dy)
        return loss, grad
    return xent(logits)


def clip_by_global_norm(grads, clip_norm: float):
    """tf.clip_by_global_norm's result (NaN everywhere when the norm is not finite), but the norm
    from multi-threaded sums of squares (its L2Loss kernel runs on one core: 6.3 ms for the 6 M
    embedding alone) and no multiply at all when the norm is within clip_norm."""
    import tensorflow as tf
    kept = [g for g in grads if g is not None]
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(g.values if isinstance(g, tf.IndexedSlices) else g,
                                                             tf.float32))) for g in kept]))

    def scaled():
        scale = tf.where(tf.math.is_finite(norm), clip_norm / tf.maximum(norm, clip_norm), np.nan)
        return [tf.IndexedSlices(g.values * tf.cast(scale, g.dtype), g.indices, g.dense_shape)
                if isinstance(g, tf.IndexedSlices) else g * tf.cast(scale, g.dtype) for g in kept]
    out = iter(tf.cond(norm <= clip_norm, lambda: kept, scaled))
    return [None if g is None else next(out) for g in grads], norm


def make_steps(model, optimizer, strategy, clip_norm: float, grouped: bool = False):
    """Compiled (train_step, eval_step) over (possibly distributed) batches (features, ids[, cells]),
    or with `grouped` (features of each image, ids, owner[, cells]): CaptionSet.batch.

    Each replica's loss is its token-loss sum divided by the token count of the *global* batch,
    so the sum of the replicas' gradients is the gradient of the global per-token mean. With more
    than one replica that sum is taken here, before clipping, so the clipped gradient is the one a
    single process clips; the optimizer is told not to sum it again (summed_gradients).
    """
    import tensorflow as tf
    if strategy.num_replicas_in_sync > 1:
        summed_gradients(optimizer)

    def split(rest):                                  # -> (cells or None, owner or None)
        owner, rest = (rest[0], rest[1:]) if grouped else (None, rest)
        return (rest[0] if rest else None), owner

    def replica_train(features, ids, *rest):          # rest: owner if grouped, cells with attention supervision
        ctx = tf.distribute.get_replica_context()
        cells, owner = split(rest)
        with tf.GradientTape() as tape:
            loss_sum, n = masked_token_loss(model, features, ids, True, cells, owner)
            loss = loss_sum / ctx.all_reduce(tf.distribute.ReduceOp.SUM, n)
        grads = tape.gradient(loss, model.trainable_variables)
        if ctx.num_replicas_in_sync > 1:
            grads = all_reduce_gradients(ctx, grads)
        grads, _ = clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(reduce_retracing=True)      # batches differ in length: dynamic padding
    def train_step(batch):
        per = strategy.run(replica_train, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per, axis=None)

    @tf.function(reduce_retracing=True)
    def eval_step(batch):
        s, n = strategy.run(lambda f, i, *rest: masked_token_loss(model, f, i, False, None, split(rest)[1]),
                            args=batch)
        return strategy.reduce("SUM", s, axis=None), strategy.reduce("SUM", n, axis=None)
    return train_step, eval_step


def all_reduce_gradients(ctx, grads: list) -> list:
    """Each gradient summed over the replicas (None stays None)."""
    import tensorflow as tf
    kept = [g for g in grads if g is not None]
    out = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, kept) if kept else [])
    return [None if g is None else next(out) for g in grads]


def summed_gradients(optimizer) -> None:
    """Keras' optimizers sum the gradients over the replicas inside apply_gradients; this one is
    handed gradients already summed (and clipped) by the step. Keras 3 has no switch for that, so
    the instance's summing method becomes the identity (pinned by the multi-replica tests: a second
    sum would double every update)."""
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)
