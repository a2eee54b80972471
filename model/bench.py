"""Training-throughput benchmark of the decoder on random data, im2txt-sized by default.

Prints, from one run (medians over timed steps):
  matmul FLOP/s of this machine (a [B*T, H] x [H, V] product, the step's biggest),
  our step (dynamic padding, logits for real tokens only) and a plain baseline (fixed padding
  to max_len, logits for every position): ms/step, examples/s, real tokens/s,
  the FLOPs the step needs for its real tokens / step time / matmul FLOP/s  (the "limit ratio"),
  peak memory.
"""
from __future__ import annotations

import re
import resource
import statistics
import time

import numpy as np


def _lengths(rng, n, max_len, mean):
    """COCO-like caption lengths (tokens incl. <start>/<end>), clipped to [5, max_len]."""
    return np.clip(np.round(rng.normal(mean, 2.5, n)), 5, max_len).astype(int)


def measure_matmul_flops(m: int, k: int, n: int, reps: int = 15, inner: int = 10) -> float:
    """FLOP/s of float32 [m, k] x [k, n] matmuls on this machine: `inner` products in one compiled
    loop (one call, one scalar back: no dispatch or result copy in the figure), median of reps."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(m, k)).astype(np.float32))
    w = tf.constant(rng.normal(size=(k, n)).astype(np.float32))

    @tf.function
    def products():
        def body(i, acc):                     # a new left operand each time: nothing can be reused
            return i + 1, acc + tf.matmul(a + tf.cast(i, tf.float32), w)[0, 0]
        return tf.while_loop(lambda i, _: i < inner, body, (0, 0.0))[1]
    products().numpy()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        products().numpy()
        ts.append(time.perf_counter() - t)
    return 2.0 * m * k * n * inner / statistics.median(ts)


def needed_flops(n_real: int, batch: int, E: int, H: int, V: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) for the real tokens of one step."""
    lstm = 2 * 4 * H * (E + H)            # gates of one LSTM step
    proj = 2 * H * V                      # logits of one token
    return 3.0 * ((n_real + batch) * lstm + n_real * proj)


GRID_DECODERS = {"attention": "attention decoder", "transformer": "transformer decoder"}   # timed beside the pooled one
PEER_NAME = "PyTorch peer: packed sequences, real-token logits (same batches)"


def _random_batches(rng, n: int, batch: int, max_len: int, mean_len: float, vocab: int, fixed: bool,
                    feature_shape: tuple, per_image: int = 1) -> list:
    """n batches of (features [batch / per_image, *feature_shape], ids padded to max_len if fixed else
    to the batch's longest caption, number of real target tokens[, owner: the image row of each
    caption, when per_image > 1: the batches of --group-by-image])."""
    out = []
    for _ in range(n):
        lens = _lengths(rng, batch, max_len, mean_len)
        t = max_len if fixed else int(lens.max())
        ids = np.zeros((batch, t), np.int32)
        for i, k in enumerate(lens):
            ids[i, 0], ids[i, k - 1] = 1, 2
            ids[i, 1:k - 1] = rng.integers(4, vocab, k - 2)
        f = rng.normal(size=(batch // per_image, *feature_shape)).astype(np.float32)
        owner = (np.repeat(np.arange(batch // per_image, dtype=np.int32), per_image),) if per_image > 1 else ()
        out.append((f, ids, int((lens - 1).sum()), *owner))
    return out


def _padded_step(model, opt):
    """The baseline's training step: logits at every position (pads included), pads masked out of the loss."""
    import tensorflow as tf

    @tf.function
    def step(batch_):
        f, ids = batch_
        with tf.GradientTape() as tape:
            logits = model.project(model.hidden(f, ids[:, :-1], training=True))   # [B, T, V] incl. pads
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(ids[:, 1:], logits)
            mask = tf.cast(ids[:, 1:] > 0, tf.float32)
            loss = tf.reduce_sum(ce * mask) / tf.reduce_sum(mask)
        g = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(g, model.trainable_variables))
        return loss
    return step


def _variant_config(vocab: int, size: int, grid: str | None, positions: int, grid_dim: int, layers: int):
    """The ModelConfig of a variant's decoder (arguments as _variant_step's)."""
    from model.config import ModelConfig
    grid_cfg = dict(decoder=grid, feature_dim=grid_dim, grid_positions=positions, attention_units=size,
                    **({"transformer_layers": layers} if layers else {}))
    return ModelConfig(vocab_size=vocab, embedding_size=size, lstm_units=size, **(grid_cfg if grid else {}))


def _width(decoder: str | None, size: int, transformer_size: int) -> int:
    """The embedding / LSTM size of a variant, the transformer's d_model (transformer_size, 0: size)."""
    return transformer_size or size if decoder == "transformer" else size


def check_grid_decoder(vocab: int, size: int, decoder: str, positions: int, grid_dim: int, layers: int = 0,
                       transformer_size: int = 0) -> None:
    """The grid decoder's config through model.config.validate (what `model train` checks), before
    anything is timed; its errors name the bench's flags."""
    from model.config import validate
    from prepare.errors import UserError
    if decoder not in GRID_DECODERS:
        return
    try:
        validate(_variant_config(vocab, _width(decoder, size, transformer_size), decoder, positions, grid_dim,
                                 layers))
    except UserError as e:
        msg = str(e).replace("--embedding-size", "--transformer-size" if transformer_size else "--size")
        raise UserError(re.sub(r"the feature cache has (\d+) positions", r"--positions \1", msg)) from None


def _variant_step(vocab: int, size: int, fixed: bool, grid: str | None, positions: int, grid_dim: int, strategy,
                  grouped: bool = False, layers: int = 0):
    """A freshly seeded decoder and optimizer, the step that trains them (the baseline's, fixed
    padding, or ours, model.steps; grouped: batches of --group-by-image) and the decoder's number of
    trainable weights. grid: None (the pooled decoder) or the grid decoder's name; layers: the
    transformer's (0: its default); size: embedding and LSTM size, the transformer's d_model."""
    import keras

    from model.decoders import build_decoder
    from model.optim import FusedAdam
    from model.steps import make_steps
    keras.utils.set_random_seed(0)
    model = build_decoder(_variant_config(vocab, size, grid, positions, grid_dim, layers))
    opt = FusedAdam(1e-3)
    opt.build(model.trainable_variables)
    n_params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    if fixed:
        return _padded_step(model, opt), n_params
    return make_steps(model, opt, strategy, 5.0, grouped)[0], n_params


def _time_step(step, data, batch: int) -> dict:
    """Two warm-up steps, then the median time of one step over the rest of `data`."""
    import tensorflow as tf
    for f, ids, _, *owner in data[:2]:
        float(step((tf.constant(f), tf.constant(ids), *map(tf.constant, owner))))       # trace / warm up
    times, toks = [], []
    for f, ids, n, *owner in data[2:]:
        bt = (tf.constant(f), tf.constant(ids), *map(tf.constant, owner))
        t = time.perf_counter()
        float(step(bt))
        times.append(time.perf_counter() - t)
        toks.append(n)
    sec = statistics.median(times)
    return {"ms_per_step": 1000 * sec, "examples_s": batch / sec,
            "real_tokens_s": statistics.median(toks) / sec, "n_real": statistics.median(toks)}


def _time_peer(results: dict, ours_data, batch: int, vocab: int, size: int) -> None:
    """results[PEER_NAME]: the PyTorch peer on our variant's batches, when PyTorch is installed."""
    import keras

    from model import bench_peer
    if bench_peer.available():
        keras.utils.set_random_seed(0)
        results[PEER_NAME] = r = bench_peer.run(ours_data, vocab, size, 2048)
        r["examples_s"] = 1000 * batch / r["ms_per_step"]
        r["n_real"] = statistics.median(n for *_, n in ours_data[2:])


def _log_results(results: dict, peaks: list, peak: float, attention_name: str | None, tf_version: str,
                 vocab: int, size: int, batch: int, max_len: int, mean_len: float, steps: int, log) -> None:
    from model import bench_peer
    log(f"model train bench (TensorFlow {tf_version}, CPU; vocab {vocab}, embedding/LSTM {size}, batch {batch}, "
        f"lengths <= {max_len} with mean ~{mean_len}; medians of {steps} steps)")
    log(f"  matmul: {peak / 1e9:.1f} GFLOP/s (median of {len(peaks)} samples taken between the variants: "
        f"{', '.join(map(str, results['matmul_gflops_samples']))})")
    for name, r in results.items():
        if isinstance(r, dict):
            log(f"  {name}:\n      {r['ms_per_step']:7.1f} ms/step  {r['examples_s']:7.1f} examples/s  "
                f"{r['real_tokens_s']:7.0f} real tokens/s  {100 * r['limit_ratio']:5.1f}% of the matmul limit"
                + (f"  ({r['params'] / 1e6:.1f} M weights)" if "params" in r else ""))
    ours, base = (results[k] for k in list(results)[:2])
    log(f"  speed-up over the baseline: {ours['real_tokens_s'] / base['real_tokens_s']:.2f}x real tokens/s")
    if PEER_NAME in results:
        log(f"  ours / PyTorch {results[PEER_NAME]['torch']} peer: "
            f"{ours['real_tokens_s'] / results[PEER_NAME]['real_tokens_s']:.2f}x real tokens/s")
    else:
        log(f"  PyTorch peer: not measured (PyTorch is not installed; {bench_peer.INSTALL})")
    if attention_name is not None:
        att = results[attention_name]
        log(f"  {attention_name.split(' (')[0]} / pooled decoder: {att['real_tokens_s'] / ours['real_tokens_s']:.2f}x "
            f"real tokens/s (the FLOP limit ratio counts the LSTM and logits only)")
    log(f"  peak memory (RSS, TensorFlow's variants): {results['peak_rss_mib']:.0f} MiB")


def run(vocab: int = 12000, size: int = 512, batch: int = 32, max_len: int = 20, mean_len: float = 12.5,
        steps: int = 12, decoder: str = "show_and_tell", positions: int = 49, grid_dim: int = 1280,
        per_image: int = 1, layers: int = 0, transformer_size: int = 0, log=print) -> dict:
    """decoder "attention" or "transformer": also times that grid decoder (same sizes, our step; the
    transformer with `layers` layers (0: its default) and its default heads and feed-forward size,
    d_model `transformer_size`, 0: `size`) on random grids of `positions` x `grid_dim` (EfficientNet-Lite0 at 224 px:
    49 x 1280); per_image > 1: in batches of `per_image` captions of each image (--group-by-image;
    COCO has 5), so that it projects each grid once for them. The pooled decoder keeps one image
    per caption: projecting its vector is under 1% of its step."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    strategy = tf.distribute.get_strategy()

    peak = measure_matmul_flops(batch * 13, size, vocab)     # the step's largest product

    results = {}
    variants = [("ours: dynamic padding, real-token logits", False, None),
                ("baseline: fixed padding, logits at every position", True, None)]
    if decoder in GRID_DECODERS:
        shape = f"{positions} positions x {grid_dim}"
        if transformer_size and decoder == "transformer":
            shape += f", d_model {transformer_size}"
        if layers and decoder == "transformer":
            shape += f", {layers} layer{'s' * (layers > 1)}"
        if per_image > 1:
            shape += f", {per_image} captions per image"
        variants.append((f"{GRID_DECODERS[decoder]} ({shape}), ours", False, decoder))
    peaks = [peak]
    for name, fixed, grid in variants:
        peaks.append(measure_matmul_flops(batch * 13, size, vocab))   # the machine's rate drifts: sample it
        k = per_image if grid else 1
        step, n_params = _variant_step(vocab, _width(grid, size, transformer_size), fixed, grid, positions, grid_dim,
                                       strategy, k > 1, layers)
        data = _random_batches(rng, steps + 2, batch, max_len, mean_len, vocab, fixed,
                               (positions, grid_dim) if grid else (2048,), k)
        if name == variants[0][0]:
            ours_data = data
        results[name] = _time_step(step, data, batch)
        results[name]["params"] = n_params
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # before PyTorch loads
    _time_peer(results, ours_data, batch, vocab, size)
    peaks.append(measure_matmul_flops(batch * 13, size, vocab))
    peak = statistics.median(peaks)
    for r in results.values():
        r["limit_ratio"] = needed_flops(r["n_real"], batch, size, size, vocab) / (r["ms_per_step"] / 1000) / peak
    results["matmul_gflops"] = peak / 1e9
    results["matmul_gflops_samples"] = [round(p / 1e9, 1) for p in peaks]
    results["peak_rss_mib"] = rss
    _log_results(results, peaks, peak, variants[2][0] if decoder in GRID_DECODERS else None, tf.__version__,
                 vocab, size, batch, max_len, mean_len, steps, log)
    return results
