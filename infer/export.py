"""python -m infer export: a run directory -> a TensorFlow SavedModel that captions image bytes.

Signature `serving_default`:
    images     tf.string [N]        encoded image files (JPEG, PNG, GIF's first frame, BMP); N may be 0
 -> captions   tf.string [N, k]     best first ("" where fewer than k captions exist)
    log_probs  float32   [N, k]     the sum of the words' log-probabilities (-inf where no caption)
    errors     tf.string [N]        "" for a captioned image, else why it was refused (its row: "" and -inf)
    unsure     bool      [N, k]     the mean log-probability per word below --unsure-below

Each image's width and height are read from its header before anything is decoded, and the limits of
`infer caption` and `serve` apply (extract/images.py: at most MAX_PIXELS, at least MIN_SOURCE_SIDE
a side): a decompression bomb or a 1x1 image is refused in its own row, never decoded, and one bad
element never fails the call. Images are decoded one at a time, so memory is bounded by one image.

Corrupt data after a valid header (decode_batch): a graph cannot catch an op's error, so the batch is
decoded as one tf.data pass whose failed elements are dropped (ignore_errors); an element that raised
while decoding gets CORRUPT in its row and the others are captioned. That catches whatever TensorFlow's
decoders refuse: a PNG cut after its IHDR or anywhere in its IDAT, a PNG with a bad CRC or without its
IEND (Pillow accepts that one), a JPEG cut inside its tables or its scan or without its EOI, a cut GIF
or BMP. It cannot catch damage a decoder does not notice: a JPEG whose scan bytes are damaged but
still parse (wrong pixels, from Pillow too) or a GIF whose LZW data is (wrong pixels; Pillow refuses
it), nor a decoder that crashes the process, nor memory the system does not have. The tf.data pass
costs time: measured on 2 cores, 16 640x480 JPEGs at 299 px decode in about 250 ms instead of
150 ms, small beside the encoder's forward pass. Its ops (TensorSliceDataset, MapDataset,
IgnoreErrorsDataset, BatchDataset, ReduceDataset) are core TensorFlow kernels; the SavedModel is
tested with tf.saved_model.load, not with TensorFlow Serving itself.

Animated GIFs: TensorFlow's GIF decoder decodes every frame even when it returns only the first
(expand_animations=False), so the graph hands it the file cut after its first image
(gif_first_image walks the blocks to it); later frames are never decoded, as in Pillow, and no
frame count needs to count against the pixel limit. The first frame's own size counts, as in Pillow.

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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CORRUPT = "corrupt image: its data does not decode (damaged or truncated)"
GIF_LOOKAHEAD = 4096      # sub-blocks of one size hopped over in one loop step (see gif_first_image)


def image_header_error(data):
    """Encoded image (tf.string scalar) -> tf.string scalar: "" when it may be decoded, else the reason.

    Reads only the header: JPEG through tf.image.extract_jpeg_shape; PNG (IHDR, big-endian uint32 at
    bytes 16-23), GIF (logical screen, little-endian uint16 at 6-9, widened to its first frame's extent
    as Pillow does: gif_first_image) and BMP (DIB header at 14) parsed from the bytes. The limits are
    extract/images.py's, so every path into the model shares them."""
    import tensorflow as tf

    from extract.images import MAX_PIXELS, MIN_SOURCE_SIDE
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 32), b"\0" * 32]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)      # the first 32 bytes, zero-padded

    def uint(i, n, big):
        v = tf.constant(0, tf.int64)
        for j in (range(i, i + n) if big else range(i + n - 1, i - 1, -1)):
            v = v * 256 + b[j]
        return v

    def signed32(v):
        return tf.where(v >= 2 ** 31, v - 2 ** 32, v)
    def at(i, n):                                                 # (substr past the end is an error)
        return tf.strings.substr(head, i, n)
    png = tf.logical_and(tf.equal(at(0, 8), PNG_SIGNATURE), tf.equal(at(12, 4), "IHDR"))
    gif = tf.logical_or(tf.equal(at(0, 6), "GIF87a"), tf.equal(at(0, 6), "GIF89a"))
    bmp = tf.equal(at(0, 2), "BM")
    jpeg = tf.io.is_jpeg(data)
    core = tf.equal(uint(14, 4, False), 12)                       # BITMAPCOREHEADER: 16-bit sizes
    bmp_w = tf.where(core, uint(18, 2, False), tf.abs(signed32(uint(18, 4, False))))
    bmp_h = tf.where(core, uint(20, 2, False), tf.abs(signed32(uint(22, 4, False))))
    gif_wh = tf.cond(gif, lambda: tf.cast(tf.stack(gif_first_image(data)[1:]), tf.int64),
                     lambda: tf.zeros([2], tf.int64))
    w = tf.where(png, uint(16, 4, True), tf.where(gif, gif_wh[0], bmp_w))
    h = tf.where(png, uint(20, 4, True), tf.where(gif, gif_wh[1], bmp_h))
    jpeg_hw = tf.cond(jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),   # (raises for a
                      lambda: tf.zeros([2], tf.int64))               # JPEG cut inside its tables: decode_batch)
    w, h = tf.where(jpeg, jpeg_hw[1], w), tf.where(jpeg, jpeg_hw[0], h)
    known = tf.reduce_any(tf.stack([jpeg, png, gif, bmp]))
    large = tf.strings.format("too large ({}x{} pixels > {}): possible decompression bomb", (w, h, MAX_PIXELS))
    small = tf.strings.format("too small ({}x{}); needs at least {} pixels a side", (w, h, MIN_SOURCE_SIDE))
    return tf.where(tf.equal(tf.strings.length(data), 0), "empty file",
           tf.where(tf.logical_not(known), "not an image (unknown format; JPEG, PNG, GIF or BMP)",
           tf.where(w * h > MAX_PIXELS, large,
           tf.where(tf.minimum(w, h) < MIN_SOURCE_SIDE, small, ""))))


def gif_first_image(data):
    """A GIF (tf.string scalar) -> (end, width, height), int32 scalars: `end` is where its first image's
    data ends (-1 when the file ends first or its blocks make no sense), width and height its size as
    Pillow gives it (the logical screen, widened to the first frame's extent where that is larger).

    Walks the blocks after the header and colour table: extensions (0x21) and the first image
    descriptor (0x2C) with its LZW sub-blocks, up to their terminator. Runs of sub-blocks of one size
    (image data comes in 255-byte ones) are hopped over GIF_LOOKAHEAD at a time, so the walk costs
    milliseconds for a frame of many megabytes. Later frames are never looked at."""
    import tensorflow as tf
    b = tf.io.decode_raw(data, tf.uint8)
    n = tf.size(b)

    def at(i):
        return tf.cast(tf.gather(b, tf.clip_by_value(i, 0, tf.maximum(n - 1, 0))), tf.int32)

    def table(packed):                        # a colour table's size in bytes, when its flag is set
        return tf.where(packed >= 128, 3 * tf.bitwise.left_shift(2, tf.bitwise.bitwise_and(packed, 7)), 0)

    def step(pos, mode, desc, end):           # mode 0: at a block; 1: an extension's sub-blocks; 2: the image's
        c = at(pos)
        ext, img = tf.logical_and(mode == 0, c == 0x21), tf.logical_and(mode == 0, c == 0x2C)
        last = tf.logical_and(mode > 0, c == 0)                  # the sub-blocks' terminator
        stride = c + 1
        run = tf.cast(tf.strided_slice(b, [pos], [tf.minimum(n, pos + stride * GIF_LOOKAHEAD)], [stride]), tf.int32)
        hops = tf.cast(tf.argmax(tf.concat([tf.cast(tf.not_equal(run, c), tf.int32), [1]], 0)), tf.int32)
        nxt = tf.where(ext, pos + 2, tf.where(img, pos + 11 + table(at(pos + 9)),
                                              tf.where(last, pos + 1, pos + tf.maximum(hops, 1) * stride)))
        stop = tf.logical_and(mode == 0, tf.logical_not(tf.logical_or(ext, img)))   # the trailer, or junk
        return (tf.where(stop, n, nxt), tf.where(ext, 1, tf.where(img, 2, tf.where(last, 0, mode))),
                tf.where(img, pos, desc), tf.where(tf.logical_and(last, mode == 2), pos + 1, end))

    _, _, desc, end = tf.while_loop(lambda pos, mode, desc, end: tf.logical_and(pos < n, end < 0), step,
                                    (13 + table(at(10)), tf.constant(0), tf.constant(-1), tf.constant(-1)))

    def u16(i):
        return at(i) + 256 * at(i + 1)
    found = desc >= 0
    w = tf.maximum(u16(6), tf.where(found, u16(desc + 1) + u16(desc + 5), 0))
    h = tf.maximum(u16(8), tf.where(found, u16(desc + 3) + u16(desc + 7), 0))
    return end, w, h


def decode_batch(images, size: int):
    """tf.string [N] -> (float32 [N, size, size, 3], tf.string [N] errors): each image decoded when its
    header passes the limits (image_header_error), else zeros and the reason; zeros and CORRUPT where
    decoding it raised (a PNG cut after its IHDR, a JPEG cut inside its tables or its scan).

    A graph cannot catch an op's error, but tf.data can drop an element whose map raised
    (ignore_errors): the batch is one dataset of (index, image) decoded one at a time (memory: one
    image), and an index missing from what comes out was corrupt. One dataset per call, not one per
    image: each costs milliseconds to start."""
    import tensorflow as tf
    n = tf.shape(images)[0]
    zeros = tf.zeros([size, size, 3], tf.float32)

    def one(i, data):
        error = image_header_error(data)
        return i, tf.cond(tf.equal(error, ""), lambda: decode_image_bytes(data, size), lambda: zeros), error
    ds = tf.data.Dataset.from_tensor_slices((tf.range(n), images)).map(one).ignore_errors()
    options = tf.data.Options()                  # graph rewrites and autotuning only slow one short pass
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    ds = ds.batch(tf.cast(tf.maximum(n, 1), tf.int64)).with_options(options)
    done, imgs, errors = ds.reduce((tf.zeros([0], tf.int32), tf.zeros([0, size, size, 3]), tf.zeros([0], tf.string)),
                                   lambda _, batch: batch)
    k = tf.shape(done)[0]                        # row of each image in the output, k (the extra row) if dropped
    row = tf.tensor_scatter_nd_update(tf.fill([n], k), done[:, None], tf.range(k))
    return (tf.gather(tf.concat([imgs, zeros[None]], 0), row),
            tf.gather(tf.concat([errors, tf.constant([CORRUPT])], 0), row))


def decode_image_bytes(data, size: int):
    """Encoded image -> float32 [size, size, 3] in 0..255 (RGB; grey expanded, alpha dropped; a GIF's
    first frame). No limits here: callers check image_header_error first (decode_batch)."""
    import tensorflow as tf

    def first_frame():           # TensorFlow's GIF decoder reads every frame (giflib's DGifSlurp), even when
        end = gif_first_image(data)[0]    # it returns one: hand it the file cut after its first image
        return tf.where(end > 0, tf.strings.join([tf.strings.substr(data, 0, tf.maximum(end, 0)), ";"]), data)
    kind = tf.strings.substr(data, 0, 6)
    data = tf.cond(tf.logical_or(tf.equal(kind, "GIF87a"), tf.equal(kind, "GIF89a")), first_frame, lambda: data)
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

    def caption(x):                              # float32 [n, size, size, 3], n >= 1
        feats = encoder_model(x, training=False)
        ids, n, lp, _ = beam_search(decoder, feats, beam_size=beam_size, max_len=max_len, length_norm=length_norm,
                                    guards=cap.beam_guards)
        ids, n, lp = ids[:, :top_k], n[:, :top_k], lp[:, :top_k]
        text = tf.where(tf.math.is_finite(lp), ids_to_text(words, ids, cap.vocab.tokenizer), "")
        return text, lp, unsure(lp, n, cap.guards.unsure_below)

    def serve(images):
        x, errors = decode_batch(images, size)  # one image decoded at a time; a corrupt one is its own row's error
        ok = tf.equal(errors, "")
        n_ok = tf.reduce_sum(tf.cast(ok, tf.int32))
        text, lp, unsure_ = tf.cond(n_ok > 0, lambda: caption(tf.boolean_mask(x, ok)),
                                    lambda: (tf.zeros([0, top_k], tf.string), tf.zeros([0, top_k], tf.float32),
                                             tf.zeros([0, top_k], tf.bool)))
        # the good rows' results in place, "", -inf and False in the refused rows (an extra row gathered for them)
        row = tf.where(ok, tf.cumsum(tf.cast(ok, tf.int32)) - 1, n_ok)
        text = tf.gather(tf.concat([text, tf.fill([1, top_k], "")], 0), row)
        lp = tf.gather(tf.concat([lp, tf.fill([1, top_k], float("-inf"))], 0), row)
        unsure_ = tf.gather(tf.concat([unsure_, tf.fill([1, top_k], False)], 0), row)
        return {"captions": text, "log_probs": lp, "errors": errors, "unsure": unsure_}

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

    from extract.images import MAX_PIXELS, MIN_SOURCE_SIDE
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
              "signature": {"inputs": {"images": "tf.string [N], encoded JPEG/PNG/GIF/BMP files (N may be 0)"},
                            "outputs": {"captions": "tf.string [N, top_k], best first (\"\" in a refused row)",
                                        "log_probs": "float32 [N, top_k] (-inf in a refused row)",
                                        "errors": "tf.string [N], \"\" for a captioned image, else the reason",
                                        "unsure": "bool [N, top_k] (False in a refused row)"},
                            "limits": {"max_pixels": MAX_PIXELS, "min_side": MIN_SOURCE_SIDE}}}
    with exclusive_lock(out):
        with Publication(out, "export") as pub:
            new = pub.tree(lambda d: module.write_out(str(d), verbose=False))
            pub.path(EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            for p in out.iterdir():                  # the previous export's other entries (only with --overwrite)
                if p.name not in (LOCK_FILE, PENDING, EXPORT_RECORD, *new) and not p.name.startswith(".tmp-"):
                    pub.discard(p.name)
    log(f"exported {display_name(Path(run))} to {display_name(out)} (SavedModel, signature serving_default: "
        f"images -> captions, log_probs, errors, unsure; beam {beam_size}, top {top_k}, max length {max_len})")
    return record
