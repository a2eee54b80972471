"""Decoding benchmark: captions/s with the batched beam search vs one image at a time (same
model, same features, one run), and the share of the machine's matmul limit the batched form
reaches (decoding FLOPs actually executed / time / matmul FLOP/s)."""
from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _log_decoding(res: dict, peaks: list, peak: float, tf_version: str, vocab: int, size: int, images: int,
                  batch_size: int, beam_size: int, max_len: int, log) -> None:
    """Prints the decoding timings in `res` (the end-to-end line is printed by run)."""
    log(f"infer bench (TensorFlow {tf_version}, CPU; vocab {vocab}, size {size}, {images} images, beam "
        f"{beam_size}, max_len {max_len}, batch {batch_size}; medians of 3 repeats, 7 for the graph)")
    log(f"  matmul ([{batch_size * beam_size}x{size}] x [{size}x{vocab}]): {peak / 1e9:.1f} GFLOP/s (median of "
        f"{len(peaks)} samples taken between the timings: {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})")
    log(f"  one image at a time: {res['one_by_one_captions_s']:7.1f} captions/s")
    log(f"  batched beam search (Python loop, the reference): {res['batched_captions_s']:7.1f} captions/s   "
        f"({res['speedup']:.1f}x; {100 * res['limit_ratio']:.0f}% of the matmul limit)")
    log(f"  batched beam search in one graph (tf.while_loop, what infer uses): {res['graph_captions_s']:7.1f} "
        f"captions/s   ({res['graph_speedup']:.1f}x; {100 * res['graph_limit_ratio']:.0f}% of the matmul limit)")


def _end_to_end(run_dir: str, images: int, batch_size: int, beam_size: int, max_len: int) -> tuple[float, int]:
    """(captions/s captioning `images` synthetic JPEG files with the run, the run's image size)."""
    from infer.captioner import Captioner
    from prepare import synth
    cap = Captioner(run_dir, beam_size=beam_size, max_len=max_len)
    with tempfile.TemporaryDirectory() as tmp:
        synth.generate(tmp, {"train": images}, size=max(cap.image_size, 128), seed=0, progress=False)
        paths = sorted((Path(tmp) / "images" / "train").glob("*.jpg"))
        cap.caption_files(paths[:batch_size], batch_size, progress=False)   # warm up
        t = time.perf_counter()
        cap.caption_files(paths, batch_size, progress=False)
        return images / (time.perf_counter() - t), cap.image_size


def run(vocab: int = 12000, size: int = 512, images: int = 64, batch_size: int = 32, beam_size: int = 3,
        max_len: int = 20, run_dir: str | None = None, log=print) -> dict:
    import keras
    import tensorflow as tf

    from infer.beam_search import beam_search, beam_search_batch
    from model.config import ModelConfig
    from model.bench import measure_matmul_flops
    from infer.captioner import numpy_decoding
    from model.decoder import ShowAndTell
    keras.utils.set_random_seed(0)
    m = ShowAndTell(ModelConfig(vocab_size=vocab, embedding_size=size, lstm_units=size))
    m.build_all()
    init_np, decode_step = numpy_decoding(m)
    rows = [0]

    def step_np(w, s):            # counts the beam rows decoded, for the FLOP figure
        rows[0] += len(w)
        return decode_step(w, s)
    feats = np.random.default_rng(0).normal(size=(images, 2048)).astype(np.float32)
    kw = dict(start_id=1, end_id=2, beam_size=beam_size, max_len=max_len)
    # warm up every shape used
    beam_search_batch(step_np, init_np(feats[:batch_size]), **kw)
    beam_search(step_np, init_np(feats[:1]), **kw)

    peaks = []            # the decode step's biggest product, sampled around every timing (the rate drifts)

    def timed(fn, reps=3):
        out = []
        peaks.append(measure_matmul_flops(batch_size * beam_size, size, vocab, reps=10))
        for _ in range(reps):
            rows[0] = 0
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t, rows[0]))
        sec = statistics.median(o[0] for o in out)
        return sec, out[0][1]

    def batched():
        for i in range(0, images, batch_size):
            beam_search_batch(step_np, init_np(feats[i:i + batch_size]), **kw)

    def one_by_one():
        for i in range(images):
            beam_search(step_np, init_np(feats[i:i + 1]), **kw)

    from model import decoding

    @tf.function(input_signature=[tf.TensorSpec([None, 2048], tf.float32)])
    def graph_search(f):
        return decoding.beam_search(m, f, beam_size=beam_size, max_len=max_len)

    def in_graph():
        for i in range(0, images, batch_size):
            x = graph_search(feats[i:i + batch_size])
            rows[0] += len(feats[i:i + batch_size]) * beam_size * (max_len - 1)   # every beam row, every step
            x[0].numpy()
    in_graph()                                    # trace
    sb, rows_b = timed(batched)
    sg, rows_g = timed(in_graph, reps=7)          # 0.2 s a repeat: more of them steady the median
    so, _ = timed(one_by_one)
    peaks.append(measure_matmul_flops(batch_size * beam_size, size, vocab, reps=10))
    peak = statistics.median(peaks)
    flops_per_row = 2 * 4 * size * (2 * size) + 2 * size * vocab
    res = {"batched_captions_s": images / sb, "one_by_one_captions_s": images / so,
           "speedup": so / sb, "limit_ratio": rows_b * flops_per_row / sb / peak, "matmul_gflops": peak / 1e9,
           "graph_captions_s": images / sg, "graph_speedup": so / sg,
           "graph_limit_ratio": rows_g * flops_per_row / sg / peak}
    _log_decoding(res, peaks, peak, tf.__version__, vocab, size, images, batch_size, beam_size, max_len, log)
    if run_dir:
        res["end_to_end_captions_s"], image_size = _end_to_end(run_dir, images, batch_size, beam_size, max_len)
        log(f"  end to end from JPEG files ({run_dir}, {image_size}px): {res['end_to_end_captions_s']:.1f} captions/s")
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"  peak memory (RSS): {res['peak_rss_mib']:.0f} MiB")
    return res
