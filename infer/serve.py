"""python -m infer serve: a web page and a JSON API that caption uploaded images with a run.

    GET  /              a page (infer/static/index.html): pick or drop images, see each with its caption drawn on it and the
                        top 3 captions with probabilities
    POST /api/caption   multipart field `image` (repeatable, at most MAX_FILES) -> 200 {"results": [{"name",
                        "captions": [{"text", "p", "unsure"}], "annotated": "data:image/jpeg;base64,..."}]}; an
                        unreadable upload -> 400 {"error": "<name>: <reason>"}; a file over --max-mb, a body over
                        max_body(--max-mb), over MAX_FILES files or over MAX_REQUEST_PIXELS pixels in all -> 413;
                        a body not received within --body-timeout seconds -> 408 (each with {"error"})
    GET  /healthz       200 {"status": "ok"} once the model is loaded (503 before)

Built on Starlette (the ASGI toolkit under FastAPI) served by uvicorn: routing, multipart parsing
into spooled temporary files and a production HTTP server from well-kept libraries, without
FastAPI's pydantic layer, which a three-route service does not need.

Concurrency: every request's images go into one queue; a single worker thread takes whatever is
waiting (up to --max-batch images), captions it as one batch (encoder and beam search batched) and
hands each request its own slice, so concurrent requests are batched, never mixed up, and the
model is only ever used by one thread. Decoding and drawing run in Starlette's thread pool, never
on the event loop, so /healthz and other clients are answered while a heavy request is decoded.
The body is counted as it streams in: reading stops at the limit (chunked uploads included).
Uploads live only in memory or in Starlette's spooled temporary files (the system temporary
folder, for uploads over 1 MB); nothing is written anywhere else. That folder is checked at start-up
(a read-only or missing TMPDIR is one line, exit code 2), and a request whose upload finds it full is
answered 507 with the folder and the fix, the same line in the server's log; the next one after space
is freed is captioned.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import io
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extract.images import MAX_PIXELS
from prepare.errors import UserError, check_range

MAX_FILES = 32          # images per request
MAX_REQUEST_PIXELS = 4 * MAX_PIXELS     # pixels of all a request's images together (each: MAX_PIXELS)
STATIC = Path(__file__).parent / "static"   # the web page (index.html)


@dataclass
class _Job:
    images: list[np.ndarray]                     # uint8 [S, S, 3] each
    done: threading.Event = field(default_factory=threading.Event)
    captions: list = field(default_factory=list)
    error: str | None = None


class BatchingCaptioner:
    """One worker thread owns the model; jobs from any thread are batched together."""

    def __init__(self, run, beam_size: int = 3, max_len: int | None = None, max_batch: int = 16, guards=None):
        from infer.captioner import Captioner
        from infer.options import run_max_len
        if max_len is None:
            max_len, _ = run_max_len(run)
        self.cap = Captioner(run, beam_size=beam_size, max_len=max_len, guards=guards)
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


def max_body(max_bytes: int) -> int:
    """The largest request body: MAX_FILES files of --max-mb and 1 MB of multipart framing."""
    return max_bytes * MAX_FILES + (1 << 20)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


def limited_receive(receive, limit: int, timeout: float):
    """An ASGI receive that counts the body's bytes as they arrive: BodyTooLarge once over `limit`
    (nothing more is read), BodyTimeout when the whole body has not arrived `timeout` s after the start."""
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + timeout, 0

    async def receive_limited():
        nonlocal seen
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            raise BodyTimeout() from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
        return message
    return receive_limited


def _header_pixels(data: bytes) -> int:
    """Width x height from the header (nothing decoded); 0 when Pillow cannot read it (the decode says why)."""
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001 - unreadable: load_image_bytes gives the reason
        return 0


def create_app(run, *, beam_size: int = 3, max_len: int | None = None, max_bytes: int = 10 << 20,
               max_batch: int = 16, top: int = 3, body_timeout: float = 30.0, guards=None):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    from extract.images import BadImage, load_image_bytes
    from infer.annotate import pretty, render

    state: dict = {"model": None, "error": None}

    def load() -> None:
        try:
            state["model"] = BatchingCaptioner(run, beam_size=max(beam_size, top), max_len=max_len,
                                               max_batch=max_batch, guards=guards)
        except Exception as e:  # noqa: BLE001 - reported by /healthz and every request
            state["error"] = f"{type(e).__name__}: {e}"

    async def healthz(_request: Request):
        if state["model"] is not None:
            return JSONResponse({"status": "ok", "batches": state["model"].batches})
        return JSONResponse({"status": "error" if state["error"] else "loading", "error": state["error"]},
                            status_code=500 if state["error"] else 503)

    page_html = (STATIC / "index.html").read_text(encoding="utf-8")     # read once, at start-up

    async def page(_request: Request):
        return HTMLResponse(page_html)

    async def api_caption(request: Request):
        model = state["model"]
        if model is None:
            return JSONResponse({"error": state["error"] or "the model is still loading; retry shortly"},
                                status_code=503)
        limit = max_body(max_bytes)
        too_large = JSONResponse({"error": f"request body over {limit} bytes ({MAX_FILES} files of --max-mb "
                                           f"and 1 MB)"}, status_code=413)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return too_large
        try:
            form = await Request(request.scope, limited_receive(request.receive, limit, body_timeout)).form(
                max_files=MAX_FILES, max_fields=MAX_FILES)
        except BodyTooLarge:
            return too_large
        except BodyTimeout:
            return JSONResponse({"error": f"the request body did not arrive within {body_timeout:g} s "
                                          f"(--body-timeout)"}, status_code=408)
        except OSError as e:                       # spooling an upload over 1 MB: the temporary folder is full
            return spool_failed(e)
        except Exception as e:  # noqa: BLE001 - malformed multipart bodies
            why = getattr(e, "detail", None) or str(e)
            if "Too many files" in why:
                return JSONResponse({"error": f"too many files: at most {MAX_FILES} images per request"},
                                    status_code=413)
            return JSONResponse({"error": f"not a multipart form with `image` fields ({why})"}, status_code=400)
        try:
            uploads = [u for u in form.getlist("image") if hasattr(u, "read")]
            if not uploads:
                return JSONResponse({"error": "no `image` field: send the images as multipart field `image`"},
                                    status_code=400)
            names, raw = [], []
            for u in uploads:
                name = Path(u.filename or "upload").name[:200]
                data = await u.read(max_bytes + 1)
                if len(data) > max_bytes:
                    return JSONResponse({"error": f"{name}: larger than {max_bytes} bytes (--max-mb)"},
                                        status_code=413)
                names.append(name)
                raw.append(data)
        finally:
            await form.close()
        decoded = await run_in_threadpool(_decode_all, names, raw, model.image_size, load_image_bytes, BadImage)
        if isinstance(decoded, JSONResponse):
            return decoded
        images = decoded
        try:
            caps = await asyncio.get_running_loop().run_in_executor(None, model.caption, images)
        except RuntimeError as e:
            return JSONResponse({"error": f"captioning failed: {e}"}, status_code=500)
        bests = [[(model.cap.text(c), math.exp(c.logprob), model.cap.unsure(c)) for c in cs[:top]] for cs in caps]
        drawn = await run_in_threadpool(lambda: [_annotated(render, d, [(t + " (unsure)" * u, p) for t, p, u in b])
                                                 for d, b in zip(raw, bests)])
        return JSONResponse({"results": [{"name": n, "captions": [{"text": pretty(t), "p": p, "unsure": u}
                                                                  for t, p, u in best], "annotated": a}
                                         for n, best, a in zip(names, bests, drawn)]})

    app = Starlette(routes=[Route("/", page), Route("/healthz", healthz),
                            Route("/api/caption", api_caption, methods=["POST"])])
    threading.Thread(target=load, daemon=True, name="load-model").start()
    return app


def temp_folder() -> str:
    """The folder Starlette spools uploads over 1 MB into (tempfile.gettempdir()), checked at start-up:
    a TMPDIR that cannot be written is refused in one line (Python would quietly spool into /tmp
    instead), and so is a machine with no writable temporary folder at all."""
    import os
    import tempfile

    from prepare.cli import user_os_error
    wanted = os.environ.get("TMPDIR")
    try:
        if wanted:
            tempfile.TemporaryFile(dir=wanted).close()
        return tempfile.gettempdir()
    except OSError as e:
        why = "uploads over 1 MB are spooled there"
        line = user_os_error(OSError(e.errno, e.strerror, wanted), [], flag="TMPDIR")   # the folder, not a file in it
        if line:
            raise UserError(f"{line} ({why})") from None
        if wanted:
            raise UserError(f"TMPDIR {wanted}: {e.strerror or e} ({why}): set TMPDIR to a writable folder") from None
        raise UserError(f"no writable temporary folder ({e}; {why}): set TMPDIR to a writable folder") from None


def spool_failed(e: OSError):
    """The answer when an upload could not be spooled into the temporary folder (507 when it is full, else
    500), the same line in the server's log; None (re-raised) for an error no disk caused."""
    import sys
    import tempfile

    from starlette.responses import JSONResponse

    from prepare.cli import user_os_error
    line = user_os_error(e, [], where=tempfile.gettempdir(), flag="TMPDIR",
                         again="send the request again (uploads over 1 MB are spooled there)")
    if line is None:
        raise e
    print(f"error: {line}", file=sys.stderr, flush=True)
    return JSONResponse({"error": line}, status_code=507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500)


def _decode_all(names, raw, size: int, load_image_bytes, BadImage):
    """In a worker thread: the uploads' images, or the JSON error (413 over MAX_REQUEST_PIXELS in all,
    from the headers before anything is decoded; 400 for the first unreadable upload)."""
    from starlette.responses import JSONResponse
    pixels = sum(_header_pixels(d) for d in raw)
    if pixels > MAX_REQUEST_PIXELS:
        return JSONResponse({"error": f"too many pixels in one request ({pixels} > {MAX_REQUEST_PIXELS}, 4 x "
                                      f"{MAX_PIXELS}): send fewer or smaller images per request"}, status_code=413)
    images = []
    for name, data in zip(names, raw):
        try:
            images.append(load_image_bytes(data, size))
        except BadImage as e:
            return JSONResponse({"error": f"{name}: {e}"}, status_code=400)
    return images


def _annotated(render, data: bytes, best) -> str | None:
    """The annotated copy as a data URL (None if it cannot be drawn: the captions still stand)."""
    try:
        buf = io.BytesIO()
        render(io.BytesIO(data), best, width=480).save(buf, format="JPEG", quality=85)
    except Exception:  # noqa: BLE001
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def serve(run, host: str = "127.0.0.1", port: int = 8000, *, beam_size: int = 3, max_mb: float = 10.0,
          max_batch: int = 16, body_timeout: float = 30.0, guards=None, log=print) -> None:
    import uvicorn

    from model.run import Run
    check_range("--port", port, 1, 65535)
    check_range("--beam-size", beam_size, 1, 100)
    check_range("--max-batch", max_batch, 1, 1024)
    if not max_mb > 0:
        raise UserError(f"--max-mb {max_mb}: must be above 0")
    if not body_timeout > 0:
        raise UserError(f"--body-timeout {body_timeout}: must be above 0 seconds")
    Run(run).verify()                              # a broken run directory: one line, before the server starts
    spool = temp_folder()                          # a read-only TMPDIR: one line, before the server starts
    app = create_app(run, beam_size=beam_size, max_bytes=int(max_mb * (1 << 20)), max_batch=max_batch,
                     body_timeout=body_timeout, guards=guards)
    log(f"serving {run} on http://{host}:{port}/  (API: POST /api/caption, health: GET /healthz; uploads over "
        f"1 MB are spooled in {spool})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
