"""What every `python -m <stage>` entry point shares: one-line errors instead of tracebacks and
TensorFlow's start-up noise filtered out of stderr."""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable, Iterator

from prepare.errors import UserError

def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; turn UserError into `error: ...` on stderr and exit code 2.
    TensorFlow's start-up notices (oneDNN, CUDA probing, CPU features) are filtered out of stderr."""
    code = 2
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
    raise SystemExit(code or 0)


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


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Pass fd 2 through a filter that drops TensorFlow's C++ start-up notices (which no log-level
    variable silences in TF 2.21); everything else, progress bars included, goes through at once."""
    import threading
    sys.stderr.flush()
    _TERMINAL.append(os.isatty(2))
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
        _TERMINAL.pop()
