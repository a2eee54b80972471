"""The run directory: checksums verified by readers, atomic multi-file commits, one writer."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from model.run import CONFIG, DECODER, ENCODER, RECORD, VOCAB, Run, load_run
from prepare.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *a: None)
TINY = {"embedding_size": 16, "lstm_units": 24, "dropout": 0.0}


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_every_file_is_recorded_and_verified(tiny_run):
    files = json.loads((tiny_run / RECORD).read_text())["files"]
    assert sorted(files) == sorted([CONFIG, VOCAB, "features_manifest.json", ENCODER, DECODER])
    Run(tiny_run).verify()


@pytest.mark.parametrize("damage", ["zero_bytes_in_weights", "shortened_vocab", "edited_config"])
def test_damaged_files_are_refused_by_readers(tiny_run, tmp_path, damage):
    run = _copy(tiny_run, tmp_path / "run")
    if damage == "zero_bytes_in_weights":
        b = bytearray((run / DECODER).read_bytes())
        b[len(b) // 2:len(b) // 2 + 4096] = bytes(4096)
        (run / DECODER).write_bytes(bytes(b))
        name = DECODER
    elif damage == "shortened_vocab":
        v = json.loads((run / VOCAB).read_text())
        v["words"], v["counts"] = v["words"][:-3], v["counts"][:-3]
        (run / VOCAB).write_text(json.dumps(v))
        name = VOCAB
    else:
        c = json.loads((run / CONFIG).read_text())
        c["model"]["dropout"] = 0.5
        (run / CONFIG).write_text(json.dumps(c))
        name = CONFIG
    with pytest.raises(UserError, match=rf"{name}: checksum differs from the one recorded in run.json"):
        load_run(run)


@pytest.mark.parametrize("name, content, msg", [(CONFIG, "{not json", "checksum differs"),
                                                 (VOCAB, None, "missing")])
def test_broken_or_missing_json_is_one_line(tiny_run, tmp_path, name, content, msg):
    run = _copy(tiny_run, tmp_path / "run")
    if content is None:
        (run / name).unlink()
    else:
        (run / name).write_text(content)
    with pytest.raises(UserError, match=msg) as e:
        load_run(run)
    assert "\n" not in str(e.value) and name in str(e.value)


COMMIT = """
import sys
sys.path.insert(0, sys.argv[1])
from model.run import Run
run = Run(sys.argv[2])
with run.lock():
    run.commit({n: (lambda p, n=n: p.write_text("new " + n)) for n in ("encoder.weights.h5", "best.weights.h5",
                                                                        "config.json")})
"""


@pytest.mark.parametrize("fault, new", [("run:staged", False), ("run:committed", True), ("run:moved-one", True)])
def test_a_kill_inside_a_commit_leaves_the_old_or_the_new_state_never_a_mix(tmp_path, fault, new):
    run = Run(tmp_path / "run")
    with run.lock():
        run.commit({n: (lambda p, n=n: p.write_text("old " + n)) for n in (ENCODER, DECODER, CONFIG)})
    r = subprocess.run([sys.executable, "-c", COMMIT, str(ROOT), str(run.path)], capture_output=True,
                       env={**os.environ, "SHOWTELL_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    run.verify((ENCODER, DECODER, CONFIG))             # a reader finishes (or discards) the interrupted save
    want = "new" if new else "old"
    assert [run.file(n).read_text() for n in (ENCODER, DECODER, CONFIG)] == [f"{want} {n}" for n in
                                                                             (ENCODER, DECODER, CONFIG)]
    assert not run.file(".pending").exists()


def test_a_train_killed_by_a_full_disk_leaves_a_folder_the_rerun_takes(tiny_dataset, tiny_features, tmp_path):
    """A kill (or ENOSPC) while staging the first commit leaves RUN/.pending/ with a partial file and
    no commit point: the folder is still free for a new run, and the same `model train` works."""
    from model.train import train
    out = tmp_path / "run"
    (out / ".pending").mkdir(parents=True)
    (out / ".pending" / CONFIG).write_text('{"mod')           # the disk filled up here
    (out / ".lock").write_text("")
    (out / ".tmp-best.weights.h5.x").write_bytes(b"half")
    assert Run(out).is_free_for_new_run() and not (out / ".pending").exists()
    (out / ".pending").mkdir()
    (out / ".pending" / ENCODER).write_bytes(b"partial")
    train(tiny_dataset, out, model_overrides=TINY, train_overrides={"max_steps": 1, "samples": 0}, **quiet)
    Run(out).verify()
    assert not (out / ".pending").exists()


def test_an_oserror_during_a_commit_is_a_user_error_and_the_rerun_finishes(tmp_path):
    import errno
    run = Run(tmp_path / "run")
    with run.lock():
        run.commit({n: (lambda p, n=n: p.write_text("old " + n)) for n in (ENCODER, CONFIG)})

    def full(p):
        p.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device", str(p))
    with pytest.raises(UserError, match=rf"{run.path} failed: no space left on device writing .*{ENCODER}; free "
                                        r"space in .* and re-run the same command: it finishes"):
        run.commit({CONFIG: lambda p: p.write_text("new"), ENCODER: full})
    run.verify((ENCODER, CONFIG))
    assert run.file(CONFIG).read_text() == "old " + CONFIG
    run.commit({CONFIG: lambda p: p.write_text("new")})
    run.verify((ENCODER, CONFIG))


def test_a_second_writer_is_refused_naming_the_holder(tiny_dataset, tiny_features, tmp_path):
    from model.train import train
    from prepare.files import exclusive_lock
    out = tmp_path / "run"
    with exclusive_lock(out):                  # as another process would hold it
        with pytest.raises(UserError, match=rf"in use by another process \(pid {os.getpid()} .*choose another --out"):
            train(tiny_dataset, out, model_overrides=TINY, train_overrides={"epochs": 1}, **quiet)


@pytest.mark.parametrize("overrides, msg", [
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"checkpoint_every": 0}, "--checkpoint-every 0: must be at least 1"),
    ({"epochs": -1}, "--epochs -1: must be at least 1"),
    ({"lr": -1.0}, "--lr -1.0: must be above 0"),
    ({"optimizer": "rmsprop"}, "--optimizer rmsprop: must be adam or sgd"),
])
def test_a_bad_flag_is_refused_before_anything_is_written(tiny_dataset, tiny_features, tmp_path, overrides, msg):
    from model.train import train
    with pytest.raises(UserError, match=msg):
        train(tiny_dataset, tmp_path / "run", model_overrides=TINY, train_overrides=overrides, **quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, msg", [({"dropout": 1.5}, "--dropout 1.5: must be in"),
                                            ({"lstm_units": 0}, "--lstm-units 0: must be at least 1")])
def test_a_bad_model_flag_is_refused_before_anything_is_written(tiny_dataset, tiny_features, tmp_path, overrides, msg):
    from model.train import train
    with pytest.raises(UserError, match=msg):
        train(tiny_dataset, tmp_path / "run", model_overrides={**TINY, **overrides}, **quiet)
    assert not (tmp_path / "run").exists()


def test_sgd_defaults_to_im2txt_learning_rate(tiny_dataset, tiny_features, tmp_path):
    from model.train import train
    train(tiny_dataset, tmp_path / "run", model_overrides=TINY,
          train_overrides={"optimizer": "sgd", "max_steps": 1, "samples": 0}, **quiet)
    assert json.loads((tmp_path / "run" / CONFIG).read_text())["train"]["lr"] == 2.0


@pytest.mark.slow
def test_model_cli_trains_a_run_and_refuses_bad_flags_in_one_line(tiny_dataset, tiny_features, tmp_path):
    base = [sys.executable, "-m", "model", "train", "--data", str(tiny_dataset), "--quiet",
            "--embedding-size", "8", "--lstm-units", "8", "--epochs", "1", "--samples", "0"]
    r = subprocess.run(base + ["--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "I0000" not in r.stderr and "oneDNN" not in r.stderr      # TensorFlow's start-up notices filtered
    Run(tmp_path / "run").verify()
    r = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--dropout", "1.5"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --dropout 1.5: must be in [0, 1)"
    assert not (tmp_path / "bad").exists()
    r = subprocess.run([sys.executable, "-m", "model", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "{train,finetune,scst,bench-reward,bench}" in r.stdout
