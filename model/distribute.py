"""More than one device or machine: the tf.distribute strategies of the training loop, TF_CONFIG
checked before anything starts, each replica's share of every global batch, and the errors a lost
worker causes.

    default       one device
    mirrored      every GPU of one machine (MirroredStrategy)
    multiworker   every device of every machine in TF_CONFIG (MultiWorkerMirroredStrategy);
                  worker 0 is the chief: the only one that writes the run directory

A step's global batch is the one a single process would draw (same rows, same order); replica r of
R takes the r-th of R near-equal contiguous pieces of it (`replica_rows`), so the summed gradient
is the single-process gradient and a 2-worker run reproduces a 1-process run (tests/test_multiworker.py).
Worker w with L local devices feeds replicas w*L .. w*L+L-1 (the order MultiWorkerMirroredStrategy
numbers them), so no worker reads another's rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from prepare.errors import UserError

STRATEGIES = ("default", "mirrored", "multiworker")


@dataclass(frozen=True)
class Cluster:
    workers: tuple[str, ...]   # host:port of every worker, worker 0 the chief
    index: int                 # this process's worker

    @property
    def peers(self) -> list[str]:
        return [a for i, a in enumerate(self.workers) if i != self.index]


def read_tf_config(text: str | None) -> Cluster:
    """TF_CONFIG's text -> Cluster, or one line naming what is wrong and how to write it."""
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\' (index: this machine\'s place in the list)')
    if not text:
        raise UserError(f"--strategy multiworker: TF_CONFIG is not set; set it on every worker, e.g. {example}")
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise UserError(f"TF_CONFIG: not valid JSON ({e}); write it as {example}") from None
    cluster, task = (cfg.get("cluster"), cfg.get("task")) if isinstance(cfg, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(cluster.get("worker"), list) or not cluster["worker"]:
        raise UserError(f"TF_CONFIG: no \"cluster\": {{\"worker\": [...]}} list of host:port addresses; {example}")
    other = sorted(set(cluster) - {"worker"})
    if other:
        raise UserError(f"TF_CONFIG: cluster jobs {other} are not used here (worker 0 is the chief, and there are "
                        f"no parameter servers); list every machine under \"worker\"")
    workers = cluster["worker"]
    for a in workers:
        host, _, port = str(a).rpartition(":")
        if not isinstance(a, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"TF_CONFIG: worker address {a!r} is not host:port (e.g. \"10.0.0.2:12345\")")
    if len(set(workers)) != len(workers):
        raise UserError(f"TF_CONFIG: worker addresses repeat ({workers}); give each worker its own host:port")
    if not isinstance(task, dict):
        raise UserError(f"TF_CONFIG: no \"task\" (which worker this process is); add "
                        f"\"task\": {{\"type\": \"worker\", \"index\": I}} with I from 0 to {len(workers) - 1}")
    if task.get("type") != "worker":
        raise UserError(f"TF_CONFIG: task type {task.get('type')!r}: use \"worker\" (worker 0 is the chief)")
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(workers):
        raise UserError(f"TF_CONFIG: task index {index!r} is not a worker of the cluster; use 0 to "
                        f"{len(workers) - 1} ({len(workers)} workers listed)")
    return Cluster(tuple(workers), index)


def make_strategy(name: str, peer_timeout: float = 300.0):
    """The tf.distribute strategy `name`. multiworker: call before any other TensorFlow operation
    (collectives are configured at program start-up); waits at most `peer_timeout` seconds for
    every worker of TF_CONFIG to join, then ends the process with one line saying who is missing."""
    import tensorflow as tf
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name != "multiworker":
        raise UserError(f"--strategy {name!r}: choose {', '.join(STRATEGIES)}")
    cluster = read_tf_config(os.environ.get("TF_CONFIG"))
    with waiting_for_peers(cluster, peer_timeout, "to start"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        barrier(strategy)                       # every worker up, or the watchdog ends the wait
    return strategy


# The watchdog: a tiny process that waits for its stdin to close (the wait ended, or this process
# died) for at most `timeout` seconds, else says why on the shared stderr and ends this process.
_WATCHDOG = """
import os, select, signal, sys
pid, timeout, message, err = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if not select.select([0], [], [], timeout)[0]:
    os.write(err, (message + "\\n").encode())
    os.kill(pid, signal.SIGKILL)
"""


class waiting_for_peers:
    """While the block runs, a watchdog: if it has not ended after `timeout` seconds (a collective
    waits for a worker that never came), the process is ended (SIGKILL) after one line on stderr.
    TensorFlow's own wait for the cluster has no limit and holds the interpreter, so neither a
    thread nor a signal handler of this process would ever run: the watchdog is another process."""

    def __init__(self, cluster: Cluster, timeout: float, what: str):
        self.timeout = timeout
        self.message = (f"error: worker {cluster.index} of {len(cluster.workers)}: the other workers "
                        f"({', '.join(cluster.peers)}) did not join within --peer-timeout {timeout:g} s {what}; "
                        f"start the same command on every worker with its own TF_CONFIG task index, and check the "
                        f"addresses and that the ports are open")

    def __enter__(self):
        import subprocess
        import sys
        from prepare.cli import real_stderr
        r, self._w = os.pipe()
        err = real_stderr()
        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.timeout),
                                       self.message, str(err)], stdin=r, pass_fds=(err,))
        os.close(r)
        return self

    def __exit__(self, *exc):
        os.close(self._w)
        self._proc.wait()


def barrier(strategy) -> None:
    """One tiny all-reduce: returns once every worker has reached it."""
    agree(strategy, np.zeros(1, np.int64))


def agree(strategy, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (min, max) over the workers of each of `values` (int64), e.g. the step each resumed at."""
    import tensorflow as tf
    v = tf.constant(np.asarray(values, np.int64))

    @tf.function
    def gather():
        every = strategy.run(lambda: tf.distribute.get_replica_context().all_gather(v[None], axis=0))
        return strategy.experimental_local_results(every)[0]             # [replicas, len(values)]
    every = gather().numpy()
    return every.min(axis=0), every.max(axis=0)


def cluster_of(strategy) -> Cluster | None:
    """The cluster a multiworker strategy was made for, None for one machine."""
    import tensorflow as tf
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    r = strategy.cluster_resolver
    return Cluster(tuple(r.cluster_spec().as_dict()["worker"]), r.task_id)


def worker_role(strategy, out, log) -> tuple[bool, object]:
    """-> (chief: this process writes the run directory `out`; its log). Another worker's lines are
    marked with its number, and it says first who writes."""
    c = cluster_of(strategy)
    if not (c and c.index):
        return True, log
    mark = lambda msg: log(f"[worker {c.index}] {msg}")  # noqa: E731
    mark(f"worker {c.index} of {len(c.workers)}: the chief ({c.workers[0]}) writes {out}")
    return False, mark


def is_chief(strategy) -> bool:
    c = cluster_of(strategy)
    return c is None or c.index == 0


def local_replicas(strategy) -> range:
    """The global numbers of this process's replicas."""
    if strategy.num_replicas_in_sync == 1:
        return range(1)
    n_local = len(strategy.extended.worker_devices)
    c = cluster_of(strategy)
    first = (c.index if c else 0) * n_local
    return range(first, first + n_local)


def dataset_of_pieces(strategy, pieces, spec, prefetch: int):
    """The distributed dataset of a generator that yields this process's replicas' pieces of each
    global batch, in replica order (the phases' `batches`). One replica in all (the usual case):
    the pieces as tensors from a thread that keeps `prefetch` of them ready (`prefetched`)."""
    import tensorflow as tf
    if strategy.num_replicas_in_sync == 1:
        return prefetched(pieces, spec, prefetch)
    return strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_generator(pieces, output_signature=spec).prefetch(prefetch))


def prefetched(pieces, spec, depth: int):
    """Iterate pieces() (tuples of arrays) as tuples of tensors of `spec`'s dtypes, made by a thread
    that runs up to `depth` pieces ahead; its errors are raised here, and it stops when the
    iteration ends or is abandoned. Measured 2026-12-03 against tf.data's from_generator on one
    replica (the attention LSTM, 2 cores): from_generator lost a fixed ~20 s after the last step of
    every other epoch and its threads slowed the steps ~10%; epochs 82 / 60 s -> 54 / 51 s."""
    import queue
    import threading

    import tensorflow as tf
    items, stop, end = queue.Queue(depth), threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for piece in pieces():
                if not put(tuple(tf.constant(x, s.dtype) for x, s in zip(piece, spec))):
                    return
            put(end)
        except BaseException as e:          # raised in the consumer
            put(e)

    def iterate():
        threading.Thread(target=fill, name="batches", daemon=True).start()
        try:
            while (item := items.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
    return iterate()


def replica_rows(rows: np.ndarray, replicas: int) -> list[np.ndarray]:
    """A global batch's rows -> each replica's contiguous piece (sizes differ by at most one; a
    piece is empty only when the batch has fewer rows than there are replicas)."""
    return np.array_split(np.asarray(rows), replicas)


LOST_WORKER_HINT = ("a worker stopped, was killed or cannot be reached (its own output says why); start the same "
                    "command again on every worker: training resumes from the run's last checkpoint")


def lost_worker_errors() -> tuple:
    """The errors a collective raises when a worker is gone."""
    import tensorflow as tf
    e = tf.errors
    return (e.UnavailableError, e.AbortedError, e.CancelledError, e.DeadlineExceededError, e.InternalError)
