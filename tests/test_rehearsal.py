"""prepare synth-coco (a caption set of MS-COCO 2014's size and shape) and infer rehearse (every
stage timed on it)."""
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from infer import rehearsal
from prepare import captions_h5, synth_coco
from prepare.errors import UserError
from prepare.synth import UNFINISHED
from prepare.vocabulary import tokenize

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


def test_full_size_is_coco_2014():
    c = synth_coco.split_counts(1.0)
    assert c == {"train": 113_287, "val": 5_000, "test": 5_000}
    assert sum(c.values()) == 82_783 + 40_504 and sum(c.values()) * synth_coco.CAPTIONS_PER_IMAGE == 616_435
    assert synth_coco.split_counts(1 / 16) == {"train": 7080, "val": 312, "test": 312}
    assert synth_coco.split_counts(1e-9) == {"train": 1, "val": 1, "test": 1}


def test_parse_fraction_and_its_errors():
    assert synth_coco.parse_fraction("1/16") == 0.0625
    assert synth_coco.parse_fraction(" 0.25 ") == 0.25 and synth_coco.parse_fraction("1") == 1.0
    for bad, says in (("0", "above 0"), ("3/2", "at most 1"), ("-1", "above 0"), ("x", "not a number"),
                      ("1/0", "not a number")):
        with pytest.raises(UserError, match=f"--fractions .*{says}|--fractions must be {says}"):
            synth_coco.parse_fraction(bad, "--fractions")


def test_pseudo_words_are_distinct_and_survive_tokenization():
    words = synth_coco.pseudo_words()
    assert len(words) == len(set(words)) == synth_coco.VOCAB
    assert all(tokenize(w) == [w] for w in words[::97])
    assert all(tokenize(w.capitalize() + ".") == [w, "."] for w in words[:50])


def test_caption_set_has_cocos_shape(tmp_path):
    out = tmp_path / "c"
    counts = synth_coco.generate(out, 1 / 256, seed=3, progress=False)
    assert counts == synth_coco.split_counts(1 / 256)
    docs = {s: json.loads((out / "annotations" / f"captions_{s}.json").read_text()) for s in counts}
    ids = [im["id"] for d in docs.values() for im in d["images"]]
    assert len(ids) == len(set(ids)) == sum(counts.values())                 # ids unique across splits
    for s, d in docs.items():
        assert len(d["images"]) == counts[s] and len(d["annotations"]) == 5 * counts[s]
        per_image = Counter(a["image_id"] for a in d["annotations"])
        assert set(per_image.values()) == {5}
        assert all((out / "images" / s / im["file_name"]).stat().st_size > 50 for im in d["images"][:20])
    lengths = np.array([len(a["caption"].rstrip(".").split()) for d in docs.values() for a in d["annotations"]])
    assert lengths.min() >= 8 and lengths.max() <= 50 and 9.5 <= lengths.mean() <= 11.5
    freq = Counter(w.strip(".").lower() for d in docs.values() for a in d["annotations"] for w in a["caption"].split())
    top = [n for _, n in freq.most_common(100)]
    assert 7 < top[0] / top[99] < 50           # Zipf-Mandelbrot: p(0) / p(99) = 101.7 / 2.7 ~ 38 (sampling noise)
    # deterministic for (fraction, seed); another seed gives other captions
    synth_coco.generate(tmp_path / "again", 1 / 256, seed=3, progress=False)
    synth_coco.generate(tmp_path / "other", 1 / 256, seed=4, progress=False)
    a, b, c = (((tmp_path / d / "annotations" / "captions_train.json").read_bytes()) for d in ("c", "again", "other"))
    assert a == b and a != c


def test_prepare_captions_takes_it_whole_and_refusals(tmp_path):
    out = tmp_path / "c"
    r = _cli("-m", "prepare", "synth-coco", "--out", str(out), "--fraction", "1/1024", "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("-m", "prepare", "captions", "--dataset", str(out))
    assert r.returncode == 0, r.stderr
    sp = captions_h5.read_split(out / "captions.h5", "train")
    assert len(sp.image_ids) == synth_coco.split_counts(1 / 1024)["train"] and len(sp.lengths) == 5 * len(sp.image_ids)
    again = _cli("-m", "prepare", "synth-coco", "--out", str(out), "--fraction", "1/1024")
    assert again.returncode == 2 and "pass --overwrite" in again.stderr and "Traceback" not in again.stderr
    bad = _cli("-m", "prepare", "synth-coco", "--out", str(tmp_path / "d"), "--fraction", "2")
    assert bad.returncode == 2 and "--fraction must be above 0 and at most 1" in bad.stderr
    assert not (tmp_path / "d").exists()


def test_a_killed_write_is_started_over_by_the_same_command(tmp_path):
    out = tmp_path / "c"
    synth_coco.generate(out, 1 / 1024, progress=False)
    (out / UNFINISHED).write_text("x")                        # what a kill part-way leaves
    stale = out / "images" / "train" / "stale.png"
    stale.write_bytes(b"x")
    synth_coco.generate(out, 1 / 1024, progress=False)          # no --overwrite needed: it was unfinished
    assert not stale.exists() and not (out / UNFINISHED).exists()


def test_rehearse_checks_every_flag_before_writing(tmp_path, monkeypatch):
    out = tmp_path / "r"
    with pytest.raises(UserError, match="--stages: unknown stage 'train'"):
        rehearsal.check_args(out, [0.1], ["write", "train"], "lite0", False)
    with pytest.raises(UserError, match="--grid must be one of lite0, inception"):
        rehearsal.check_args(out, [0.1], ["write"], "vgg", False)
    with pytest.raises(UserError, match="datapath reads the grid .* add features"):
        rehearsal.check_args(out, [0.1], ["datapath"], "lite0", False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - 10 ** 9, 10 ** 9))
    with pytest.raises(UserError, match=r"inception grid needs 32\.3 GB and 1\.0 GB are free"):
        rehearsal.check_args(out, [1 / 16, 1.0], ["features"], "inception", False)
    assert not out.exists()
    out.mkdir()
    (out / "rehearsal.json").write_text("{}")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        rehearsal.check_args(out, [0.1], ["write"], "lite0", False)
    r = _cli("-m", "infer", "rehearse", "--out", str(tmp_path / "s"), "--fractions", "1/4,0")
    assert r.returncode == 2 and "--fractions must be above 0" in r.stderr and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_rehearse_measures_the_data_path_on_a_grid_of_the_real_shape(tmp_path):
    out = tmp_path / "r"
    logs = []
    report = rehearsal.rehearse(out, [1 / 2048, 1 / 1024], stages=["write", "prepare", "features", "datapath"],
                                log=logs.append)
    assert json.loads((out / "rehearsal.json").read_text()) == report
    assert [r["label"] for r in report["fractions"]] == ["1/2048", "1/1024"]
    for row in report["fractions"]:
        n = row["images"]["train"]
        st = row["stages"]
        assert st["features"]["features_gb"] == round(sum(row["images"].values()) * 49 * 1280 * 2 / 1e9, 2)
        d = st["datapath"]
        assert d["captions"] == 5 * n and d["batches_per_epoch"] == -(-5 * n // 32)
        assert d["batches_per_s"] > 0 and d["mapped"] is False
        assert all(st[s]["seconds"] > 0 and st[s]["peak_gb"] > 0 for s in ("write", "prepare", "features", "datapath"))
    assert not any(p.is_dir() for p in out.iterdir())          # each fraction's data removed (no --keep)
    table = logs[-1].splitlines()
    assert table[0].startswith("| stage | 1/2048 (") and [ln.split(" |")[0] for ln in table[2:]] == \
        ["| write", "| prepare", "| features", "| datapath"]
