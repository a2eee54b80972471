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


# A random-init EfficientNet-Lite0 at 64 px: its grid is 2x2 (4 positions x 1280 channels)
TINY_GRID = dict(encoder="efficientnet_lite0", weights="none", image_size=64, batch_size=16)


@pytest.fixture(scope="session")
def tiny_grid(tiny_dataset, tmp_path_factory):
    """Grid features of the tiny dataset (extract --features grid), shared read-only by tests."""
    from extract.cache import extract_features
    out = tmp_path_factory.mktemp("grid") / "features"
    extract_features(tiny_dataset / "captions.h5", out, features="grid", **TINY_GRID, progress=False,
                     log=lambda *a: None)
    return out


# A tiny attention decoder (tests/test_attention.py, test_grid16.py)
TINY_ATT = {"decoder": "attention", "embedding_size": 16, "lstm_units": 24, "attention_units": 12, "dropout": 0.0}


def train_tiny_attention(dataset: Path, features: Path, run: Path) -> Path:
    """The tiny attention decoder trained 3 epochs on a grid cache of the tiny dataset, into `run`."""
    from model.train import train
    train(dataset, run, features=features, model_overrides=TINY_ATT,
          train_overrides={"epochs": 3, "batch_size": 16, "lr": 5e-3, "samples": 0}, progress=False,
          log=lambda *a: None)
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tiny_features, tmp_path_factory):
    """A small decoder trained a few epochs on the tiny dataset."""
    from model.train import train
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_dataset, run, model_overrides={"embedding_size": 32, "lstm_units": 64, "dropout": 0.0},
          train_overrides={"epochs": 4, "batch_size": 16, "lr": 5e-3, "samples": 0}, progress=False,
          log=lambda *a: None)
    return run


def savedmodel_captions_like_infer_caption(run: Path, images: list, tmp: Path, at_least: int) -> None:
    """Export `run`, caption `images` (their bytes) with the SavedModel and with infer caption: the
    best captions agree on at least `at_least` of them (JPEG decoding may differ by a grey level)."""
    import json

    import tensorflow as tf

    from infer.caption import caption_images
    from infer.export import export
    export(run, tmp / "saved", beam_size=3, top_k=1, log=lambda *a: None)
    caption_images(run, [str(p) for p in images], tmp / "cap", progress=False, log=lambda *a: None)
    want = [r["captions"][0]["caption"] for r in map(json.loads, (tmp / "cap" / "captions.jsonl")
                                                     .read_text().splitlines())]
    m = tf.saved_model.load(str(tmp / "saved"))
    got = m.signatures["serving_default"](images=tf.constant([p.read_bytes() for p in images]))["captions"]
    got = got.numpy().astype(str)[:, 0].tolist()
    assert sum(a == b for a, b in zip(got, want)) >= at_least, (got, want)


@pytest.fixture
def killed_after_saves():
    """Run `call` (Python source, after `from model import checkpoint`) in a fresh process that dies
    like kill -9 right after its n-th checkpoint.save: the shared kill-and-resume harness."""
    import signal
    import subprocess

    def run(call: str, n: int) -> None:
        code = (f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom model import checkpoint\n"
                f"orig, count = checkpoint.save, [0]\n"
                f"def save(*a, **k):\n    orig(*a, **k)\n    count[0] += 1\n"
                f"    if count[0] == {n}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                f"checkpoint.save = save\n{call}\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True)
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    return run


def odd_files(d: Path) -> dict:
    """Entries named like images that are not regular files, made in `d`: name -> what each one is."""
    import os
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "fifo.jpg")                      # opening it for reading would wait for a writer forever
    (d / "loop.jpg").symlink_to("loop.jpg")
    (d / "x.jpg").symlink_to("/dev/zero")
    (d / "d.jpg").mkdir()
    return {"fifo.jpg": "a FIFO", "loop.jpg": "a symlink loop", "x.jpg": "a character device",
            "d.jpg": "a directory"}


GIF_PALETTE = [255, 0, 0, 0, 0, 255, 0, 160, 0] + [0] * 759      # red, blue, green


def gif_bytes(colours: list[int], side: int) -> bytes:
    """A GIF of side x side frames, frame i all of palette index colours[i] (0 red, 1 blue, 2 green)."""
    import io

    from PIL import Image
    frames = []
    for c in colours:
        f = Image.new("P", (side, side), c)
        f.putpalette(GIF_PALETTE)
        frames.append(f)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=len(frames) > 1, append_images=frames[1:], duration=40, loop=0)
    return buf.getvalue()


def animated_gif(frames: int = 500, side: int = 300) -> bytes:
    """An animated GIF whose first frame is red and whose later ones alternate blue and green (all differ
    from the one before, so none is merged away)."""
    return gif_bytes([0] + [1 + i % 2 for i in range(frames - 1)], side)
