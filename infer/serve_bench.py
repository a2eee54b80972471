"""Bounded load on `infer serve` over localhost: N requests from C concurrent clients, one image
each (a cycle over the given images), against a server process started here.

Prints captions/s, latency p50/p95/max, the server's peak memory (VmHWM) and how many batches the
server ran (fewer batches than requests: concurrent requests were captioned together)."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def post_images(url: str, files: list[tuple[str, bytes]], timeout: float = 300) -> tuple[int, dict]:
    """A client: POST (name, bytes) pairs as multipart field `image` -> (HTTP status, JSON body)."""
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


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300, log_path: Path | None = None) -> None:
    """Poll /healthz until the model is loaded (or the server died)."""
    def tail() -> str:
        return log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {tail()}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become healthy in time: {tail()}")


def start_server(run_dir, *args: str, env: dict | None = None, timeout: float = 300):
    """`python -m infer serve --run RUN ARGS` on a free localhost port, its output in a log file
    (process.log_path), waited for until healthy -> (process, base URL). The caller terminates it."""
    import tempfile
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "infer", "serve", "--run", str(run_dir), "--port", str(port),
                                 *args], cwd=root, env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout, log_path)
    except RuntimeError:
        proc.kill()
        raise
    return proc, base


def run(run_dir, images: list[Path], requests: int = 200, clients: int = 8, log=print) -> dict:
    proc, base = start_server(run_dir)
    try:
        files = [(p.name, p.read_bytes()) for p in images]
        post_images(base + "/api/caption", files[:1])                        # warm up (traces)

        def one(i: int) -> tuple[int, float]:
            t = time.perf_counter()
            status, _ = post_images(base + "/api/caption", [files[i % len(files)]])
            return status, time.perf_counter() - t
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
        peak_kib = next((int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                         if line.startswith("VmHWM:")), 0)
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            batches = json.loads(r.read()).get("batches")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(t for _, t in results)
    ok = sum(s == 200 for s, _ in results)
    out = {"requests": requests, "clients": clients, "ok": ok, "captions_s": ok / wall,
           "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
           "max_ms": 1000 * lat[-1], "server_peak_mib": peak_kib / 1024, "batches": batches}
    log(f"infer serve under load ({requests} requests, {clients} clients, 1 image each, localhost):")
    log(f"  {ok}/{requests} answered 200; {out['captions_s']:.1f} captions/s; latency p50 {out['p50_ms']:.0f} ms, "
        f"p95 {out['p95_ms']:.0f} ms, max {out['max_ms']:.0f} ms; server peak memory {out['server_peak_mib']:.0f} MiB; "
        f"{batches} batches")
    return out
