"""--features grid16 (issue #21, "finer grids"): the encoders' last stride-16 feature map, through
extract, train (attention and transformer), infer (cache, images, attention strips, SavedModel) and
finetune, which must rebuild the same stride-16 layers."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract import encoder as enc
from extract.cache import FeatureArray, extract_features, read_manifest
from model.train import train
from prepare.errors import UserError
from tests.conftest import TINY_ATT, TINY_GRID, savedmodel_captions_like_infer_caption, train_tiny_attention

quiet = dict(progress=False, log=lambda *a: None)
TINY_TRF = {"decoder": "transformer", "embedding_size": 16, "transformer_heads": 2, "transformer_ff": 32,
            "dropout": 0.0}
# The numbers at each encoder's native size (side, channels), and the block after the
# stride-16 layer, which already works at stride 32
NATIVE = {"efficientnet_lite0": (14, 112, "block6a_project_bn"), "inception_v3": (17, 768, "mixed8")}


def _x(size: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


# ---- the encoder -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(NATIVE))
def test_grid16_is_the_last_stride16_map_at_the_native_size(name):
    spec = enc.get_spec(name)
    side, dim, next_block = NATIVE[name]
    grid, _ = enc.build_encoder(name, "none", spec.default_image_size, output="grid")
    grid16, _ = enc.build_encoder(name, "none", spec.default_image_size, output="grid16")
    assert tuple(grid16.output.shape[1:]) == (side * side, dim)
    whole = enc.backbone_of(grid)
    side32 = whole.output.shape[1]
    assert whole.get_layer(spec.stride16_layer).output.shape[1:] == (side, side, dim)
    assert whole.get_layer(next_block).output.shape[1] == side32 < side / 1.9    # the next block strides to 32
    assert len(enc.batchnorm_layers(grid16)) < len(enc.batchnorm_layers(grid))  # the layers after it are not there


def test_lite0s_stride16_layer_is_found_from_its_block_list():
    from extract import lite0
    b = lite0.last_block_at_stride(16)
    after = lite0.blocks()[b.index + 1]
    assert after.stride == 2 and b.stride == 1 and lite0.block_output(b) == enc.get_spec("efficientnet_lite0").stride16_layer
    with pytest.raises(ValueError, match="no block at stride 64"):
        lite0.last_block_at_stride(64)


@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 64),
                                       pytest.param("inception_v3", 75, marks=pytest.mark.slow)])
def test_grid16_equals_the_whole_networks_activation_at_that_layer(name, size, tmp_path):
    import keras
    spec = enc.get_spec(name)
    pooled, _ = enc.build_encoder(name, "none", size, seed=7)
    enc.save_encoder_weights(pooled, tmp_path / "whole.weights.h5")                # a whole backbone's file
    whole = enc.backbone_of(pooled)
    at_layer = keras.Model(whole.input, whole.get_layer(spec.stride16_layer).output)
    want = at_layer(_x(size) * spec.scale + spec.offset).numpy()                    # [2, h, w, C]
    grid16, src = enc.build_encoder(name, str(tmp_path / "whole.weights.h5"), size, output="grid16")
    got = grid16(_x(size)).numpy()
    assert src.kind == "file" and got.shape == (2, want.shape[1] * want.shape[2], want.shape[3])
    np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # its own file (what a grid16 cache or run keeps) rebuilds it, loaded or passed as --weights FILE
    enc.save_encoder_weights(grid16, tmp_path / "grid16.weights.h5")
    again, _ = enc.build_encoder(name, "none", size, output="grid16")
    assert not np.allclose(again(_x(size)).numpy(), got)                            # seed 0, not 7
    enc.load_encoder_weights(again, tmp_path / "grid16.weights.h5")
    np.testing.assert_array_equal(again(_x(size)).numpy(), got)
    as_file, _ = enc.build_encoder(name, str(tmp_path / "grid16.weights.h5"), size, output="grid16")
    np.testing.assert_array_equal(as_file(_x(size)).numpy(), got)
    with pytest.raises(UserError, match="grid16 cache or run holds the layers up to the stride-16 map only"):
        enc.build_encoder(name, str(tmp_path / "grid16.weights.h5"), size)        # the pooled encoder needs them all


def test_extract_help_and_the_scst_hint_name_grid16(capsys, tmp_path):
    from extract.__main__ import main
    from model.scst import _check_source
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "grid16 (the last stride-16 map" in " ".join(capsys.readouterr().out.split())

    class Source:                      # a run whose encoder made grid16 features; the cache is another's
        path = tmp_path
        file = staticmethod(lambda name: tmp_path / name)
        encoder_sha256 = staticmethod(lambda: "a" * 64)
    run_manifest = {"features": "grid16", "storage_scale": 1.0, "encoder": "efficientnet_lite0/stride16"}
    cache = {"features": "grid", "storage_scale": 1.0, "encoder": "efficientnet_lite0", "weights": {"sha256": "b" * 64}}
    with pytest.raises(UserError, match=r"another encoder than .*encoder.weights.h5; extract a cache with it "
                                        r"\(`python -m extract .*--features grid16 --out NEW`\)"):
        _check_source(Source(), {}, run_manifest, cache, tmp_path / "cache")
    _check_source(Source(), {}, run_manifest, {**run_manifest, "weights": {"sha256": "a" * 64}}, tmp_path)  # its own


# ---- the cache -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_grid16(tiny_dataset, tmp_path_factory):
    """grid16 features of the tiny dataset: the random Lite0 of tiny_grid, its stride-16 map at 64 px."""
    out = tmp_path_factory.mktemp("grid16") / "features"
    extract_features(tiny_dataset / "captions.h5", out, features="grid16", **TINY_GRID, **quiet)
    return out


def test_lite0_grid16_cache_holds_the_stride16_map_the_cached_encoder_makes(tiny_dataset, tiny_grid, tiny_grid16):
    from extract.images import load_image
    from prepare import captions_h5
    m, m32 = read_manifest(tiny_grid16), read_manifest(tiny_grid)
    side = math.isqrt(m32["grid_positions"]) * 2                   # Lite0 pads SAME: the stride-32 side doubled
    assert (m["features"], m["grid_positions"], m["dtype"]) == ("grid16", side * side, "float16")
    assert m["request"]["encoder"] == f"efficientnet_lite0/{enc.get_spec('efficientnet_lite0').stride16_layer}"
    assert m["feature_dim"] == len(m["train_stats"]["mean"]) < m32["feature_dim"]
    model, _ = enc.build_encoder("efficientnet_lite0", str(tiny_grid16 / "encoder.weights.h5"), 64, output="grid16")
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "val")
    for split, n in (("train", 48), ("val", 12), ("test", 12)):
        g = np.load(tiny_grid16 / f"{split}.grid16.npy", mmap_mode="r")
        assert g.dtype == np.float16 and g.shape == (n, side * side, m["feature_dim"])
        assert not (tiny_grid16 / f"{split}.grid.npy").exists() and not (tiny_grid16 / f"{split}.npy").exists()
    x = load_image(tiny_dataset / sp.file_names[3], 64)[None].astype(np.float32)
    want = model(x).numpy()[0]
    np.testing.assert_allclose(FeatureArray(tiny_grid16, "val", m)[3], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # the other kinds' caches of the same images are not this one: a grid16 request reuses only grid16
    with pytest.raises(UserError, match="other settings"):
        extract_features(tiny_dataset / "captions.h5", tiny_grid, features="grid16", **TINY_GRID, **quiet)


@pytest.mark.slow
def test_inception_grid16_cache_is_its_mixed7_map(tiny_dataset, tmp_path):
    import keras
    mixed7 = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3)).get_layer("mixed7")
    h, w, c = mixed7.output.shape[1:]
    m = extract_features(tiny_dataset / "captions.h5", tmp_path / "f", weights="none", image_size=75, batch_size=16,
                         splits=["val"], features="grid16", **quiet)
    assert (m["features"], m["grid_positions"], m["feature_dim"]) == ("grid16", h * w, c) and h == w
    assert m["request"]["encoder"] == "inception_v3/mixed7"
    assert np.load(tmp_path / "f" / "val.grid16.npy").shape == (12, h * w, c)


# ---- train and infer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid16_run(tiny_dataset, tiny_grid16, tmp_path_factory):
    return train_tiny_attention(tiny_dataset, tiny_grid16, tmp_path_factory.mktemp("att16") / "run")


def test_pooled_decoder_refuses_grid16_and_grid_decoders_name_it(tiny_dataset, tiny_features, tiny_grid16, tmp_path):
    with pytest.raises(UserError, match=r"--decoder show_and_tell reads pooled features but .* holds grid16 "
                                        r"features.*--features pooled.*--decoder attention"):
        train(tiny_dataset, tmp_path / "a", features=tiny_grid16, train_overrides={"epochs": 1}, **quiet)
    with pytest.raises(UserError, match=r"--decoder transformer reads grid features but .* holds pooled.*"
                                        r"--features grid \(or grid16\)"):
        train(tiny_dataset, tmp_path / "b", model_overrides=TINY_TRF, train_overrides={"epochs": 1}, **quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_attention_run_on_grid16_evaluates_from_cache_and_images_alike(tiny_dataset, tiny_grid, tiny_grid16,
                                                                      grid16_run, tmp_path):
    from infer.caption import caption_images
    from infer.captioner import Captioner
    from infer.evaluate import evaluate
    m = read_manifest(tiny_grid16)
    cfg = json.loads((grid16_run / "config.json").read_text())["model"]
    assert (cfg["decoder"], cfg["grid_positions"], cfg["feature_dim"]) == ("attention", m["grid_positions"],
                                                                             m["feature_dim"])
    history = json.loads((grid16_run / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    cap = Captioner(grid16_run)
    assert cap.features_kind == "grid16"
    assert cap.encoder()(_x(64, 1)).shape == (1, m["grid_positions"], m["feature_dim"])
    cached = evaluate(grid16_run, tiny_dataset, features=tiny_grid16, out=tmp_path / "c", attention_maps=2, **quiet)
    lines = []
    files = evaluate(grid16_run, tiny_dataset, features=tiny_grid, out=tmp_path / "i", attention_maps=2,
                     progress=False, log=lines.append)                   # a grid cache is not this run's: images
    assert (cached["source"], files["source"], cached["images"]) == ("cache", "images", 12)
    assert any("does not hold this run's features (grid16" in x for x in lines)
    res = {d: {x["image_id"]: x["caption"] for x in json.loads((tmp_path / d / "results.json").read_text())}
           for d in ("c", "i")}
    assert sum(res["c"][k] == res["i"][k] for k in res["c"]) >= 11, res           # float16 storage aside, equal
    for d in ("c", "i"):
        strips = sorted((tmp_path / d / "attention").glob("*.png"))
        assert len(strips) == 2 and all(Image.open(p).size[0] > 112 for p in strips)
    imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:2]
    out = caption_images(grid16_run, [str(p) for p in imgs], tmp_path / "cap", attention=True, **quiet)
    assert out["captioned"] == 2
    for row in map(json.loads, (tmp_path / "cap" / "captions.jsonl").read_text().splitlines()):
        assert Path(row["attention"]).is_file() and row["captions"][0]["caption"] == res["i"][row["image_id"]]


def test_transformer_run_on_grid16_reads_its_positions(tiny_dataset, tiny_grid16, tmp_path):
    from infer.captioner import Captioner
    run = tmp_path / "trf"
    train(tiny_dataset, run, features=tiny_grid16, model_overrides=TINY_TRF,
          train_overrides={"epochs": 2, "batch_size": 16, "lr": 5e-3, "samples": 0}, **quiet)
    positions = read_manifest(tiny_grid16)["grid_positions"]
    cap = Captioner(run)
    assert cap.model.side ** 2 == positions and cap.features_kind == "grid16"
    res = cap.caption_files(sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:2], progress=False,
                            attention=True)
    for r in res:
        assert r.attention.shape == (len(r.captions[0].ids) - 1, positions)
        assert np.allclose(r.attention.sum(-1), 1, atol=1e-5)


@pytest.mark.slow
def test_savedmodel_of_a_grid16_run_captions_like_infer_caption(tiny_dataset, grid16_run, tmp_path):
    imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:6]
    savedmodel_captions_like_infer_caption(grid16_run, imgs, tmp_path, at_least=5)


@pytest.mark.slow
def test_finetuning_a_grid16_run_trains_the_stride16_encoder(tiny_dataset, grid16_run, tiny_grid16, tmp_path):
    from infer.captioner import Captioner
    from model import checkpoint
    from model.finetune import finetune
    from model.run import load_run
    m = read_manifest(tiny_grid16)
    shape = (2, m["grid_positions"], m["feature_dim"])
    out = tmp_path / "ft"
    r = finetune(grid16_run, tiny_dataset, out, overrides={"epochs": 1, "batch_size": 16, "cnn_lr": 1e-3,
                                                             "samples": 0}, **quiet)
    assert r["steps"] == 3
    before, _ = enc.build_encoder("efficientnet_lite0", str(grid16_run / "encoder.weights.h5"), 64, output="grid16")
    cap = Captioner(out)
    assert cap.encoder()(_x(64)).numpy().shape == shape                 # the run's encoder file rebuilt at stride 16
    trained, _ = enc.build_encoder("efficientnet_lite0", "none", 64, trainable=True, output="grid16")
    checkpoint.load(out / "checkpoints" / "latest.h5", [load_run(out)[0], trained])
    assert trained(_x(64)).shape == shape
    assert not np.allclose(trained(_x(64)).numpy(), before(_x(64)).numpy())   # the stride-16 layers were trained
    imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:2]
    assert all(c.captions for c in cap.caption_files(imgs, progress=False, attention=True))
