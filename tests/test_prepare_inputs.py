"""`prepare captions` on odd input (issue #23, second sweep): ids beyond 64 bits, file names the
file system refuses, broken text, deep JSON, a BOM, invisible characters, other scripts and
scripts written without spaces, a split the vocabulary cannot read, very long captions."""
import json

import h5py
import pytest
from PIL import Image

from prepare import captions_h5
from prepare.coco import OUTSIDE
from prepare.prepare_captions import prepare_captions
from prepare.vocabulary import Vocabulary, tokenize
from tests.test_prepare import _cli, _one_line_error


def _doc(captions, files=None, first=1):
    """A COCO caption document: image i (from `first`) has file files[i] (default i.jpg) and captions[i]."""
    files = files or [f"{i}.jpg" for i in range(first, len(captions) + first)]
    images = [{"id": i, "file_name": f} for i, f in enumerate(files, first)]
    anns, aid = [], 100 * first
    for i, caps in enumerate(captions, first):
        for c in [caps] if isinstance(caps, str) else caps:
            aid += 1
            anns.append({"id": aid, "image_id": i, "caption": c})
    return {"images": images, "annotations": anns}


def _write(tmp_path, doc, name="ann.json", files=None):
    imgs = tmp_path / "imgs"
    imgs.mkdir(exist_ok=True)
    for f in files if files is not None else [im["file_name"] for im in doc["images"]]:   # doc: dict or text
        Image.new("RGB", (8, 8), (30, 60, 90)).save(imgs / f)
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return p, imgs


def _prep(tmp_path, ann, imgs, **kw):
    lines = []
    s = prepare_captions(tmp_path / "out.h5", pairs=[("train", str(ann), str(imgs))], val_fraction=0,
                         test_fraction=0, log=lines.append, **kw)
    return s, lines


def _cli_prep(tmp_path, ann, imgs, *args):
    return _cli("captions", "--annotations", ann, "--images", imgs, "--out", tmp_path / "out.h5",
                "--val-fraction", 0, "--test-fraction", 0, *args)


# ---- item 8: one-line errors naming file and entry, or skip-and-count -----------------------
@pytest.mark.parametrize("where,key", [("images", "id"), ("annotations", "id")])
def test_an_id_beyond_64_bits_is_a_one_line_error(tmp_path, where, key):
    doc = _doc(["a red star", "a blue dot"])
    doc[where][1][key] = 2 ** 64
    if where == "images":                       # its caption points to it: before, an OverflowError in h5py
        doc["annotations"][1]["image_id"] = 2 ** 64
    ann, imgs = _write(tmp_path, doc)
    _one_line_error(_cli_prep(tmp_path, ann, imgs), str(ann), f"{where}[1]", f"'{key}'", str(2 ** 64), "64-bit")
    assert not (tmp_path / "out.h5").exists()


def test_a_file_name_too_long_for_the_file_system_is_skipped_and_counted(tmp_path):
    doc = _doc(["a red star", "a blue dot"], files=["a.jpg", "x" * 300 + ".jpg"])
    ann, imgs = _write(tmp_path, doc, files=["a.jpg"])
    s, lines = _prep(tmp_path, ann, imgs)
    assert s["skipped"] == {"image file name unusable (File name too long)": 1,
                            "captions of images with unusable file names": 1}
    assert any("File name too long" in ln for ln in lines)
    assert captions_h5.read_split(tmp_path / "out.h5", "train").file_names == ["imgs/a.jpg"]


def test_a_caption_with_a_lone_surrogate_is_a_one_line_error(tmp_path):
    ann, imgs = _write(tmp_path, json.dumps(_doc(["a red star", "a blue dot"])).replace("a blue", "a \\ud800blue"),
                        files=["1.jpg", "2.jpg"])
    line = _one_line_error(_cli_prep(tmp_path, ann, imgs), str(ann), "annotations[1]", "'caption'", "surrogate")
    assert "'\\ud800'" in line
    assert not (tmp_path / "out.h5").exists()


def test_a_caption_with_a_nul_character_is_a_one_line_error(tmp_path):
    ann, imgs = _write(tmp_path, _doc(["a red star", "a blue\0dot"]))
    _one_line_error(_cli_prep(tmp_path, ann, imgs), str(ann), "annotations[1]", "'caption'", "NUL")


def test_json_nested_100000_deep_is_a_one_line_error(tmp_path):
    ann, imgs = _write(tmp_path, '{"images": ' + "[" * 100_000 + "]" * 100_000 + ', "annotations": []}', files=[])
    _one_line_error(_cli_prep(tmp_path, ann, imgs), str(ann), "nested too deeply")


# ---- item 16: the true reason a file name is refused --------------------------------------
def test_a_nul_byte_in_a_file_name_is_reported_as_such(tmp_path):
    doc = _doc(["a red star", "a blue dot"], files=["a.jpg", "b\0.jpg"])
    ann, imgs = _write(tmp_path, doc, files=["a.jpg"])
    s, lines = _prep(tmp_path, ann, imgs)
    assert s["skipped"] == {"image file name contains a NUL byte": 1, "captions of images with unusable file names": 1}
    assert OUTSIDE not in s["skipped"] and any("contains a NUL byte" in ln for ln in lines)


def test_not_inside_names_the_true_reason(tmp_path):
    from prepare.files import inside, not_inside
    assert not_inside(tmp_path, "a\0.jpg") == "contains a NUL byte" and inside(tmp_path, "a\0.jpg") is None
    assert [not_inside(tmp_path, n) for n in ("", "/etc/passwd", "../x.jpg", ".", "ok/a.jpg")] == \
        ["is empty", "is absolute", "has a '..' component", "names the folder itself", None]


# ---- item 12: invisible characters, a BOM ---------------------------------------------------
def test_a_caption_of_invisible_characters_only_is_skipped_as_empty(tmp_path):
    ann, imgs = _write(tmp_path, _doc([["a red star", "\u200b\u200d\u200e\ufeff", "a\u200b red\ufeff star\u200e"]]))
    s, _ = _prep(tmp_path, ann, imgs)
    assert s["skipped"] == {"empty caption": 1} and s["splits"]["train"]["captions"] == 2
    vocab = captions_h5.read_vocab(tmp_path / "out.h5")
    assert vocab.words[4:] == ["a", "red", "star"]


def test_a_caption_file_starting_with_a_utf8_bom_is_read(tmp_path):
    ann, imgs = _write(tmp_path, _doc(["a red star"]))
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    r = _cli_prep(tmp_path, ann, imgs)
    assert r.returncode == 0, r.stderr
    assert captions_h5.read_vocab(tmp_path / "out.h5").words[4:] == ["a", "red", "star"]


# ---- item 10: other scripts keep their words ------------------------------------------------
def test_captions_in_other_scripts_keep_their_words_and_latin_accents_are_folded(tmp_path):
    ann, imgs = _write(tmp_path, _doc(["ビール と パン", "かぎ", "लाल वृत्त", "دائرة", "Un café"]))
    s, lines = _prep(tmp_path, ann, imgs)
    words = set(captions_h5.read_vocab(tmp_path / "out.h5").words)
    assert {"ビール", "パン", "かぎ", "लाल", "वृत्त", "دائرة", "cafe"} <= words
    assert not words & {"ヒール", "かき", "دايرة", "ा", "café"}
    assert s["notes"] == {"non-ASCII captions (kept as written)": 4, "non-ASCII captions (kept, accents folded)": 1}


# ---- item 11: scripts written without spaces ------------------------------------------------
JAPANESE = ["赤い星と青い丸。", "大きい緑の三角。", "小さい黄色の星です。"]


def test_japanese_captions_warn_and_the_chars_tokenizer_round_trips(tmp_path):
    ann, imgs = _write(tmp_path, _doc(JAPANESE))
    r = _cli_prep(tmp_path, ann, imgs)
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "train: 3 captions" in warn[0] and "--tokenizer chars" in warn[0], r.stdout
    r = _cli_prep(tmp_path, ann, imgs, "--tokenizer", "chars", "--overwrite", "--max-len", 16)
    assert r.returncode == 0, r.stderr
    assert "tokenizer chars" in r.stdout and "warning:" not in r.stdout
    h5 = tmp_path / "out.h5"
    vocab = captions_h5.read_vocab(h5)
    assert vocab.tokenizer == "chars" and captions_h5.read_attrs(h5)["config"]["tokenizer"] == "chars"
    assert all(len(w) == 1 for w in vocab.words[4:]) and {"赤", "い", "星", "。"} <= set(vocab.words)
    sp = captions_h5.read_split(h5, "train")
    assert sp.lengths.tolist() == [len(t) + 2 for t in JAPANESE]             # one token per character
    assert [vocab.decode(c) for c in sp.captions] == JAPANESE                  # joined back without spaces
    reread = Vocabulary.from_json(vocab.to_json())                            # as a run's vocab.json keeps it
    assert reread.decode(sp.captions[0]) == JAPANESE[0]
    _one_line_error(_cli_prep(tmp_path, ann, imgs, "--tokenizer", "letters"), "--tokenizer")


# ---- item 13: a split the vocabulary cannot read -------------------------------------------
def test_a_val_split_of_only_unk_warns_with_the_fix(tmp_path):
    train, imgs = _write(tmp_path, _doc(["a red star", "a blue circle"]), name="train.json")
    val, _ = _write(tmp_path, _doc(["красная звезда", "синий круг"], first=3), name="val.json")
    lines = []
    s = prepare_captions(tmp_path / "out.h5", pairs=[("train", str(train), str(imgs)), ("val", str(val), str(imgs))],
                         test_fraction=0, log=lines.append)
    assert s["splits"]["val"]["unk_rate"] == 1.0
    assert len(s["warnings"]) == 1
    w = s["warnings"][0]
    assert w.startswith("val: every caption is only <unk>") and "--vocab-size" in w and "same language" in w
    assert f"warning: {w}" in lines


# ---- item 15: the vocabulary comes from the tokens training can see -----------------------
def test_words_only_after_the_max_len_cut_are_not_in_the_vocabulary(tmp_path):
    long = "a red star " + " ".join(f"word{i}" for i in range(5000))
    ann, imgs = _write(tmp_path, _doc([long, "a blue circle"]))
    s, _ = _prep(tmp_path, ann, imgs, max_len=8)
    vocab = captions_h5.read_vocab(tmp_path / "out.h5")
    assert tokenize(long)[:6] == ["a", "red", "star", "word0", "word1", "word2"]   # 6 + <start>/<end> = 8
    assert vocab.words[4:] == ["a", "blue", "circle", "red", "star", "word0", "word1", "word2"]
    assert s["vocabulary"] == 12
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert json.loads(f.attrs["config"])["max_len"] == 8


def test_karpathy_file_gets_the_same_checks(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train2014" / "a.jpg")

    def run(**change):
        im = {"filepath": "train2014", "filename": "a.jpg", "split": "train", "cocoid": 1,
              "sentences": [{"raw": "a red star"}]} | change
        (tmp_path / "k.json").write_text(json.dumps({"images": [im]}))
        return _cli("captions", "--karpathy", tmp_path / "k.json", "--images-root", root,
                    "--out", tmp_path / "k.h5", "--overwrite")
    assert run().returncode == 0
    _one_line_error(run(cocoid=2 ** 63), "images[0]", "'cocoid'", "64-bit")
    _one_line_error(run(sentences=[{"raw": "a \ud800 star"}]), "images[0]: sentences[0]", "'raw'", "surrogate")
