"""--strategy multiworker: TF_CONFIG checked in one line, each worker feeding its own part of every
global batch, two CPU workers on 127.0.0.1 equal to one process, a killed worker resumed by the
same command, a missing peer given up on after --peer-timeout."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from model.distribute import Cluster, read_tf_config, replica_rows
from prepare.errors import UserError
from tests.conftest import ROOT

TINY = {"embedding_size": 16, "lstm_units": 32, "dropout": 0.0}
TRAIN = {"epochs": 2, "batch_size": 16, "checkpoint_every": 4, "samples": 0, "lr": 5e-3}
quiet = dict(progress=False, log=lambda *a: None)


def tf_config(workers, index=0, type_="worker") -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": type_, "index": index}})


@pytest.mark.parametrize("text, says", [
    (None, "TF_CONFIG is not set"),
    ("{cluster", "not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "['ps'] are not used"),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}', "'b' is not host:port"),
    ('{"cluster": {"worker": ["a:1", "a:99999"]}, "task": {"type": "worker", "index": 0}}', "not host:port"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "addresses repeat"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}}', 'no "task"'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief'"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "task index 2 is not"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": true}}', "task index True"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker"}}', "task index None"),
])
def test_a_bad_tf_config_is_one_line_naming_what_to_fix(text, says):
    with pytest.raises(UserError) as e:
        read_tf_config(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_good_tf_config_names_the_workers_and_this_one():
    c = read_tf_config(tf_config(["10.0.0.1:2222", "10.0.0.2:2222", "[::1]:3333"], index=1))
    assert c == Cluster(("10.0.0.1:2222", "10.0.0.2:2222", "[::1]:3333"), 1)
    assert c.peers == ["10.0.0.1:2222", "[::1]:3333"]


@pytest.mark.parametrize("n_rows, replicas", [(16, 2), (17, 2), (16, 3), (3, 4), (1, 1)])
def test_replicas_split_a_global_batch_into_contiguous_pieces_in_order(n_rows, replicas):
    rows = np.random.default_rng(n_rows).permutation(100)[:n_rows]
    parts = replica_rows(rows, replicas)
    assert len(parts) == replicas
    np.testing.assert_array_equal(np.concatenate(parts), rows)          # nothing lost, nothing read twice
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_multiworker_without_tf_config_writes_nothing(tiny_dataset, tiny_features, tmp_path, monkeypatch):
    from model.train import train
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG is not set"):
        train(tiny_dataset, tmp_path / "run", model_overrides=TINY, train_overrides={**TRAIN, "strategy": "multiworker"},
              **quiet)
    assert not (tmp_path / "run").exists()


def test_finetune_under_multiworker_without_tf_config_writes_nothing(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    from model.finetune import finetune
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG is not set"):
        finetune(tiny_run, tiny_dataset, tmp_path / "ft", overrides={"strategy": "multiworker"}, **quiet)
    assert not (tmp_path / "ft").exists()


def test_a_run_may_resume_under_another_strategy():
    from model.train import RESUMABLE_CHANGES
    assert {"strategy", "peer_timeout"} <= RESUMABLE_CHANGES       # the steps are the same on any replica count


# ---- worker processes ----------------------------------------------------------------------------

WORKER = r"""
import json, os, signal, sys
sys.path.insert(0, {root!r})
from model.data import CaptionSet
from model.train import DecoderPhase
from prepare.cli import run_cli
seen = {{"train": 0, "val": 0}}
batch = CaptionSet.batch
def counted(self, rows, *grouped):
    seen[self.split] += len(rows)
    return batch(self, rows, *grouped)
CaptionSet.batch = counted
kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
step = DecoderPhase.train_step
def killable(self, b, s):
    if kill_at and s == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)          # this worker dies between two steps, as a machine would
    return step(self, b, s)
DecoderPhase.train_step = killable
import atexit
atexit.register(lambda: print("ROWS " + json.dumps(seen), flush=True))
from model.__main__ import main
run_cli(main, sys.argv[1:])
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def start_workers(tmp_path, data, out, n=2, kill=None, peer_timeout=120, env_extra=None):
    """n worker processes of `python -m model train --strategy multiworker` on 127.0.0.1."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    procs = []
    for i in range(n):
        env = {**os.environ, "TF_CONFIG": tf_config(workers, i), "TF_CPP_MIN_LOG_LEVEL": "2",
               "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
        if kill and kill[0] == i:
            env["KILL_AT_STEP"] = str(kill[1])
        cmd = [sys.executable, str(script), "train", "--data", str(data), "--out", str(out), "--quiet",
               "--strategy", "multiworker", "--peer-timeout", str(peer_timeout), *flags({**TINY, **TRAIN})]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def finish(procs, timeout=600):
    """-> (exit status, stdout, stderr) of each; a process still running after `timeout` is killed
    (with the others) and fails the test."""
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def rows_seen(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("ROWS "))[5:])


@pytest.fixture(scope="module")
def one_process(tiny_dataset, tiny_features, tmp_path_factory):
    from model.train import train
    return train(tiny_dataset, tmp_path_factory.mktemp("mw") / "ref", model_overrides=TINY, train_overrides=TRAIN,
                 **quiet)


def assert_same_history(got: list, ref: list):
    assert [h["step"] for h in got] == [h["step"] for h in ref]
    for g, r in zip(got, ref):
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
        assert g["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_two_workers_compute_the_steps_of_one_process_each_reading_half(tiny_dataset, one_process, tmp_path):
    from model.run import Run
    out = tmp_path / "run"
    (c0, o0, e0), (c1, o1, e1) = finish(start_workers(tmp_path, tiny_dataset, out))
    assert c0 == 0 and c1 == 0, (e0[-2000:], e1[-2000:])
    history = json.loads((out / "history.json").read_text())
    assert_same_history(history, one_process["history"])
    Run(out).verify()                                    # the chief's run directory is whole and checksummed
    r0, r1 = rows_seen(o0), rows_seen(o1)
    from extract.cache import read_manifest
    from model.data import CaptionSet
    m = read_manifest(tiny_dataset / "features")
    n_train = len(CaptionSet(tiny_dataset / "captions.h5", tiny_dataset / "features", "train", m))
    n_val = len(CaptionSet(tiny_dataset / "captions.h5", tiny_dataset / "features", "val", m))
    # each worker fed half of every global batch: together each caption once per epoch (+ the val passes)
    assert r0["train"] + r1["train"] == TRAIN["epochs"] * n_train
    assert abs(r0["train"] - r1["train"]) <= one_process["history"][-1]["step"]     # pieces differ by <= 1 row
    assert r0["val"] + r1["val"] == TRAIN["epochs"] * n_val
    assert "[worker 1]" in o1 and "[worker 1]" not in o0


@pytest.mark.slow
def test_a_killed_worker_is_resumed_by_the_same_command_on_every_worker(tiny_dataset, one_process, tmp_path):
    out = tmp_path / "run"
    kill_step = one_process["history"][0]["step"] + 3          # in the second epoch, after a checkpoint
    (c0, o0, e0), (c1, _, _) = finish(start_workers(tmp_path, tiny_dataset, out, kill=(1, kill_step)))
    assert c1 == -9
    assert c0 == 2, e0[-2000:]
    last = e0.strip().splitlines()[-1]
    assert last.startswith("error: multi-worker training stopped at step") and "start the same command again" in last
    assert "Traceback" not in e0
    (c0, o0, e0), (c1, _, e1) = finish(start_workers(tmp_path, tiny_dataset, out))
    assert c0 == 0 and c1 == 0, (e0[-2000:], e1[-2000:])
    assert "resuming" in o0
    assert_same_history(json.loads((out / "history.json").read_text()), one_process["history"])


@pytest.mark.slow
def test_a_worker_whose_peer_never_comes_gives_up_after_peer_timeout(tiny_dataset, tiny_features, tmp_path):
    p = start_workers(tmp_path, tiny_dataset, tmp_path / "run", n=2, peer_timeout=3)
    p[1].kill()                                                 # worker 1 never joins
    (c0, _, e0), = finish(p[:1], timeout=300)
    p[1].wait()
    assert c0 == -9                                             # ended by its watchdog ...
    line = e0.strip().splitlines()[-1]                          # ... after saying why
    assert "did not join within --peer-timeout 3 s" in line and "127.0.0.1:" in line
    assert not (tmp_path / "run").exists()                      # nothing written before the cluster is whole


# ---- model finetune under multiworker ------------------------------------------------------------

FT_WORKER = r"""
import json, sys
sys.path.insert(0, {root!r})
from model import finetune
seen = [0]
take = finetune.ImageStream.take
def counted(self, m):
    seen[0] += m
    return take(self, m)
finetune.ImageStream.take = counted
import atexit
atexit.register(lambda: print("IMAGES " + json.dumps(seen[0]), flush=True))
from prepare.cli import run_cli
from model.__main__ import main
run_cli(main, sys.argv[1:])
"""
# BatchNorm frozen and no augmentation: the steps are then exactly one process's (in training mode
# each replica normalises by its own images' statistics; augmentation draws per replica)
FT = {"epochs": 2, "batch_size": 8, "captions_per_image": 2, "checkpoint_every": 3, "samples": 0, "bn": "frozen"}


@pytest.mark.slow
def test_two_workers_finetune_as_one_process_each_decoding_half_the_images(tiny_dataset, tiny_run, tmp_path):
    from model.finetune import finetune
    from model.run import Run
    ref = finetune(tiny_run, tiny_dataset, tmp_path / "ref", overrides={**FT, "augment": False}, **quiet)
    script = tmp_path / "ft_worker.py"
    script.write_text(FT_WORKER.format(root=str(ROOT)))
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, str(script), "finetune", "--run", str(tiny_run), "--data",
                               str(tiny_dataset), "--out", str(out), "--quiet", "--strategy", "multiworker",
                               "--peer-timeout", "120", "--no-augment", *flags(FT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TF_CONFIG": tf_config(workers, i), "TF_CPP_MIN_LOG_LEVEL": "2",
                                   "CUDA_VISIBLE_DEVICES": ""}) for i in range(2)]
    (c0, o0, e0), (c1, o1, e1) = finish(procs)
    assert c0 == 0 and c1 == 0, (e0[-2000:], e1[-2000:])
    assert_same_history(json.loads((out / "history.json").read_text()), ref["history"])
    Run(out).verify()
    n0, n1 = (int(next(ln for ln in o.splitlines() if ln.startswith("IMAGES "))[7:]) for o in (o0, o1))
    from extract.cache import read_manifest
    from model.data import ImageCaptionSet
    n_train = len(ImageCaptionSet(tiny_dataset / "captions.h5", "train", read_manifest(tiny_dataset / "features")).rows)
    assert n0 + n1 == FT["epochs"] * n_train and abs(n0 - n1) <= ref["steps"]    # each image once an epoch, halves
    assert "[worker 1]" in o1 and "[worker 1]" not in o0
