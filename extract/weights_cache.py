"""The folder where ImageNet weights are cached: Keras' own (~/.keras/models, moved by $KERAS_HOME).
Inception v3's download lands there; EfficientNet-Lite0's converted weights are written there."""
from __future__ import annotations

import os
from pathlib import Path


def keras_models_dir() -> Path:
    try:
        from keras.src.backend.config import keras_home
        home = keras_home()
    except ImportError:  # pragma: no cover - older/newer Keras layout
        home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(os.path.expanduser(home)) / "models"


def ensure_keras_models_dir() -> Path:
    """keras_models_dir(), created; a UserError naming it (and $KERAS_HOME) when it cannot be
    (HOME=/dev/null, a read-only HOME, a file in the way)."""
    from prepare.errors import UserError
    folder = keras_models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"[Errno 13] Permission denied: {str(folder)!r}")
    except OSError as e:
        why = e.strerror or str(e)
        raise UserError(f"cannot create the ImageNet weights cache folder {folder} ({why}): set KERAS_HOME to "
                        f"a writable folder (e.g. KERAS_HOME=/tmp/keras)") from None
    return folder
