import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small synthetic dataset (75 px) and its captions.h5, shared read-only by tests."""
    from prepare import synth
    from prepare.prepare_captions import prepare_captions
    d = tmp_path_factory.mktemp("tiny")
    synth.generate(d, {"train": 48, "val": 12, "test": 12}, size=75, seed=3, progress=False)
    pairs = [(s, str(d / "annotations" / f"captions_{s}.json"), str(d / "images" / s))
             for s in ("train", "val", "test")]
    prepare_captions(d / "captions.h5", pairs=pairs, max_len=28, log=lambda *a: None)
    return d


@pytest.fixture(scope="session")
def tiny_features(tiny_dataset):
    """Features of the tiny dataset: random-init Inception at 75 px."""
    from extract.cache import extract_features
    extract_features(tiny_dataset / "captions.h5", tiny_dataset / "features", weights="none",
                     image_size=75, batch_size=16, progress=False, log=lambda *a: None)
    return tiny_dataset / "features"


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tiny_features, tmp_path_factory):
    """A small decoder trained a few epochs on the tiny dataset."""
    from model.train import train
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_dataset, run, model_overrides={"embedding_size": 32, "lstm_units": 64, "dropout": 0.0},
          train_overrides={"epochs": 4, "batch_size": 16, "lr": 5e-3, "samples": 0}, progress=False,
          log=lambda *a: None)
    return run
