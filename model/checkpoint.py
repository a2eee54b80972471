"""Checkpoints: model variables, optimizer variables and loop state in one HDF5 file, written
atomically (a kill never leaves a half-written checkpoint).

Every variable is stored under a key made from its path, so a model whose variables come in
another order loads by name, and one with other variables is refused naming them:

    model/<model name>/<path>                 each variable of each model (weights, and dropout's
                                              random-generator states, so a resumed run draws the
                                              same dropout masks as an uninterrupted one)
    optimizer/<i>/<model key>/<slot>          optimizer i's variable for that model variable
    optimizer/<i>/<name>                      its own variables (iteration, learning_rate)
    attrs: format, state (the loop state, JSON)

Keras numbers the names it makes up (conv2d_93, seed_generator_4) across the whole process, so two
builds of one model differ in those numbers: a key renumbers each name's suffix by the order the
names first appear in its model (the 1st conv2d_* becomes conv2d, the 2nd conv2d_1, ...).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np

from prepare.errors import UserError
from prepare.files import atomic_path, h5_written

FORMAT = "keyed-1"
_NUMBERED = re.compile(r"(.*?)(?:_(\d+))?")


def _models(model) -> list:
    """A model, or a list of models (e.g. decoder and encoder), -> a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _optimizers(optimizer) -> list:
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [] if optimizer is None else [optimizer]


def _model_keys(models) -> dict:
    """{key: variable} of every variable of every model."""
    out = {}
    for m in models:
        ranks: dict[str, dict[str, int]] = {}

        def canonical(part: str) -> str:
            prefix = _NUMBERED.fullmatch(part).group(1)
            seen = ranks.setdefault(prefix, {})
            rank = seen.setdefault(part, len(seen))
            return prefix if rank == 0 else f"{prefix}_{rank}"
        for v in m.variables:
            parts = v.path.split("/")
            if parts[0] == m.name:
                parts = parts[1:]
            key = "/".join([m.name] + [canonical(p) for p in parts])
            k, n = key, 1
            while k in out:                     # two variables of one path: told apart by order
                k, n = f"{key}~{n}", n + 1
            out[k] = v
    return out


def _optimizer_keys(optimizers, model_keys: dict) -> dict:
    """{key: variable} of every optimizer variable: Keras names a slot variable
    `<optimizer>/<model variable's path with / as _>_<slot>`; it is keyed by that variable's key."""
    flat = sorted(((v.path.replace("/", "_") + "_", k) for k, v in model_keys.items()), key=lambda x: -len(x[0]))
    out = {}
    for i, o in enumerate(optimizers):
        for v in o.variables:
            rest = v.path.split("/", 1)[-1]
            key = next((f"{i}/{k}/{rest[len(p):]}" for p, k in flat if rest.startswith(p)), f"{i}/{rest}")
            out[key] = v
    return out


def save(path, model, optimizer=None, state: dict | None = None) -> None:
    """model / optimizer: one or a list of them."""
    keys = _model_keys(_models(model))
    groups = {"model": keys}
    if optimizer is not None:
        groups["optimizer"] = _optimizer_keys(_optimizers(optimizer), keys)
    with atomic_path(path) as tmp:
        with h5_written(tmp) as f:
            for group, variables in groups.items():
                g = f.create_group(group)
                for key, v in variables.items():
                    g.create_dataset(key, data=np.asarray(v.numpy()))
                    g[key].attrs["path"] = v.path
            f.attrs["format"] = FORMAT
            f.attrs["state"] = json.dumps(state or {})


def _saved(g) -> dict:
    """{key: dataset} of an HDF5 group's datasets at any depth."""
    out = {}
    g.visititems(lambda name, obj: out.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assign(path: Path, what: str, saved: dict, variables: dict) -> None:
    missing, unexpected = sorted(set(variables) - set(saved)), sorted(set(saved) - set(variables))
    if missing or unexpected:
        said = [f"{len(x)} {kind} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
                for x, kind in ((missing, "missing"), (unexpected, "unexpected")) if x]
        raise UserError(f"{path}: its {what} variables do not fit: {'; '.join(said)}; the checkpoint was made by "
                        "another model, config or version")
    for key, v in variables.items():
        a = saved[key][()]
        if tuple(a.shape) != tuple(v.shape):
            raise UserError(f"{path}: {what} variable {key} has shape {a.shape}, the model expects {tuple(v.shape)}")
        v.assign(a)


def load(path, model, optimizer=None) -> dict:
    """Assign saved values into a built model (and built optimizer); returns the loop state."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: unreadable checkpoint ({e})")
    with f:
        if f.attrs.get("format") != FORMAT:
            raise UserError(f"{path}: a checkpoint made by an older version (weights stored by position); "
                            "retrain (model train with a new --out)")
        keys = _model_keys(_models(model))
        _assign(path, "model", _saved(f["model"]), keys)
        if optimizer is not None:
            if "optimizer" not in f:
                raise UserError(f"{path}: holds no optimizer variables (saved for inference only); resume from "
                                "checkpoints/latest.h5")
            _assign(path, "optimizer", _saved(f["optimizer"]), _optimizer_keys(_optimizers(optimizer), keys))
        return json.loads(f.attrs["state"])
