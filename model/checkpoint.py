"""Checkpoints: model weights, optimizer variables and loop state in one HDF5 file, written
atomically (a kill never leaves a half-written checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from prepare.util import UserError, atomic_path


def save(path, model, optimizer=None, state: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("model")
            for i, w in enumerate(model.weights):
                g.create_dataset(str(i), data=np.asarray(w.numpy()))
                g[str(i)].attrs["name"] = w.path
            if optimizer is not None:
                o = f.create_group("optimizer")
                for i, v in enumerate(optimizer.variables):
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
        if len(g) != len(model.weights):
            raise UserError(f"{path}: holds {len(g)} weights, the model has {len(model.weights)}; "
                            "was it made with another config?")
        for i, w in enumerate(model.weights):
            a = g[str(i)][()]
            if tuple(a.shape) != tuple(w.shape):
                raise UserError(f"{path}: weight {w.path} has shape {a.shape}, the model expects {tuple(w.shape)}")
            w.assign(a)
        if optimizer is not None and "optimizer" in f:
            o = f["optimizer"]
            for i, v in enumerate(optimizer.variables):
                v.assign(o[str(i)][()])
        return json.loads(f.attrs["state"])
