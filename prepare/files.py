"""Files every stage writes the same way: paths kept inside their folder, atomic writes,
checksums, one writer per output folder (a lock naming its holder) and the test hook that kills a
process between two steps of a save.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from prepare.errors import UserError

OUTSIDE_REASONS = ("is absolute", "has a '..' component", "leaves its folder", "names the folder itself")


def not_inside(folder: str | os.PathLike, name) -> str | None:
    """Why `name` (read from a user's file) is not a relative path that stays inside `folder`, or
    None when it is: "is not text", "is empty", "contains a NUL byte", or one of OUTSIDE_REASONS
    (absolute, `..` anywhere, ...). Decided on the text alone (os.path.normpath), never by
    following symlinks."""
    if not isinstance(name, str):
        return "is not text"
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL byte"
    if os.path.isabs(name):
        return "is absolute"
    if ".." in Path(name).parts:
        return "has a '..' component"
    base = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.join(base, name))
    if full == base:
        return "names the folder itself"
    if os.path.commonpath([base, full]) != base:
        return "leaves its folder"
    return None


def inside(folder: str | os.PathLike, name: str) -> Path | None:
    """folder/name if `name` (read from a user's file) is a relative path that stays inside
    `folder`, else None: absolute names, `..` components anywhere, NUL bytes and empty names are
    refused (not_inside says which)."""
    if not_inside(folder, name) is not None:
        return None
    return Path(os.path.normpath(os.path.join(os.path.normpath(os.path.abspath(folder)), name)))


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
