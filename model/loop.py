"""The one training loop, and the training phase it drives.

A phase is a subclass of TrainingPhase: stage 1 (model/train.py: the decoder on cached features),
fine-tuning (model/finetune.py: CNN + decoder from images), and later self-critical training. A
phase says what its batches are, what one step does, how it is evaluated, what "best" means and
what it saves; `fit` owns everything else: progress bar, NaN stop, TensorBoard scalars,
checkpoints every N steps and at each epoch, --max-steps, resuming, the best model, history.json
and its plot.

Why our own loop and not Keras' Model.fit: a killed run must resume at the exact batch of the
exact epoch with the same data order (the loop state travels in the checkpoint with the model,
the optimizers and dropout's RNG), batches are padded only to their own longest caption, the loss
is a mean over real tokens only, and fine-tuning steps two optimizers with their own clipping. The
step itself is one compiled tf.function either way.

Loop state (saved in every checkpoint):
    step, epoch (epochs finished), batch (batches of the current epoch done), epoch_losses,
    best_val (the best evaluation figure so far), history (one record per evaluation)
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import numpy as np

from model import checkpoint
from model.distribute import LOST_WORKER_HINT, cluster_of, is_chief, lost_worker_errors
from model.run import CHECKPOINT, CONFIG, CURVE, HISTORY, TENSORBOARD, Run
from prepare.cli import progress_bar
from prepare.errors import UserError
from prepare.files import atomic_path, write_json_atomic


class TrainingPhase:
    """One phase of training on the shared loop. A subclass sets the attributes below in its
    __init__ and implements the five methods that raise NotImplementedError."""
    name = "train"             # "train" | "finetune" | ...: progress bar, log and TensorBoard tags
    best_key = "val_loss"      # the evaluation figure that picks the best model ...
    higher_is_better = False   # ... and which way is better
    nan_hint = "lower the learning rate"   # what to change when the loss becomes NaN

    def __init__(self, run: Run, epochs: int, max_steps: int, checkpoint_every: int, steps_per_epoch: int,
                 batch_size: int, strategy=None):
        self.run = run
        self.strategy = strategy                  # tf.distribute strategy of the step (None: the default)
        self.writes = strategy is None or is_chief(strategy)   # multiworker: only the chief writes the run
        self.epochs = epochs                      # passes over the training data
        self.max_steps = max_steps                # 0: no limit
        self.checkpoint_every = checkpoint_every
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size              # examples per step, for the speed figure

    # ---- what a phase defines ------------------------------------------------------------
    def batches(self, epoch: int, start: int) -> Iterable:
        """That epoch's batches from batch number `start` on (the order depends on the epoch only)."""
        raise NotImplementedError

    def train_step(self, batch, step: int) -> float:
        """One optimisation step; -> its loss."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """-> {best_key: ..., other figures}."""
        raise NotImplementedError

    def save_best(self, record: dict) -> None:
        """Publish the current model as the run's best (one commit)."""
        raise NotImplementedError

    def checkpointed(self) -> tuple[list, list]:
        """-> (models, optimizers) whose variables a checkpoint holds."""
        raise NotImplementedError

    # ---- what a phase may change ---------------------------------------------------------
    def start(self, state: dict) -> None:
        """Before the first step of a new run (not on resume)."""

    def describe(self, ev: dict) -> str:
        return f"val loss {ev['val_loss']:.3f}, val perplexity {perplexity(ev['val_loss']):.2f}"

    def after_epoch(self) -> None:
        """After each evaluation, e.g. print sample captions."""

    def record_extra(self) -> dict:
        """Figures added to each history record, e.g. the learning rate."""
        return {}

    def improved(self, ev: dict, best) -> bool:
        v = ev[self.best_key]
        return best is None or (v > best if self.higher_is_better else v < best)

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        if not self.writes:
            return
        models, optimizers = self.checkpointed()
        checkpoint.save(self.run.file(CHECKPOINT), models, optimizers, state)

    def load_checkpoint(self) -> dict:
        models, optimizers = self.checkpointed()
        return checkpoint.load(self.run.file(CHECKPOINT), models, optimizers)


def open_run(run: Run, config: dict, vocab, resumable: set, create, same_kind=lambda run: None, kept=()) -> bool:
    """Create the run directory (`create()`), or check that the existing one is this run, refusing
    another vocabulary, config or kind (`same_kind(run)` raises UserError); a resumed run keeps its
    own values of the config keys `kept` (filled in while it trains). True: resume."""
    if run.is_run():
        same_kind(run)
        config.update({k: run.config()[k] for k in kept})
        run.check_resume(config, vocab, resumable)
        if run.config() != config:                   # epochs / max_steps may have been extended
            run.commit({CONFIG: lambda p: write_json_atomic(p, config)})
        return run.file(CHECKPOINT).exists()
    if not run.is_free_for_new_run():
        raise UserError(f"{run.path} exists and is not a run directory (no config.json); choose a new --out")
    create()
    return False


def new_state() -> dict:
    return {"step": 0, "epoch": 0, "batch": 0, "epoch_losses": [], "best_val": None, "history": []}


def perplexity(loss_per_token: float) -> float:
    return math.exp(min(loss_per_token, 50.0))


def fit(phase: TrainingPhase, resume: bool, progress: bool = True, log=print) -> dict:
    """Train `phase` until its epochs (or max_steps) are done, from its checkpoint when `resume`;
    returns the loop state."""
    import tensorflow as tf
    state = new_state()
    if resume:
        state = phase.load_checkpoint()
        log(f"resuming {phase.run.path} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    if cluster_of(phase.strategy):
        _same_state_on_every_worker(phase, state)
        try:
            return _fit(phase, state, progress, log)
        except lost_worker_errors() as e:
            raise UserError(f"multi-worker training stopped at step {state['step']}: {LOST_WORKER_HINT} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return _fit(phase, state, progress, log)


def _same_state_on_every_worker(phase: TrainingPhase, state: dict) -> None:
    """Every worker resumes from the same checkpoint, or none starts."""
    from model.distribute import agree
    here = np.array([state["step"], state["epoch"], state["batch"]], np.int64)
    lo, hi = agree(phase.strategy, here)
    if (lo != hi).any():
        raise UserError(f"the workers would resume at different steps ({int(lo[0])} to {int(hi[0])}; this one at "
                        f"{int(here[0])}): every worker reads the chief's {phase.run.file(CHECKPOINT)}, so --out must "
                        f"be one folder all machines share (NFS, a cluster file system) at the same path")


def _fit(phase: TrainingPhase, state: dict, progress: bool, log) -> dict:
    import tensorflow as tf
    if state["best_val"] is None:         # nothing evaluated yet (a new run, or killed before that)
        phase.start(state)
    writer = (tf.summary.create_file_writer(str(phase.run.file(TENSORBOARD))) if phase.writes
              else tf.summary.create_noop_writer())
    while state["epoch"] < phase.epochs:
        t0 = time.time()
        stopped, seen = _train_epoch(phase, state, writer, progress)
        if stopped and not seen:
            break                         # --max-steps was reached before: nothing new to evaluate
        _end_of_epoch(phase, state, writer, stopped, seen, time.time() - t0, log)
        if stopped:
            log(f"stopped at --max-steps {phase.max_steps}; run the same command with more steps to continue")
            break
    writer.flush()
    return state


def _end_of_epoch(phase: TrainingPhase, state: dict, writer, stopped: bool, seen: int, seconds: float, log) -> None:
    """Evaluate, log, keep the best model, checkpoint, history and its plot."""
    import tensorflow as tf
    ev = phase.evaluate()
    epoch = state["epoch"] + (state["batch"] / phase.steps_per_epoch if stopped else 1)
    rec = {"epoch": epoch if stopped else int(epoch), "step": state["step"],
           "train_loss": float(np.mean(state["epoch_losses"] or [np.nan])), **ev,
           **({"val_perplexity": perplexity(ev["val_loss"])} if "val_loss" in ev else {}), **phase.record_extra(),
           "examples_per_s": seen / max(seconds, 1e-9), "seconds": round(seconds, 2)}
    state["history"].append(rec)
    if not stopped:
        state["epoch"], state["batch"], state["epoch_losses"] = state["epoch"] + 1, 0, []
    log(f"{phase.name} epoch {_fmt(rec['epoch'])}: train loss {rec['train_loss']:.3f}, {phase.describe(ev)}, "
        f"{rec['examples_per_s']:.1f} examples/s")
    phase.after_epoch()
    with writer.as_default():             # every figure of the evaluation and the phase's extras
        for key, value in rec.items():
            if key not in ("epoch", "step", "seconds") and isinstance(value, (int, float)) and math.isfinite(value):
                tf.summary.scalar(f"{phase.name}/{key}", value, step=state["step"])
    if phase.improved(ev, state["best_val"]):
        if phase.writes:
            phase.save_best(rec)
        state["best_val"] = ev[phase.best_key]
    phase.save_checkpoint(state)
    if phase.writes:
        write_json_atomic(phase.run.file(HISTORY), state["history"])
        plot_history(state["history"], phase.run.file(CURVE), phase.name, phase.best_key)


def _fmt(epoch) -> str:
    return f"{epoch:.2f}" if isinstance(epoch, float) else str(epoch)


def _train_epoch(phase: TrainingPhase, state: dict, writer, progress: bool) -> tuple[bool, int]:
    """The rest of the current epoch; -> (stopped by --max-steps, examples seen)."""
    import tensorflow as tf
    epoch = state["epoch"]
    if phase.max_steps and state["step"] >= phase.max_steps:
        return True, 0
    bar = progress_bar(progress, total=phase.steps_per_epoch, initial=state["batch"],
                       desc=f"{phase.name} {epoch + 1}/{phase.epochs}", unit="step")
    t0, seen = time.time(), 0
    try:
        for batch in phase.batches(epoch, state["batch"]):
            loss = phase.train_step(batch, state["step"])
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {state['step'] + 1} (epoch {epoch + 1}); {phase.nan_hint}. "
                                f"The last good checkpoint is kept in {phase.run.file('checkpoints')}; lower --lr "
                                f"and start a new --out")
            state["step"] += 1
            state["batch"] += 1
            state["epoch_losses"].append(loss)
            seen += phase.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", ex_s=f"{seen / (time.time() - t0):.1f}")
            with writer.as_default():
                tf.summary.scalar(f"{phase.name}/loss", loss, step=state["step"])
            if state["step"] % phase.checkpoint_every == 0:
                phase.save_checkpoint(state)
            if phase.max_steps and state["step"] >= phase.max_steps and state["batch"] < phase.steps_per_epoch:
                phase.save_checkpoint(state)
                return True, seen
    finally:
        bar.close()
    return False, seen


def plot_history(history: list[dict], path, title: str = "train", key: str = "val_loss") -> None:
    """Losses (left) and the validation figure that picks the best model (right: perplexity for a
    loss, else `key`), one point per evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if all("val_loss" in h for h in history):
        a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss per token"), a.legend(), a.grid(alpha=0.3)
    right = "val_perplexity" if key == "val_loss" else key
    b.plot(ep, [h.get(right) for h in history], "o-", color="C1")
    b.set_xlabel("epoch"), b.set_ylabel(right.replace("val_", "validation ")), b.grid(alpha=0.3)
    fig.suptitle(TITLES.get(title, title))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


TITLES = {"train": "Show and Tell decoder training", "finetune": "Fine-tuning encoder + decoder",
          "scst": "Self-critical training (CIDEr-D reward)"}
