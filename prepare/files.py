"""Files every stage writes the same way: paths kept inside their folder, atomic writes,
checksums, one writer per output folder (a lock naming its holder), the one publish protocol
(Publication / publish / finish_pending: several files of a folder replaced together, crash-safe)
and the test hook that kills a process between two steps of a save.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

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


@contextlib.contextmanager
def h5_written(path: str | os.PathLike) -> Iterator:
    """An h5py File (mode "w") that is built in memory and written to `path` (an atomic_path
    temporary) in one go when the block ends. HDF5 writing straight to a full disk crashes the
    process (it retries the failed write while freeing its objects, then segfaults); a plain write
    fails with an ordinary OSError (ENOSPC) instead."""
    import io

    import h5py
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        yield f
    with open(path, "wb") as out:
        out.write(buf.getbuffer())


def need_space(path: str | os.PathLike, nbytes: int) -> None:
    """OSError ENOSPC naming `path` unless its folder's file system has room for about `nbytes`
    (with 10% and 1 MB to spare): for writers that cannot fail cleanly part-way (Keras's HDF5)."""
    import errno
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.1 + (1 << 20):
        raise OSError(errno.ENOSPC, f"No space left on device ({nbytes >> 20} MB needed, "
                                    f"{free >> 20} MB free)", str(path))


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
    """True when `folder` is missing or holds nothing but a lock file, leftover temp files and an
    uncommitted publication (.pending/ without its commit point: finish_pending discards it)."""
    folder = Path(folder)
    return not folder.exists() or all(p.name == LOCK_FILE or p.name.startswith(".tmp-") or
                                      (p.name == PENDING and pending_state(folder) == "uncommitted")
                                      for p in folder.iterdir())


def fault_point(label: str) -> None:
    """Test hook: die here like kill -9 when $SHOWTELL_FAULT names this point (used by the
    kill-and-resume tests to stop a process between two steps of a save)."""
    if os.environ.get("SHOWTELL_FAULT") == label:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


# ---- one publish protocol: stage, commit point, move into place ----------------------------------
PENDING = ".pending"              # FOLDER/.pending/: the entries of a publication being staged
COMMIT_POINT = ".commit.json"     # FOLDER/.pending/.commit.json: its presence commits the publication
_REPLACED = ".replaced"           # FOLDER/.pending/.replaced/: folders a committed publication replaces
_RESERVED = {PENDING, LOCK_FILE, COMMIT_POINT, _REPLACED}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                     # some file systems cannot sync a folder
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.is_symlink():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        for d in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
            _fsync_dir(d)
    else:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def tree_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder: its files' relative names and contents, in sorted order."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def read_record(path: str | os.PathLike) -> dict[str, str]:
    """The checksums a record file lists: name -> sha256. A `.json` record is {"files": {name:
    sha256}, ...}; any other is sha256sum's text format (`HEX  NAME` a line). Missing: {}."""
    path = Path(path)
    if not path.is_file():
        return {}
    if path.suffix == ".json":
        try:
            files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{path}: not a valid checksum record ({e}); the folder is damaged: restore it "
                            f"from a copy or make it again") from None
        return dict(files) if isinstance(files, dict) else {}
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out[parts[1].strip().lstrip("*")] = parts[0]
    return out


def _write_record(path: Path, old: Path, checksums: dict[str, str]) -> None:
    """A record listing `old`'s checksums updated with `checksums`, in `old`'s format."""
    if path.suffix == ".json":
        try:
            doc = json.loads(old.read_text(encoding="utf-8")) if old.is_file() else {}
        except (ValueError, UnicodeDecodeError):
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        doc["files"] = {**read_record(old), **checksums}
        write_json_atomic(path, doc)
    else:
        files = {**read_record(old), **checksums}
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{sha}  {name}\n" for name, sha in files.items()), encoding="utf-8")


def _user_error(e: OSError, folder: Path) -> UserError:
    """An OSError while publishing into `folder`, as one line naming the folder and the fix."""
    import errno
    where = e.filename or folder
    fix = "re-run the same command: it finishes"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        why = f"no space left on device writing {where}; free space in {folder} and {fix}"
    elif e.errno == errno.EROFS:
        why = f"{where} is on a read-only file system; make {folder} writable (or choose another folder) and {fix}"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = f"permission denied writing {where}; make {folder} writable (or choose another folder) and {fix}"
    else:
        why = f"cannot write {where} ({e.strerror or e}); fix that and {fix}"
    return UserError(f"publishing into {folder} failed: {why}")


def _is_ours(e: BaseException, folder: Path) -> bool:
    """Whether an exception raised while staging is a failure to write into `folder`."""
    import errno
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)):
        return True
    if e.filename:
        try:
            return os.path.commonpath([os.path.abspath(e.filename), os.path.abspath(folder)]) == \
                os.path.abspath(folder)
        except ValueError:
            return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _apply(folder: Path, label: str) -> None:
    """Move a committed publication's entries into place in their order, delete what it removes,
    the record last, then the staging folder. Idempotent: a kill anywhere is finished by a rerun."""
    stage = folder / PENDING
    point = json.loads((stage / COMMIT_POINT).read_text(encoding="utf-8"))
    record = point.get("record")
    names = [n for n, _ in point["entries"] if n != record]
    for i, name in enumerate(names + ([record] if record else [])):
        if name == record:
            for gone in point.get("remove", []):
                _remove(folder / gone)
        src, dst = stage / name, folder / name
        if not os.path.lexists(src):
            continue                             # moved before a kill
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dst) and ((dst.is_dir() and not dst.is_symlink()) or src.is_dir()):
            trash = stage / _REPLACED
            trash.mkdir(exist_ok=True)
            os.replace(dst, trash / str(i))      # a folder cannot be renamed onto another: set it aside
        os.replace(src, dst)
        fault_point(f"{label}:moved-one")
    if not record:
        for gone in point.get("remove", []):
            _remove(folder / gone)
    _fsync_dir(folder)
    shutil.rmtree(stage)


def pending_state(folder: str | os.PathLike) -> str | None:
    """None (no publication pending), "committed" (finish_pending completes it) or "uncommitted"
    (finish_pending discards it)."""
    stage = Path(folder) / PENDING
    if not stage.exists():
        return None
    return "committed" if (stage / COMMIT_POINT).is_file() else "uncommitted"


def finish_pending(folder: str | os.PathLike, label: str = "publish") -> str | None:
    """Complete a publication a kill interrupted after its commit point, or discard one that has
    none. The caller holds the folder's lock. -> "finished", "discarded" or None (none pending)."""
    folder = Path(folder)
    state = pending_state(folder)
    if state is None:
        return None
    try:
        if state == "committed":
            _apply(folder, label)
            return "finished"
        shutil.rmtree(folder / PENDING)
        return "discarded"
    except OSError as e:
        raise _user_error(e, folder) from None


class Publication:
    """Replace several entries (files or folders) of FOLDER together; the caller holds its lock.

        with Publication(folder, "run", record="run.json") as pub:
            write_a(pub.path("a.h5")); write_b(pub.path("sub/b.json")); pub.discard("stale.json")

    Entries are staged in FOLDER/.pending/ (a pending publication is first finished or discarded:
    finish_pending). On leaving the block: every staged entry is fsynced, the commit point
    (.pending/.commit.json: each entry with its sha256, in order) is written, then the entries are
    moved into place in the order they were staged, the discarded names deleted and the record (if
    any: a checksum file listing each entry's sha256 with the previous record's other files, see
    read_record) moved last. A kill before the commit point leaves the old state (the next
    finish_pending discards the stage), after it the new one (the next finish_pending completes
    it). An exception in the block discards the stage; an OSError writing into FOLDER becomes a
    UserError naming the folder and the fix. Fault points: LABEL:staged, LABEL:committed,
    LABEL:moved-one (after each move)."""

    def __init__(self, folder: str | os.PathLike, label: str = "publish", *, record: str | None = None):
        self.folder, self.label, self.record = Path(folder), label, record
        self.dir = self.folder / PENDING
        self.names: list[str] = []
        self.removed: list[str] = []
        self.checksums: dict[str, str] = {}
        self._trees = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            finish_pending(self.folder, label)
            self.dir.mkdir()
        except OSError as e:
            raise _user_error(e, self.folder) from None

    def _check(self, name: str) -> str:
        if inside(self.folder, name) is None or Path(name).parts[0] in _RESERVED or name == self.record:
            raise ValueError(f"cannot publish {name!r} into {self.folder}")
        return Path(name).as_posix()

    def path(self, name: str) -> Path:
        """Where to write entry `name` (a relative path; its folders are made)."""
        name = self._check(name)
        if name not in self.names:
            self.names.append(name)
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def tree(self, write: Callable[[Path], None]) -> list[str]:
        """write(folder) fills a new folder; each of its top-level entries becomes a staged entry."""
        self._trees += 1
        scratch = self.dir / f".tree-{self._trees}"
        write(scratch)
        names = sorted(p.name for p in scratch.iterdir())
        for n in names:
            os.replace(scratch / n, self.path(n))
        scratch.rmdir()
        return names

    def discard(self, name: str) -> None:
        """Delete `name` from FOLDER as part of the publication (when it is not staged)."""
        name = self._check(name)
        if name not in self.removed:
            self.removed.append(name)

    def commit(self) -> dict[str, str]:
        """Publish (see the class docstring); -> each published entry's sha256."""
        try:
            entries = [n for n in self.names if os.path.lexists(self.dir / n)]   # a writer may have given up
            for n in entries:
                _fsync_tree(self.dir / n)
                self.checksums[n] = tree_digest(self.dir / n)
            order = list(entries)
            if self.record:
                _write_record(self.dir / self.record, self.folder / self.record, self.checksums)
                order.append(self.record)
            for d in {(self.dir / n).parent for n in order}:
                _fsync_dir(d)
            fault_point(f"{self.label}:staged")
            point = {"entries": [[n, self.checksums.get(n) or tree_digest(self.dir / n)] for n in order],
                     "remove": [n for n in self.removed if n not in entries], "record": self.record}
            write_json_atomic(self.dir / COMMIT_POINT, point)            # the commit point
            _fsync_dir(self.dir)
            fault_point(f"{self.label}:committed")
            _apply(self.folder, self.label)
        except OSError as e:
            raise _user_error(e, self.folder) from None
        return dict(self.checksums)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Publication":
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if e is None:
            self.commit()
            return False
        if pending_state(self.folder) == "uncommitted":
            self.abort()
        if _is_ours(e, self.folder):
            raise _user_error(e, self.folder) from None
        return False


def publish(folder: str | os.PathLike, writers: dict[str, Callable[[Path], None]], *, label: str = "publish",
            record: str | None = None, remove=()) -> dict[str, str]:
    """Replace the named entries of `folder` together: writer(path) writes one (a file or a
    folder). See Publication; -> each entry's sha256."""
    with Publication(folder, label, record=record) as pub:
        for name, write in writers.items():
            write(pub.path(name))
        for name in remove:
            pub.discard(name)
    return pub.checksums


@contextlib.contextmanager
def waiting_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Wait for an exclusive lock on `folder` itself (its own file descriptor: no lock file is
    left in a shared folder such as the Keras cache)."""
    import fcntl
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
