import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infer.caption import caption_images
from infer.files import image_id_from_name
from model.metrics import content_accuracy
from infer.captioner import Captioner
from infer.evaluate import evaluate, human_ceiling
from prepare import captions_h5
from prepare.errors import UserError
from tests.conftest import animated_gif, gif_bytes, odd_files


def _skimage_photo(name: str) -> Path:
    import skimage
    return Path(skimage.__file__).parent / "data" / name


def test_caption_folder_glob_bad_file_and_real_photo(tiny_dataset, tiny_run, tmp_path):
    imgs = tmp_path / "in"
    imgs.mkdir()
    for p in sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:3]:
        shutil.copy(p, imgs / p.name)
    (imgs / "broken.jpg").write_text("not a picture")
    photo = _skimage_photo("astronaut.png")
    lines = []
    s = caption_images(tiny_run, [str(imgs), str(tiny_dataset / "images/val/*.jpg"), str(photo), "nope/*.png"],
                       tmp_path / "out", top=2, progress=False, log=lines.append)
    n_val = len(list((tiny_dataset / "images/val").glob("*.jpg")))
    assert s["captioned"] == 3 + n_val + 1
    assert [Path(p).name for p, _ in s["unreadable"]] == ["broken.jpg"] and s["missing"] == ["nope/*.png"]
    text = "\n".join(lines)
    assert "Captions for image astronaut.png:" in text
    assert re.search(r"^  0\) \S.* \(p=0\.\d{6}\)$", text, re.M) and re.search(r"^  1\) ", text, re.M)
    rows = [json.loads(x) for x in (tmp_path / "out/captions.jsonl").read_text().splitlines()]
    # up to --top captions each: beam search returns only complete captions once some complete,
    # and those can be fewer than the beam size
    assert len(rows) == s["captioned"] and all(1 <= len(r["captions"]) <= 2 for r in rows)
    assert any(len(r["captions"]) == 2 for r in rows)
    for r in rows:
        lp = [c["logprob"] for c in r["captions"]]
        assert lp == sorted(lp, reverse=True)
    # annotated copies: a title band above the image, aspect kept
    ann = Image.open(tmp_path / "out/annotated/astronaut.jpg")
    w, h = Image.open(photo).size
    assert ann.width == 640 and ann.height > round(h * 640 / w)
    band = np.asarray(ann.convert("L"))[: ann.height - round(h * 640 / w)]
    assert (band < 100).any() and (band > 250).mean() > 0.5         # dark text on white
    assert not (tmp_path / "out/results.json").exists()             # astronaut.png has no image id


def test_results_json_and_no_silent_overwrite(tiny_dataset, tiny_run, tmp_path):
    files = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:4]
    caption_images(tiny_run, [str(f) for f in files], tmp_path / "o", progress=False, log=lambda *a: None)
    res = json.loads((tmp_path / "o/results.json").read_text())
    assert [r["image_id"] for r in res] == [image_id_from_name(f) for f in files]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in res)
    before = (tmp_path / "o/captions.jsonl").read_bytes()
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        caption_images(tiny_run, [str(f) for f in files], tmp_path / "o", progress=False, log=lambda *a: None)
    assert (tmp_path / "o/captions.jsonl").read_bytes() == before
    caption_images(tiny_run, [str(f) for f in files], tmp_path / "o", overwrite=True, progress=False,
                   log=lambda *a: None)


def test_batched_captioning_equals_one_by_one_and_files_match_the_cache(tiny_dataset, tiny_features, tiny_run):
    cap = Captioner(tiny_run, beam_size=3, max_len=12)
    feats = np.load(tiny_features / "val.npy")
    batched = cap.caption_features(feats, batch_size=32)
    single = cap.caption_features(feats, batch_size=1)
    assert [[c.ids for c in b] for b in batched] == [[c.ids for c in s] for s in single]
    for b, s in zip(batched, single):
        np.testing.assert_allclose([c.logprob for c in b], [c.logprob for c in s], rtol=1e-5)
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "val")
    from_files = cap.caption_files(sp.image_paths(tiny_dataset), progress=False)
    assert [r.captions[0].ids for r in from_files] == [b[0].ids for b in batched]


def test_tampered_encoder_in_run_dir_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with open(run / "encoder.weights.h5", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="checksum differs"):
        Captioner(run).encoder()


def test_human_ceiling_and_content_accuracy_on_hand_examples():
    same = {1: ["a red star", "a red star", "a red star"], 2: ["two blue circles", "two blue circles", "two blue circles"]}
    assert human_ceiling(same)["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    mixed = {1: ["a red star on the left", "a red star", "a small red star"], 2: same[2]}
    assert human_ceiling(mixed)["Bleu_1"] < 1.0
    truth = {1: [{"shape": "star", "colour": "red", "size": "small", "cx": 1, "cy": 1, "r": 1}],
             2: [{"shape": "circle", "colour": "blue", "size": "large", "cx": 1, "cy": 1, "r": 1}]}
    acc = content_accuracy({1: "a small red star .", 2: "a blue square ."}, truth)
    assert acc["exact"] == 0.5 and acc["colour"] == 1.0 and acc["shape"] == 0.5 and acc["size"] == 1.0
    truth[3] = truth[1] + truth[2]
    acc = content_accuracy({1: "a small red star .", 2: "a blue square .", 3: "a red star and a blue circle ."}, truth)
    assert acc["by_objects"] == {"1": {"images": 2, "exact": 0.5}, "2": {"images": 1, "exact": 1.0}}


def test_pointing_scores_the_peak_cell_of_each_word_naming_a_true_object():
    from model.metrics import named_objects, pointing
    # a 100 x 50 image (cells scale per axis) seen as a 2 x 2 grid: cell centres x 25 / 75, y 12.5 / 37.5
    red = {"shape": "star", "colour": "red", "size": "small", "cx": 25, "cy": 12, "r": 10}     # top left cell
    blue = {"shape": "circle", "colour": "blue", "size": "small", "cx": 75, "cy": 37, "r": 10}  # bottom right
    words = "a red star above a blue circle and a green square".split()
    assert [o and o["colour"] for o in named_objects(words, [red, blue])] == \
        [None, "red", "red", None, None, "blue", "blue", None, None, None, None]
    at = lambda cell: np.eye(4)[cell] * 0.7 + 0.075                             # noqa: E731 - peak at one cell
    maps = np.stack([at(0), at(0), at(3), at(0), at(0), at(3), at(3), at(1), at(1), at(1), at(1)])
    # red: peaks top left (hit), bottom right (miss); blue: bottom right twice (hits); green square: not true
    assert pointing(words, maps, [red, blue], 100, 50) == (3, 4)
    assert pointing(words, maps[:6], [red, blue], 100, 50) == (2, 3)           # words without maps are not scored
    assert pointing(words, maps, [red, blue], 50, 100) == (0, 4)               # 50 x 100: cell centres x 12.5 / 37.5
    with pytest.raises(ValueError, match="5 positions are not a square grid"):   # not rounded to a 2 x 2 grid
        pointing(words, np.full((11, 5), 0.2), [red, blue], 100, 50)


def test_pointing_reads_an_old_images_size_from_its_header_and_leaves_unreadable_ones_out(tmp_path, monkeypatch):
    import os
    from PIL import Image
    from infer.evaluate import _pointing
    from model.metrics import image_size_of as _image_size
    Image.new("RGB", (100, 50)).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")                          # opening it would block the evaluation for ever
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert _image_size({"width": 30, "height": 40}, tmp_path / "missing.png") == (30, 40)   # recorded: no read
    assert _image_size({}, tmp_path / "ok.png") == (100, 50)
    assert [_image_size({}, tmp_path / n) for n in ("pipe.png", "broken.png", "missing.png")] == [None] * 3

    class Cap:
        vocab = type("V", (), {"decode": lambda self, ids: ""})()
    red = {"shape": "star", "colour": "red", "size": "small", "cx": 25, "cy": 12, "r": 10}
    maps = {0: np.tile(np.eye(4)[0] * 0.7 + 0.075, (3, 1)), 1: np.tile(np.eye(4)[0], (3, 1))}
    beams = {r: [type("B", (), {"ids": [1, 5, 6, 2]})()] for r in maps}
    monkeypatch.setattr("infer.attention_maps.caption_words", lambda vocab, ids, n: ["red", "star", "."][:n])
    p = _pointing(Cap(), beams, maps, {0: {"objects": [red]}, 1: {"objects": [red]}}, {0: (100, 50), 1: None})
    assert p == {"words": 2, "hits": 2, "accuracy": 1.0, "images_of_unknown_size": 1}


def test_model_leave_one_out_uses_the_human_ceilings_reference_subsets(monkeypatch):
    import infer.evaluate as ev
    refs = {1: ["a red star on the left", "a small red star", "a red star", "one red star"],
            2: ["two blue circles", "a pair of blue circles", "blue circles", "two circles that are blue"]}
    hyp = {1: "a small red star", 2: "two blue circles"}        # each equals one of its references
    monkeypatch.setattr(ev, "java_available", lambda: False)    # BLEU, ROUGE-L, CIDEr only: fast
    all_refs = ev.coco_scores(refs, {i: [c] for i, c in hyp.items()})
    loo = ev.model_leave_one_out(refs, hyp)
    assert all_refs["Bleu_4"] == pytest.approx(1.0) and all_refs["Bleu_1"] == pytest.approx(1.0)
    assert loo["Bleu_1"] < all_refs["Bleu_1"] and loo["Bleu_4"] < all_refs["Bleu_4"]
    # the same subsets as the human ceiling: record what each one scores against
    seen = {"human": [], "model": []}
    real = ev.coco_scores
    for who, fn in (("human", lambda: ev.human_ceiling(refs)), ("model", lambda: ev.model_leave_one_out(refs, hyp))):
        monkeypatch.setattr(ev, "coco_scores", lambda gts, res, scorer=None, who=who: seen[who].append((gts, res))
                            or real(gts, res, scorer))
        fn()
    assert [g for g, _ in seen["human"]] == [g for g, _ in seen["model"]]
    assert len(seen["model"]) == 4 and all(len(v) == 3 for g, _ in seen["model"] for v in g.values())
    assert [r for _, r in seen["model"]] == [{i: [c] for i, c in hyp.items()}] * 4
    assert [r for _, r in seen["human"]] == [{i: [v[j]] for i, v in refs.items()} for j in range(4)]
    # by hand: leave-one-out is the mean over the 4 subsets
    want = np.mean([real({i: v[:j] + v[j + 1:] for i, v in refs.items()}, {i: [c] for i, c in hyp.items()})["Bleu_1"]
                    for j in range(4)])
    assert loo["Bleu_1"] == pytest.approx(want)


@pytest.mark.slow
@pytest.mark.parametrize("java", [True, False])
def test_one_scorer_for_every_column_scores_as_separate_runs(java, monkeypatch):
    """evaluate tokenizes each caption once and keeps one METEOR process for its 11 scorings: the
    scores equal those of separate runs, each with its own tokenizer and METEOR."""
    import infer.evaluate as ev
    if java and not ev.java_available():
        pytest.skip("no Java: the PTB tokenizer and METEOR are not used")
    monkeypatch.setattr(ev, "java_available", lambda: java)
    refs = {1: ["A red star, on the LEFT.", "a small red star", "A red star!", "one red star"],
            2: ["Two blue circles.", "a pair of blue circles", "blue circles", "two circles that are blue"],
            3: ["A green square's corner", "the green square", "green square", "a square, green"]}
    hyp = {1: "A small red star.", 2: "two blue circle", 3: "a red square"}
    with ev.Scorer() as s:
        s.prime(refs, {i: [c] for i, c in hyp.items()})
        shared = [ev.coco_scores(refs, {i: [c] for i, c in hyp.items()}, s), ev.model_leave_one_out(refs, hyp, s),
                  ev.human_ceiling(refs, s)]
    separate = [ev.coco_scores(refs, {i: [c] for i, c in hyp.items()}), ev.model_leave_one_out(refs, hyp),
                ev.human_ceiling(refs)]
    assert shared == separate
    assert ("METEOR" in shared[0]) == java and 0 < shared[0]["CIDEr"] < 10


def test_metrics_table_shows_model_all_refs_leave_one_out_and_human_side_by_side():
    from infer.evaluate import format_table
    m = {"model": {"Bleu_1": 0.9, "CIDEr": 1.5}, "model_leave_one_out": {"Bleu_1": 0.8, "CIDEr": 1.2},
         "human_ceiling": {"Bleu_1": 0.7, "CIDEr": 4.0}, "content": None}
    lines = format_table(m).splitlines()
    assert re.search(r"model \(all refs\).*model \(leave-one-out\).*human", lines[0])
    assert re.match(r"Bleu_1\s+0\.900\s+0\.800\s+0\.700$", lines[1])
    assert re.match(r"CIDEr\s+1\.500\s+1\.200\s+4\.000$", lines[2])


@pytest.mark.slow
def test_evaluate_writes_metrics_with_ceiling_and_content(tiny_dataset, tiny_run, tmp_path):
    m = evaluate(tiny_run, tiny_dataset, split="test", out=tmp_path / "e", progress=False, log=lambda *a: None)
    assert m["source"] == "cache" and m["images"] == 12
    assert m["guards"]["on"] and "the" in m["guards"]["no_end_after"] and isinstance(m["degenerate"], int)
    assert 0 <= m["unsure"] <= 12
    w = m["word_log_prob"]                                   # the figures --unsure-below is chosen from
    assert w["min"] <= w["p01"] <= w["p05"] <= w["median"] < 0
    assert (m["unsure"] > 0) == (w["min"] < m["guards"]["unsure_below"])
    assert set(m["model"]) >= {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} | ({"METEOR"} if m["java"] else set())
    assert m["human_ceiling"]["Bleu_1"] > 0.5
    assert set(m["model_leave_one_out"]) == set(m["human_ceiling"]) == set(m["model"])
    assert json.loads((tmp_path / "e/metrics.json").read_text())["model"] == m["model"]
    res = json.loads((tmp_path / "e/results.json").read_text())
    assert len(res) == 12
    # the scores are those of results.json against the split's references, recomputed independently
    from infer.evaluate import coco_scores
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "test")
    refs = {int(i): [t for t, r in zip(sp.texts, sp.image_index) if r == row] for row, i in enumerate(sp.image_ids)}
    hyp = {r["image_id"]: r["caption"] for r in res}
    assert coco_scores(refs, {i: [c] for i, c in hyp.items()}) == pytest.approx(m["model"], rel=1e-9)
    truth = {int(i): json.loads(o)["objects"] for i, o in zip(sp.image_ids, sp.objects)}
    acc = content_accuracy(hyp, truth)
    assert acc.pop("by_objects") == m["content"].pop("by_objects") and acc == pytest.approx(m["content"])
    assert m["pointing"] is None                                   # a pooled decoder has no attention to score
    with pytest.raises(UserError, match="already exists"):
        evaluate(tiny_run, tiny_dataset, split="test", out=tmp_path / "e", progress=False, log=lambda *a: None)
    # a feature cache that is not the run's: captions come from the images, and agree with the cache
    m2 = evaluate(tiny_run, tiny_dataset, split="test", out=tmp_path / "e2", features=tmp_path / "nowhere",
                  progress=False, log=lambda *a: None)
    assert m2["source"] == "images"
    assert json.loads((tmp_path / "e2/results.json").read_text()) == res


# ---- names, flags, annotated copies ----------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_only_coco_style_names_carry_image_ids():
    assert image_id_from_name("x/COCO_val2014_000000123456.jpg") == 123456
    assert image_id_from_name("COCO_train2014_000000000009.jpg") == 9
    assert image_id_from_name("000000397133.jpg") == 397133                 # COCO 2017
    assert image_id_from_name("val_000042.jpg") == 42 and image_id_from_name("test_000061.jpg") == 61
    for name in ("IMG_2023.jpg", "1.jpg", "a/1.jpg", "photo.png", "DSC01234.JPG", "val_42.jpg",
                 "COCO_val2014_123.jpg", "myval_000042.jpg", "2023-01-01.png"):
        assert image_id_from_name(name) is None, name


def _infer_cli(*args):
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "infer", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("args,flag", [
    (["--top", "0"], "--top"), (["--max-len", "0"], "--max-len"), (["--max-len", "1"], "--max-len"),
    (["--beam-size", "0"], "--beam-size"), (["--batch-size", "0"], "--batch-size"), (["--top", "1000"], "--top")])
def test_caption_cli_checks_flags_before_anything(tmp_path, args, flag):
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(img)
    r = _infer_cli("caption", "--run", tmp_path / "no-run", img, "--out", tmp_path / "out", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {flag} must be ") and re.search(r"(at least|between) \d+", line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,flag", [
    (["--limit", "-1"], "--limit"), (["--beam-size", "0"], "--beam-size"), (["--max-len", "1"], "--max-len"),
    (["--batch-size", "0"], "--batch-size")])
def test_evaluate_cli_checks_flags_before_anything(tmp_path, args, flag):
    r = _infer_cli("evaluate", "--run", tmp_path / "no-run", "--data", tmp_path, "--out", tmp_path / "e", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {flag} must be ")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("cmd", ["caption", "evaluate"])
def test_out_that_is_an_existing_file_is_refused_before_captioning(tmp_path, cmd):
    (tmp_path / "taken").write_text("precious")
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(img)
    args = (["caption", "--run", tmp_path, img] if cmd == "caption" else ["evaluate", "--run", tmp_path, "--data", tmp_path])
    r = _infer_cli(*args, "--out", tmp_path / "taken")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: --out ") and str(tmp_path / "taken") in line and "existing file" in line
    assert (tmp_path / "taken").read_text() == "precious"


def test_inputs_that_are_not_regular_files_are_named_and_counted(tmp_path):
    from infer.files import expand_inputs
    odd = odd_files(tmp_path / "in")
    Image.new("RGB", (20, 20)).save(tmp_path / "in" / "ok.jpg")
    paths, missing, irregular = expand_inputs([str(tmp_path / "in")])             # inside a folder
    assert paths == [tmp_path / "in" / "ok.jpg"] and missing == []
    assert sorted(irregular) == sorted((str(tmp_path / "in" / n), w) for n, w in odd.items())
    direct = [str(tmp_path / "in" / n) for n in odd if n != "d.jpg"]                # given directly
    paths, missing, irregular = expand_inputs(direct + [str(tmp_path / "in" / "*.jpg")])
    assert paths == [tmp_path / "in" / "ok.jpg"] and missing == []
    assert sorted(irregular) == sorted((str(tmp_path / "in" / n), w) for n, w in odd.items())
    (tmp_path / "empty.jpg").mkdir()
    assert expand_inputs([str(tmp_path / "empty.jpg")]) == ([], [], [(str(tmp_path / "empty.jpg"),
                                                                       "a directory with no image files")])


def test_caption_skips_and_counts_fifo_device_and_loop(tiny_dataset, tiny_run, tmp_path):
    odd = odd_files(tmp_path / "in")
    good = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[0]
    shutil.copy(good, tmp_path / "in" / good.name)
    lines = []
    s = caption_images(tiny_run, [str(tmp_path / "in"), str(tmp_path / "in" / "fifo.jpg")], tmp_path / "out",
                       progress=False, log=lines.append)
    assert s["captioned"] == 1 and s["missing"] == [] and s["unreadable"] == []
    assert sorted(Path(p).name for p, _ in s["not_regular"]) == sorted(odd)
    text = "\n".join(lines)
    for n, what in odd.items():
        assert f"{tmp_path / 'in' / n}: not a regular file ({what}); skipped" in text
    assert "no such file" not in text and "4 not regular files" in text


def test_caption_cli_given_only_a_fifo_fails_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "f.jpg")
    r = _infer_cli("caption", "--run", tmp_path / "no-run", tmp_path / "f.jpg", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: no images to caption: ") and f"{tmp_path / 'f.jpg'} is not a regular file (a FIFO)" in line
    assert not (tmp_path / "out").exists()


def test_annotated_copies_of_tall_narrow_and_16_bit_images_stay_small_and_right(tmp_path):
    from infer.annotate import MAX_PIXELS, annotate
    caps = [("a red star .", 0.5), ("a blue square to the left of a red star .", 0.2)]
    for w, h in ((10, 1100), (8, 200000), (200000, 8), (1, 1), (3000, 2000)):
        src = tmp_path / f"{w}x{h}.png"
        Image.new("RGB", (w, h), (200, 40, 40)).save(src)
        annotate(src, caps, tmp_path / f"{w}x{h}.jpg")
        im = Image.open(tmp_path / f"{w}x{h}.jpg")
        assert im.width <= 640 and im.height <= 1280 + 400 and im.width * im.height <= MAX_PIXELS, (w, h, im.size)
        pix = np.asarray(im.convert("RGB")).astype(int)
        assert (pix[..., 0] - pix[..., 1] > 50).sum() >= min(w, h, 640)   # the (red) picture is there
    # aspect kept: a 3000x2000 picture becomes 640x427 under its caption band
    pix = np.asarray(Image.open(tmp_path / "3000x2000.jpg").convert("RGB")).astype(int)
    red_rows = (np.abs(pix - (200, 40, 40)).sum(-1) < 60).all(1).sum()
    assert abs(red_rows - 427) <= 2
    # a 16-bit grey PNG: the picture has the brightness of its 8-bit equivalent, not white
    a = np.full((48, 64), 30000, np.uint16)
    a[:, :32] = 10000
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    annotate(tmp_path / "g16.png", caps, tmp_path / "g16.jpg")
    g = np.asarray(Image.open(tmp_path / "g16.jpg").convert("L")).astype(float)[-480:]   # 64x48 -> 640x480
    want = np.asarray(Image.fromarray((a / 65535 * 255 + 0.5).astype(np.uint8)).resize((640, 480)), float)
    assert abs(g.mean() - want.mean()) < 4 and abs(g[:, 20:300].mean() - 10000 / 65535 * 255) < 4


def test_an_animated_gif_is_captioned_as_its_first_frame(tiny_run, tmp_path):
    """500 frames of 300x300, the first red, the rest blue and green: `infer caption` (and extract, finetune and
    serve, which read images through the same load_image) sees only the first frame: its pixels, features and
    captions are the red still image's, and differ from a blue one's (so the comparison can tell)."""
    from extract.images import load_image
    d = tmp_path / "in"
    d.mkdir()
    for name, data in (("anim.gif", animated_gif(500, 300)), ("red.gif", gif_bytes([0], 300)),
                       ("blue.gif", gif_bytes([1], 300))):
        (d / name).write_bytes(data)
    cap = Captioner(tiny_run)
    pixels = {n: load_image(d / n, cap.image_size) for n in ("anim.gif", "red.gif", "blue.gif")}
    np.testing.assert_array_equal(pixels["anim.gif"], pixels["red.gif"])
    feats = cap.encoder()(np.stack(list(pixels.values())).astype(np.float32)).numpy()
    np.testing.assert_array_equal(feats[0], feats[1])
    assert not np.allclose(feats[1], feats[2])
    s = caption_images(tiny_run, [str(d)], tmp_path / "out", top=2, progress=False, log=lambda *a: None)
    assert s["captioned"] == 3 and not s["unreadable"]
    rows = {Path(r["file"]).name: r["captions"] for r in
            map(json.loads, (tmp_path / "out" / "captions.jsonl").read_text().splitlines())}
    # the same captions; their log-probabilities to float rounding only (a row's place in the
    # batch changes the kernels' rounding: -2.8640368 against -2.8640361 seen), far closer than
    # the blue picture's
    def logprobs(name):
        return [c["logprob"] for c in rows[name]]
    assert [c["caption"] for c in rows["anim.gif"]] == [c["caption"] for c in rows["red.gif"]]
    assert logprobs("anim.gif") == pytest.approx(logprobs("red.gif"), abs=1e-5)
    assert logprobs("blue.gif") != pytest.approx(logprobs("red.gif"), abs=1e-3)


def test_odd_pictures_and_non_utf8_names_never_stop_a_caption_run(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    import infer.caption as ic
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (10, 1100), (40, 80, 220)).save(src / "tall.png")
    Image.new("RGB", (8, 200000), (40, 80, 220)).save(src / "strip.png")
    Image.fromarray(np.full((80, 80), 30000, np.uint16)).save(src / "grey16.png")
    latin1 = os.fsdecode(b"caf\xe9.jpg")                  # not UTF-8: a surrogate-escaped str
    shutil.copy(sorted((tiny_dataset / "images/test").glob("*.jpg"))[0], src / latin1)
    shutil.copy(src / latin1, src / "cursed.jpg")
    real = ic.annotate

    def annotate(path, caps, dst):
        if Path(path).name == "cursed.jpg":
            raise OSError("disk full")
        return real(path, caps, dst)
    monkeypatch.setattr(ic, "annotate", annotate)
    lines = []
    s = caption_images(tiny_run, [str(src)], tmp_path / "out", progress=False, log=lines.append)
    assert s["captioned"] == 5 and not s["unreadable"]
    assert s["not_annotated"] == [(str(src / "cursed.jpg"), "OSError: disk full")]
    assert "Captions for image caf\ufffd.jpg:" in lines
    rows = [json.loads(x) for x in (tmp_path / "out/captions.jsonl").read_text(encoding="utf-8").splitlines()]
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {"tall.png", "strip.png", "grey16.png", "caf\ufffd.jpg", "cursed.jpg"}
    assert by_name["cursed.jpg"]["annotated"] is None and by_name["cursed.jpg"]["captions"]
    assert by_name["caf\ufffd.jpg"]["annotated"] == str(tmp_path / "out/annotated/caf\ufffd.jpg")
    for n in ("tall", "strip", "grey16", "caf\ufffd"):
        im = Image.open(tmp_path / "out/annotated" / f"{n}.jpg")
        assert im.width <= 640 and im.width * im.height <= 1_500_000
    assert not (tmp_path / "out/annotated/cursed.jpg").exists()


def test_results_json_never_stale_nor_with_duplicate_ids(tiny_dataset, tiny_run, tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    coco_named = sorted((tiny_dataset / "images/test").glob("*.jpg"))[:2]
    caption_images(tiny_run, [str(f) for f in coco_named], tmp_path / "o", **quiet)
    assert (tmp_path / "o/results.json").exists()
    # --overwrite with names that carry no ids: the old results.json goes
    shutil.copy(coco_named[0], tmp_path / "IMG_2023.jpg")
    s = caption_images(tiny_run, [str(tmp_path / "IMG_2023.jpg")], tmp_path / "o", overwrite=True, **quiet)
    assert s["captioned"] == 1 and not s["results_json"] and not (tmp_path / "o/results.json").exists()
    assert json.loads((tmp_path / "o/captions.jsonl").read_text())["image_id"] is None
    # the same id from two folders: no results.json, a warning naming the id and both files
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(coco_named[0], tmp_path / d / coco_named[0].name)
    lines = []
    s = caption_images(tiny_run, [str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "o2", progress=False,
                       log=lines.append)
    iid = image_id_from_name(coco_named[0])
    assert s["captioned"] == 2 and not s["results_json"] and not (tmp_path / "o2/results.json").exists()
    warn = [ln for ln in lines if "results.json not written" in ln]
    assert len(warn) == 1 and f"id {iid}" in warn[0] and str(tmp_path / "a") in warn[0] and str(tmp_path / "b") in warn[0]


def test_max_len_defaults_to_the_runs_own(tiny_dataset, tiny_run, tmp_path):
    from infer.options import run_max_len
    longest = captions_h5.max_length(tiny_dataset / "captions.h5", "train")
    assert 5 < longest <= 28
    assert run_max_len(tiny_run)[0] == longest + 2
    # recorded in config: used; a run from before it was recorded: one line saying what to do
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["train_max_length"] == longest                         # recorded by train
    del cfg["data"]["train_max_length"]                                        # as in an older run
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config.json: records no data.train_max_length.*older version.*--max-len"):
        run_max_len(run)
    with pytest.raises(UserError, match="not a run directory"):
        run_max_len(tmp_path)
    cfg["data"]["train_max_length"] = 17
    (run / "config.json").write_text(json.dumps(cfg))
    assert run_max_len(run)[0] == 19
    lines = []
    s = caption_images(tiny_run, [str(sorted((tiny_dataset / "images/test").glob("*.jpg"))[0])], tmp_path / "o",
                       progress=False, log=lines.append)
    assert s["max_len"] == longest + 2 and f"--max-len {longest + 2}: the longest training caption" in lines[0]


def test_a_kill_during_evaluate_overwrite_never_leaves_old_metrics_beside_new_results(tiny_dataset, tiny_run,
                                                                                       tmp_path, monkeypatch):
    import infer.evaluate as ev
    out = tmp_path / "e"
    out.mkdir()
    (out / "results.json").write_text('[{"image_id": 1, "caption": "old"}]')
    (out / "metrics.json").write_text('{"model": {"Bleu_4": 0.99}}')

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "coco_scores", killed)          # dies while scoring, after captioning
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(tiny_run, tiny_dataset, split="test", out=out, overwrite=True, limit=3, progress=False,
                    log=lambda *a: None)
    assert not (out / "metrics.json").exists()
    assert len(json.loads((out / "results.json").read_text())) == 3     # the new results, alone


# ---- decoding guards (#22) ---------------------------------------------------------------
def test_guards_on_by_default_off_with_a_flag_and_unsure_captions_are_marked(tiny_dataset, tiny_run, tmp_path):
    from model.decoding import NO_END_AFTER, Guards
    imgs = [str(p) for p in sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:6]]

    def rows_of(out, guards):
        lines = []
        s = caption_images(tiny_run, imgs, tmp_path / out, top=3, guards=guards, progress=False, log=lines.append)
        rows = [json.loads(x) for x in (tmp_path / out / "captions.jsonl").read_text().splitlines()]
        return s, lines, [c for r in rows for c in r["captions"]]
    s, lines, on = rows_of("on", None)                                   # the defaults: guards on
    assert all(isinstance(c["unsure"], bool) for c in on)
    for c in on:
        w = c["caption"].split()
        assert all(a != b for a, b in zip(w, w[1:])), c                  # never a word twice in a row
        grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
        assert len(grams) == len(set(grams)) and not (w and w[-1] in NO_END_AFTER), c
    assert re.search(rf"best captions: {s['degenerate']} degenerate, \d+ unsure$", lines[-2], re.M)
    s, lines, off = rows_of("off", Guards(on=False, unsure_below=-np.inf))
    assert any(a == b for c in off for a, b in zip(c["caption"].split(), c["caption"].split()[1:]))
    assert not any(c["unsure"] for c in off) and s["unsure"] == 0
    s, lines, marked = rows_of("marked", Guards(unsure_below=0.0))      # every caption is below 0
    assert all(c["unsure"] for c in marked) and s["unsure"] == 6
    assert [c["caption"] for c in marked] == [c["caption"] for c in on]
    assert sum("(unsure) (p=" in ln for ln in lines) == len(marked)
    s, _, words = rows_of("words", Guards(no_end_after=()))             # the list replaced: "" for none
    assert s["captioned"] == 6


@pytest.mark.parametrize("cmd", ["caption", "evaluate", "export", "serve"])
def test_guard_flags_are_checked_before_anything(tmp_path, cmd):
    args = {"caption": ["caption", "--run", tmp_path / "no-run", tmp_path / "a.png", "--out", tmp_path / "o"],
            "evaluate": ["evaluate", "--run", tmp_path / "no-run", "--data", tmp_path, "--out", tmp_path / "o"],
            "export": ["export", "--run", tmp_path / "no-run", "--out", tmp_path / "o"],
            "serve": ["serve", "--run", tmp_path / "no-run"]}[cmd]
    r = _infer_cli(*args, "--unsure-below", "nan", "--no-guards", "--no-end-after", "the of ,")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: --unsure-below nan: must be a number")
    assert not (tmp_path / "o").exists()
