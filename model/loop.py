"""The one training loop of stage 1 (`model train`) and stage 2 (`model finetune`).

A stage supplies its data, its compiled step, its evaluation and what it saves (a `Stage`); the
loop owns everything else: progress bar, NaN stop, TensorBoard scalars, checkpoints every N steps
and at each epoch, --max-steps, the best model by validation loss, history.json and its plot.

Why our own loop and not Keras' Model.fit: a killed run must resume at the exact batch of the
exact epoch with the same data order (the loop state travels in the checkpoint with the model,
the optimizers and dropout's RNG), batches are padded only to their own longest caption, the loss
is a mean over real tokens only, and stage 2 steps two optimizers with their own clipping. The
step itself is one compiled tf.function either way.

Loop state (saved in every checkpoint):
    step, epoch (epochs finished), batch (batches of the current epoch done), epoch_losses,
    best_val, history (one record per evaluation)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from model.run import CURVE, HISTORY, TENSORBOARD, Run
from prepare.errors import UserError
from prepare.files import atomic_path, write_json_atomic


@dataclass
class Stage:
    name: str                                   # "train" | "finetune": bar and TensorBoard tags
    run: Run
    epochs: int
    max_steps: int                              # 0: no limit
    checkpoint_every: int
    steps_per_epoch: int
    batch_size: int                             # examples per step, for the speed figure
    batches: Callable[[int, int], Iterable]     # (epoch, first batch) -> that epoch's batches from there
    train_step: Callable[[object, int], float]  # (batch, step number) -> loss
    evaluate: Callable[[], dict]                # -> {"val_loss": ..., other figures}
    describe: Callable[[dict], str]             # evaluation -> one line
    save_checkpoint: Callable[[dict], None]     # loop state -> checkpoints/latest.h5
    save_best: Callable[[dict], None]           # record -> the run's best files (one commit)
    nan_hint: str                               # what to change when the loss becomes NaN
    after_epoch: Callable[[], None] = lambda: None      # e.g. print sample captions
    record_extra: Callable[[], dict] = field(default=lambda: {})  # e.g. the learning rate


def new_state() -> dict:
    return {"step": 0, "epoch": 0, "batch": 0, "epoch_losses": [], "best_val": None, "history": []}


def perplexity(loss_per_token: float) -> float:
    return math.exp(min(loss_per_token, 50.0))


def fit(stage: Stage, state: dict, progress: bool = True, log=print) -> dict:
    """Train until stage.epochs (or stage.max_steps); returns the loop state."""
    import tensorflow as tf
    writer = tf.summary.create_file_writer(str(stage.run.file(TENSORBOARD)))
    while state["epoch"] < stage.epochs:
        t0 = time.time()
        stopped, seen = _train_epoch(stage, state, writer, progress)
        if stopped and not seen:
            break                         # --max-steps was reached before: nothing new to evaluate
        ev = stage.evaluate()
        epoch = state["epoch"] + (state["batch"] / stage.steps_per_epoch if stopped else 1)
        rec = {"epoch": epoch if stopped else int(epoch), "step": state["step"],
               "train_loss": float(np.mean(state["epoch_losses"] or [np.nan])), **ev,
               "val_perplexity": perplexity(ev["val_loss"]), **stage.record_extra(),
               "examples_per_s": seen / max(time.time() - t0, 1e-9), "seconds": round(time.time() - t0, 2)}
        state["history"].append(rec)
        if not stopped:
            state["epoch"], state["batch"], state["epoch_losses"] = state["epoch"] + 1, 0, []
        log(f"{stage.name} epoch {_fmt(rec['epoch'])}: train loss {rec['train_loss']:.3f}, {stage.describe(ev)}, "
            f"{rec['examples_per_s']:.1f} examples/s")
        stage.after_epoch()
        with writer.as_default():
            tf.summary.scalar(f"{stage.name}/val_loss", ev["val_loss"], step=state["step"])
            tf.summary.scalar(f"{stage.name}/val_perplexity", rec["val_perplexity"], step=state["step"])
        if state["best_val"] is None or ev["val_loss"] < state["best_val"]:
            stage.save_best(rec)
            state["best_val"] = ev["val_loss"]
        stage.save_checkpoint(state)
        write_json_atomic(stage.run.file(HISTORY), state["history"])
        plot_history(state["history"], stage.run.file(CURVE), stage.name)
        if stopped:
            log(f"stopped at --max-steps {stage.max_steps}; run the same command with more steps to continue")
            break
    writer.flush()
    return state


def _fmt(epoch) -> str:
    return f"{epoch:.2f}" if isinstance(epoch, float) else str(epoch)


def _train_epoch(stage: Stage, state: dict, writer, progress: bool) -> tuple[bool, int]:
    """The rest of the current epoch; -> (stopped by --max-steps, examples seen)."""
    import tensorflow as tf
    from tqdm import tqdm
    epoch = state["epoch"]
    if stage.max_steps and state["step"] >= stage.max_steps:
        return True, 0
    bar = tqdm(total=stage.steps_per_epoch, initial=state["batch"], desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
               unit="step", disable=not progress)
    t0, seen = time.time(), 0
    try:
        for batch in stage.batches(epoch, state["batch"]):
            loss = stage.train_step(batch, state["step"])
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {state['step'] + 1} (epoch {epoch + 1}); {stage.nan_hint}. "
                                f"The last good checkpoint is kept in {stage.run.file('checkpoints')}; lower --lr "
                                f"and start a new --out")
            state["step"] += 1
            state["batch"] += 1
            state["epoch_losses"].append(loss)
            seen += stage.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", ex_s=f"{seen / (time.time() - t0):.1f}")
            with writer.as_default():
                tf.summary.scalar(f"{stage.name}/loss", loss, step=state["step"])
            if state["step"] % stage.checkpoint_every == 0:
                stage.save_checkpoint(state)
            if stage.max_steps and state["step"] >= stage.max_steps and state["batch"] < stage.steps_per_epoch:
                stage.save_checkpoint(state)
                return True, seen
    finally:
        bar.close()
    return False, seen


def plot_history(history: list[dict], path, title: str = "train") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss per token (nats)"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [h["val_perplexity"] for h in history], "o-", color="C1")
    b.set_xlabel("epoch"), b.set_ylabel("validation perplexity"), b.grid(alpha=0.3)
    fig.suptitle("Show and Tell decoder training" if title == "train" else "Fine-tuning encoder + decoder")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
