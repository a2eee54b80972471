"""prepare/cli.py: progress bars on a terminal only, so a piped log holds no carriage-return updates."""
import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYNTH = [sys.executable, "-m", "prepare", "synth", "--train", "40", "--val", "4", "--test", "4", "--size", "64"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_piped_log_gets_no_progress_updates(tmp_path):
    r = subprocess.run([*SYNTH, "--out", str(tmp_path / "d")], cwd=ROOT, capture_output=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stderr and b"\r" not in r.stdout       # tqdm's updates would start with \r
    assert b"wrote 48 images" in r.stdout                        # the summary line still comes


def _stderr_on_a_terminal(args) -> tuple[int, bytes]:
    """Run `args` with stderr on a pseudo-terminal; -> (exit code, what the terminal received)."""
    parent, child = pty.openpty()
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=child, env=_env())
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:                  # EIO once the child side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    return p.wait(), out


def test_a_terminal_gets_progress_bars(tmp_path):
    """stderr on a pseudo-terminal: the bars are drawn (through run_cli's noise filter, which
    replaces fd 2 by a pipe: the bar must ask the real stderr, not the pipe)."""
    rc, out = _stderr_on_a_terminal([*SYNTH, "--out", str(tmp_path / "d")])
    assert rc == 0, out
    assert b"synth train" in out and b"\r" in out


def test_quiet_turns_bars_off_on_a_terminal_too(tmp_path):
    rc, out = _stderr_on_a_terminal([*SYNTH, "--out", str(tmp_path / "d"), "--quiet"])
    assert rc == 0, out
    assert b"synth train" not in out
