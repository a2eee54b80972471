"""Checkpoints: model weights, optimizer variables and loop state in one HDF5 file, written
atomically (a kill never leaves a half-written checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from prepare.errors import UserError
from prepare.files import atomic_path


def _models(model) -> list:
    """A model, or a list of models (e.g. decoder and encoder), -> a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _weights(model) -> list:
    return [w for m in _models(model) for w in m.weights]


def _rng_states(model) -> list:
    """Dropout's random-generator states (not among `weights`): saved so a resumed run draws the
    same dropout masks as an uninterrupted one."""
    return [v for m in _models(model) for v in m.variables if v.path.endswith("seed_generator_state")]


def _opt_vars(optimizer) -> list:
    opts = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer] if optimizer is not None else []
    return [v for o in opts for v in o.variables]


def save(path, model, optimizer=None, state: dict | None = None) -> None:
    """model / optimizer: one or a list of them."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("model")
            for i, w in enumerate(_weights(model)):
                g.create_dataset(str(i), data=np.asarray(w.numpy()))
                g[str(i)].attrs["name"] = w.path
            r = f.create_group("rng")
            for i, v in enumerate(_rng_states(model)):
                r.create_dataset(str(i), data=np.asarray(v.numpy()))
            if optimizer is not None:
                o = f.create_group("optimizer")
                for i, v in enumerate(_opt_vars(optimizer)):
                    o.create_dataset(str(i), data=np.asarray(v.numpy()))
            f.attrs["state"] = json.dumps(state or {})


def load(path, model, optimizer=None) -> dict:
    """Assign saved values into a built model (and built optimizer); returns the loop state."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: unreadable checkpoint ({e})")
    with f:
        g = f["model"]
        weights = _weights(model)
        if len(g) != len(weights):
            raise UserError(f"{path}: holds {len(g)} weights, the model has {len(weights)}; "
                            "was it made with another config?")
        for i, w in enumerate(weights):
            a = g[str(i)][()]
            saved = g[str(i)].attrs.get("name", "")
            if isinstance(saved, bytes):
                saved = saved.decode()
            # Keras auto-numbers some layer names (conv2d_93), so the variable's own name is compared
            if saved and saved.split("/")[-1] != w.path.split("/")[-1]:
                raise UserError(f"{path}: weight {i} is {saved}, the model expects {w.path} here; the checkpoint "
                                "was made by another model or version")
            if tuple(a.shape) != tuple(w.shape):
                raise UserError(f"{path}: weight {w.path} has shape {a.shape}, the model expects {tuple(w.shape)}")
            w.assign(a)
        rng = _rng_states(model)
        if "rng" in f and len(f["rng"]) == len(rng):
            for i, v in enumerate(rng):
                v.assign(f["rng"][str(i)][()])
        if optimizer is not None and "optimizer" in f:
            o = f["optimizer"]
            for i, v in enumerate(_opt_vars(optimizer)):
                v.assign(o[str(i)][()])
        return json.loads(f.attrs["state"])
