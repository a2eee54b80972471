import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infer.caption import caption_images
from infer.captioner import Captioner, image_id_from_name
from infer.evaluate import content_accuracy, evaluate, human_ceiling
from prepare import captions_h5
from prepare.util import UserError


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
        monkeypatch.setattr(ev, "coco_scores", lambda gts, res, who=who: seen[who].append((gts, res)) or real(gts, res))
        fn()
    assert [g for g, _ in seen["human"]] == [g for g, _ in seen["model"]]
    assert len(seen["model"]) == 4 and all(len(v) == 3 for g, _ in seen["model"] for v in g.values())
    assert [r for _, r in seen["model"]] == [{i: [c] for i, c in hyp.items()}] * 4
    assert [r for _, r in seen["human"]] == [{i: [v[j]] for i, v in refs.items()} for j in range(4)]
    # by hand: leave-one-out is the mean over the 4 subsets
    want = np.mean([real({i: v[:j] + v[j + 1:] for i, v in refs.items()}, {i: [c] for i, c in hyp.items()})["Bleu_1"]
                    for j in range(4)])
    assert loo["Bleu_1"] == pytest.approx(want)


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
    for k in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr") + (("METEOR",) if m["java"] else ()):
        assert 0 <= m["model"][k] and k in m["human_ceiling"]
    assert m["human_ceiling"]["Bleu_1"] > 0.5
    assert set(m["model_leave_one_out"]) == set(m["human_ceiling"])
    assert 0 <= m["content"]["exact"] <= 1 and m["content"]["images"] == 12
    assert json.loads((tmp_path / "e/metrics.json").read_text())["model"] == m["model"]
    res = json.loads((tmp_path / "e/results.json").read_text())
    assert len(res) == 12
    with pytest.raises(UserError, match="already exists"):
        evaluate(tiny_run, tiny_dataset, split="test", out=tmp_path / "e", progress=False, log=lambda *a: None)
    # a feature cache that is not the run's: captions come from the images, and agree with the cache
    m2 = evaluate(tiny_run, tiny_dataset, split="test", out=tmp_path / "e2", features=tmp_path / "nowhere",
                  progress=False, log=lambda *a: None)
    assert m2["source"] == "images"
    assert json.loads((tmp_path / "e2/results.json").read_text()) == res
