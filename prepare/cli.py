"""What every `python -m <stage>` entry point shares: one-line errors instead of tracebacks and
TensorFlow's start-up noise filtered out of stderr."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from typing import Callable, Iterator

from prepare.errors import UserError

def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; turn UserError into `error: ...` on stderr and exit code 2, and so an
    OSError a user causes (no space, read-only, permission, name too long: user_os_error) with the
    path and the fix; any other error keeps its traceback (a bug).
    TensorFlow's start-up notices (oneDNN, CUDA probing, CPU features) are filtered out of stderr."""
    code = 2
    disk = False
    import logging   # matplotlib (Keras imports it) warns in two lines about an unwritable ~/.config and
    logging.getLogger("matplotlib").setLevel(logging.ERROR)   # then uses a temp folder: not the user's business
    with native_noise_filtered():
        try:
            code = main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print("interrupted: partial outputs were kept as resumable work files (see above)", file=sys.stderr)
            code = 130
        except Exception as e:                     # noqa: BLE001 - re-raised unless a user caused it
            line = user_os_error(e, sys.argv[1:] if argv is None else argv)
            if line is None:
                raise                              # not one a user causes: a bug, keep its traceback
            print(f"error: {line}", file=sys.stderr)
            code, disk = 2, True
    if disk:
        # h5py objects a failed write left behind can crash the interpreter as it tears them down
        # (HDF5 retries the write while closing): leave without running their destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code or 0)


# errno -> what to do; {path} is the file at fault, {flag} the flag whose folder holds it
_FIXES = {
    errno.ENOSPC: "no space left on the device of {path}: free space there (or choose another {flag}) and "
                  "{again}",
    errno.EROFS: "{path} is on a read-only file system: choose a writable {flag}",
    errno.EACCES: "permission denied on {path}: give this user access to it or choose another {flag}",
    errno.ENAMETOOLONG: "file name too long: {path}: choose a shorter {flag} (or shorter file names)",
    errno.ENOTDIR: "a part of {path} is a file, not a folder: choose another {flag}",
}
_FIXES[errno.EPERM] = _FIXES[errno.EACCES]
_FIXES[errno.EFBIG] = ("{path} grew past the file system's largest file: choose another {flag} on a file "
                       "system without that limit")
if hasattr(errno, "EDQUOT"):
    _FIXES[errno.EDQUOT] = ("disk quota exceeded writing {path}: free space in your quota (or choose another "
                            "{flag}) and {again}")
RERUN = "re-run the same command: it picks up where it stopped"


def user_os_error(e: BaseException, argv: list[str], *, where: str | None = None, flag: str | None = None,
                  again: str = RERUN) -> str | None:
    """The one line for an OSError a user causes (no space, read-only, permission, name too long,
    a file where a folder should be): the path at fault and the fix; None for any other error.
    h5py reports a failed write as an OSError or RuntimeError whose text holds `errno = N` and
    `filename = '...'`; an error without a file name is pinned on the file a frame of its
    traceback was writing, else on --out. A caller that knows better names the folder (`where`,
    for an error without a file name), the setting that chooses it (`flag`, e.g. TMPDIR) and what
    to do once it is fixed (`again`; default: re-run the same command)."""
    if not isinstance(e, (OSError, RuntimeError)) and not type(e).__module__.startswith("tensorflow"):
        return None
    text = str(e)
    num = e.errno if isinstance(e, OSError) else None
    m = re.search(r"errno = (\d+)", text)                        # h5py
    if m and (num is None or num not in _FIXES):
        num = int(m.group(1))
    path = getattr(e, "filename", None)
    if num not in _FIXES and type(e).__module__.startswith("tensorflow"):   # TF's OpError: "PATH; No space left ..."
        for n in _FIXES:
            m = re.search(rf"(\S+); {re.escape(os.strerror(n))}", text)
            if m:
                num, path = n, m.group(1)
                break
    if num not in _FIXES:
        return None
    if path is None:
        m = re.search(r"filename = '([^']+)'", text)
        path = m.group(1) if m else where or _path_in_traceback(e)
    path = os.fsdecode(path) if path is not None else _flag_value(argv, "--out")
    if path and f"{os.sep}.pending{os.sep}" in path:               # a publication's stage: name its folder
        path = path.split(f"{os.sep}.pending{os.sep}")[0]
    if path and os.path.basename(path).startswith(".tmp-"):    # atomic_path's temporary: name its target
        path = os.path.join(os.path.dirname(path), re.sub(r"^\.tmp-(.+)\.[^.]+$", r"\1", os.path.basename(path)))
    flag, run_without_out = (flag, False) if flag else _flag_of(path, argv)
    if run_without_out:                 # a default output inside --run (infer evaluate's RUN/eval-SPLIT)
        if num in (errno.EROFS, errno.EACCES, errno.EPERM):
            return (f"{_flag_value(argv, '--run')} is read-only here ({os.strerror(num).lower()}: {path}); "
                    f"pass --out to write elsewhere")
        flag = "--out"
    return _FIXES[num].format(path=path or "an output file", flag=flag, again=again)


def _path_in_traceback(e: BaseException) -> str | None:
    """The file the innermost frame of e's traceback that had one open was writing."""
    import io
    tb, found = e.__traceback__, None
    while tb is not None:
        for v in list(tb.tb_frame.f_locals.values()):
            try:
                name = (v.name if isinstance(v, io.IOBase) else
                        v.filename if type(v).__module__.startswith("h5py") else None)
            except Exception:                   # a closed or broken h5py object
                name = None
            if isinstance(name, (str, bytes)):
                found = os.fsdecode(name)
        tb = tb.tb_next
    return found


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def _flag_of(path: str | None, argv: list[str]) -> tuple[str, bool]:
    """(the flag whose value holds `path`, default --out; whether that is --run with no --out given:
    a default output inside the run folder)."""
    best = None
    if path:
        full = os.path.abspath(path)
        for i, a in enumerate(argv[:-1]):
            if a.startswith("--") and "=" not in a and not argv[i + 1].startswith("--"):
                v = os.path.abspath(argv[i + 1])
                with contextlib.suppress(ValueError):
                    if os.path.commonpath([v, full]) == v and (best is None or len(v) > len(best[1])):
                        best = (a, v)                # the deepest folder holding it
    if best is None:
        return "--out", False
    return best[0], best[0] == "--run" and _flag_value(argv, "--out") is None


_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                    rb"|[IWE]\d{4} [\d:.]+\s+\d+ (port|cudart_stub|cuda_platform|cpu_feature_guard|cuda_executor|"
                    rb"cuda_diagnostics|gpu_device)\.cc:\d+\]"
                    rb"|To enable the following instructions: )")


_NOISE_STARTS = (b"WARNING: All log", b"I0000", b"W0000", b"E0000", b"To enable the following")


_TERMINAL: list[bool] = []    # whether stderr was a terminal before native_noise_filtered piped it


def stderr_is_terminal() -> bool:
    """Is the user's stderr a terminal? (Asked of the real one while run_cli filters it.)"""
    return _TERMINAL[-1] if _TERMINAL else os.isatty(2)


def progress_bar(wanted: bool = True, **kwargs):
    """A tqdm bar on stderr when `wanted` and stderr is a terminal; in a piped log or file it is
    off (no carriage-return updates: the stages print their own summary lines)."""
    from tqdm import tqdm
    return tqdm(disable=not (wanted and stderr_is_terminal()), **kwargs)


_REAL_STDERR: list[int] = []    # while native_noise_filtered runs: the terminal's (or log's) own fd


def real_stderr() -> int:
    """The fd that reaches the user's stderr without this process's filter thread (which cannot run
    while a native call holds the interpreter): for a helper process that must be heard then."""
    return _REAL_STDERR[-1] if _REAL_STDERR else 2


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Pass fd 2 through a filter that drops TensorFlow's C++ start-up notices (which no log-level
    variable silences in TF 2.21); everything else, progress bars included, goes through at once."""
    import threading
    sys.stderr.flush()
    _TERMINAL.append(os.isatty(2))
    saved = os.dup(2)
    _REAL_STDERR.append(saved)
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
        _TERMINAL.pop()
        _REAL_STDERR.pop()
