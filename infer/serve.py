"""python -m infer serve: a web page and a JSON API that caption uploaded images with a run.

    GET  /              a page: pick or drop images, see each with its caption drawn on it and the
                        top 3 captions with probabilities
    POST /api/caption   multipart field `image` (repeatable) -> 200 {"results": [{"name", "captions":
                        [{"text", "p"}], "annotated": "data:image/jpeg;base64,..."}]}; an unreadable
                        upload -> 400 {"error": "<name>: <reason>"}; a file over --max-mb -> 413
    GET  /healthz       200 {"status": "ok"} once the model is loaded (503 before)

Built on Starlette (the ASGI toolkit under FastAPI) served by uvicorn: routing, multipart parsing
into spooled temporary files and a production HTTP server from well-kept libraries, without
FastAPI's pydantic layer, which a three-route service does not need.

Concurrency: every request's images go into one queue; a single worker thread takes whatever is
waiting (up to --max-batch images), captions it as one batch (encoder and beam search batched) and
hands each request its own slice, so concurrent requests are batched, never mixed up, and the
model is only ever used by one thread. Uploads live only in memory or in Starlette's spooled
temporary files (the system temporary folder); nothing is written anywhere else.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prepare.errors import UserError, check_range

MAX_FILES = 32          # images per request


@dataclass
class _Job:
    images: list[np.ndarray]                     # uint8 [S, S, 3] each
    done: threading.Event = field(default_factory=threading.Event)
    captions: list = field(default_factory=list)
    error: str | None = None


class BatchingCaptioner:
    """One worker thread owns the model; jobs from any thread are batched together."""

    def __init__(self, run, beam_size: int = 3, max_len: int | None = None, max_batch: int = 16):
        from infer.captioner import Captioner
        from infer.options import run_max_len
        if max_len is None:
            max_len, _ = run_max_len(run)
        self.cap = Captioner(run, beam_size=beam_size, max_len=max_len)
        self.forward = self.cap.encoder()
        self.max_batch = max_batch
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.batches = 0                         # batches run (for the tests and the log)
        threading.Thread(target=self._work, daemon=True, name="captioner").start()

    @property
    def image_size(self) -> int:
        return self.cap.image_size

    def caption(self, images: list[np.ndarray]) -> list:
        """Blocking: the captions (best first) of each image, batched with other callers' images."""
        job = _Job(images)
        self.jobs.put(job)
        job.done.wait()
        if job.error:
            raise RuntimeError(job.error)
        return job.captions

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            n = len(jobs[0].images)
            while n < self.max_batch:
                try:
                    j = self.jobs.get_nowait()
                except queue.Empty:
                    break
                jobs.append(j)
                n += len(j.images)
            try:
                x = np.stack([im for j in jobs for im in j.images]).astype(np.float32)
                caps = self.cap.caption_features(self.forward(x).numpy(), batch_size=len(x))
                self.batches += 1
                k = 0
                for j in jobs:
                    j.captions, k = caps[k:k + len(j.images)], k + len(j.images)
            except Exception as e:  # noqa: BLE001 - a failure is the requests' answer, never the worker's end
                for j in jobs:
                    j.error = f"{type(e).__name__}: {e}"
            for j in jobs:
                j.done.set()


def create_app(run, *, beam_size: int = 3, max_len: int | None = None, max_bytes: int = 10 << 20,
               max_batch: int = 16, top: int = 3):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from extract.images import BadImage, load_image_bytes
    from infer.annotate import pretty, render

    state: dict = {"model": None, "error": None}

    def load() -> None:
        try:
            state["model"] = BatchingCaptioner(run, beam_size=max(beam_size, top), max_len=max_len,
                                               max_batch=max_batch)
        except Exception as e:  # noqa: BLE001 - reported by /healthz and every request
            state["error"] = f"{type(e).__name__}: {e}"

    async def healthz(_request: Request):
        if state["model"] is not None:
            return JSONResponse({"status": "ok", "batches": state["model"].batches})
        return JSONResponse({"status": "error" if state["error"] else "loading", "error": state["error"]},
                            status_code=500 if state["error"] else 503)

    async def page(_request: Request):
        return HTMLResponse(PAGE)

    async def api_caption(request: Request):
        model = state["model"]
        if model is None:
            return JSONResponse({"error": state["error"] or "the model is still loading; retry shortly"},
                                status_code=503)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes * MAX_FILES + (1 << 20):
            return JSONResponse({"error": f"request too large ({int(length)} bytes)"}, status_code=413)
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        except Exception as e:  # noqa: BLE001 - malformed multipart bodies
            return JSONResponse({"error": f"not a multipart form with `image` fields ({e})"}, status_code=400)
        try:
            uploads = [u for u in form.getlist("image") if hasattr(u, "read")]
            if not uploads:
                return JSONResponse({"error": "no `image` field: send the images as multipart field `image`"},
                                    status_code=400)
            names, images, raw = [], [], []
            for u in uploads:
                name = Path(u.filename or "upload").name[:200]
                data = await u.read(max_bytes + 1)
                if len(data) > max_bytes:
                    return JSONResponse({"error": f"{name}: larger than {max_bytes} bytes (--max-mb)"},
                                        status_code=413)
                try:
                    images.append(load_image_bytes(data, model.image_size))
                except BadImage as e:
                    return JSONResponse({"error": f"{name}: {e}"}, status_code=400)
                names.append(name)
                raw.append(data)
        finally:
            await form.close()
        try:
            caps = await asyncio.get_running_loop().run_in_executor(None, model.caption, images)
        except RuntimeError as e:
            return JSONResponse({"error": f"captioning failed: {e}"}, status_code=500)
        results = []
        for name, data, cs in zip(names, raw, caps):
            best = [(model.cap.text(c), math.exp(c.logprob)) for c in cs[:top]]
            results.append({"name": name, "captions": [{"text": pretty(t), "p": p} for t, p in best],
                            "annotated": _annotated(render, data, best)})
        return JSONResponse({"results": results})

    app = Starlette(routes=[Route("/", page), Route("/healthz", healthz),
                            Route("/api/caption", api_caption, methods=["POST"])])
    app.state.captioner = state
    threading.Thread(target=load, daemon=True, name="load-model").start()
    return app


def _annotated(render, data: bytes, best) -> str | None:
    """The annotated copy as a data URL (None if it cannot be drawn: the captions still stand)."""
    try:
        buf = io.BytesIO()
        render(io.BytesIO(data), best, width=480).save(buf, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def post_images(url: str, files: list[tuple[str, bytes]], timeout: float = 300) -> tuple[int, dict]:
    """A client: POST (name, bytes) pairs as multipart field `image` -> (HTTP status, JSON body)."""
    import urllib.error
    import urllib.request
    import uuid
    boundary = uuid.uuid4().hex.encode()
    body = b"".join(b'--%s\r\nContent-Disposition: form-data; name="image"; filename="%s"\r\n'
                    b"Content-Type: application/octet-stream\r\n\r\n%s\r\n"
                    % (boundary, name.replace('"', "_").encode(), data) for name, data in files)
    body += b"--%s--\r\n" % boundary
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def serve(run, host: str = "127.0.0.1", port: int = 8000, *, beam_size: int = 3, max_mb: float = 10.0,
          max_batch: int = 16, log=print) -> None:
    import uvicorn

    from model.run import Run
    check_range("--port", port, 1, 65535)
    check_range("--beam-size", beam_size, 1, 100)
    check_range("--max-batch", max_batch, 1, 1024)
    if not max_mb > 0:
        raise UserError(f"--max-mb {max_mb}: must be above 0")
    Run(run).verify()                              # a broken run directory: one line, before the server starts
    app = create_app(run, beam_size=beam_size, max_bytes=int(max_mb * (1 << 20)), max_batch=max_batch)
    log(f"serving {run} on http://{host}:{port}/  (API: POST /api/caption, health: GET /healthz)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Show and Tell: caption your images</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
 #drop { border: 2px dashed #999; border-radius: 8px; padding: 2rem; text-align: center; cursor: pointer; }
 #drop.over { background: #eef; border-color: #55c; }
 .card { display: flex; gap: 1rem; margin: 1.5rem 0; align-items: flex-start; }
 .card img { max-width: 480px; border: 1px solid #ddd; }
 .card ol { margin: 0; padding-left: 1.2rem; } .p { color: #777; font-size: 0.9em; }
 .error { color: #b00; } #status { margin-top: 1rem; color: #555; }
</style></head>
<body>
<h1>Show and Tell</h1>
<div id="drop">Drop images here, or <label><u>choose files</u>
 <input id="files" type="file" accept="image/*" multiple hidden></label></div>
<div id="status"></div>
<div id="results"></div>
<script>
const drop = document.getElementById('drop'), input = document.getElementById('files');
const status = document.getElementById('status'), out = document.getElementById('results');
drop.addEventListener('click', e => { if (e.target === drop) input.click(); });
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); send(e.dataTransfer.files); });
input.addEventListener('change', () => send(input.files));
async function send(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append('image', f, f.name);
  status.textContent = 'captioning ' + files.length + ' image(s)...';
  try {
    const r = await fetch('/api/caption', {method: 'POST', body: form});
    const body = await r.json();
    if (!r.ok) { status.innerHTML = '<span class="error"></span>'; status.firstChild.textContent = body.error; return; }
    status.textContent = '';
    for (const res of body.results) out.prepend(card(res));
  } catch (err) { status.textContent = 'request failed: ' + err; }
}
function card(res) {
  const div = document.createElement('div'); div.className = 'card';
  if (res.annotated) { const img = document.createElement('img'); img.src = res.annotated; img.alt = res.name; div.append(img); }
  const text = document.createElement('div');
  const h = document.createElement('h3'); h.textContent = res.name; text.append(h);
  const ol = document.createElement('ol');
  for (const c of res.captions) {
    const li = document.createElement('li'); li.className = 'caption'; li.textContent = c.text + ' ';
    const p = document.createElement('span'); p.className = 'p'; p.textContent = '(p=' + c.p.toPrecision(2) + ')';
    li.append(p); ol.append(li);
  }
  text.append(ol); div.append(text); return div;
}
</script>
</body></html>
"""
