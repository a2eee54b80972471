"""Small helpers every stage shares: user-facing errors, atomic writes, checksums.

Later stages import this module; it imports nothing from them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; turn UserError into `error: ...` on stderr and exit code 2.
    TensorFlow's start-up notices (oneDNN, CUDA probing, CPU features) are filtered out of stderr."""
    code = 2
    with native_noise_filtered():
        try:
            code = main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print("interrupted: partial outputs were kept as resumable work files (see above)", file=sys.stderr)
            code = 130
    raise SystemExit(code or 0)


_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                    rb"|[IWE]\d{4} [\d:.]+\s+\d+ (port|cudart_stub|cuda_platform|cpu_feature_guard|cuda_executor|"
                    rb"cuda_diagnostics|gpu_device)\.cc:\d+\]"
                    rb"|To enable the following instructions: )")
_NOISE_STARTS = (b"WARNING: All log", b"I0000", b"W0000", b"E0000", b"To enable the following")


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Pass fd 2 through a filter that drops TensorFlow's C++ start-up notices (which no log-level
    variable silences in TF 2.21); everything else, progress bars included, goes through at once."""
    import threading
    sys.stderr.flush()
    saved = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        buf = b""
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not _NOISE.match(line):
                    os.write(saved, line + b"\n")
            if buf and not any(p.startswith(buf[:len(p)]) for p in _NOISE_STARTS):
                os.write(saved, buf)          # a progress bar's partial line: show it now
                buf = b""
        if buf and not _NOISE.match(buf):
            os.write(saved, buf)
        os.close(r)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)                     # closes the pipe's last writer: the pump sees EOF
        t.join(timeout=5)
        os.close(saved)


def inside(folder: str | os.PathLike, name: str) -> Path | None:
    """folder/name if `name` (read from a user's file) is a relative path that stays inside
    `folder`, else None: absolute names, `..` components anywhere, NUL bytes and empty names are
    refused. Decided on the text alone (os.path.normpath), never by following symlinks."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return None
    if ".." in Path(name).parts:
        return None
    base = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([base, full]) != base or full == base:
        return None
    return Path(full)


def check_range(flag: str, value, lo=None, hi=None, why: str = "") -> None:
    """UserError naming the flag and its valid range unless lo <= value <= hi (None: unbounded).

    check_range("--top", 0, 1) -> "--top must be at least 1 (got 0)".
    """
    if (lo is None or value >= lo) and (hi is None or value <= hi):
        return
    rng = (f"between {lo} and {hi}" if lo is not None and hi is not None else
           f"at least {lo}" if lo is not None else f"at most {hi}")
    raise UserError(f"{flag} must be {rng} (got {value}){f'; {why}' if why else ''}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A crash or kill inside the block leaves at most a `.tmp-*` file, never a file at `path`
    that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600: outputs follow the umask like any file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def differences(old: dict, new: dict, ignore: set = frozenset(), prefix: str = "", was: str = "run has") -> list[str]:
    """Saved settings vs now, nested dicts flattened to dotted keys: ['train.lr: run has 0.1, now 0.2']."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, ignore, f"{prefix}{k}.", was)
        elif a != b:
            out.append(f"{prefix}{k}: {was} {a!r}, now {b!r}")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---- one writer per output folder ---------------------------------------------------------
LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) while the block runs.

    A second process asking for the same folder is refused at once with a message naming the
    holder (pid, command, start time). Temporary files a killed writer left (`.tmp-*`, in the
    folder and its subfolders) are removed once the lock is held. The lock is the OS's (flock), so a killed holder releases
    it: a stale `.lock` file never blocks a re-run.
    """
    import fcntl
    import socket
    import time
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
        os.close(fd)
        raise UserError(f"{folder} is in use by another process ({holder}); wait for it to finish "
                        f"or choose another {flag}") from None
    me = (f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}, "
          f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode("utf-8", "replace"), 0)
    for tmp in [*folder.glob(".tmp-*"), *folder.glob("*/.tmp-*")]:   # left by a killed writer: ours now
        tmp.unlink(missing_ok=True)
    try:
        yield folder
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_empty_folder(folder: str | os.PathLike) -> bool:
    """True when `folder` is missing or holds nothing but a lock file and leftover temp files."""
    folder = Path(folder)
    return not folder.exists() or all(p.name == LOCK_FILE or p.name.startswith(".tmp-") for p in folder.iterdir())


def fault_point(label: str) -> None:
    """Test hook: die here like kill -9 when $SHOWTELL_FAULT names this point (used by the
    kill-and-resume tests to stop a process between two steps of a save)."""
    if os.environ.get("SHOWTELL_FAULT") == label:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
