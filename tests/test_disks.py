"""Every CLI against a read-only and a full output folder (issue #23; the subprocess tests are marked slow: about 15 minutes on 2 cores): one `error:` line naming the
path (exit code 2, no traceback, no crash), and after a full disk is freed the same command
succeeds (it never refuses its own leftovers). `infer serve` writes nothing but the uploads over
1 MB that Starlette spools into the temporary folder: a read-only TMPDIR is refused at start-up in
one line, a full one answers that request 507 and the next one after space is freed is captioned.

Needs tmpfs mounts: runs as root where `mount -t tmpfs` works, else the module is skipped saying why.
"""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEFT_FREE = 4096          # what the filler leaves on the full mount: one page
FULL_SIZE = "768m"        # room once freed for finetune: the 84 MB Inception weights, and a checkpoint holding
                          # them with Adam's two moments (263 MB) written beside the one it replaces


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, env={**_env(), **(env or {})}, timeout=timeout)


def _mount(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a read-only and a full output folder)")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount -t tmpfs -o {options}: {r.stderr.strip() or r.returncode})")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """{"ro": a read-only tmpfs, "full": a 768 MB tmpfs (filled by fill_up)}; unmounted afterwards."""
    base = tmp_path_factory.mktemp("mounts")
    made = []
    try:
        for name, options in (("ro", "ro"), ("full", f"size={FULL_SIZE}")):
            _mount(base / name, options)
            made.append(base / name)
        yield {"ro": base / "ro", "full": base / "full"}
    finally:
        for m in made:
            _umount(m)


@pytest.fixture(scope="module")
def built(mounts, tmp_path_factory):
    """A tiny dataset, its captions.h5, features and a 1-epoch run, made with the CLIs."""
    d = tmp_path_factory.mktemp("disks")
    data, run = d / "data", d / "run"
    for args in (("prepare", "synth", "--out", data, "--train", 24, "--val", 6, "--test", 6, "--size", 64, "--quiet"),
                 ("prepare", "captions", "--dataset", data),
                 ("extract", "--captions", data / "captions.h5", "--out", data / "features", "--weights", "none",
                  "--image-size", 75, "--quiet"),
                 ("model", "train", "--data", data, "--out", run, "--epochs", 1, "--embedding-size", 16,
                  "--lstm-units", 16, "--quiet")):
        r = _cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    return data, run


def commands(data: Path, run: Path, out: Path) -> dict:
    return {
        "synth": ("prepare", "synth", "--out", out, "--train", 24, "--val", 6, "--test", 6, "--size", 64, "--quiet"),
        "captions": ("prepare", "captions", "--dataset", data, "--out", out / "captions.h5"),
        "extract": ("extract", "--captions", data / "captions.h5", "--out", out, "--weights", "none",
                    "--image-size", 75, "--quiet"),
        "train": ("model", "train", "--data", data, "--out", out, "--epochs", 1, "--embedding-size", 16,
                  "--lstm-units", 16, "--quiet"),
        "caption": ("infer", "caption", "--run", run, data / "images" / "test", "--out", out, "--quiet"),
        "evaluate": ("infer", "evaluate", "--run", run, "--data", data, "--out", out, "--quiet"),
        "export": ("infer", "export", "--run", run, "--out", out),
        "finetune": ("model", "finetune", "--run", run, "--data", data, "--out", out, "--epochs", 1, "--max-steps", 2,
                     "--batch-size", 4, "--captions-per-image", 1, "--samples", 0, "--calibration-images", 4,
                     "--force", "--quiet"),
        "scst": ("model", "scst", "--run", run, "--data", data, "--out", out, "--epochs", 1, "--max-steps", 2,
                 "--batch-size", 4, "--samples-per-image", 2, "--samples", 0, "--quiet"),
    }


NAMES = ["synth", "captions", "extract", "train", "caption", "evaluate", "export", "finetune", "scst"]


def assert_refused(r: subprocess.CompletedProcess, where: Path) -> str:
    """Exit code 2 (no crash: not 139, -11, -7), no traceback, the last line `error: ...` naming `where`."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    assert str(where) in lines[-1], lines[-1]
    return lines[-1]


def fill_up(folder: Path) -> Path:
    """A file taking all but LEFT_FREE bytes of folder's file system."""
    filler = folder / "filler"
    st = os.statvfs(folder)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(st.f_bavail * st.f_frsize - LEFT_FREE, 1))
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_read_only_out_is_one_line(name, mounts, built):
    data, run = built
    out = mounts["ro"] / name
    line = assert_refused(_cli(*commands(data, run, out)[name]), out)
    assert "read-only" in line and "--out" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_full_disk_is_one_line_and_the_rerun_finishes(name, mounts, built):
    data, run = built
    out = mounts["full"] / name
    args = commands(data, run, out)[name]
    filler = fill_up(mounts["full"])
    try:
        line = assert_refused(_cli(*args), out)
        assert "no space left" in line and "re-run the same command" in line, line
    finally:
        filler.unlink()
    r = _cli(*args)                                   # space freed: the same command finishes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    shutil.rmtree(out)                                # room for the next command


@pytest.mark.slow
def test_evaluate_in_a_read_only_run_says_pass_out(built, tmp_path):
    data, run = built
    where = tmp_path / "ro-run"
    _mount(where, "size=200m")
    try:
        shutil.copytree(run, where / "run", ignore=shutil.ignore_patterns("eval-*"))
        r = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here ({r.stderr.strip()})")
        line = assert_refused(_cli("infer", "evaluate", "--run", where / "run", "--data", data, "--quiet"),
                              where / "run")
        assert "read-only" in line and "pass --out" in line, line
    finally:
        _umount(where)


@pytest.mark.slow
def test_serve_with_a_read_only_tmpdir_is_one_line(mounts, built):
    """Python would quietly spool uploads into /tmp instead: serve refuses at start-up, naming TMPDIR."""
    from infer.serve_bench import free_port
    _, run = built
    r = _cli("infer", "serve", "--run", run, "--port", free_port(), env={"TMPDIR": str(mounts["ro"])}, timeout=180)
    line = assert_refused(r, mounts["ro"])
    assert "read-only" in line and "TMPDIR" in line, line


def _noise_png(side: int) -> bytes:
    """A PNG of random pixels: side=800 is about 1.9 MB, so Starlette spools it to the temporary folder."""
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (side, side, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_serve_with_a_full_tmpdir_answers_507_and_captions_once_space_is_freed(mounts, built):
    from infer.serve_bench import post_images, start_server
    _, run = built
    tmp = mounts["full"]
    upload = [("noise.png", _noise_png(800))]
    assert len(upload[0][1]) > 1 << 20
    proc, base = start_server(run, env={"TMPDIR": str(tmp)}, timeout=300)
    try:
        filler = fill_up(tmp)
        try:
            status, body = post_images(base + "/api/caption", upload)
        finally:
            filler.unlink()
        assert status == 507, (status, body)
        assert body["error"].startswith(f"no space left on the device of {tmp}:") and "TMPDIR" in body["error"]
        status, body = post_images(base + "/api/caption", upload)         # space freed: the same request works
        assert status == 200 and body["results"][0]["captions"], body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = Path(proc.log_path).read_text()
    assert "Traceback" not in log, log[-3000:]
    assert any(ln.startswith(f"error: no space left on the device of {tmp}:") for ln in log.splitlines()), log[-3000:]


def test_feature_arrays_are_allocated_up_front(mounts):
    """extract's work arrays get their blocks when made: a full disk is ENOSPC there (and the file
    removed), never SIGBUS when a page of a sparse memory map is first written."""
    import numpy as np

    from extract.cache import _new_array
    path = mounts["full"] / "big.npy"
    filler = fill_up(mounts["full"])
    try:
        with pytest.raises(OSError) as e:
            _new_array(path, np.float32, (64, 2048))          # 512 KB on a file system with 4 KB left
        assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
        assert not path.exists()
    finally:
        filler.unlink()
    arr = _new_array(path, np.float32, (64, 2048))
    arr[:] = 1.0
    arr.flush()
    del arr
    assert np.load(path).sum() == 64 * 2048
    path.unlink()


def test_user_os_error_names_the_path_and_the_fix():
    """Without mounts: which errors become one line, and what that line names."""
    from prepare.cli import user_os_error
    argv = ["--data", "/d", "--out", "/o"]
    assert user_os_error(OSError(errno.ECONNREFUSED, "Connection refused"), argv) is None   # a bug: traceback
    assert user_os_error(ValueError("x"), argv) is None
    line = user_os_error(OSError(errno.ENOSPC, "No space left on device"), argv)           # no file name: --out
    assert line.startswith("no space left on the device of /o") and "re-run the same command" in line
    line = user_os_error(OSError(errno.EROFS, "Read-only file system", "/o/sub/.tmp-a.json.x1y2"), argv)
    assert line == "/o/sub/a.json is on a read-only file system: choose a writable --out"
    line = user_os_error(OSError(errno.ENAMETOOLONG, "File name too long", "/o/" + "n" * 300), argv)
    assert "choose a shorter --out" in line
    h5 = RuntimeError("Can't decrement id ref count (file write failed: time = x, filename = '/o/.tmp-c.h5.abc', "
                      "file descriptor = 5, errno = 28, error message = 'No space left on device')")
    assert user_os_error(h5, argv).startswith("no space left on the device of /o/c.h5:")
    line = user_os_error(OSError(errno.EROFS, "Read-only file system", "/r/eval-test"),
                         ["--run", "/r", "--data", "/d"])
    assert line.startswith("/r is read-only here") and line.endswith("pass --out to write elsewhere")
    line = user_os_error(OSError(errno.EACCES, "Permission denied", "/d/captions.h5"), argv)
    assert "/d/captions.h5" in line and "--data" in line       # the flag whose folder holds it
    line = user_os_error(OSError(errno.ENOSPC, "No space left on device"), argv, where="/t", flag="TMPDIR",
                         again="send the request again")           # serve's spooled uploads: no file name
    assert line == ("no space left on the device of /t: free space there (or choose another TMPDIR) and "
                    "send the request again")
