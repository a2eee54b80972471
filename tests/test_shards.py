"""Sharded extraction (extract --num-shards N --shard-index I, then --merge): the merged cache equals a
single-process run's byte for byte; parts resume after kill -9; parts of other settings, missing or
damaged parts and bad flag combinations are refused with one line naming the shard or the flag."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from extract.cache import extract_features, read_manifest
from extract.shards import extract_sharded, part_folder, shard_rows
from prepare.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BROKEN_ROW = 5       # in block 1 (batch size 4): shard 1 of 2 and shard 1 of 3
# A random-init Lite0 at 64 px, grid features (float16 with a storage scale): 2x2x1280 an image
FLAGS = dict(encoder="efficientnet_lite0", weights="none", image_size=64, batch_size=4, features="grid")
CLI = ["--encoder", "efficientnet_lite0", "--weights", "none", "--image-size", "64", "--batch-size", "4",
       "--features", "grid", "--quiet"]
quiet = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train 20 images (5 blocks of 4, one unreadable), val 7 (a full block and one of 3)."""
    from prepare import synth
    from prepare.prepare_captions import prepare_captions
    d = tmp_path_factory.mktemp("shards")
    synth.generate(d, {"train": 20, "val": 7}, size=64, seed=5, progress=False)
    pairs = [(s, str(d / "annotations" / f"captions_{s}.json"), str(d / "images" / s)) for s in ("train", "val")]
    prepare_captions(d / "captions.h5", pairs=pairs, val_fraction=0, test_fraction=0, log=lambda *a: None)
    from prepare import captions_h5
    name = captions_h5.read_split(d / "captions.h5", "train").file_names[BROKEN_ROW]
    (d / name).write_text("not a picture")
    return d


@pytest.fixture(scope="module")
def single(data):
    """The single-process cache the merged ones must equal."""
    out = data / "single"
    m = extract_features(data / "captions.h5", out, **FLAGS, **quiet)
    assert [f["row"] for f in m["failed"]["train"]] == [BROKEN_ROW] and m["failed"]["val"] == []
    return out


def assert_same_cache(out: Path, ref: Path) -> None:
    files = sorted(p.name for p in ref.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == files
    for name in files:
        if name != "manifest.json":
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    m, r = read_manifest(out), read_manifest(ref)
    assert m["merged_from"]["num_shards"] >= 2
    ignore = {"seconds", "merged_from"}
    assert {k: v for k, v in m.items() if k not in ignore} == {k: v for k, v in r.items() if k not in ignore}
    assert not (out / ".shards").exists() and not (out / ".work").exists()


def test_shard_rows_are_every_nth_block_and_cover_each_row_once():
    for n, block, count in [(20, 4, 2), (20, 4, 3), (7, 4, 3), (1, 32, 5), (33, 32, 1)]:
        shares = [shard_rows(n, block, i, count) for i in range(count)]
        assert sorted(r for s in shares for r in s.tolist()) == list(range(n))
        for i, s in enumerate(shares):
            assert all((r // block) % count == i for r in s.tolist())
            assert s.tolist() == sorted(s.tolist())


def test_three_shards_merged_equal_a_single_run_and_odd_parts_are_refused(data, single):
    out = data / "three"
    for i in (0, 2):
        extract_sharded(data / "captions.h5", out, num_shards=3, shard_index=i, **FLAGS, **quiet)
    with pytest.raises(UserError, match=r"--merge: 1 of 3 parts are not finished: --shard-index 1; "):
        extract_sharded(data / "captions.h5", out, num_shards=3, merge=True, **FLAGS, **quiet)
    assert not (out / ".work").exists() and not (out / "manifest.json").exists()

    extract_sharded(data / "captions.h5", out, num_shards=3, shard_index=1, **{**FLAGS, "image_size": 72}, **quiet)
    with pytest.raises(UserError, match=r"--merge: the part of --shard-index 1 \(.*1-of-3\) was made with other "
                                        r"settings \(image_size: part has 72, now 64\)"):
        extract_sharded(data / "captions.h5", out, num_shards=3, merge=True, **FLAGS, **quiet)
    extract_sharded(data / "captions.h5", out, num_shards=3, shard_index=1, force=True, **FLAGS, **quiet)

    p1 = part_folder(out, 1, 3)
    saved = (p1 / "manifest.json").read_text()
    doc = json.loads(saved)
    doc["weights"]["sha256"] = "0" * 64                       # as a shard with another ImageNet file would record
    (p1 / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"encoder weights of --shard-index 1 differ from those of --shard-index 0"):
        extract_sharded(data / "captions.h5", out, num_shards=3, merge=True, **FLAGS, **quiet)
    (p1 / "manifest.json").write_text(saved)

    damaged = p1 / "train.grid.npy"
    good = damaged.read_bytes()
    damaged.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(UserError, match=r"1-of-3/train\.grid\.npy does not match the checksum its part recorded.*"
                                        r"re-run --shard-index 1"):
        extract_sharded(data / "captions.h5", out, num_shards=3, merge=True, **FLAGS, **quiet)
    assert not (part_folder(out, 0, 3) / "train.grid.npy").exists()     # part 0's rows were merged: freed
    damaged.write_bytes(good)
    lines = []
    extract_sharded(data / "captions.h5", out, num_shards=3, merge=True, **FLAGS, progress=False, log=lines.append)
    assert any("resuming the unfinished merge" in ln for ln in lines)
    assert_same_cache(out, single)
    lines = []
    extract_features(data / "captions.h5", out, **FLAGS, progress=False, log=lines.append)    # an ordinary cache
    assert "reused" in lines[0]


def _cli(args: list, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SHOWTELL_FAULT"}
    if fault:
        env["SHOWTELL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "extract", *map(str, args), *CLI], cwd=ROOT, capture_output=True,
                          text=True, env=env)


@pytest.mark.slow
def test_two_shards_a_part_and_the_merge_killed_resume_to_a_single_runs_cache(data, single):
    out = data / "two"
    base = ["--captions", data / "captions.h5", "--out", out, "--num-shards", "2"]
    extract_sharded(data / "captions.h5", out, num_shards=2, shard_index=0, **FLAGS, **quiet)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from extract.shards import extract_sharded; "
            "extract_sharded(sys.argv[2], sys.argv[3], num_shards=2, shard_index=1, encoder='efficientnet_lite0', "
            "weights='none', image_size=64, batch_size=4, features='grid', chunk_batches=1, progress=False)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(data / "captions.h5"), str(out)],
                       capture_output=True, env={**os.environ, "SHOWTELL_FAULT": "extract:train:chunk"})
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    work = part_folder(out, 1, 2) / ".work"
    prog = json.loads((work / "train.progress.json").read_text())
    assert prog == {"done": 4, "failed": {str(BROKEN_ROW): prog["failed"][str(BROKEN_ROW)]}}  # its 1st block, row 5 in it

    r = _cli([*base, "--merge"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: --merge: 1 of 2 parts are not finished: --shard-index 1 (started, unfinished "
                           "or still running: 1); run those with the same flags and --num-shards 2")

    r = _cli([*base, "--shard-index", "1"])
    assert r.returncode == 0 and "resuming the unfinished extraction" in r.stdout, r.stderr[-2000:]
    r = _cli([*base, "--merge"], fault="extract:merge:train:part")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert json.loads((out / ".work" / "train.progress.json").read_text())["merged"] == [0]   # killed after part 0
    assert not (out / "manifest.json").exists()
    r = _cli([*base, "--merge"])
    assert r.returncode == 0 and "resuming the unfinished merge" in r.stdout, r.stderr[-2000:]
    assert_same_cache(out, single)
    r = _cli([*base, "--shard-index", "0"])                      # a re-run task after the merge: nothing to do
    assert r.returncode == 0 and "nothing to do" in r.stdout and not (out / ".shards").exists(), r.stderr[-2000:]


@pytest.mark.parametrize("kw, msg", [
    (dict(num_shards=0, shard_index=0), "--num-shards must be at least 1 (got 0)"),
    (dict(num_shards=3, shard_index=3), "--shard-index must be between 0 and 2 (got 3)"),
    (dict(num_shards=3, shard_index=-1), "--shard-index must be between 0 and 2 (got -1)"),
    (dict(num_shards=3, shard_index=1, merge=True), "--merge assembles every part: drop --shard-index 1"),
    (dict(num_shards=3), "--num-shards 3: pass --shard-index I (0 to 2) to extract one part, or --merge"),
    (dict(num_shards=None, shard_index=1), "--shard-index 1 needs --num-shards N"),
    (dict(num_shards=None, merge=True), "--merge needs --num-shards N"),
])
def test_bad_shard_flags_are_refused_before_anything_is_written(data, tmp_path, kw, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        extract_sharded(data / "captions.h5", tmp_path / "f", **kw, **FLAGS, **quiet)
    assert not (tmp_path / "f").exists()


def test_a_bad_shard_flag_on_the_command_line_is_one_line(tmp_path):
    r = _cli(["--captions", tmp_path / "none.h5", "--out", tmp_path / "f", "--num-shards", "2", "--shard-index", "2"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line, = r.stderr.strip().splitlines()
    assert line == "error: --shard-index must be between 0 and 1 (got 2); the parts of --num-shards 2 are numbered from 0"
    assert not (tmp_path / "f").exists()


def test_merging_parts_of_another_count_names_it(data, tmp_path):
    out = tmp_path / "f"
    (part_folder(out, 0, 2) / ".work").mkdir(parents=True)          # a started part of --num-shards 2
    with pytest.raises(UserError, match=r"--merge: 3 of 3 parts are not finished: --shard-index 0-2; .*"
                                        r"also holds parts 0-of-2: another --num-shards\?"):
        extract_sharded(data / "captions.h5", out, num_shards=3, merge=True, **FLAGS, **quiet)
