"""python -m infer export: a run directory -> a TensorFlow SavedModel that captions image bytes.

Signature `serving_default`:
    images     tf.string [N]        encoded image files (JPEG, PNG, GIF's first frame, BMP)
 -> captions   tf.string [N, k]     best first ("" where fewer than k captions exist)
    log_probs  float32   [N, k]     the sum of the words' log-probabilities (-inf where no caption)
    unsure     bool      [N, k]     the mean log-probability per word below --unsure-below

Everything runs in the graph: decoding, resizing, the run's encoder, the decoder and beam search
(model/decoding.py: a tf.while_loop with im2txt's semantics). So
`tf.saved_model.load(DIR)` captions images in any Python with TensorFlow, and TensorFlow Serving
can load DIR. Beam size, k, max length and the decoding guards (model/decoding.py: on unless
--no-guards) are fixed at export and recorded in DIR/export.json.

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
from pathlib import Path

from model.decoding import beam_search, ids_to_text, unsure
from prepare.errors import UserError
from prepare.files import LOCK_FILE, PENDING, Publication, exclusive_lock

EXPORT_RECORD = "export.json"


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


def build_module(run_dir, beam_size: int, top_k: int, max_len: int, length_norm: float = 0.0, guards=None):
    """A Keras ExportArchive of the run's encoder and decoder with one endpoint, `serve`."""
    import keras
    import tensorflow as tf

    from infer.captioner import Captioner
    cap = Captioner(run_dir, guards=guards)
    encoder_model = cap.encoder_model()
    decoder = cap.model
    size = cap.image_size
    words = tf.constant(cap.vocab.words)

    def serve(images):
        x = tf.map_fn(lambda b: decode_image_bytes(b, size), images,
                      fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        feats = encoder_model(x, training=False)
        ids, n, lp, _ = beam_search(decoder, feats, beam_size=beam_size, max_len=max_len, length_norm=length_norm,
                                    guards=cap.beam_guards)
        ids, n, lp = ids[:, :top_k], n[:, :top_k], lp[:, :top_k]
        text = tf.where(tf.math.is_finite(lp), ids_to_text(words, ids, cap.vocab.tokenizer), "")
        return {"captions": text, "log_probs": lp, "unsure": unsure(lp, n, cap.guards.unsure_below)}

    archive = keras.export.ExportArchive()       # tracks the models' variables, not their Keras call signatures
    archive.track(encoder_model)
    archive.track(decoder)
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    return archive, cap


def export(run, out, *, beam_size: int = 3, top_k: int = 3, max_len: int | None = None, length_norm: float = 0.0,
           overwrite: bool = False, guards=None, log=print) -> dict:
    """Write the SavedModel into OUT atomically: its entries (saved_model.pb, variables/, ...,
    export.json last) replace the previous export's in one publication (prepare.files, label "export")."""
    import tensorflow as tf

    from infer.files import display_name
    from infer.options import check_flags, run_max_len
    check_flags(beam_size=beam_size, top=top_k, max_len=max_len)
    if top_k > beam_size:
        raise UserError(f"--top {top_k}: at most --beam-size ({beam_size}); beam search keeps that many captions")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {display_name(out)} is an existing file; --out names a folder")
    interrupted = (out / PENDING).exists()          # a killed export: redo it
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (overwrite or interrupted):
        raise UserError(f"--out {display_name(out)} already holds files; pass --overwrite to replace them or "
                        f"choose another folder")
    if max_len is None:
        max_len, why = run_max_len(run)
        log(f"--max-len {max_len}: {why}")
    module, cap = build_module(run, beam_size, top_k, max_len, length_norm, guards)
    record = {"run": str(Path(run).resolve()), "beam_size": beam_size, "top_k": top_k, "max_len": max_len,
              "length_norm": length_norm, "image_size": cap.image_size, "guards": cap.guards.record(),
              "decoder": cap.config["model"].get("decoder", "show_and_tell"),
              "encoder": cap.manifest.get("encoder"), "encoder_sha256": cap.encoder_sha256(),
              "signature": {"inputs": {"images": "tf.string [N], encoded JPEG/PNG files"},
                            "outputs": {"captions": "tf.string [N, top_k], best first",
                                        "log_probs": "float32 [N, top_k]", "unsure": "bool [N, top_k]"}}}
    with exclusive_lock(out):
        with Publication(out, "export") as pub:
            new = pub.tree(lambda d: module.write_out(str(d), verbose=False))
            pub.path(EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            for p in out.iterdir():                  # the previous export's other entries (only with --overwrite)
                if p.name not in (LOCK_FILE, PENDING, EXPORT_RECORD, *new) and not p.name.startswith(".tmp-"):
                    pub.discard(p.name)
    log(f"exported {display_name(Path(run))} to {display_name(out)} (SavedModel, signature serving_default: "
        f"images -> captions, log_probs, unsure; beam {beam_size}, top {top_k}, max length {max_len})")
    return record
