"""prepare.files' publish protocol, generically: kill -9 at each of its fault points, then the next
process's finish_pending gives the old state or the new one, never a mix; a publish after a kill works."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prepare.errors import UserError
from prepare.files import (PENDING, Publication, finish_pending, is_empty_folder, pending_state, publish,
                           read_record, sha256_file)

ROOT = Path(__file__).resolve().parents[1]

PUBLISH = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from prepare.files import publish
def tree(d):
    d.mkdir()
    (d / "inner.txt").write_text("new tree")
publish(sys.argv[2], {"a.txt": lambda p: p.write_text("new a"), "sub/b.txt": lambda p: p.write_text("new b"),
                      "tree": tree, "last.json": lambda p: p.write_text("new last")},
        label="publish", record="record.json", remove=["stale.txt"])
"""


def _state(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "record.json" and p.name != ".lock"}


def _old(folder: Path) -> dict:
    def tree(d):
        d.mkdir()
        (d / "inner.txt").write_text("old tree")
        (d / "only-old.txt").write_text("old only")
    publish(folder, {"a.txt": lambda p: p.write_text("old a"), "sub/b.txt": lambda p: p.write_text("old b"),
                     "tree": tree, "last.json": lambda p: p.write_text("old last"),
                     "stale.txt": lambda p: p.write_text("stale")}, record="record.json")
    return _state(folder)


NEW = {"a.txt": "new a", "last.json": "new last", "sub/b.txt": "new b", "tree/inner.txt": "new tree"}


def test_publish_replaces_files_and_folders_and_records_their_checksums(tmp_path):
    old = _old(tmp_path)
    assert old["tree/only-old.txt"] == "old only"
    rec = read_record(tmp_path / "record.json")
    assert rec["a.txt"] == sha256_file(tmp_path / "a.txt") and set(rec) >= {"a.txt", "sub/b.txt", "tree", "last.json"}
    r = subprocess.run([sys.executable, "-c", PUBLISH, str(ROOT), str(tmp_path)], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert _state(tmp_path) == NEW                     # the folder replaced whole, the stale file removed
    rec2 = read_record(tmp_path / "record.json")
    assert rec2["a.txt"] == sha256_file(tmp_path / "a.txt") and rec2["stale.txt"] == rec["stale.txt"]
    assert not (tmp_path / PENDING).exists()


@pytest.mark.parametrize("fault, new", [("publish:staged", False), ("publish:committed", True),
                                        ("publish:moved-one", True)])
def test_a_kill_at_each_fault_point_leaves_the_old_or_the_new_state_never_a_mix(tmp_path, fault, new):
    old = _old(tmp_path)
    r = subprocess.run([sys.executable, "-c", PUBLISH, str(ROOT), str(tmp_path)], capture_output=True,
                       env={**os.environ, "SHOWTELL_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert pending_state(tmp_path) == ("committed" if new else "uncommitted")
    assert finish_pending(tmp_path) == ("finished" if new else "discarded")
    assert _state(tmp_path) == (NEW if new else old)
    assert not (tmp_path / PENDING).exists()
    if new:
        assert read_record(tmp_path / "record.json")["a.txt"] == sha256_file(tmp_path / "a.txt")
    # a second publish after the kill works
    r = subprocess.run([sys.executable, "-c", PUBLISH, str(ROOT), str(tmp_path)], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert _state(tmp_path) == NEW and finish_pending(tmp_path) is None


def test_a_kill_while_finishing_is_finished_by_the_next_process(tmp_path):
    _old(tmp_path)
    env = {**os.environ, "SHOWTELL_FAULT": "publish:committed"}
    assert subprocess.run([sys.executable, "-c", PUBLISH, str(ROOT), str(tmp_path)], env=env).returncode < 0
    finish = ("import sys; sys.path.insert(0, sys.argv[1]); from prepare.files import finish_pending; "
              "finish_pending(sys.argv[2], 'publish')")
    r = subprocess.run([sys.executable, "-c", finish, str(ROOT), str(tmp_path)],
                       env={**os.environ, "SHOWTELL_FAULT": "publish:moved-one"})
    assert r.returncode == -signal.SIGKILL
    assert finish_pending(tmp_path) == "finished" and _state(tmp_path) == NEW


def test_a_failing_writer_leaves_the_old_state(tmp_path):
    old = _old(tmp_path)

    def boom(p):
        p.write_text("half")
        raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError, match="writer failed"):
        publish(tmp_path, {"a.txt": lambda p: p.write_text("new a"), "sub/b.txt": boom})
    assert _state(tmp_path) == old and not (tmp_path / PENDING).exists()


def test_an_oserror_while_publishing_is_one_line_naming_the_folder_and_the_fix(tmp_path):
    old = _old(tmp_path)

    def full(p):
        p.write_text("par")
        raise OSError(errno.ENOSPC, "No space left on device", str(p))
    with pytest.raises(UserError, match=rf"publishing into {tmp_path} failed: no space left on device writing "
                                        rf".*a\.txt; free space in .* and re-run the same command: it finishes"):
        publish(tmp_path, {"a.txt": full})
    assert _state(tmp_path) == old and finish_pending(tmp_path) is None


def test_an_uncommitted_stage_is_discarded_and_counts_as_empty(tmp_path):
    (tmp_path / ".lock").write_text("")
    (tmp_path / PENDING).mkdir()
    (tmp_path / PENDING / "best.weights.h5").write_bytes(b"partial")      # a disk filled up mid-write
    assert is_empty_folder(tmp_path)
    assert finish_pending(tmp_path) == "discarded" and is_empty_folder(tmp_path)
    (tmp_path / PENDING).mkdir()
    (tmp_path / PENDING / ".commit.json").write_text(json.dumps({"entries": [], "remove": [], "record": None}))
    assert not is_empty_folder(tmp_path)             # a committed one is not ours to throw away


def test_entries_outside_the_folder_or_reserved_are_refused(tmp_path):
    with Publication(tmp_path) as pub:
        for bad in ("../x", "/etc/passwd", ".pending/x", ".lock", ".commit.json"):
            with pytest.raises(ValueError):
                pub.path(bad)
    assert not (tmp_path / PENDING).exists()
