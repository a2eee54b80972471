import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from prepare import captions_h5, synth
from prepare.prepare_captions import prepare_captions
from prepare.errors import UserError
from prepare.vocabulary import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, tokenize

ROOT = Path(__file__).resolve().parents[1]


# ---- vocabulary -------------------------------------------------------------------------
def test_tokenize_lowercases_splits_punctuation_and_folds_accents():
    assert tokenize("A man,  riding a WAVE!") == ["a", "man", ",", "riding", "a", "wave", "!"]
    assert tokenize("Café\tcrème.") == ["cafe", "creme", "."]
    assert tokenize("   ") == []


def test_vocabulary_top_n_with_ties_and_fixed_special_ids():
    caps = [["b", "a", "c"], ["a", "b", "d"], ["a", "e"]]  # a:3, b:2, c:1, d:1, e:1
    v = Vocabulary.build(caps, max_size=7)
    assert v.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "b", "c"]  # c wins the tie alphabetically
    assert v.counts[4:] == [3, 2, 1]
    assert (v.id("<pad>"), v.id("<start>"), v.id("<end>"), v.id("<unk>")) == (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert v.id("e") == UNK_ID
    assert Vocabulary.build(caps, min_count=2).words[4:] == ["a", "b"]


def test_encode_decode_round_trip_padding_and_truncation(tmp_path):
    v = Vocabulary.build([["a", "red", "star"]])
    ids = v.encode(["a", "red", "star"], max_len=7)
    assert ids.tolist() == [1, v.id("a"), v.id("red"), v.id("star"), 2, 0, 0]
    assert v.decode(ids) == "a red star"
    assert v.decode(v.encode(["a", "blue", "star"])) == "a <unk> star"
    short = v.encode(["a", "red", "star", "a", "red"], max_len=4)
    assert short.tolist() == [1, v.id("a"), v.id("red"), 2]  # truncated, keeps <end>
    v.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").words == v.words


# ---- captions.h5 ------------------------------------------------------------------------
def test_h5_layout_read_back_with_h5py(tiny_dataset):
    path = tiny_dataset / "captions.h5"
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"train", "val", "test", "vocab"}
        caps, lens = f["train/captions"][()], f["train/lengths"][()]
        assert caps.dtype == np.int32 and caps.shape[1] == 28
        assert f["train/image_ids"].dtype == np.int64
        assert len(f["train/image_ids"]) == 48 and caps.shape[0] == 48 * 5
        assert (caps[:, 0] == START_ID).all()
        for row, n in zip(caps, lens):
            assert row[n - 1] == END_ID and (row[n:] == PAD_ID).all() and (row[1:n - 1] > 3).all()
        idx = f["train/image_index"][()]
        assert idx.min() == 0 and idx.max() == 47
        assert json.loads(f.attrs["config"])["max_len"] == 28
        assert len(json.loads(f.attrs["checksums"])) == 3
    sp = captions_h5.read_split(path, "val")
    assert all((tiny_dataset / f).is_file() for f in sp.file_names)  # relative to the h5's folder
    vocab = captions_h5.read_vocab(path)
    # decode every caption of image 0 and compare with the raw JSON captions
    doc = json.loads((tiny_dataset / "annotations" / "captions_val.json").read_text())
    want = sorted(" ".join(tokenize(a["caption"])) for a in doc["annotations"] if a["image_id"] == sp.image_ids[0])
    got = sorted(vocab.decode(c) for c, i in zip(sp.captions, sp.image_index) if i == 0)
    assert got == want


def test_existing_output_is_not_overwritten(tiny_dataset, tmp_path):
    out = tmp_path / "c.h5"
    out.write_bytes(b"precious")
    pairs = [("train", str(tiny_dataset / "annotations/captions_train.json"), str(tiny_dataset / "images/train"))]
    with pytest.raises(UserError, match="--overwrite"):
        prepare_captions(out, pairs=pairs, log=lambda *a: None)
    assert out.read_bytes() == b"precious"
    prepare_captions(out, pairs=pairs, overwrite=True, log=lambda *a: None)
    assert h5py.is_hdf5(out)


def test_carved_splits_are_reproducible_and_disjoint(tiny_dataset, tmp_path):
    pairs = [("train", str(tiny_dataset / "annotations/captions_train.json"), str(tiny_dataset / "images/train"))]
    ids = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_captions(tmp_path / f"{name}.h5", pairs=pairs, seed=seed, val_fraction=0.25,
                         test_fraction=0.25, log=lambda *a: None)
        ids[name] = {s: captions_h5.read_split(tmp_path / f"{name}.h5", s).image_ids.tolist()
                     for s in ("train", "val", "test")}
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    a = ids["a"]
    assert len(a["val"]) == len(a["test"]) == 12 and len(a["train"]) == 24
    assert not (set(a["train"]) & set(a["val"])) and not (set(a["val"]) & set(a["test"]))



def test_train_and_test_stay_disjoint_when_test_is_carved(tiny_dataset, tmp_path):
    d = tiny_dataset
    pairs = [("train", str(d / "annotations/captions_train.json"), str(d / "images/train")),
             ("val", str(d / "annotations/captions_val.json"), str(d / "images/val"))]
    s = prepare_captions(tmp_path / "c.h5", pairs=pairs, test_fraction=0.25, seed=7, log=lambda *a: None)
    ids = {k: captions_h5.read_split(tmp_path / "c.h5", k).image_ids.tolist() for k in ("train", "val", "test")}
    all_train = [im["id"] for im in json.loads((d / "annotations/captions_train.json").read_text())["images"]]
    assert len(ids["test"]) == 12 and len(ids["train"]) == 36 and len(ids["val"]) == 12
    assert not set(ids["train"]) & set(ids["test"])
    assert sorted(ids["train"] + ids["test"]) == sorted(all_train)     # carved from train only
    assert not set(ids["val"]) & (set(ids["train"]) | set(ids["test"]))
    assert captions_h5.read_attrs(tmp_path / "c.h5")["config"]["carved"] == ["test"]
    # captions follow their images: every test caption's text is one of its image's own captions
    doc = json.loads((d / "annotations/captions_train.json").read_text())
    by_id = {}
    for a in doc["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a["caption"])
    sp = captions_h5.read_split(tmp_path / "c.h5", "test")
    assert all(t in by_id[int(sp.image_ids[r])] for t, r in zip(sp.texts, sp.image_index))
    assert s["splits"]["test"]["captions"] == 5 * 12


def test_a_word_seen_only_in_val_captions_decodes_to_unk(tmp_path):
    imgs = tmp_path / "imgs"
    for f in ("t1.jpg", "t2.jpg", "v1.jpg"):
        _img(imgs / f)
    doc = lambda ims, anns: {"images": [{"id": i, "file_name": f} for i, f in ims],  # noqa: E731
                             "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in anns]}
    (tmp_path / "train.json").write_text(json.dumps(doc([(1, "t1.jpg"), (2, "t2.jpg")],
                                                        [(1, 1, "A red star."), (2, 2, "A blue circle.")])))
    (tmp_path / "val.json").write_text(json.dumps(doc([(3, "v1.jpg")], [(3, 3, "A red zebra.")])))
    s = prepare_captions(tmp_path / "c.h5", pairs=[("train", str(tmp_path / "train.json"), str(imgs)),
                                                   ("val", str(tmp_path / "val.json"), str(imgs))],
                         test_fraction=0, log=lambda *a: None)
    vocab = captions_h5.read_vocab(tmp_path / "c.h5")
    assert "zebra" not in vocab.words and {"red", "star", "blue", "circle"} <= set(vocab.words)
    sp = captions_h5.read_split(tmp_path / "c.h5", "val")
    assert sp.captions[0, :sp.lengths[0]].tolist() == [START_ID, vocab.id("a"), vocab.id("red"), UNK_ID,
                                                       vocab.id("."), END_ID]
    assert vocab.decode(sp.captions[0]) == "a red <unk> ."
    assert sp.texts == ["A red zebra."]                     # the reference text keeps the word
    assert s["splits"]["val"]["unk_rate"] == pytest.approx(1 / 4) and s["splits"]["train"]["unk_rate"] == 0


def _img(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 140, 200)).save(path)


def test_karpathy_split_file_as_documented(tmp_path):
    """README: `python -m prepare captions --karpathy dataset_coco.json --images-root coco/`;
    restval joins train (Karpathy's convention); val and test are kept as given, nothing carved."""
    coco = tmp_path / "coco"
    entries = [  # (filepath, filename, split, id key, id, sentences)
        ("train2014", "COCO_train2014_000000000009.jpg", "train", "cocoid", 9, ["A red star.", "A star, red!"]),
        ("val2014", "COCO_val2014_000000000042.jpg", "restval", "cocoid", 42, ["A blue circle."]),
        ("val2014", "COCO_val2014_000000000073.jpg", "val", "cocoid", 73, ["A green square.", "Green square"]),
        ("val2014", "COCO_val2014_000000000074.jpg", "test", "cocoid", 74, ["A red circle."]),
        ("val2014", "COCO_val2014_000000000075.jpg", "test", "imgid", 75, ["A blue star.", "  "]),
    ]
    images = []
    for fp, fn, split, key, iid, sents in entries:
        _img(coco / fp / fn)
        images.append({"filepath": fp, "filename": fn, "split": split, key: iid, "sentids": [],
                       "sentences": [{"raw": t, "tokens": t.lower().split(), "imgid": iid} for t in sents]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    r = _cli("captions", "--karpathy", "dataset_coco.json", "--images-root", "coco/", "--out", "coco/captions.h5",
             "--max-len", 8, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped: 1 x empty caption" in r.stdout
    h5 = coco / "captions.h5"
    with h5py.File(h5, "r") as f:
        assert set(f.keys()) == {"train", "val", "test", "vocab"}
        for split in ("train", "val", "test"):
            g = f[split]
            assert set(g.keys()) == {"captions", "lengths", "image_index", "image_ids", "file_names", "objects",
                                     "texts"}
            assert g["captions"].dtype == np.int32 and g["captions"].shape[1] == 8
            assert g["image_ids"].dtype == np.int64
    sp = {k: captions_h5.read_split(h5, k) for k in ("train", "val", "test")}
    assert sp["train"].image_ids.tolist() == [9, 42]                 # restval joined train
    assert sp["val"].image_ids.tolist() == [73] and sp["test"].image_ids.tolist() == [74, 75]
    assert sp["train"].file_names == ["train2014/COCO_train2014_000000000009.jpg",
                                      "val2014/COCO_val2014_000000000042.jpg"]       # relative to coco/
    assert all(p.is_file() for s in sp.values() for p in s.image_paths(coco))
    assert sp["train"].texts == ["A red star.", "A star, red!", "A blue circle."]
    assert sp["train"].image_index.tolist() == [0, 0, 1] and sp["test"].texts == ["A red circle.", "A blue star."]
    vocab = captions_h5.read_vocab(h5)
    assert vocab.decode(sp["train"].captions[1]) == "a star , red !"
    assert vocab.decode(sp["val"].captions[0]) == "a <unk> <unk> ."          # vocabulary from train only
    attrs = captions_h5.read_attrs(h5)
    assert attrs["config"]["karpathy"] == "dataset_coco.json" and attrs["config"]["carved"] == []
    assert list(attrs["checksums"]) == [str((tmp_path / "dataset_coco.json").resolve())]


# ---- bad input --------------------------------------------------------------------------
def _write_coco(tmp_path, images, annotations, files=None, name="ann.json"):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    for f in files if files is not None else [im["file_name"] for im in images]:
        Image.new("RGB", (8, 8)).save(img_dir / f)
    p = tmp_path / name
    p.write_text(json.dumps({"images": images, "annotations": annotations}))
    return p, img_dir


def _prep(tmp_path, ann, img_dir):
    return prepare_captions(tmp_path / "out.h5", pairs=[("train", str(ann), str(img_dir))],
                            val_fraction=0, test_fraction=0, log=lambda *a: None)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(UserError, match=r"nope\.json: file not found"):
        _prep(tmp_path, tmp_path / "nope.json", tmp_path / "imgs")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,]}')
    with pytest.raises(UserError, match=r"bad\.json: malformed JSON at line 1"):
        _prep(tmp_path, bad, tmp_path / "imgs")
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match=r"bad\.json: not UTF-8"):
        _prep(tmp_path, bad, tmp_path / "imgs")
    assert not (tmp_path / "out.h5").exists()


def test_missing_keys_and_wrong_types_name_the_key(tmp_path):
    p, d = _write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg"}], [{"id": 1, "image_id": 1}])
    with pytest.raises(UserError, match=r"annotations\[0\]: missing key 'caption'"):
        _prep(tmp_path, p, d)
    p, d = _write_coco(tmp_path, [{"id": "1", "file_name": "a.jpg"}], [])
    with pytest.raises(UserError, match=r"images\[0\]: key 'id' should be int"):
        _prep(tmp_path, p, d)
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="missing top-level key 'annotations'"):
        _prep(tmp_path, p, d)


def test_duplicate_image_ids_with_different_files_are_an_error(tmp_path):
    p, d = _write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
                       [{"id": 1, "image_id": 1, "caption": "x"}])
    with pytest.raises(UserError, match="image id 1 appears twice"):
        _prep(tmp_path, p, d)


def test_skips_are_counted_in_the_summary(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(1, 6)]
    anns = [
        {"id": 1, "image_id": 1, "caption": "A red star."},
        {"id": 1, "image_id": 1, "caption": "duplicate annotation id"},
        {"id": 2, "image_id": 99, "caption": "unknown image"},
        {"id": 3, "image_id": 2, "caption": "   "},
        {"id": 4, "image_id": 2, "caption": "Un café crème."},
        {"id": 5, "image_id": 4, "caption": "its file is missing"},
        {"id": 6, "image_id": 5, "caption": "?!"},
        {"id": 7, "image_id": 5, "caption": "a blue dot"},
    ]  # image 3 has no captions
    p, d = _write_coco(tmp_path, images, anns, files=["1.jpg", "2.jpg", "3.jpg", "5.jpg"])
    s = _prep(tmp_path, p, d)
    assert s["skipped"] == {"duplicate annotation id": 1, "caption of unknown image id": 1, "empty caption": 1,
                            "image without captions": 1, "image file missing": 1, "captions of missing images": 1}
    assert s["notes"] == {"non-ASCII captions (kept, accents folded)": 1}
    assert s["splits"]["train"]["images"] == 3 and s["splits"]["train"]["captions"] == 4
    sp = captions_h5.read_split(tmp_path / "out.h5", "train")
    assert sp.image_ids.tolist() == [1, 2, 5]
    vocab = captions_h5.read_vocab(tmp_path / "out.h5")
    assert "cafe" in vocab.words and "?" in vocab.words


def test_image_in_two_splits_is_an_error(tmp_path):
    p, d = _write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg"}], [{"id": 1, "image_id": 1, "caption": "x"}])
    with pytest.raises(UserError, match="image id 1 is in both"):
        prepare_captions(tmp_path / "o.h5", pairs=[("train", str(p), str(d)), ("val", str(p), str(d))],
                         log=lambda *a: None)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prepare", "captions", "--annotations", str(tmp_path / "x.json"),
                        "--images", str(tmp_path), "--out", str(tmp_path / "o.h5")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'x.json'}: file not found; check --annotations"


def test_killed_prepare_leaves_no_valid_looking_output(tiny_dataset, tmp_path):
    out = tmp_path / "c.h5"
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from prepare import vocabulary
from prepare.prepare_captions import prepare_captions
calls = [0]
orig = vocabulary.Vocabulary.encode
def encode(self, *a, **k):
    calls[0] += 1
    if calls[0] == 100:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, *a, **k)
vocabulary.Vocabulary.encode = encode
d = {str(tiny_dataset)!r}
prepare_captions({str(out)!r}, pairs=[("train", d + "/annotations/captions_train.json", d + "/images/train")])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".tmp-c.h5") for n in leftovers) and leftovers  # the temp file it was writing


# ---- the synthetic dataset --------------------------------------------------------------
def test_synth_is_deterministic(tmp_path):
    for name in ("a", "b"):
        synth.generate(tmp_path / name, {"train": 10, "val": 3}, size=80, seed=5, progress=False, workers=1)
    for rel in ("annotations/captions_train.json", "annotations/captions_val.json",
                "images/train/train_000004.jpg", "images/val/val_000012.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    synth.generate(tmp_path / "c", {"train": 10}, size=80, seed=6, progress=False)
    assert (tmp_path / "a/annotations/captions_train.json").read_text() != \
        (tmp_path / "c/annotations/captions_train.json").read_text()


def test_synth_larger_train_keeps_val_and_test(tmp_path):
    """--train N changes only the training split: the val and test scenes (and captions) are the
    same, and the smaller training set is the first images of the larger one."""
    def split(name, s):
        doc = json.loads((tmp_path / name / f"annotations/captions_{s}.json").read_text())
        caps = {}
        for a in doc["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        return [(im["objects"], caps[im["id"]], (tmp_path / name / "images" / s / im["file_name"]).read_bytes())
                for im in doc["images"]]
    synth.generate(tmp_path / "small", {"train": 4, "val": 3, "test": 3}, size=64, seed=2, progress=False, workers=1)
    synth.generate(tmp_path / "large", {"train": 9, "val": 3, "test": 3}, size=64, seed=2, progress=False, workers=1)
    for s in ("val", "test"):
        assert split("small", s) == split("large", s)
    assert split("small", "train") == split("large", "train")[:4]
    assert split("small", "val") != split("small", "test")


def test_synth_coco_format_and_five_different_captions(tiny_dataset):
    doc = json.loads((tiny_dataset / "annotations/captions_train.json").read_text())
    assert {"info", "licenses", "images", "annotations"} <= set(doc)
    per = Counter(a["image_id"] for a in doc["annotations"])
    for im in doc["images"]:
        assert {"id", "file_name", "width", "height", "objects"} <= set(im)
        assert 1 <= len(im["objects"]) <= 3 and per[im["id"]] == 5
        caps = [a["caption"] for a in doc["annotations"] if a["image_id"] == im["id"]]
        assert len(set(caps)) == 5
    assert len({" ".join(tokenize(a["caption"])[:2]) for a in doc["annotations"]}) >= 5  # varied openings



def _cli(*args, cwd=ROOT):
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "prepare", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_synth_cli_refuses_an_existing_dataset_without_overwrite(tmp_path):
    d = tmp_path / "data"
    r = _cli("synth", "--out", d, "--train", 3, "--val", 2, "--test", 0, "--size", 64, "--quiet")
    assert r.returncode == 0, r.stderr
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert d / "annotations/captions_val.json" in before
    _one_line_error(_cli("synth", "--out", d, "--train", 2, "--val", 0, "--test", 0, "--size", 64, "--quiet"),
                    str(d), "--overwrite")
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before      # nothing touched
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        synth.generate(d, {"train": 2}, size=64, progress=False)
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    # --overwrite replaces the dataset: no stale split or image is left behind
    r = _cli("synth", "--out", d, "--train", 2, "--val", 0, "--test", 0, "--size", 64, "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) == \
        ["annotations/captions_train.json", "images/train/train_000001.jpg", "images/train/train_000002.jpg"]
    # an empty existing folder is fine
    (tmp_path / "empty").mkdir()
    synth.generate(tmp_path / "empty", {"train": 1}, size=64, progress=False, workers=1)


@pytest.mark.parametrize("args,flag", [
    (["--size", "10"], "--size"), (["--size", "100000"], "--size"), (["--train", "-5"], "--train"),
    (["--train", "0"], "--train"), (["--val", "-1"], "--val"), (["--seed", "-1"], "--seed")])
def test_synth_cli_checks_flags_before_writing_anything(tmp_path, args, flag):
    line = _one_line_error(_cli("synth", "--out", tmp_path / "d", "--train", 2, "--val", 0, "--test", 0,
                                "--size", 64, "--quiet", *args), flag)
    assert re.search(r"must be (at least|between) ", line)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args,flag", [
    (["--vocab-size", "2"], "--vocab-size"), (["--max-len", "0"], "--max-len"), (["--max-len", "2"], "--max-len"),
    (["--max-len", "1000000000"], "--max-len"), (["--min-count", "0"], "--min-count"),
    (["--test-fraction", "1.5"], "--test-fraction"), (["--val-fraction", "-0.1"], "--val-fraction"),
    (["--seed", "-3"], "--seed")])
def test_captions_cli_checks_flags_before_writing_anything(tiny_dataset, tmp_path, args, flag):
    line = _one_line_error(_cli("captions", "--dataset", tiny_dataset, "--out", tmp_path / "o" / "c.h5", *args), flag)
    assert re.search(r"must be (at least|between) ", line)
    assert not (tmp_path / "o").exists()


def test_captions_cli_writes_a_readable_file(tiny_dataset, tmp_path):
    r = _cli("captions", "--dataset", tiny_dataset, "--out", tmp_path / "c.h5", "--max-len", 28, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'c.h5'}" in r.stdout and re.search(r"train: 48 images, 240 captions", r.stdout)
    assert captions_h5.split_names(tmp_path / "c.h5") == ["train", "val", "test"]
    assert captions_h5.read_vocab(tmp_path / "c.h5").words == captions_h5.read_vocab(tiny_dataset / "captions.h5").words


def _nearest_colour(rgb) -> str:
    names = list(synth.COLOURS)
    return names[int(np.argmin([np.sum((np.asarray(rgb, float) - synth.COLOURS[n]) ** 2) for n in names]))]


def test_synth_captions_are_true_to_the_pixels(tmp_path):
    synth.generate(tmp_path, {"train": 40}, size=128, seed=11, progress=False)
    doc = json.loads((tmp_path / "annotations/captions_train.json").read_text())
    checked_rel = 0
    yy, xx = np.mgrid[0:128, 0:128]
    for im in doc["images"]:
        pix = np.asarray(Image.open(tmp_path / "images/train" / im["file_name"]).convert("RGB")).astype(float)
        # Each recorded object is really there: the pixels around its centre have its colour,
        # and the pixels far from every object are background (low saturation).
        for o in im["objects"]:
            inner = (xx - o["cx"]) ** 2 + (yy - o["cy"]) ** 2 <= (0.3 * o["r"]) ** 2
            assert _nearest_colour(pix[inner].mean(0)) == o["colour"], (im["file_name"], o)
        far = np.ones((128, 128), bool)
        for o in im["objects"]:
            far &= (xx - o["cx"]) ** 2 + (yy - o["cy"]) ** 2 > (1.25 * o["r"]) ** 2
        sat = pix.max(-1) - pix.min(-1)
        assert np.percentile(sat[far], 99) < 60
        by_key = {(o["colour"], o["shape"]): o for o in im["objects"]}
        for c in (a["caption"] for a in doc["annotations"] if a["image_id"] == im["id"]):
            p = synth.parse_caption(c)
            assert p.objects and all((col, sh) in by_key for _, col, sh in p.objects), c
            for a, rel, b in p.relations:
                oa, ob = by_key[p.objects[a][1:]], by_key[p.objects[b][1:]]
                dx, dy = oa["cx"] - ob["cx"], oa["cy"] - ob["cy"]
                along = {"to the left of": -dx, "to the right of": dx, "above": -dy, "below": dy}[rel]
                other = abs(dy) if rel in ("to the left of", "to the right of") else abs(dx)
                assert along > 0 and along >= synth.CLEAR_RATIO * other, (c, oa, ob)
                checked_rel += 1
    assert checked_rel > 20


# ---- env.sh -----------------------------------------------------------------------------
def _fake_repo(tmp_path, with_venv=True):
    """A copy of env.sh beside a requirements.txt; with_venv: a ready .venv (nothing to install)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "env.sh", root / "env.sh")
    (root / "requirements.txt").write_text("numpy\n")
    (root / "requirements-test.txt").write_text("")     # the stamp is the checksum of both files
    if with_venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
        (root / ".venv" / ".requirements.sha256").write_text(hashlib.sha256(b"numpy\n").hexdigest() + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return root, elsewhere


def _source(root, elsewhere, pre="set +e", env=None):
    """Source env.sh from another folder in a shell with `pre` options; report what changed."""
    script = (f"{pre}; before_o=$(set +o); before_f=$(declare -F); before_v=$(compgen -v | sort); "
              f"source {root}/env.sh; echo \"rc=$?\"; "
              "[ \"$(set +o)\" = \"$before_o\" ] && echo options-unchanged; "
              "[ \"$(declare -F)\" = \"$before_f\" ] && echo functions-unchanged; "
              "echo \"new-vars=$(comm -13 <(echo \"$before_v\") <(compgen -v | sort | grep -vx before_v) | tr '\\n' ' ')\"; "
              "echo \"pwd=$(pwd)\"; echo \"venv=${VIRTUAL_ENV:-}\"; echo \"path=$PATH\"; false; echo alive")
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    r = subprocess.run(["bash", "-c", script], cwd=elsewhere, capture_output=True, text=True,
                       env=base | (env or {}), timeout=60)
    return r, dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln), r.stdout.splitlines()


@pytest.mark.parametrize("pre", ["set +e", "set -euo pipefail"])
def test_sourcing_env_sh_changes_only_environment_variables(tmp_path, pre):
    root, elsewhere = _fake_repo(tmp_path)
    r, kv, lines = _source(root, elsewhere, pre)
    assert kv["rc"] == "0", r.stderr
    assert "options-unchanged" in lines and "functions-unchanged" in lines
    assert set(kv["new-vars"].split()) <= {"PATH", "VIRTUAL_ENV", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL"}
    assert kv["pwd"] == str(elsewhere)          # no cd
    assert ("alive" in lines) == (pre == "set +e")   # `false` ends the shell only where the caller said so
    assert kv["venv"] == str(root / ".venv") and kv["path"].startswith(f"{root / '.venv' / 'bin'}:")


def test_sourcing_env_sh_returns_1_with_a_message_when_set_up_fails(tmp_path):
    root, elsewhere = _fake_repo(tmp_path, with_venv=False)
    r, kv, lines = _source(root, elsewhere, env={"PYTHON": "false"})
    assert kv["rc"] == "1" and "error:" in r.stderr and "PYTHON" in r.stderr
    assert "options-unchanged" in lines and "alive" in lines and kv["pwd"] == str(elsewhere)
    assert kv["venv"] == ""                     # nothing exported on failure
