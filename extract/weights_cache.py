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
