import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract import encoder as enc
from extract.images import load_image
from extract.cache import extract_features, read_manifest
from prepare import captions_h5
from prepare.prepare_captions import prepare_captions
from prepare.errors import UserError
from tests.conftest import odd_files

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *a: None)


def test_shapes_dtype_and_rows_aligned_with_captions_h5(tiny_dataset, tiny_features):
    m = read_manifest(tiny_features)
    for split in ("train", "val", "test"):
        sp = captions_h5.read_split(tiny_dataset / "captions.h5", split)
        f = np.load(tiny_features / f"{split}.npy")
        assert f.dtype == np.float32 and f.shape == (len(sp.image_ids), 2048)
        assert m["counts"][split] == len(sp.image_ids) and m["failed"][split] == []
    # row i really is image i: recompute two rows with the saved encoder weights
    model, _ = enc.build_encoder("inception_v3", "none", 75)
    enc.load_encoder_weights(model, tiny_features / "encoder.weights.h5")
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "val")
    feats = np.load(tiny_features / "val.npy")
    for row in (0, 7):
        x = load_image(tiny_dataset / sp.file_names[row], 75)[None].astype(np.float32)
        np.testing.assert_allclose(model(x, training=False).numpy()[0], feats[row], rtol=1e-4, atol=1e-7)
    assert len(m["train_stats"]["mean"]) == 2048 and m["train_stats"]["rows"] == 48
    std = np.asarray(m["train_stats"]["std"])
    assert 0 < np.median(std) < 1e-2   # random-init Inception features are tiny


def test_weights_file_gives_the_same_features_and_second_run_rewrites_nothing(tiny_dataset, tiny_features, tmp_path):
    wfile = tmp_path / "w.weights.h5"
    wfile.write_bytes((tiny_features / "encoder.weights.h5").read_bytes())
    out = tmp_path / "f"
    m = extract_features(tiny_dataset / "captions.h5", out, weights=str(wfile), image_size=75, batch_size=16, **quiet)
    assert m["weights"]["source"]["kind"] == "file"
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.load(out / f"{split}.npy"), np.load(tiny_features / f"{split}.npy"))
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
    lines = []
    extract_features(tiny_dataset / "captions.h5", out, weights=str(wfile), image_size=75, batch_size=16,
                     progress=False, log=lines.append)
    assert "reused" in lines[0]
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()} == before


def test_cache_with_other_settings_is_refused(tiny_dataset, tiny_features):
    with pytest.raises(UserError, match=r"other settings \(image_size: cache has 75, now 80.*--force"):
        extract_features(tiny_dataset / "captions.h5", tiny_features, weights="none", image_size=80, **quiet)
    with pytest.raises(UserError, match="weights"):
        extract_features(tiny_dataset / "captions.h5", tiny_features, weights="imagenet", image_size=75, **quiet)


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tiny_dataset, tiny_features, tmp_path):
    wfile = tmp_path / "w.weights.h5"
    wfile.write_bytes((tiny_features / "encoder.weights.h5").read_bytes())
    ref, out = tmp_path / "ref", tmp_path / "killed"
    extract_features(tiny_dataset / "captions.h5", ref, weights=str(wfile), image_size=75, batch_size=8, **quiet)
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from extract import encoder as enc
from extract.images import load_image
from extract.cache import extract_features
orig = enc.compiled_forward
def compiled_forward(model):
    f = orig(model); n = [0]
    def g(x):
        n[0] += 1
        if n[0] == 4:   # die (kill -9) in the middle of the 4th batch of train
            os.kill(os.getpid(), signal.SIGKILL)
        return f(x)
    return g
enc.compiled_forward = compiled_forward
extract_features({str(tiny_dataset / 'captions.h5')!r}, {str(out)!r}, weights={str(wfile)!r}, image_size=75,
                 batch_size=8, chunk_batches=1, progress=False)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    prog = json.loads((out / ".work" / "train.progress.json").read_text())
    assert prog["done"] == 24   # three batches of 8 were recorded before the kill
    lines = []
    m = extract_features(tiny_dataset / "captions.h5", out, weights=str(wfile), image_size=75, batch_size=8,
                         progress=False, log=lines.append)
    assert any("resuming" in line for line in lines)
    for split in ("train", "val", "test"):
        assert np.load(out / f"{split}.npy").tobytes() == np.load(ref / f"{split}.npy").tobytes()
    assert m["train_stats"] == read_manifest(ref)["train_stats"]
    assert not (out / ".work").exists()


def _bad_images(d: Path) -> dict[str, str | None]:
    """file name -> expected failure reason fragment (None: must succeed)."""
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    good.save(d / "good.jpg")
    data = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "corrupt.jpg").write_bytes(data[:200] + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a picture\n")
    Image.new("1", (11000, 11000)).save(d / "bomb.png")          # 121 Mpx, a few kB on disk
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "tiny.png")
    Image.fromarray(np.full((80, 80), 49151, np.uint16)).save(d / "deep16.png")
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.new("RGBA", (80, 80), (0, 0, 255, 0)).save(d / "clear.png")
    Image.new("L", (80, 80), 100).save(d / "grey.png")
    half = np.zeros((80, 160, 3), np.uint8)
    half[:, :80] = (255, 0, 0)       # stored: red left half, 160 wide, 80 high
    exif = Image.Exif()
    exif[0x0112] = 6                 # "rotate 90 CW to display"
    Image.fromarray(half).save(d / "exif.jpg", exif=exif, quality=95)
    (d / "missing.jpg").write_bytes(data)  # deleted after prepare
    return {"good.jpg": None, "truncated.jpg": "corrupt", "corrupt.jpg": "", "empty.jpg": "empty file",
            "text.jpg": "not an image", "bomb.png": "decompression bomb", "tiny.png": "too small",
            "deep16.png": None, "cmyk.jpg": None, "clear.png": None, "grey.png": None, "exif.jpg": None,
            "missing.jpg": "missing file"}


def test_bad_images_are_counted_recorded_and_never_crash(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    expect = _bad_images(d)
    names = sorted(expect)
    doc = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
           "annotations": [{"id": i + 1, "image_id": i + 1, "caption": "a thing"} for i in range(len(names))]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    prepare_captions(tmp_path / "c.h5", pairs=[("train", str(tmp_path / "ann.json"), str(d))],
                     val_fraction=0, test_fraction=0, log=lambda *a: None)
    (d / "missing.jpg").unlink()
    m = extract_features(tmp_path / "c.h5", tmp_path / "f", weights="none", image_size=75, batch_size=4, **quiet)
    failed = {Path(f["file"]).name: f["reason"] for f in m["failed"]["train"]}
    assert set(failed) == {n for n, why in expect.items() if why is not None}
    for n, why in expect.items():
        if why:
            assert why in failed[n], (n, failed[n])
    feats = np.load(tmp_path / "f" / "train.npy")
    for f in m["failed"]["train"]:
        assert not feats[f["row"]].any()
    assert m["train_stats"]["rows"] == len(names) - len(failed)
    # the ones that load are converted correctly
    assert load_image(d / "deep16.png", 75)[0, 0].tolist() == [191, 191, 191]  # 49151/65535*255
    c = load_image(d / "cmyk.jpg", 75)[30, 30]
    assert c[0] > 200 and c[1] < 60 and c[2] < 60                      # CMYK (0,255,255,0) is red
    assert load_image(d / "clear.png", 75)[5, 5].tolist() == [255, 255, 255]  # transparent over white
    assert load_image(d / "grey.png", 75).shape == (75, 75, 3)
    rot = load_image(d / "exif.jpg", 75)   # displayed 80 wide, 160 high: red on top
    assert rot[10, 37, 0] > 200 and rot[65, 37, 0] < 50


def _split_with_broken_images(tmp_path, broken: int) -> Path:
    """captions.h5 of a synthetic train (8) and val (4) split, `broken` val images overwritten with text."""
    from prepare import synth
    d = tmp_path / "data"
    synth.generate(d, {"train": 8, "val": 4}, size=75, seed=3, progress=False)
    pairs = [(s, str(d / "annotations" / f"captions_{s}.json"), str(d / "images" / s)) for s in ("train", "val")]
    prepare_captions(d / "captions.h5", pairs=pairs, val_fraction=0, test_fraction=0, log=lambda *a: None)
    for p in sorted((d / "images" / "val").iterdir())[:broken]:
        p.write_text("not a picture")
    return d


@pytest.mark.parametrize("broken,share", [(4, "every"), (3, "more than half of the"), (2, None)])
def test_a_split_whose_images_mostly_failed_is_warned_about(tmp_path, broken, share):
    d = _split_with_broken_images(tmp_path, broken)
    lines = []
    m = extract_features(d / "captions.h5", d / "features", weights="none", image_size=75, batch_size=4,
                         progress=False, log=lines.append)
    assert len(m["failed"]["val"]) == broken and m["failed"]["train"] == []
    warnings = [ln for ln in lines if ln.startswith("WARNING:") and "failed" in ln]
    if share is None:
        assert warnings == []
        return
    w, = warnings
    assert w.startswith(f"WARNING: {share} 'val' image failed ({broken} of 4; ")
    assert str(d / "features" / "manifest.json") in w and "re-run extract" in w


def test_fifo_device_folder_and_symlink_loop_are_never_read(tmp_path):
    from extract.images import BadImage, image_dataset, not_regular
    odd = odd_files(tmp_path)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("blocked reading")))
    signal.alarm(20)
    try:
        for name, what in odd.items():
            assert not_regular(tmp_path / name) == what
            with pytest.raises(BadImage, match=re.escape(f"not a regular file ({what})")):
                load_image(tmp_path / name, 75)
        paths = [tmp_path / n for n in odd]
        (imgs, ok, why), = list(image_dataset(paths, 75, 8))      # the tf.data loader extract uses
        assert not ok.numpy().any() and not imgs.numpy().any()
        assert [w.decode() for w in why.numpy()] == [f"not a regular file ({w})" for w in odd.values()]
    finally:
        signal.alarm(0)


def test_offline_imagenet_gives_one_clear_message(tmp_path):
    """A real offline download (proxies pointing at a closed local port), not a patched function."""
    keras_home = tmp_path / "keras_home"
    env = {**os.environ, "KERAS_HOME": str(keras_home), "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}
    r = subprocess.run([sys.executable, "-m", "extract", "--captions", str(tmp_path / "x.h5"), "--out",
                        str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr[-2000:]       # the missing captions.h5 is named first: no download yet
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from prepare.cli import run_cli; "
            "from extract import encoder as enc; run_cli(lambda a: enc.build_encoder('inception_v3', 'imagenet', 75))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and msg[0].startswith("error: could not download the ImageNet weights for Inception v3")
    assert str(keras_home / "models" / enc.IMAGENET_FILE) in msg[0]
    assert "--weights FILE" in msg[0] and "--encoder efficientnet_lite0" in msg[0]


def test_unwritable_home_names_the_weights_folder_and_keras_home(tiny_dataset, tmp_path):
    """HOME=/dev/null, KERAS_HOME unset: the Keras cache folder cannot be created (a real subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    env["HOME"] = "/dev/null"
    r = subprocess.run([sys.executable, "-m", "extract", "--captions", str(tiny_dataset / "captions.h5"),
                        "--out", str(tmp_path / "f"), "--encoder", "efficientnet_lite0", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: cannot create the ImageNet weights cache folder /dev/null/.keras/models")
    assert "set KERAS_HOME to a writable folder" in line


def test_wrong_weights_file_and_small_size_are_refused(tmp_path):
    bad = tmp_path / "x.weights.h5"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match=r"x\.weights\.h5: does not hold Inception v3"):
        enc.build_encoder("inception_v3", str(bad), 75)
    with pytest.raises(UserError, match="minimum of 75"):
        enc.build_encoder("inception_v3", "none", 64)


FAULTS = ["extract:weights-saved", "extract:train:chunk", "extract:val:done", "extract:staged",
          "extract:committed", "extract:moved-one"]


@pytest.mark.slow
def test_kill_at_every_stage_boundary_resumes_to_the_same_cache(tiny_dataset, tiny_features, tmp_path):
    """kill -9 between any two steps of the save (work files, renames, manifest): the re-run
    finishes, and the cache is bit-identical to an uninterrupted one."""
    wfile = tmp_path / "w.weights.h5"
    wfile.write_bytes((tiny_features / "encoder.weights.h5").read_bytes())
    args = dict(weights=str(wfile), image_size=75, batch_size=16)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from extract.cache import extract_features; "
            "extract_features(sys.argv[2], sys.argv[3], weights=sys.argv[4], image_size=75, batch_size=16, "
            "chunk_batches=1, progress=False)")
    for fault in FAULTS:
        out = tmp_path / fault.replace(":", "_")
        r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tiny_dataset / "captions.h5"), str(out),
                            str(wfile)], capture_output=True, env={**os.environ, "SHOWTELL_FAULT": fault})
        assert r.returncode == -signal.SIGKILL, (fault, r.stderr.decode()[-2000:])
        m = extract_features(tiny_dataset / "captions.h5", out, **args, **quiet)
        assert not (out / ".work").exists() and (out / "manifest.json").is_file(), fault
        for split in ("train", "val", "test"):
            assert np.load(out / f"{split}.npy").tobytes() == np.load(tiny_features / f"{split}.npy").tobytes(), fault
        assert m["train_stats"] == read_manifest(tiny_features)["train_stats"], fault


def test_second_process_on_the_same_out_is_refused_naming_the_holder(tiny_dataset, tmp_path):
    from prepare.files import exclusive_lock
    out = tmp_path / "f"
    with exclusive_lock(out):
        with pytest.raises(UserError, match=rf"{out} is in use by another process \(pid {os.getpid()} .*choose another --out"):
            extract_features(tiny_dataset / "captions.h5", out, weights="none", image_size=75, **quiet)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]     # nothing was written


def test_wrong_images_root_is_an_error_before_anything_is_written(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match=r"48 of 48 'train' images are missing under .*nowhere \(first: .*train_\d+\.jpg\); "
                                        r"pass --images-root"):
        extract_features(tiny_dataset / "captions.h5", tmp_path / "f", weights="none", image_size=75,
                         images_root=tmp_path / "nowhere", **quiet)
    assert not (tmp_path / "f" / ".work").exists()


@pytest.mark.parametrize("kw, msg", [({"batch_size": 0}, "--batch-size 0: must be at least 1"),
                                     ({"image_size": 60}, "--image-size 60 is below Inception v3's minimum of 75"),
                                     ({"encoder": "resnet"}, "--encoder 'resnet': unknown; choose one of"),
                                     ({"weights": "/no/such.h5"}, "--weights /no/such.h5: no such file")])
def test_bad_flag_values_are_refused_before_anything_is_written(tiny_dataset, tmp_path, kw, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        extract_features(tiny_dataset / "captions.h5", tmp_path / "f", **{"weights": "none", "image_size": 75, **kw},
                         **quiet)
    assert not (tmp_path / "f").exists()
