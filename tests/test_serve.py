"""infer export (a SavedModel used without this project) and infer serve (a real server process)."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepare.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *a: None)


# ---- export ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_savedmodel_captions_image_bytes_like_infer_caption_without_the_project(tiny_dataset, tiny_run, tmp_path):
    from infer.caption import caption_images
    from infer.export import export
    out = tmp_path / "saved"
    rec = export(tiny_run, out, beam_size=3, top_k=2, **{"log": lambda *a: None})
    assert json.loads((out / "export.json").read_text())["top_k"] == 2 and rec["beam_size"] == 3
    assert rec["guards"]["on"] and "the" in rec["guards"]["no_end_after"]           # on by default, recorded
    imgs = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:10]
    caption_images(tiny_run, [str(p) for p in imgs], tmp_path / "cap", top=2, **quiet)
    want = {Path(r["file"]).name: r["captions"][0]["caption"]
            for r in map(json.loads, (tmp_path / "cap" / "captions.jsonl").read_text().splitlines())}
    # a Python with TensorFlow and nothing of this project: run from an empty folder, no PYTHONPATH
    code = ("import json, sys, tensorflow as tf\n"
            "m = tf.saved_model.load(sys.argv[1])\n"
            "files = sys.argv[2:]\n"
            "out = m.signatures['serving_default'](images=tf.constant([open(f, 'rb').read() for f in files]))\n"
            "print(json.dumps({'captions': out['captions'].numpy().astype(str).tolist(),"
            " 'log_probs': out['log_probs'].numpy().tolist(), 'unsure': out['unsure'].numpy().tolist(),"
            " 'unsure_dtype': out['unsure'].dtype.name}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(out), *map(str, imgs)], capture_output=True, text=True,
                       cwd=empty, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert np.array(got["log_probs"]).shape == np.array(got["unsure"]).shape == (10, 2)
    assert got["unsure_dtype"] == "bool"
    assert all(a >= b for a, b in got["log_probs"])                       # best first
    same = sum(got["captions"][i][0] == want[p.name] for i, p in enumerate(imgs))
    assert same >= 9, (got["captions"], want)
    with pytest.raises(UserError, match="already holds files; pass --overwrite"):
        export(tiny_run, out, log=lambda *a: None)
    with pytest.raises(UserError, match="--top 4: at most --beam-size"):
        export(tiny_run, tmp_path / "x", beam_size=3, top_k=4, log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["export:staged", "export:moved-one"])
def test_a_killed_export_is_finished_by_the_rerun(tiny_run, tmp_path, fault):
    import signal

    from infer.export import export
    out = tmp_path / "saved"
    export(tiny_run, out, log=lambda *a: None)
    first = (out / "saved_model.pb").read_bytes()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from infer.export import export; "
            "export(sys.argv[2], sys.argv[3], beam_size=2, top_k=1, overwrite=True, log=lambda *a: None)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tiny_run), str(out)], capture_output=True,
                       env={**os.environ, "SHOWTELL_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    rec = export(tiny_run, out, beam_size=2, top_k=1, log=lambda *a: None)      # no --overwrite needed: ours
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(rec))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["assets", "export.json", "fingerprint.pb", "saved_model.pb", "variables"]
    assert not (out / ".export-new").exists() and not (out / ".export-old").exists()
    assert (out / "saved_model.pb").read_bytes() != first          # the new export (beam 2, top 1)


# ---- serve: a real server process ----------------------------------------------------------
def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, files: list[tuple[str, bytes]]):
    from infer.serve_bench import post_images
    return post_images(url, files, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from infer.serve_bench import start_server
    tmp = tmp_path_factory.mktemp("serve-tmp")
    try:                                   # waits on the condition (model loaded), no fixed sleep
        proc, base = start_server(tiny_run, "--max-mb", "0.05", env={"TMPDIR": str(tmp)}, timeout=180)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield base, tmp
    proc.terminate()
    proc.wait(timeout=30)


def _images(tiny_dataset, n):
    return [(p.name, p.read_bytes()) for p in sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:n]]


def test_api_captions_good_uploads_and_refuses_bad_ones(server, tiny_dataset, tiny_run, tmp_path):
    from infer.annotate import pretty
    from infer.caption import caption_images
    base, tmp = server
    files = _images(tiny_dataset, 3)
    status, body = _post(base + "/api/caption", files)
    assert status == 200 and [r["name"] for r in body["results"]] == [n for n, _ in files]
    caption_images(tiny_run, [str(tiny_dataset / "images" / "test" / n) for n, _ in files], tmp_path / "c", **quiet)
    rows = [json.loads(x) for x in (tmp_path / "c" / "captions.jsonl").read_text().splitlines()]
    for res, row in zip(body["results"], rows):
        assert [c["text"] for c in res["captions"]] == [pretty(c["caption"]) for c in row["captions"]]
        assert res["annotated"].startswith("data:image/jpeg;base64,")
        assert 0 < res["captions"][0]["p"] <= 1
        assert [c["unsure"] for c in res["captions"]] == [c["unsure"] for c in row["captions"]]
    status, body = _post(base + "/api/caption", [files[0], ("notes.jpg", b"this is not a picture")])
    assert status == 400 and body["error"].startswith("notes.jpg: not an image")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
    buf = __import__("io").BytesIO()
    big.save(buf, format="PNG")                    # ~120 KB > --max-mb 0.05
    status, body = _post(base + "/api/caption", [("big.png", buf.getvalue())])
    assert status == 413 and "big.png" in body["error"]
    bomb = __import__("io").BytesIO()
    Image.new("1", (11000, 11000)).save(bomb, format="PNG")   # 121 Mpx in a few kB
    status, body = _post(base + "/api/caption", [("bomb.png", bomb.getvalue())])
    assert status == 400 and "bomb" in body["error"]
    assert _post(base + "/api/caption", [])[0] == 400
    assert _get(base + "/")[0] == 200 and b"/api/caption" in _get(base + "/")[1]
    assert not list(Path(tmp).rglob("*.jpg")) and not list(Path(tmp).rglob("*.png"))   # nothing left behind


def test_forty_concurrent_requests_from_eight_clients_get_their_own_answers(server, tiny_dataset):
    base, _ = server
    files = _images(tiny_dataset, 8)
    single = {n: _post(base + "/api/caption", [(n, d)])[1]["results"][0]["captions"] for n, d in files}
    jobs = [files[i % 8:i % 8 + 1 + (i % 3)] for i in range(40)]          # 1-3 images per request

    def call(job):
        return job, _post(base + "/api/caption", job)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, jobs))
    for job, (status, body) in answers:
        assert status == 200, body
        assert [r["name"] for r in body["results"]] == [n for n, _ in job]
        for r in body["results"]:
            got = [(c["text"], round(c["p"], 5)) for c in r["captions"]]
            assert got == [(c["text"], round(c["p"], 5)) for c in single[r["name"]]]


# ---- the page in a real browser --------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_the_page_in_headless_chromium_uploads_a_photo_and_shows_its_caption(server, tmp_path):
    chromium, driver = _chromium(), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium or chromedriver not installed (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    base, _ = server
    import skimage
    photo = tmp_path / "chelsea.jpg"                 # a real photo, small enough for the server's --max-mb 0.05
    Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB").save(photo, quality=80)
    assert photo.stat().st_size < 0.05 * (1 << 20)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        opts.add_argument(a)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        browser.get(base + "/")
        browser.find_element(By.ID, "files").send_keys(str(photo))
        try:
            WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .card li.caption"))
        except Exception:
            pytest.fail(f"no caption on the page; status line: {browser.find_element(By.ID, 'status').text!r}")
        items = browser.find_elements(By.CSS_SELECTOR, "#results .card li.caption")
        assert len(items) >= 1 and "(p=" in items[0].text and len(items[0].text) > 10
        img = browser.find_element(By.CSS_SELECTOR, "#results .card img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 100
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    im = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert im.shape[1] >= 1000 and im.std() > 20          # the page with the annotated photo, not a blank
    os.makedirs(ROOT / "out", exist_ok=True)
    shutil.copyfile(shot, ROOT / "out" / "serve-page.png")   # for people to look at (out/ is ignored)
