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


def _encoded(size, fmt, mode="RGB"):
    import io
    buf = io.BytesIO()
    Image.new(mode, size, 0 if mode == "1" else (90, 120, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _headers_claiming(w, h):
    """Files whose headers claim w x h (and hold no pixels): a limit must refuse them before any decoding."""
    import struct
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    gif = b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b";"
    bmp = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHH", 40, w, -h, 1, 24) + b"\0" * 24
    return {"png": png, "gif": gif, "bmp": bmp}


def test_savedmodel_limits_are_read_from_the_header_per_element(tiny_run):
    """Bombs, tiny and non-images are refused in their own row (errors), the rest captioned as before."""
    import tensorflow as tf

    from extract.images import MAX_PIXELS
    from infer.export import build_module, image_header_error
    for fmt in ("PNG", "GIF", "BMP", "JPEG"):
        assert image_header_error(tf.constant(_encoded((8, 9), fmt))).numpy() == b"", fmt
        assert image_header_error(tf.constant(_encoded((7, 30), fmt))).numpy().decode() == \
            "too small (7x30); needs at least 8 pixels a side", fmt
    for fmt, data in _headers_claiming(9500, 9500).items():
        assert image_header_error(tf.constant(data)).numpy().decode() == \
            f"too large (9500x9500 pixels > {MAX_PIXELS}): possible decompression bomb", fmt
    for fmt, data in _headers_claiming(9000, 9000).items():
        assert image_header_error(tf.constant(data)).numpy() == b"", fmt        # 81 Mpx: within the limit
    module, _ = build_module(tiny_run, beam_size=3, top_k=2, max_len=10)
    serve = module._tf_trackable.serve        # the endpoint's tf.function: the graph write_out saves
    good = _encoded((40, 30), "PNG")
    bomb = _encoded((16000, 16000), "PNG", mode="1")               # 256 Mpx in a few tens of kB
    batch = [good, b"this is not a picture", _encoded((1, 1), "PNG"), bomb, b"", _encoded((40, 30), "JPEG")]
    t0 = time.monotonic()
    out = serve(tf.constant(batch))
    assert time.monotonic() - t0 < 30                              # was 14-18 s and 7 GB for the bomb alone
    errors = [e.decode() for e in out["errors"].numpy()]
    assert errors[0] == errors[5] == ""
    assert errors[1] == "not an image (unknown format; JPEG, PNG, GIF or BMP)"
    assert errors[2] == "too small (1x1); needs at least 8 pixels a side"
    assert errors[3] == f"too large (16000x16000 pixels > {MAX_PIXELS}): possible decompression bomb"
    assert errors[4] == "empty file"
    caps, lps = out["captions"].numpy(), out["log_probs"].numpy()
    assert caps.shape == lps.shape == (6, 2)
    alone = serve(tf.constant([good]))
    assert caps[0].tolist() == alone["captions"].numpy()[0].tolist() and caps[0][0] != b""
    np.testing.assert_allclose(lps[0], alone["log_probs"].numpy()[0], rtol=1e-5)
    for i in (1, 2, 3, 4):
        assert caps[i].tolist() == [b"", b""] and np.all(np.isneginf(lps[i]))
    empty = serve(tf.constant([], tf.string))
    assert empty["captions"].shape == (0, 2) and empty["log_probs"].shape == (0, 2) and empty["errors"].shape == (0,)
    only_bad = serve(tf.constant([b"x"]))
    assert only_bad["captions"].numpy().tolist() == [[b"", b""]] and only_bad["errors"].numpy()[0] != b""


@pytest.fixture(scope="module")
def saved_model(tiny_run, tmp_path_factory):
    """The tiny run exported (beam 3, top 2, max length 10) and loaded back with tf.saved_model.load."""
    import tensorflow as tf

    from infer.export import export
    out = tmp_path_factory.mktemp("export") / "saved"
    export(tiny_run, out, beam_size=3, top_k=2, max_len=10, log=lambda *a: None)
    return tf.saved_model.load(str(out))


def _noise_jpeg(side: int = 64) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (side, side, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_savedmodel_corrupt_data_after_a_valid_header_fails_only_its_row(saved_model):
    """[good, PNG cut after its IHDR, good, JPEG cut inside its scan, good]: the two cut ones pass the header
    check, fail to decode and get CORRUPT in their own row; the good ones are captioned as when alone."""
    import tensorflow as tf

    from infer.export import CORRUPT, image_header_error
    serve = saved_model.signatures["serving_default"]
    png, jpeg = _encoded((40, 30), "PNG"), _noise_jpeg()
    cut_png = png[:33]                                          # signature + IHDR chunk, nothing more
    scan = jpeg.index(b"\xff\xda")
    cut_jpeg = jpeg[:scan + (len(jpeg) - scan) // 2]
    for data in (cut_png, cut_jpeg):
        assert image_header_error(tf.constant(data)).numpy() == b""      # a valid header: only decoding fails
    out = serve(images=tf.constant([png, cut_png, jpeg, cut_jpeg, png]))
    assert [e.decode() for e in out["errors"].numpy()] == ["", CORRUPT, "", CORRUPT, ""]
    caps, lps = out["captions"].numpy(), out["log_probs"].numpy()
    alone = serve(images=tf.constant([png, jpeg]))
    for row, ref in ((0, 0), (2, 1), (4, 0)):
        assert caps[row].tolist() == alone["captions"].numpy()[ref].tolist() and caps[row][0] != b""
        np.testing.assert_allclose(lps[row], alone["log_probs"].numpy()[ref], rtol=1e-5)
    for row in (1, 3):
        assert caps[row].tolist() == [b"", b""] and np.all(np.isneginf(lps[row]))
        assert not out["unsure"].numpy()[row].any()
    only_bad = serve(images=tf.constant([cut_png]))
    assert only_bad["errors"].numpy().tolist() == [CORRUPT.encode()] and only_bad["captions"].shape == (1, 2)


@pytest.mark.slow
def test_savedmodel_captions_an_animated_gif_as_its_first_frame(saved_model):
    """500 frames of 300x300, the first red, the rest blue and green: its pixels in the graph and its captions
    are the red still image's (and differ from a blue one's, so the comparison can tell)."""
    import tensorflow as tf

    from infer.export import decode_image_bytes
    from tests.conftest import animated_gif, gif_bytes
    anim, red, blue = animated_gif(500, 300), gif_bytes([0], 300), gif_bytes([1], 300)
    pixels = [decode_image_bytes(tf.constant(d), 75).numpy() for d in (anim, red, blue)]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert pixels[1][0, 0].tolist() == [255, 0, 0] and pixels[2][0, 0].tolist() == [0, 0, 255]
    out = saved_model.signatures["serving_default"](images=tf.constant([anim, red, blue]))
    assert out["errors"].numpy().tolist() == [b"", b"", b""]
    lps, caps = out["log_probs"].numpy(), out["captions"].numpy()
    assert not np.allclose(lps[1], lps[2])
    np.testing.assert_array_equal(lps[0], lps[1])
    assert caps[0].tolist() == caps[1].tolist()


def _gif_image_ends(data: bytes) -> list[int]:
    """Where each image of a GIF ends (after its sub-blocks' terminator): a plain walk of its blocks."""
    pos, ends = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0), []
    while pos < len(data) and data[pos] in (0x21, 0x2C):
        image = data[pos] == 0x2C
        pos += 11 + (3 << ((data[pos + 9] & 7) + 1) if data[pos + 9] & 0x80 else 0) if image else 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
        if image:
            ends.append(pos)
    return ends


def test_the_graph_decodes_only_an_animated_gifs_first_frame():
    """TensorFlow's GIF decoder decodes every frame even when it returns the first (measured: 5.9 s for 201
    frames of 2000x2000); decode_image_bytes hands it the file cut after its first image (gif_first_image),
    found by walking the blocks: the cut is exactly where the first image's data ends."""
    import tensorflow as tf

    from infer.export import decode_image_bytes, gif_first_image
    from tests.conftest import animated_gif
    anim = animated_gif(500, 300)
    ends = _gif_image_ends(anim)
    assert len(ends) == 500 and int(gif_first_image(tf.constant(anim))[0]) == ends[0]
    f = tf.function(lambda d: decode_image_bytes(d, 75))
    first, of_many = f(tf.constant(animated_gif(2, 300))).numpy(), f(tf.constant(anim)).numpy()
    np.testing.assert_array_equal(first, of_many)
    assert int(gif_first_image(tf.constant(anim[:ends[0] - 1]))[0]) == -1        # cut inside it: no end found


def test_a_gif_whose_first_frame_is_larger_than_its_screen_is_held_to_the_frames_size():
    """Pillow widens a GIF to its first frame's extent: the graph's header check does the same, so an 8x8
    screen with a 10000x10000 first frame is refused as a bomb on both paths."""
    import struct

    import tensorflow as tf

    from extract.images import MAX_PIXELS, BadImage, load_image_bytes
    from infer.export import image_header_error
    data = (b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 10000, 10000, 0) + b"\x02\x02\x4c\x01\x00;")
    want = f"too large (10000x10000 pixels > {MAX_PIXELS}): possible decompression bomb"
    assert image_header_error(tf.constant(data)).numpy().decode() == want
    with pytest.raises(BadImage) as e:
        load_image_bytes(data, 75)
    assert str(e.value) == want


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
        proc, base = start_server(tiny_run, "--max-mb", "0.05", "--body-timeout", "4", env={"TMPDIR": str(tmp)},
                                  timeout=180)
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


def _raw_request(base: str, head: bytes):
    """A socket to the server with the request line and headers sent."""
    import socket
    host, port = base.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head)
    return sock


def _read_response(sock, timeout: float) -> tuple[int, dict]:
    """Status and JSON body of the response on `sock` (Content-Length framed), within `timeout` s."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            [h.split(b":")[1] for h in data.split(b"\r\n") if h.lower().startswith(b"content-length:")][0]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_a_chunked_upload_is_refused_once_the_body_passes_the_limit_not_after_it_is_spooled(server):
    import select
    base, _ = server
    sock = _raw_request(base, b"POST /api/caption HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                              b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")
    part = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="huge.png"\r\n\r\n'
    block = b"\x89" * (1 << 16)
    sent, total = 0, 60 << 20                            # the server's limit: 32 x 0.05 MB + 1 MB = 2.6 MB
    with sock:
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        while sent < total and not select.select([sock], [], [], 0)[0]:      # until the server answers
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
        status, body = _read_response(sock, 30)
    assert status == 413 and "request body over" in body["error"], body
    assert sent < total // 2, sent                       # answered long before the 60 MB were sent


def test_a_body_that_stops_arriving_is_answered_408_after_the_body_timeout(server):
    base, _ = server
    t0 = time.monotonic()
    with _raw_request(base, b"POST /api/caption HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n"
                            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n--XyZ\r\n"
                            b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG') as sock:
        status, body = _read_response(sock, 30)          # --body-timeout 4 on this server
    assert status == 408 and "--body-timeout" in body["error"], body
    assert time.monotonic() - t0 < 20


def _bilevel_png(side: int) -> bytes:
    """A side x side single-colour PNG: side**2 pixels in about side**2 / 8000 bytes."""
    import io
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def test_requests_are_capped_in_pixels_and_files_with_a_clear_413(server, tiny_dataset):
    from infer.serve import MAX_FILES, MAX_REQUEST_PIXELS
    base, _ = server
    big = _bilevel_png(9000)                             # 81 Mpx (under MAX_PIXELS), 10 kB
    status, body = _post(base + "/api/caption", [(f"b{i}.png", big) for i in range(5)])     # 405 Mpx in all
    assert status == 413 and f"> {MAX_REQUEST_PIXELS}" in body["error"], body
    name, data = _images(tiny_dataset, 1)[0]
    status, body = _post(base + "/api/caption", [(name, data)] * (MAX_FILES + 1))
    assert status == 413 and body["error"] == f"too many files: at most {MAX_FILES} images per request"
    assert _post(base + "/api/caption", [(name, data)] * MAX_FILES)[0] == 200


def test_healthz_answers_while_a_heavy_request_is_decoded(server):
    import threading
    base, _ = server
    heavy = [(f"h{i}.png", _bilevel_png(9000)) for i in range(3)]   # 243 Mpx: seconds of decoding and drawing
    done, answer = threading.Event(), []

    def post():
        answer.append(_post(base + "/api/caption", heavy))
        done.set()
    threading.Thread(target=post, daemon=True).start()
    latencies = []
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        t0 = time.monotonic()
        status, _ = _get(base + "/healthz")
        if not done.is_set():                            # answered while the heavy request was in flight
            latencies.append(time.monotonic() - t0)
        assert status == 200
    assert done.wait(120) and answer[0][0] == 200, answer
    assert len(latencies) >= 3 and max(latencies) < 2.0, latencies


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
