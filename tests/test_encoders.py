"""The encoder registry through every stage: extract, train, infer and finetune use the run's own
encoder, and a run made with one encoder refuses another's features."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract import encoder as enc
from extract.cache import extract_features, read_manifest
from prepare.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *a: None)
TINY = {"embedding_size": 16, "lstm_units": 24, "dropout": 0.0}
FAST_FT = {"batch_size": 8, "captions_per_image": 2, "max_steps": 2, "epochs": 1, "samples": 0, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def lite0_features(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("l0") / "features"
    extract_features(tiny_dataset / "captions.h5", out, encoder="efficientnet_lite0", weights="none", image_size=64,
                     batch_size=16, **quiet)
    return out


@pytest.fixture(scope="module")
def lite0_run(tiny_dataset, lite0_features, tmp_path_factory):
    from model.train import train
    run = tmp_path_factory.mktemp("l0run") / "run"
    train(tiny_dataset, run, features=lite0_features, model_overrides=TINY,
          train_overrides={"epochs": 1, "batch_size": 16, "samples": 0}, **quiet)
    return run


def test_registry_entries_say_what_each_encoder_is():
    assert {n: (s.feature_dim, s.default_image_size) for n, s in enc.ENCODERS.items()} == {
        "inception_v3": (2048, 299), "efficientnet_lite0": (1280, 224)}
    model, _ = enc.build_encoder("efficientnet_lite0", "none", 64)
    assert model.output.shape[-1] == 1280 and enc.backbone_of(model).name == "efficientnet_lite0"
    assert len(enc.batchnorm_layers(model)) == 49
    scaling = model.get_layer("input_scaling")     # (x - 127) / 128 is the model's first layer
    assert float(scaling(np.array([[127.0, 255.0]], np.float32)).numpy()[0, 0]) == 0.0
    assert float(scaling(np.array([[255.0]], np.float32)).numpy()[0, 0]) == 1.0


def test_lite0_cache_records_its_encoder(tiny_dataset, lite0_features):
    m = read_manifest(lite0_features)
    assert (m["encoder"], m["feature_dim"], m["request"]["encoder"]) == ("efficientnet_lite0", 1280,
                                                                          "efficientnet_lite0/avg_pool")
    assert m["preprocessing"].endswith("(x - 127) / 128") and m["image_size"] == 64
    assert np.load(lite0_features / "val.npy").shape == (12, 1280)
    # the cached encoder weights rebuild the same features
    model, _ = enc.build_encoder("efficientnet_lite0", str(lite0_features / "encoder.weights.h5"), 64)
    from extract.images import load_image
    from prepare import captions_h5
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "val")
    x = load_image(tiny_dataset / sp.file_names[3], 64)[None].astype(np.float32)
    np.testing.assert_allclose(model(x).numpy()[0], np.load(lite0_features / "val.npy")[3], rtol=1e-4, atol=1e-6)


def test_a_run_refuses_features_of_another_encoder(tiny_dataset, tiny_features, lite0_run):
    from model.train import train
    with pytest.raises(UserError, match=r"trained on features of another encoder \(EfficientNet-Lite0.*"
                                        r"holds Inception v3.*choose a new --out"):
        train(tiny_dataset, lite0_run, features=tiny_features, model_overrides=TINY,
              train_overrides={"epochs": 2, "batch_size": 16, "samples": 0}, **quiet)


def test_infer_on_a_lite0_run_runs_lite0(tiny_dataset, lite0_features, lite0_run):
    from infer.captioner import Captioner
    from prepare import captions_h5
    cap = Captioner(lite0_run, max_len=12)
    assert cap.config["model"]["feature_dim"] == 1280 and cap.image_size == 64
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "test")
    paths = sp.image_paths(tiny_dataset)[:4]
    from_files = cap.caption_files(paths, progress=False)
    from_cache = cap.caption_features(np.load(lite0_features / "test.npy")[:4])
    assert [r.captions[0].ids for r in from_files] == [c[0].ids for c in from_cache]


@pytest.mark.slow
def test_finetune_on_a_lite0_run_trains_lite0(tiny_dataset, lite0_run, tmp_path):
    from infer.captioner import Captioner
    from model.finetune import finetune
    ft = tmp_path / "ft"
    s = finetune(lite0_run, tiny_dataset, ft, overrides=FAST_FT, **quiet)
    assert s["steps"] == 2
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["finetune"]["recipe"] == "from_scratch"            # --weights none -> learn from scratch
    a, _ = enc.build_encoder("efficientnet_lite0", str(lite0_run / "encoder.weights.h5"), 64)
    b, _ = enc.build_encoder("efficientnet_lite0", str(ft / "encoder.weights.h5"), 64)
    changed = sum(not np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, b.weights))
    assert changed > 50                                             # convolutions and BatchNorm statistics moved
    assert Captioner(ft).encoder_sha256() == cfg["encoder"]["sha256"]


def test_pretrained_recipe_comes_from_the_encoder_entry():
    from model.config import FinetuneConfig
    from model.finetune import resolve_recipe
    lite = {"encoder": "efficientnet_lite0", "weights": {"source": {"kind": "imagenet"}}}
    incep = {"encoder": "inception_v3", "weights": {"source": {"kind": "imagenet"}}}
    assert resolve_recipe(FinetuneConfig(), lite).bn == enc.ENCODERS["efficientnet_lite0"].pretrained_recipe["bn"]
    assert resolve_recipe(FinetuneConfig(), incep).cnn_optimizer == "sgd"
    assert resolve_recipe(FinetuneConfig(cnn_lr=3e-5), lite).cnn_lr == 3e-5       # a flag overrides


@pytest.mark.slow
def test_extract_cli_with_lite0_and_one_line_errors(tiny_dataset, tmp_path):
    cmd = [sys.executable, "-m", "extract", "--captions", str(tiny_dataset / "captions.h5"), "--quiet",
           "--encoder", "efficientnet_lite0", "--weights", "none", "--image-size", "64"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(tmp_path / "f")["encoder"] == "efficientnet_lite0"
    r = subprocess.run(cmd + ["--out", str(tmp_path / "g"), "--batch-size", "0"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --batch-size 0: must be at least 1"
    assert "Traceback" not in r.stderr and not (tmp_path / "g").exists()
