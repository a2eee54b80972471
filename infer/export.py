"""python -m infer export: a run directory -> a TensorFlow SavedModel that captions image bytes.

Signature `serving_default`:
    images     tf.string [N]        encoded image files (JPEG, PNG, GIF's first frame, BMP)
 -> captions   tf.string [N, k]     best first ("" where fewer than k captions exist)
    log_probs  float32   [N, k]     the sum of the words' log-probabilities (-inf where no caption)

Everything runs in the graph: decoding, resizing, the run's encoder, the decoder and beam search
(a tf.while_loop with im2txt's semantics, the same as infer/beam_search.py: each live beam expands
with its k best words, the k best partial captions stay alive, those ending in <end> join the k best
complete ones; if none completes within max_len, the partial ones are returned). So
`tf.saved_model.load(DIR)` captions images in any Python with TensorFlow, and TensorFlow Serving
can load DIR. Beam size, k and max length are fixed at export and recorded in DIR/export.json.

Where it differs from `infer caption`: images are decoded by TensorFlow instead of Pillow. JPEGs
are decoded with libjpeg's accurate integer IDCT, which gives Pillow's pixels exactly (TensorFlow's
default IDCT differs by about 1 grey level on average, and that alone changed 6 of 10 top captions
of a run); the resize is TensorFlow's antialiased bilinear filter in Pillow's two rounded passes (width, then
height), within 1-2 grey levels of Pillow's (0.003 on average for a photo, 0.03-0.13 for the
built-in pictures). Not done in the graph: EXIF rotation; alpha is dropped instead of
composited over white. Ties between equally probable beams are broken by position instead of by
word ids. On the built-in test images the top captions agree (tested).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from prepare.util import UserError, exclusive_lock
from prepare.vocabulary import END_ID, PAD_ID, START_ID

EXPORT_RECORD = "export.json"


def beam_search_graph(decoder, features, *, beam_size: int, max_len: int, length_norm: float = 0.0):
    """In-graph batched beam search over decoder.initial_state / decoder.step.

    features [N, ...] -> (ids int32 [N, k, max_len] (<start> ... <end>, then <pad>), lengths [N, k],
    log_probs [N, k], complete bool [N, k]), best first."""
    import tensorflow as tf
    k, L = beam_size, max_len
    neg_inf = tf.constant(-np.inf, tf.float32)
    n = tf.shape(features)[0]
    state = tuple(tf.repeat(s, k, axis=0) for s in decoder.initial_state(features))     # rows n*k
    ids = tf.concat([tf.fill([n, k, 1], START_ID), tf.fill([n, k, L - 1], PAD_ID)], axis=2)
    live_lp = tf.tile(tf.concat([[0.0], tf.fill([k - 1], -np.inf)], 0)[None], [n, 1])   # one real beam
    done_ids = tf.fill([n, k, L], PAD_ID)
    done_lp = tf.fill([n, k], neg_inf)
    done_score = tf.fill([n, k], neg_inf)
    done_len = tf.zeros([n, k], tf.int32)
    rows = tf.range(n)[:, None] * k                                                        # [n, 1]

    def score(lp, length):
        return lp / tf.cast(length, tf.float32) ** length_norm if length_norm else lp

    def body(t, ids, live_lp, state, done_ids, done_lp, done_score, done_len):
        words = tf.reshape(ids[:, :, t], [-1])                                  # [n*k] the last word
        logp, new_state = decoder.step(words, state)
        logp = tf.reshape(tf.cast(logp, tf.float32), [n, k, -1])
        top_lp, top_w = tf.math.top_k(logp, k)                                  # [n, k, k] per beam
        total = live_lp[:, :, None] + top_lp
        total = tf.where(tf.math.is_finite(top_lp), total, neg_inf)             # a -inf word is never taken
        flat_total, flat_w = tf.reshape(total, [n, k * k]), tf.reshape(top_w, [n, k * k])
        is_end = tf.equal(flat_w, END_ID)
        parent = tf.tile(tf.repeat(tf.range(k), k)[None], [n, 1])              # [n, k*k]
        column = tf.one_hot(t + 1, L, dtype=tf.int32)                           # where the new word goes

        def extend(sel_parent, sel_word):                                       # -> ids [n, m, L]
            base = tf.gather(ids, sel_parent, batch_dims=1)
            return base * (1 - column) + sel_word[:, :, None] * column
        length = t + 2
        # complete: the k best of the old ones and the new ones ending in <end>
        end_lp = tf.where(is_end, flat_total, neg_inf)
        all_score = tf.concat([done_score, score(end_lp, length)], axis=1)
        best_score, pick = tf.math.top_k(all_score, k)
        cand_ids = tf.concat([done_ids, extend(parent, flat_w)], axis=1)
        cand_lp = tf.concat([done_lp, end_lp], axis=1)
        cand_len = tf.concat([done_len, tf.fill([n, k * k], length)], axis=1)
        done_ids = tf.gather(cand_ids, pick, batch_dims=1)
        done_lp = tf.gather(cand_lp, pick, batch_dims=1)
        done_len = tf.gather(cand_len, pick, batch_dims=1)
        done_score = best_score
        # live: the k best expansions that did not end
        live_total = tf.where(is_end, neg_inf, flat_total)
        new_live_lp, pick = tf.math.top_k(live_total, k)
        sel_parent = tf.gather(parent, pick, batch_dims=1)
        ids = extend(sel_parent, tf.gather(flat_w, pick, batch_dims=1))
        state_rows = tf.reshape(rows + sel_parent, [-1])
        state = tuple(tf.gather(s, state_rows) for s in new_state)
        return t + 1, ids, new_live_lp, state, done_ids, done_lp, done_score, done_len

    loop_vars = (tf.constant(0), ids, live_lp, state, done_ids, done_lp, done_score, done_len)
    shapes = tuple(tf.TensorShape([None, *s.shape[1:]]) for s in state)
    invariants = (tf.TensorShape([]), tf.TensorShape([None, k, L]), tf.TensorShape([None, k]), shapes,
                  tf.TensorShape([None, k, L]), tf.TensorShape([None, k]), tf.TensorShape([None, k]),
                  tf.TensorShape([None, k]))
    _, ids, live_lp, _, done_ids, done_lp, done_score, done_len = tf.while_loop(
        lambda t, *_: t < L - 1, body, loop_vars, shape_invariants=invariants)
    any_done = tf.math.is_finite(done_score[:, :1])                             # [n, 1]
    steps = L - 1 if L > 1 else 0
    live_len = tf.fill([n, k], steps + 1)
    # partial captions ranked like complete ones (all of the same length: by log-prob)
    order = tf.argsort(score(live_lp, steps + 1), axis=1, direction="DESCENDING", stable=True)
    live_ids, live_lp = tf.gather(ids, order, batch_dims=1), tf.gather(live_lp, order, batch_dims=1)
    out_ids = tf.where(any_done[:, :, None], done_ids, live_ids)
    out_lp = tf.where(any_done, done_lp, live_lp)
    out_len = tf.where(any_done, done_len, live_len)
    return out_ids, out_len, out_lp, tf.broadcast_to(any_done, tf.shape(out_lp))


def ids_to_text(words, ids):
    """[N, k, L] ids -> [N, k] strings, as Vocabulary.decode: stop at <end>, drop <start>/<pad>."""
    import tensorflow as tf
    ended = tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int32), axis=-1) > 0
    keep = tf.logical_not(ended) & tf.not_equal(ids, START_ID) & tf.not_equal(ids, PAD_ID)
    tokens = tf.where(keep, tf.gather(words, ids), "")
    joined = tf.strings.reduce_join(tokens, axis=-1, separator=" ")
    return tf.strings.strip(tf.strings.regex_replace(joined, " +", " "))


def decode_image_bytes(data, size: int):
    """Encoded image -> float32 [size, size, 3] in 0..255 (RGB; grey expanded, alpha dropped)."""
    import tensorflow as tf
    img = tf.cond(tf.io.is_jpeg(data),      # libjpeg's accurate integer IDCT: Pillow's, pixel for pixel
                  lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                  lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False))
    # Pillow resizes in two passes, width then height, each rounded to uint8: so do we
    img = tf.cast(img, tf.float32)
    img = tf.image.resize(img, [tf.shape(img)[0], size], method="bilinear", antialias=True)
    img = tf.round(tf.clip_by_value(img, 0.0, 255.0))
    img = tf.image.resize(img, [size, size], method="bilinear", antialias=True)
    return tf.round(tf.clip_by_value(img, 0.0, 255.0))


def build_module(run_dir, beam_size: int, top_k: int, max_len: int, length_norm: float = 0.0):
    """A Keras ExportArchive of the run's encoder and decoder with one endpoint, `serve`."""
    import keras
    import tensorflow as tf

    from infer.captioner import Captioner
    cap = Captioner(run_dir)
    encoder_model = cap.encoder_model()
    decoder = cap.model
    size = cap.image_size
    words = tf.constant(cap.vocab.words)

    def serve(images):
        x = tf.map_fn(lambda b: decode_image_bytes(b, size), images,
                      fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        feats = encoder_model(x, training=False)
        ids, _, lp, _ = beam_search_graph(decoder, feats, beam_size=beam_size, max_len=max_len,
                                          length_norm=length_norm)
        ids, lp = ids[:, :top_k], lp[:, :top_k]
        text = tf.where(tf.math.is_finite(lp), ids_to_text(words, ids), "")
        return {"captions": text, "log_probs": lp}

    archive = keras.export.ExportArchive()       # tracks the models' variables, not their Keras call signatures
    archive.track(encoder_model)
    archive.track(decoder)
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    return archive, cap


def export(run, out, *, beam_size: int = 3, top_k: int = 3, max_len: int | None = None, length_norm: float = 0.0,
           overwrite: bool = False, log=print) -> dict:
    """Write the SavedModel into OUT atomically (a temporary folder renamed into place)."""
    import tensorflow as tf

    from infer.caption import check_flags, display_name, run_max_len
    check_flags(beam_size=beam_size, top=top_k, max_len=max_len)
    if top_k > beam_size:
        raise UserError(f"--top {top_k}: at most --beam-size ({beam_size}); beam search keeps that many captions")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {display_name(out)} is an existing file; --out names a folder")
    interrupted = (out / ".tmp-export").exists() or (out / ".tmp-old").exists()     # a killed export: redo it
    if out.exists() and any(p.name != ".lock" for p in out.iterdir()) and not (overwrite or interrupted):
        raise UserError(f"--out {display_name(out)} already holds files; pass --overwrite to replace them or "
                        f"choose another folder")
    if max_len is None:
        max_len, why = run_max_len(run)
        log(f"--max-len {max_len}: {why}")
    module, cap = build_module(run, beam_size, top_k, max_len, length_norm)
    record = {"run": str(Path(run).resolve()), "beam_size": beam_size, "top_k": top_k, "max_len": max_len,
              "length_norm": length_norm, "image_size": cap.image_size,
              "decoder": cap.config["model"].get("decoder", "show_and_tell"),
              "encoder": cap.manifest.get("encoder"), "encoder_sha256": cap.encoder_sha256(),
              "signature": {"inputs": {"images": "tf.string [N], encoded JPEG/PNG files"},
                            "outputs": {"captions": "tf.string [N, top_k], best first",
                                        "log_probs": "float32 [N, top_k]"}}}
    with exclusive_lock(out):
        tmp = out / ".tmp-export"
        shutil.rmtree(tmp, ignore_errors=True)
        module.write_out(str(tmp), verbose=False)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        old = out / ".tmp-old"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        for p in out.iterdir():                      # the previous export (only with --overwrite)
            if p.name not in (".lock", ".tmp-export", ".tmp-old"):
                os.replace(p, old / p.name)
        for p in tmp.iterdir():
            os.replace(p, out / p.name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log(f"exported {display_name(Path(run))} to {display_name(out)} (SavedModel, signature serving_default: "
        f"images -> captions, log_probs; beam {beam_size}, top {top_k}, max length {max_len})")
    return record
