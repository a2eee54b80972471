"""The CNN when it trains (fine-tuning): the stage-1 encoder made trainable, BatchNorm frozen or
calibrated, the decoder's feature normalisation re-fitted, and the augmentation of its images.

BatchNorm (`--bn`): in training mode its layers use batch statistics in training and their moving
statistics at evaluation and inference, re-estimated from training images (calibrate_batchnorm)
before the first step and before every evaluation: with random-init weights they start at 0/1,
~1000x off, and moving averages lag the weights as they change. `frozen` keeps statistics, beta and
gamma fixed and trains only the convolutions (measurements: docs/results.md).

Augmentation: random crops and brightness/contrast jitter only; no hue or saturation changes
(colours are content) and no horizontal flips unless asked (they falsify "left"/"right").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from extract import encoder as enc
from model.config import FinetuneConfig


def calibrate_batchnorm(encoder, batches) -> int:
    """Set every BatchNorm layer's moving mean/variance to the average of its batch statistics over
    `batches` (uint8/float image batches), each computed in a training-mode forward pass, so inference
    mode computes what training mode does. Returns the number of images used.

    Needed twice with --bn train: before the first step (random-init moving statistics are 0/1, ~1000x
    off) and before every evaluation (moving averages lag the weights as they change)."""
    import tensorflow as tf
    bns = enc.batchnorm_layers(encoder)
    saved = [(x.momentum, x.trainable) for x in bns]
    n = 0
    try:
        for i, images in enumerate(batches):
            for x in bns:                 # moving = moving * m + batch * (1 - m): a running average
                x.momentum, x.trainable = i / (i + 1), True
            encoder(tf.cast(images, tf.float32), training=True)
            n += int(images.shape[0])
    finally:
        for x, (m, t) in zip(bns, saved):
            x.momentum, x.trainable = m, t
    return n


def fit_feature_normalisation(decoder, forward, batches) -> None:
    """Re-fit the decoder's per-dimension feature mean/std to what `forward` now produces."""
    f = np.concatenate([forward(images).numpy() for images in batches]).astype(np.float64)
    f = f.reshape(-1, f.shape[-1])                    # a grid: every position of every image
    decoder.set_feature_stats(f.mean(0), f.std(0))


def trainable_encoder(spec, size: int, cfg: FinetuneConfig, weights: Path, kind: str = "pooled"):
    """The stage-1 encoder, trainable; kind "grid" or "grid16" (the grid decoders): its last feature
    map or its stride-16 one, the same layers as the cache that trained the decoder."""
    import keras
    if cfg.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        encoder, _ = enc.build_encoder(spec.name, "none", size, trainable=True, output=kind)
    finally:
        keras.config.set_dtype_policy("float32")
    enc.load_encoder_weights(encoder, weights)
    if cfg.bn == "frozen":
        # Statistics *and* beta/gamma fixed. With random-init weights the CNN's activations are tiny
        # (Inception's features ~1e-4), and Adam moves every parameter by ~lr a step: trainable beta
        # offsets of that size drown the image signal and every image gets the same caption (measured).
        for layer in enc.batchnorm_layers(encoder):
            layer.trainable = False
    return encoder


def augment(x, seed, size: int, flip: bool):
    """Random crop (85-100% of the side) and brightness/contrast jitter; flips only if asked.
    x float32 [B, S, S, 3] in 0..255; seed int32 [2]."""
    import tensorflow as tf
    b = tf.shape(x)[0]
    s = tf.random.stateless_uniform([b, 4], seed=seed)
    frac = 0.85 + 0.15 * s[:, 0:1]
    y0, x0 = (1 - frac) * s[:, 1:2], (1 - frac) * s[:, 2:3]
    boxes = tf.concat([y0, x0, y0 + frac, x0 + frac], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(b), [size, size])
    if flip:
        x = tf.where((s[:, 3] < 0.5)[:, None, None, None], x[:, :, ::-1], x)
    bc = tf.random.stateless_uniform([b, 2], seed=seed + 1)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * (0.8 + 0.4 * bc[:, 0])[:, None, None, None] + mean + (bc[:, 1] - 0.5)[:, None, None, None] * 40
    return tf.clip_by_value(x, 0.0, 255.0)
