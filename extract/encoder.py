"""The image encoder: Inception v3 up to its 2048-d average pool, and image loading.

One function builds the encoder and one loads an image, and extract, finetune and infer all
use both, so the three stages can never disagree on preprocessing:

    load_image(path, size) -> uint8 [size, size, 3]   PIL: EXIF rotation applied, any mode -> RGB,
                                                      resized to size x size (bilinear, aspect not kept)
    build_encoder(...)     -> keras.Model  float32 [B, size, size, 3] in 0..255 -> [B, 2048]
                              (Inception's scaling to [-1, 1] is the model's first layer)
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from prepare.util import UserError, sha256_file

FEATURE_DIM = 2048
MIN_IMAGE_SIZE = 75          # Inception v3's smallest input
MIN_SOURCE_SIDE = 8          # smaller source images carry no content: flagged as failed
MAX_PIXELS = 89_478_485      # decompression-bomb guard (Pillow's default warning limit)
IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, never half a picture


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in the manifest."""


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode one image file into uint8 [size, size, 3] RGB, or raise BadImage(reason)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"too large ({w}x{h} pixels > {MAX_PIXELS}): possible decompression bomb")
            if min(w, h) < MIN_SOURCE_SIDE:
                raise BadImage(f"too small ({w}x{h}); needs at least {MIN_SOURCE_SIDE} pixels a side")
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("missing file")
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}")
    except (Image.UnidentifiedImageError, SyntaxError):
        raise BadImage("not an image Pillow can read")
    except (OSError, ValueError) as e:
        raise BadImage(f"corrupt image: {e}")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


# ---- the encoder ------------------------------------------------------------------------
def keras_models_dir() -> Path:
    try:
        from keras.src.backend.config import keras_home
        home = keras_home()
    except ImportError:  # pragma: no cover - older/newer Keras layout
        home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(os.path.expanduser(home)) / "models"


@dataclass
class WeightsSource:
    kind: str            # "imagenet" | "file" | "none"
    path: str | None     # the file the weights came from (None for random init)
    sha256: str | None   # its checksum


def _offline_message(err: Exception) -> str:
    dest = keras_models_dir() / IMAGENET_FILE
    return (f"could not download the ImageNet weights for Inception v3 ({err}). This machine seems "
            f"offline. Either put the file at {dest} (download it elsewhere from Keras' "
            f"'inception_v3' release assets; $KERAS_HOME moves ~/.keras), or pass --weights FILE "
            f"(a Keras weights file of InceptionV3(include_top=False)), or --weights none for random "
            f"weights (captions of real photos will then be meaningless)")


def build_encoder(weights: str = "imagenet", image_size: int | None = 299, trainable: bool = False,
                  seed: int = 0):
    """-> (keras.Model float32 0..255 images -> [B, 2048], WeightsSource).

    weights: "imagenet" (Keras' own loader and cache), "none" (random init from `seed`, so the same
    random encoder everywhere) or a weights FILE.
    """
    import keras
    from keras import layers
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image-size {image_size} is below Inception v3's minimum of {MIN_IMAGE_SIZE}")
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    if weights == "imagenet":
        try:
            base = keras.applications.InceptionV3(include_top=False, pooling="avg", weights="imagenet",
                                                  input_shape=shape)
        except Exception as e:  # Keras raises a bare Exception("URL fetch failure ...")
            if "URL fetch failure" in str(e) or isinstance(e, OSError):
                raise UserError(_offline_message(e)) from None
            raise
        path = keras_models_dir() / IMAGENET_FILE
        source = WeightsSource("imagenet", str(path), sha256_file(path) if path.exists() else None)
    else:
        if weights in ("none", None):
            keras.utils.set_random_seed(seed)
        base = keras.applications.InceptionV3(include_top=False, pooling="avg", weights=None,
                                              input_shape=shape)
        if weights in ("none", None):
            source = WeightsSource("none", None, None)
        else:
            load_encoder_weights(base, weights)
            source = WeightsSource("file", str(Path(weights).resolve()), sha256_file(weights))
    base.trainable = trainable
    inputs = keras.Input(shape, name="image")           # float32 0..255, RGB
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="inception_scaling")(inputs)
    outputs = base(x)                                     # [B, 2048]
    model = keras.Model(inputs, outputs, name="encoder")
    return model, source


def inception_of(encoder):
    """The InceptionV3 sub-model inside an encoder built by build_encoder."""
    return encoder.get_layer("inception_v3")


def load_encoder_weights(base_or_encoder, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found; check --weights")
    base = base_or_encoder
    if base.name == "encoder":
        base = inception_of(base)
    try:
        base.load_weights(str(path))
    except Exception as e:
        raise UserError(f"{path}: does not hold Inception v3 (include_top=False) weights ({e}); pass a "
                        f"file saved from keras.applications.InceptionV3(include_top=False)") from None


def save_encoder_weights(encoder, path: str | os.PathLike) -> None:
    """Save the Inception weights (Keras `.weights.h5`), atomically."""
    from prepare.util import atomic_path
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp_named = tmp.with_name(tmp.name + ".weights.h5")
        inception_of(encoder).save_weights(str(tmp_named))
        shutil.move(tmp_named, tmp)


def image_dataset(paths, size: int, batch_size: int):
    """tf.data: parallel load_image over `paths` -> batches of (uint8 [B,S,S,3], ok [B], reason [B]).

    A bad image yields zeros, ok=False and its reason; it never stops the stream.
    """
    import tensorflow as tf

    def _load(p):
        try:
            return load_image(p.decode("utf-8"), size), True, b""
        except BadImage as e:
            return np.zeros((size, size, 3), np.uint8), False, str(e).encode("utf-8")

    def _map(p):
        img, ok, why = tf.numpy_function(_load, [p], [tf.uint8, tf.bool, tf.string], stateful=False)
        img.set_shape((size, size, 3))
        ok.set_shape(())
        why.set_shape(())
        return img, ok, why

    ds = tf.data.Dataset.from_tensor_slices(tf.constant([str(p) for p in paths], tf.string))
    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compiled_forward(encoder):
    """A traced forward pass (inference mode) taking uint8 or float batches."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(images):
        return encoder(tf.cast(images, tf.float32), training=False)
    return forward
