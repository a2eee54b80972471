"""The attention decoder over grid features (model/attention.py), the grid cache, attention maps."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.cache import FeatureArray, extract_features, read_manifest
from infer.beam_search import beam_search_batch
from model.config import ModelConfig
from model.decoding import compiled_decoding
from model.decoders import build_decoder
from model.steps import masked_token_loss
from model.train import train
from prepare.errors import UserError
from tests.conftest import TINY_ATT, TINY_GRID as LITE, train_tiny_attention  # LITE: the tiny_grid settings

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *a: None)


def _attention_model(vocab=13, P=4, F=6, reg=0.0, seed=3):
    m = build_decoder(ModelConfig(vocab_size=vocab, decoder="attention", feature_dim=F, grid_positions=P,
                                  embedding_size=8, lstm_units=5, attention_units=7, attention_reg=reg,
                                  dropout=0.0), seed=seed)
    rng = np.random.default_rng(0)
    m.set_feature_stats(rng.normal(size=F), np.abs(rng.normal(size=F)) + 0.5)
    return m


def test_step_reproduces_teacher_forced_log_probs_and_maps_are_distributions():
    m = _attention_model()
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 4, 6)).astype(np.float32)
    ids = rng.integers(1, 13, size=(3, 6)).astype(np.int32)
    full = m(f, ids).numpy()                                   # [3, 6, 13]
    init, step = compiled_decoding(m)
    state = init(f)
    assert [tuple(s.shape) for s in state] == [(3, 5), (3, 5), (3, 4, 8), (3, 4, 7)]
    for t in range(6):
        logp, state = step(ids[:, t], state)
        np.testing.assert_allclose(logp.numpy(), full[:, t], atol=2e-6)
    maps = m.attention(f, ids).numpy()
    assert maps.shape == (3, 6, 4) and np.allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert (maps > 0).all() and maps.std() > 1e-4           # not uniform: the query moves it
    # another image changes what it looks at, and so the words
    f2 = f.copy()
    f2[0] = f2[0][::-1]
    assert not np.allclose(m.attention(f2, ids).numpy()[0], maps[0])


def test_doubly_stochastic_penalty_is_added_in_training_only():
    m = _attention_model(reg=0.5)
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2, 4, 6)).astype(np.float32)
    ids = np.array([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]], np.int32)
    s_eval, n = masked_token_loss(m, f, ids, training=False)
    s_train, n2 = masked_token_loss(m, f, ids, training=True)   # dropout 0: same log-probs
    maps = m.attention(f, ids[:, :-1]).numpy()                  # [2, 5, 4]
    mask = (ids[:, 1:] > 0)[:, :, None]
    want = 0.5 * ((1.0 - (maps * mask).sum(1)) ** 2).sum()
    assert float(n) == float(n2) == 6
    np.testing.assert_allclose(float(s_train) - float(s_eval), want, rtol=1e-4)
    logp = m(f, ids[:, :-1]).numpy()
    nll = -sum(logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(5) if ids[b, t + 1] > 0)
    np.testing.assert_allclose(float(s_eval), nll, rtol=1e-5)


# ---- beam search through the attention decoder's step, pinned on the hand-made table ---------
def test_beam_search_carries_each_beams_attention_state(monkeypatch):
    """The table of test_beam_search decides the words; the real attention decoder's state rides
    along. Every step checks that each row's state is exactly its own image's and prefix's."""
    from tests.test_beam_search import DEFAULT, END, START, TABLE, PrefixModel
    m = _attention_model(vocab=5, seed=7)
    init, step = compiled_decoding(m)
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(2, 4, 6)).astype(np.float32)
    table = PrefixModel(TABLE, DEFAULT)

    def replay(image: int, fed: tuple) -> np.ndarray:
        state = init(feats[image:image + 1])
        for w in fed:
            _, state = step(np.array([w], np.int32), state)
        return state[0].numpy()[0]

    checked, calls = [0], [0]

    def step_fn(words, state):
        nodes, image, dec = state[0], state[1], tuple(state[2:])
        for r in range(len(words)):
            i = int(image[r, 0])
            prefix = table.prefixes[int(nodes[r, 0])]
            fed = prefix if calls[0] else ()   # before the first step nothing is fed; then <start> and the words
            np.testing.assert_allclose(dec[2][r], init(feats[i:i + 1])[2].numpy()[0], atol=1e-6)   # its image's values
            # (oneDNN's products may differ in the last bit between a batch of 2 and of 1 on some CPUs)
            np.testing.assert_allclose(dec[0][r], replay(i, fed), atol=1e-6)
            checked[0] += 1
        calls[0] += 1
        logp, (new_nodes,) = table.step(words, (nodes,))
        _, new_dec = step(np.asarray(words, np.int32), dec)
        return logp, (new_nodes, image, *[x.numpy() for x in new_dec])

    state0 = init(feats)
    initial = (np.zeros((2, 1), np.int64), np.array([[0], [1]]), *[x.numpy() for x in state0])
    got = beam_search_batch(step_fn, initial, start_id=START, end_id=END, beam_size=2, max_len=4)
    A, B = 2, 3
    for caps in got:   # both images follow the table: test_beam_search's expected beams
        assert [(c.ids, round(math.exp(c.logprob), 6)) for c in caps] == \
            [([START, B, END], 0.21), ([START, A, B, END], 0.1375)]
    assert checked[0] >= 10


# ---- the grid cache -------------------------------------------------------------------------


def test_grid_cache_is_float16_positions_by_channels_and_pools_to_the_pooled_cache(tiny_dataset, tiny_grid, tmp_path):
    m = read_manifest(tiny_grid)
    assert (m["features"], m["grid_positions"], m["feature_dim"], m["dtype"]) == ("grid", 4, 1280, "float16")
    pooled = tmp_path / "pooled"
    extract_features(tiny_dataset / "captions.h5", pooled, **LITE, **quiet)   # the same random encoder (seed 0)
    for split, n in (("train", 48), ("val", 12), ("test", 12)):
        g = np.load(tiny_grid / f"{split}.grid.npy", mmap_mode="r")
        assert g.dtype == np.float16 and g.shape == (n, 4, 1280)
        assert 16 < np.abs(g).max() < 4096              # stored scaled into float16's precise range
        assert not (tiny_grid / f"{split}.npy").exists()
        p = np.load(pooled / f"{split}.npy")             # random Lite0: features ~1e-12, below float16's range
        assert np.abs(p).max() < 1e-6
        g = FeatureArray(tiny_grid, split, m)[:]         # the encoder's own values again
        np.testing.assert_allclose(g.mean(1), p, rtol=2e-2, atol=2e-3 * np.abs(p).max())
    g = np.asarray(FeatureArray(tiny_grid, "train", m)[:], np.float64).reshape(-1, 1280)
    np.testing.assert_allclose(m["train_stats"]["mean"], g.mean(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m["train_stats"]["std"], g.std(0), rtol=1e-3, atol=1e-7)
    with pytest.raises(UserError, match="--features 'map': choose pooled .* or grid"):
        extract_features(tiny_dataset / "captions.h5", tmp_path / "x", features="map", **LITE, **quiet)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["extract:train:chunk", "extract:val:done", "extract:committed"])
def test_killed_grid_extraction_resumes_bit_identical(tiny_dataset, tiny_grid, tmp_path, fault):
    out = tmp_path / "killed"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from extract.cache import extract_features; "
            "extract_features(sys.argv[2], sys.argv[3], encoder='efficientnet_lite0', weights='none', image_size=64, "
            "batch_size=16, chunk_batches=1, features='grid', progress=False)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tiny_dataset / "captions.h5"), str(out)],
                       capture_output=True, env={**__import__("os").environ, "SHOWTELL_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    m = extract_features(tiny_dataset / "captions.h5", out, features="grid", **LITE, **quiet)
    assert not (out / ".work").exists()
    for split in ("train", "val", "test"):
        assert np.load(out / f"{split}.grid.npy").tobytes() == np.load(tiny_grid / f"{split}.grid.npy").tobytes()
    assert m["train_stats"] == read_manifest(tiny_grid)["train_stats"]


def test_decoder_and_feature_kind_must_match(tiny_dataset, tiny_features, tiny_grid, tmp_path):
    with pytest.raises(UserError, match=r"--decoder attention reads grid features but .* holds pooled.*--features grid"):
        train(tiny_dataset, tmp_path / "a", model_overrides=TINY_ATT, train_overrides={"epochs": 1}, **quiet)
    with pytest.raises(UserError, match=r"--decoder show_and_tell reads pooled .* holds grid.*--decoder attention"):
        train(tiny_dataset, tmp_path / "b", features=tiny_grid, train_overrides={"epochs": 1}, **quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- train, evaluate, caption, fine-tune with the attention decoder ---------------------------
@pytest.fixture(scope="module")
def attention_run(tiny_dataset, tiny_grid, tmp_path_factory):
    return train_tiny_attention(tiny_dataset, tiny_grid, tmp_path_factory.mktemp("att") / "run")


def test_attention_run_records_its_decoder_and_captions_from_cache_and_images(tiny_dataset, tiny_grid, attention_run,
                                                                              tmp_path):
    from infer.caption import caption_images
    from infer.captioner import Captioner
    from infer.evaluate import evaluate
    cfg = json.loads((attention_run / "config.json").read_text())
    assert cfg["model"]["decoder"] == "attention" and cfg["model"]["grid_positions"] == 4
    cap = Captioner(attention_run)
    assert cap.features_kind == "grid" and cap.encoder()(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 4, 1280)
    lines = []
    m = evaluate(attention_run, tiny_dataset, features=tiny_grid, out=tmp_path / "ev", attention_maps=2,
                 progress=False, log=lines.append)
    assert m["source"] == "cache" and m["images"] == 12
    strips = sorted((tmp_path / "ev" / "attention").glob("*.png"))
    assert [p.name for p in strips] == ["test_000061.png", "test_000062.png"] or len(strips) == 2
    # pointing accuracy: every caption's words that name a true object are scored, not only the strips'
    from model.metrics import named_objects
    from prepare import captions_h5
    sp = captions_h5.read_split(tiny_dataset / "captions.h5", "test")
    truth = {int(i): json.loads(o)["objects"] for i, o in zip(sp.image_ids, sp.objects)}
    named = sum(o is not None for x in json.loads((tmp_path / "ev" / "results.json").read_text())
                for o in named_objects(x["caption"].split(), truth[x["image_id"]]))
    assert m["pointing"]["words"] == named and 0 <= m["pointing"]["hits"] <= named
    assert any("pointing accuracy" in line for line in lines) == (named > 0)
    m_img = evaluate(attention_run, tiny_dataset, features=tmp_path / "nowhere", out=tmp_path / "ev2",
                     progress=False, log=lambda *a: None)
    assert m_img["source"] == "images" and m_img["pointing"] == m["pointing"]
    # captioning the same images from files gives the same captions (the grid encoder is rebuilt)
    test_imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:3]
    r = caption_images(attention_run, [str(p) for p in test_imgs], tmp_path / "cap", attention=True, **quiet)
    assert r["captioned"] == 3
    rows = [json.loads(x) for x in (tmp_path / "cap" / "captions.jsonl").read_text().splitlines()]
    results = {x["image_id"]: x["caption"] for x in json.loads((tmp_path / "ev" / "results.json").read_text())}
    for row in rows:
        assert Path(row["attention"]).is_file() and Image.open(row["attention"]).size[0] > 112
        assert row["captions"][0]["caption"] == results[row["image_id"]]


def test_attention_flags_on_a_pooled_run_are_refused(tiny_dataset, tiny_run, tmp_path):
    from infer.caption import caption_images
    from infer.evaluate import evaluate
    img = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[0]
    with pytest.raises(UserError, match="--attention: .* show_and_tell decoder.*--decoder attention"):
        caption_images(tiny_run, [str(img)], tmp_path / "c", attention=True, **quiet)
    with pytest.raises(UserError, match="--attention: .* show_and_tell decoder"):
        evaluate(tiny_run, tiny_dataset, out=tmp_path / "e", attention_maps=1, **quiet)
    assert not (tmp_path / "c" / "captions.jsonl").exists() and not (tmp_path / "e" / "metrics.json").exists()


@pytest.mark.slow
def test_finetuning_an_attention_run_trains_the_grid_encoder(tiny_dataset, attention_run, tmp_path):
    from extract import encoder as enc
    from infer.captioner import Captioner
    from model.finetune import finetune
    out = tmp_path / "ft"
    r = finetune(attention_run, tiny_dataset, out, overrides={"epochs": 1, "batch_size": 16, "cnn_lr": 1e-3,
                                                               "samples": 0}, **quiet)
    assert r["steps"] == 3
    before, _ = enc.build_encoder("efficientnet_lite0", "none", 64, output="grid")
    enc.load_encoder_weights(before, attention_run / "encoder.weights.h5")
    cap = Captioner(out)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    after = cap.encoder()(x).numpy()
    assert after.shape == (2, 4, 1280)
    # the run keeps the best pair (here possibly still the stage-1 one); the last checkpoint holds
    # the trained grid encoder, which must differ from the stage-1 encoder
    from model import checkpoint
    from model.run import load_run
    decoder = load_run(out)[0]
    trained, _ = enc.build_encoder("efficientnet_lite0", "none", 64, trainable=True, output="grid")
    checkpoint.load(out / "checkpoints" / "latest.h5", [decoder, trained])
    assert trained(x).shape == (2, 4, 1280)
    assert not np.allclose(trained(x).numpy(), before(x).numpy())     # the CNN's feature map was trained
    img = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:2]
    assert all(c.captions for c in cap.caption_files(img, progress=False, attention=True))


# ---- attention maps people can see --------------------------------------------------------
def test_attention_strip_puts_the_heat_where_the_weight_is(tmp_path):
    from infer.attention_maps import TILE, attention_strip
    img = Image.new("RGB", (200, 100), (128, 128, 128))
    maps = np.array([[0.97, 0.01, 0.01, 0.01],      # top left
                     [0.01, 0.01, 0.01, 0.97]])     # bottom right
    attention_strip(img, ["red", "star"], maps, tmp_path / "s.png")
    a = np.asarray(Image.open(tmp_path / "s.png").convert("L"), np.float32)
    assert a.shape[1] == 3 * (TILE + 4) + 4            # the image and one tile per word, one row
    q = TILE // 4

    def quad(tile: int, y: int, x: int) -> float:
        x0, y0 = 4 + tile * (TILE + 4), 4
        return float(a[y0 + y * 3 * q: y0 + y * 3 * q + q, x0 + x * 3 * q: x0 + x * 3 * q + q].mean())
    assert quad(1, 0, 0) > quad(1, 1, 1) + 60           # "red": bright top left, dark bottom right
    assert quad(2, 1, 1) > quad(2, 0, 0) + 60           # "star": the other way round
    assert abs(quad(0, 0, 0) - quad(0, 1, 1)) < 2       # the plain image tile has no heat
    with pytest.raises(ValueError, match="not a square grid"):
        attention_strip(img, ["x"], np.ones((1, 5)) / 5, tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
