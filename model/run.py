"""A run directory: the unit users pass around. Everything that captions an image lives in it.

    RUN/config.json               model + training (+ fine-tuning) config, data paths and fingerprints
    RUN/vocab.json                the vocabulary (copied from captions.h5)
    RUN/features_manifest.json    the feature cache's manifest: encoder, its weights' checksum, train stats
    RUN/encoder.weights.h5        the CNN backbone the decoder reads (stage 1: the one that made the
                                  features; after fine-tuning: the fine-tuned one)
    RUN/best.weights.h5           decoder weights with the lowest validation loss so far
    RUN/run.json                  the sha256 of each of the five files above: readers verify them
    RUN/checkpoints/latest.h5     model + optimizer + loop state, for resuming (written atomically)
    RUN/history.json, training_curve.png, tb/     per-epoch records, their plot, TensorBoard
    RUN/.lock                     held by the one process that writes the run

This module owns the layout, the lock, the checksums and the atomic change of several files:
`commit({name: writer})` publishes them with prepare.files.publish (label "run", record run.json):
the new files are staged in RUN/.pending/ with a new run.json, then the commit point, then they
are moved into place and run.json last. A kill before the commit point leaves the old state (the
staging folder is discarded); a kill after it is finished by the next process that opens the run.
So weights, encoder and config always change together.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from model.decoders import build_decoder
from prepare.errors import UserError, differences
from prepare.files import (exclusive_lock, finish_pending, is_empty_folder, pending_state, publish, sha256_file,
                           write_json_atomic)

_HELD: set[str] = set()       # run directories whose lock this process holds

CONFIG = "config.json"
VOCAB = "vocab.json"
MANIFEST = "features_manifest.json"
ENCODER = "encoder.weights.h5"
DECODER = "best.weights.h5"
RECORD = "run.json"
CHECKPOINT = "checkpoints/latest.h5"
HISTORY = "history.json"
CURVE = "training_curve.png"
TENSORBOARD = "tb"
REQUIRED = (CONFIG, VOCAB, MANIFEST, ENCODER, DECODER)


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON file of the run, or one line saying which file is wrong and what to do."""
    if not path.is_file():
        raise UserError(f"{path}: missing ({what}); {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({what}: {e}); {fix}") from None


class Run:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @contextmanager
    def lock(self) -> Iterator["Run"]:
        """Exclusive: the one process that writes this run (train, finetune). Re-entrant."""
        key = str(self.path.resolve())
        if key in _HELD:
            yield self
            return
        with exclusive_lock(self.path):
            _HELD.add(key)
            try:
                yield self
            finally:
                _HELD.discard(key)

    def is_run(self) -> bool:
        if pending_state(self.path) == "committed":     # an interrupted save: finish it first
            self.finish_pending()
        return self.file(CONFIG).is_file() or self.file(RECORD).is_file()

    def is_free_for_new_run(self) -> bool:
        """Missing, or holding only our lock, temp files and an uncommitted save (discarded here)."""
        if is_empty_folder(self.path):
            self.finish_pending()
            return True
        return False

    # ---- reading -------------------------------------------------------------------------
    def record(self) -> dict:
        p = self.file(RECORD)
        if not p.is_file():
            return {"files": {}}
        return read_json(p, "the run's checksums", "the run directory is damaged; restore it from a copy")

    def verify(self, names=REQUIRED) -> None:
        """Every named file exists and has the checksum recorded when it was written."""
        self.finish_pending()
        if not self.is_run():
            raise UserError(f"{self.path}: not a run directory (no {CONFIG}); pass the --out of `model train`")
        files = self.record()["files"]
        for name in names:
            p = self.file(name)
            if not p.is_file():
                hint = "train at least one epoch" if name == DECODER else "copy the whole run directory again"
                raise UserError(f"{p}: missing; the run directory is incomplete ({hint})")
            if name not in files:
                raise UserError(f"{self.file(RECORD)}: records no checksum for {name}; the run directory was made "
                                f"by an older version or damaged: retrain it")
            if sha256_file(p) != files[name]:
                raise UserError(f"{p}: checksum differs from the one recorded in {RECORD} when it was written "
                                f"(the file was modified or damaged); restore the run directory from a copy or retrain")

    def config(self) -> dict:
        return read_json(self.file(CONFIG), "the run's config", "restore the run directory from a copy or retrain")

    def manifest(self) -> dict:
        return read_json(self.file(MANIFEST), "the feature manifest",
                         "restore the run directory from a copy or retrain")

    def vocab(self):
        from prepare.vocabulary import Vocabulary
        d = read_json(self.file(VOCAB), "the vocabulary", "restore the run directory from a copy or retrain")
        try:
            return Vocabulary.from_json(d)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.file(VOCAB)}: not a vocabulary ({e}); restore the run directory") from None

    def encoder_sha256(self) -> str | None:
        return self.record()["files"].get(ENCODER)

    # ---- writing (under self.lock()) -----------------------------------------------------
    def commit(self, writers: dict[str, Callable[[Path], None]]) -> None:
        """Replace the named files together (see the module docstring). writer(path) writes one file."""
        with self.lock():
            self.finish_pending()
            self.record()                               # a damaged run.json is refused before anything is staged
            publish(self.path, writers, label="run", record=RECORD)

    def finish_pending(self) -> None:
        """Complete a commit a kill interrupted after its commit point, or discard one before it."""
        if pending_state(self.path) is None:
            return
        try:
            with self.lock():
                finish_pending(self.path, "run")
        except OSError as e:                             # the lock file cannot be made: a read-only copy
            raise UserError(f"{self.path}: an interrupted save must be finished but the folder is not writable "
                            f"({e}); copy the run directory somewhere writable") from None

    def create(self, config: dict, vocab, manifest: dict, encoder_file: Path) -> None:
        """A new run: config, vocabulary, manifest and encoder weights in one commit."""
        self.commit({CONFIG: lambda p: write_json_atomic(p, config), VOCAB: vocab.save,
                     MANIFEST: lambda p: write_json_atomic(p, manifest),
                     ENCODER: lambda p: shutil.copyfile(encoder_file, p)})

    def check_resume(self, config: dict, vocab, resumable: set) -> None:
        """Refuse to resume with another vocabulary or config (resumable keys may change)."""
        self.finish_pending()
        if self.vocab().words != vocab.words:
            raise UserError(f"{self.path} was trained with another vocabulary; choose a new --out "
                            "(resuming would scramble the word ids)")
        diffs = differences(self.config(), config, resumable)
        if diffs:
            raise UserError(f"{self.path} holds a run with another config ({'; '.join(diffs)}); resume it with "
                            f"the same settings or choose a new --out")
        self.verify((CONFIG, VOCAB, MANIFEST, ENCODER))


def load_run(path: str | os.PathLike):
    """-> (decoder with its best weights, vocab, config, feature manifest), every file verified."""
    from model import checkpoint
    from model.config import ModelConfig, from_dict
    run = Run(path)
    run.verify()
    config = run.config()
    mcfg = from_dict(ModelConfig, config["model"], f"{run.file(CONFIG)} model")
    manifest = run.manifest()
    model = build_decoder(mcfg, manifest)
    checkpoint.load(run.file(DECODER), model)
    return model, run.vocab(), config, manifest

