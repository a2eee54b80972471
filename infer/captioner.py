"""Load a run directory and caption features or image files with batched beam search."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract import encoder as enc
from extract.images import image_dataset
from infer.beam_search import Caption, beam_search_batch
from model.run import Run, load_run
from prepare.vocabulary import END_ID, START_ID


@dataclass
class ImageCaptions:
    path: str
    captions: list[Caption]     # best first
    error: str | None = None    # set when the image could not be read


def numpy_decoding(model):
    """The decoder's compiled initial_state/step as numpy-in, numpy-out functions for beam search."""
    from model.decoder import compiled_decoding
    init, step = compiled_decoding(model)

    def init_np(features):
        return tuple(x.numpy() for x in init(np.asarray(features, np.float32)))

    def step_np(word_ids, state):
        logp, new = step(np.asarray(word_ids, np.int32), tuple(np.asarray(x, np.float32) for x in state))
        return logp.numpy(), tuple(x.numpy() for x in new)
    return init_np, step_np


class Captioner:
    def __init__(self, run_dir, beam_size: int = 3, max_len: int = 20, length_norm: float = 0.0):
        self.run_dir = Path(run_dir)
        self.model, self.vocab, self.config, self.manifest = load_run(self.run_dir)   # every file verified
        self._encoder_sha256 = Run(self.run_dir).encoder_sha256() or self.manifest["weights"]["sha256"]
        self.beam_size, self.max_len, self.length_norm = beam_size, max_len, length_norm
        self._init, self._step = numpy_decoding(self.model)
        self._encoder = None

    # ---- the encoder this run was trained with --------------------------------------------
    @property
    def encoder_file(self) -> Path:
        return self.run_dir / "encoder.weights.h5"

    def encoder_sha256(self) -> str:
        return self._encoder_sha256

    def encoder(self):
        """The run's own encoder (its file's checksum was verified by load_run)."""
        if self._encoder is None:
            f = self.encoder_file
            model, _ = enc.build_encoder(enc.spec_of_manifest(self.manifest).name, "none", self.image_size)
            enc.load_encoder_weights(model, f)
            self._encoder = enc.compiled_forward(model)
        return self._encoder

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    # ---- captioning ------------------------------------------------------------------------
    def caption_features(self, features: np.ndarray, batch_size: int = 32) -> list[list[Caption]]:
        out: list[list[Caption]] = []
        for i in range(0, len(features), batch_size):
            state = self._init(features[i:i + batch_size])
            out += beam_search_batch(self._step, state, start_id=START_ID, end_id=END_ID, beam_size=self.beam_size,
                                     max_len=self.max_len, length_norm=self.length_norm)
        return out

    def caption_files(self, paths: list[Path], batch_size: int = 32, progress: bool = True) -> list[ImageCaptions]:
        from tqdm import tqdm
        forward = self.encoder()
        results: list[ImageCaptions] = []
        bar = tqdm(total=len(paths), desc="caption", unit="img", disable=not progress)
        t0 = time.time()
        for b, (imgs, ok, why) in enumerate(image_dataset(paths, self.image_size, batch_size)):
            batch_paths = paths[b * batch_size:(b + 1) * batch_size]
            okn = ok.numpy()
            caps = self.caption_features(forward(imgs).numpy()[okn], batch_size) if okn.any() else []
            it = iter(caps)
            for p, good, reason in zip(batch_paths, okn, why.numpy()):
                results.append(ImageCaptions(str(p), next(it)) if good else
                               ImageCaptions(str(p), [], reason.decode()))
            bar.update(len(batch_paths))
            bar.set_postfix(img_s=f"{len(results) / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        return results

    def text(self, cap: Caption) -> str:
        return self.vocab.decode(cap.ids)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from prepare.util import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
