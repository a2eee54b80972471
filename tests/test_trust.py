"""Paths read from users' files (caption JSON, captions.h5) never leave the folder they belong to."""
import json
from pathlib import Path

import h5py
import pytest
from PIL import Image

from prepare import captions_h5
from prepare.coco import OUTSIDE
from prepare.prepare_captions import prepare_captions
from prepare.errors import UserError
from prepare.files import inside

BAD_NAMES = ["/etc/passwd", "../../../etc/hostname", "../secret.jpg", "sub/../ok.jpg", "sub/./../../secret.jpg"]


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def test_inside_refuses_absolute_and_dotdot_names(tmp_path):
    assert inside(tmp_path, "a.jpg") == tmp_path / "a.jpg"
    assert inside(tmp_path, "sub/./b.jpg") == tmp_path / "sub" / "b.jpg"
    for bad in BAD_NAMES + ["", ".", "a\0.jpg", "sub/.."]:
        assert inside(tmp_path, bad) is None, bad


def test_coco_file_names_outside_the_images_folder_are_skipped_and_counted(tmp_path):
    imgs = tmp_path / "imgs"
    for f in ("ok.jpg", "sub/ok2.jpg"):
        _img(imgs / f)
    _img(tmp_path / "secret.jpg")                       # a real image file just outside the folder
    names = ["ok.jpg", "sub/ok2.jpg"] + BAD_NAMES
    images = [{"id": i, "file_name": n} for i, n in enumerate(names, 1)]
    anns = [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in range(1, len(names) + 1)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    out = tmp_path / "imgs" / "c.h5"
    lines = []
    s = prepare_captions(out, pairs=[("train", str(ann), str(imgs))], val_fraction=0, test_fraction=0,
                         log=lines.append)
    assert s["skipped"] == {OUTSIDE: len(BAD_NAMES), "captions of images outside their folder": len(BAD_NAMES)}
    assert any(OUTSIDE in ln for ln in lines)          # the summary says so
    sp = captions_h5.read_split(out, "train")
    assert sp.image_ids.tolist() == [1, 2] and sp.file_names == ["ok.jpg", "sub/ok2.jpg"]
    assert sp.texts == ["caption 1", "caption 2"]
    assert sp.image_paths(imgs) == [imgs / "ok.jpg", imgs / "sub" / "ok2.jpg"]


def test_karpathy_file_names_outside_the_images_root_are_skipped_and_counted(tmp_path):
    root = tmp_path / "coco"
    _img(root / "train2014" / "a.jpg")
    _img(tmp_path / "secret.jpg")
    entries = [("train2014", "a.jpg"), ("..", "secret.jpg"), ("train2014", "../../secret.jpg"),
               ("/etc", "hostname"), ("train2014", "/etc/passwd"), ("", "../secret.jpg")]
    doc = {"images": [{"filepath": fp, "filename": fn, "split": "train", "cocoid": i,
                       "sentences": [{"raw": f"caption {i}"}]} for i, (fp, fn) in enumerate(entries, 1)]}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    s = prepare_captions(root / "c.h5", karpathy=str(tmp_path / "k.json"), images_root=str(root),
                         val_fraction=0, test_fraction=0, log=lambda *a: None)
    assert s["skipped"][OUTSIDE] == 5 and s["skipped"]["captions of images outside their folder"] == 5
    sp = captions_h5.read_split(root / "c.h5", "train")
    assert sp.file_names == ["train2014/a.jpg"] and sp.image_ids.tolist() == [1]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../etc/hostname", "images/../../x.jpg"])
def test_tampered_captions_h5_never_yields_a_path_outside_root(tiny_dataset, tmp_path, bad):
    h5 = tmp_path / "c.h5"
    h5.write_bytes((tiny_dataset / "captions.h5").read_bytes())
    with h5py.File(h5, "r+") as f:
        names = [x.decode() for x in f["val/file_names"][()]]
        names[3] = bad
        del f["val/file_names"]
        f.create_dataset("val/file_names", data=names, dtype=h5py.string_dtype("utf-8"))
    sp = captions_h5.read_split(h5, "val")
    assert sp.file_names[3] == bad
    with pytest.raises(UserError) as e:
        sp.image_paths(tiny_dataset)
    msg = str(e.value)
    assert str(h5) in msg and "val/file_names[3]" in msg and repr(bad) in msg
    assert "python -m prepare captions --overwrite" in msg
    # the untouched file is fine
    good = captions_h5.read_split(tiny_dataset / "captions.h5", "val").image_paths(tiny_dataset)
    assert all(p.is_file() and tiny_dataset in p.parents for p in good)


def test_images_outside_the_h5_folder_get_a_recorded_root_not_absolute_names(tiny_dataset, tmp_path):
    pairs = [("train", str(tiny_dataset / "annotations/captions_train.json"), str(tiny_dataset / "images/train"))]
    lines = []
    s = prepare_captions(tmp_path / "c.h5", pairs=pairs, val_fraction=0, test_fraction=0, log=lines.append)
    root = tiny_dataset / "images" / "train"
    assert s["images_root"] == str(root) and any(f"relative to {root}" in ln for ln in lines)
    assert captions_h5.images_root(tmp_path / "c.h5") == root
    assert captions_h5.read_attrs(tmp_path / "c.h5")["images_root"] == root
    sp = captions_h5.read_split(tmp_path / "c.h5", "train")
    assert all(not Path(f).is_absolute() and ".." not in Path(f).parts for f in sp.file_names)
    assert all(p.is_file() for p in sp.image_paths(root))
    # readers that pass the captions file's folder (their default), or nothing, get the recorded root
    assert sp.image_paths(tmp_path) == sp.image_paths() == sp.image_paths(root)
    # a tampered images_root attribute is refused too
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f.attrs["images_root"] = "etc/../"
    with pytest.raises(UserError, match="images_root 'etc/../' is not a normalised absolute folder"):
        captions_h5.read_split(tmp_path / "c.h5", "train")
    # next to its images: no recorded root, names relative to its own folder
    assert captions_h5.images_root(tiny_dataset / "captions.h5") == tiny_dataset


def test_the_lock_holder_removes_temp_files_a_killed_writer_left(tmp_path):
    from prepare.files import exclusive_lock
    (tmp_path / "checkpoints").mkdir()
    left = [tmp_path / ".tmp-best.weights.h5.abc", tmp_path / "checkpoints" / ".tmp-latest.h5.x"]
    for p in left:
        p.write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("mine")
    with exclusive_lock(tmp_path):
        assert not any(p.exists() for p in left)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_killed_caption_run_is_finished_by_the_same_command(tiny_run, tiny_dataset, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    images = sorted(str(p) for p in (tiny_dataset / "images" / "test").glob("*.jpg"))[:3]
    cmd = [sys.executable, "-m", "infer", "caption", "--run", str(tiny_run), "--out", str(tmp_path / "o"),
           "--quiet", *images]
    r = subprocess.run(cmd, cwd=root, capture_output=True, env={**os.environ, "SHOWTELL_FAULT": "caption:moved-one"})
    assert r.returncode == -signal.SIGKILL
    assert not (tmp_path / "o" / "captions.jsonl").exists() and len(list((tmp_path / "o" / "annotated").iterdir())) == 1
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)          # no --overwrite needed
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finishing the interrupted run" in r.stdout
    assert len((tmp_path / "o" / "captions.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "o" / ".caption-incomplete").exists()
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)          # a finished run is protected
    assert r.returncode == 2 and "pass --overwrite" in r.stderr


def test_outputs_follow_the_umask(tmp_path):
    import os
    from prepare.files import write_json_atomic
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
