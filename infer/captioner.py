"""Load a run directory and caption features or image files with batched beam search."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract import encoder as enc
from extract.images import image_dataset
from infer.beam_search import Caption, beam_search_batch
from model.run import Run, load_run
from prepare.errors import UserError
from prepare.vocabulary import END_ID, START_ID


@dataclass
class ImageCaptions:
    path: str
    captions: list[Caption]     # best first
    error: str | None = None    # set when the image could not be read
    attention: np.ndarray | None = None   # attention decoder, when asked: the best caption's maps [words, P]


def numpy_decoding(model):
    """The decoder's compiled initial_state/step as numpy-in, numpy-out functions for beam search."""
    from model.decoding import compiled_decoding
    init, step = compiled_decoding(model)

    def init_np(features):
        return tuple(x.numpy() for x in init(np.asarray(features, np.float32)))

    def step_np(word_ids, state):
        logp, new = step(np.asarray(word_ids, np.int32), tuple(np.asarray(x, np.float32) for x in state))
        return logp.numpy(), tuple(x.numpy() for x in new)
    return init_np, step_np


class Captioner:
    def __init__(self, run_dir, beam_size: int = 3, max_len: int = 20, length_norm: float = 0.0, guards=None):
        """guards: model.decoding.Guards, the in-graph search's (default: on, the default words and
        threshold); caption_features_python, the reference, never has any."""
        from model.decoding import Guards
        self.run_dir = Path(run_dir)
        self.model, self.vocab, self.config, self.manifest = load_run(self.run_dir)   # every file verified
        self.guards = guards or Guards()
        self.beam_guards = self.guards.resolve(self.vocab.words)
        self._encoder_sha256 = Run(self.run_dir).encoder_sha256() or self.manifest["weights"]["sha256"]
        self.beam_size, self.max_len, self.length_norm = beam_size, max_len, length_norm
        self._init, self._step = numpy_decoding(self.model)
        self._encoder = None
        self._attention = None
        self._graph = None

    @property
    def features_kind(self) -> str:
        """"pooled", "grid" or "grid16": what this run's decoder reads (the kind of its cache)."""
        from extract.cache import feature_kind
        return feature_kind(self.manifest)

    @property
    def has_attention(self) -> bool:
        return hasattr(self.model, "attention")

    def check_attention(self) -> None:
        if not self.has_attention:
            raise UserError(f"--attention: {self.run_dir} holds a {self.config['model'].get('decoder', 'show_and_tell')} "
                            f"decoder, which has no attention to show; train one with `python -m model train "
                            f"--decoder attention` (or transformer) on grid features")

    def attention_maps(self, features: np.ndarray, captions: list[Caption]) -> list[np.ndarray]:
        """Per image, the attention of each word of its caption: [len(ids) - 1, P] (the last row is <end>'s
        when the caption is complete)."""
        import tensorflow as tf
        if self._attention is None:
            self._attention = tf.function(lambda f, ids: self.model.attention(f, ids), reduce_retracing=True)
        T = max(len(c.ids) for c in captions) - 1
        ids = np.zeros((len(captions), max(T, 1)), np.int32)
        for i, c in enumerate(captions):
            ids[i, :len(c.ids) - 1] = c.ids[:-1]
        maps = self._attention(np.asarray(features, np.float32), ids).numpy()
        return [maps[i, :len(c.ids) - 1] for i, c in enumerate(captions)]

    # ---- the encoder this run was trained with --------------------------------------------
    @property
    def encoder_file(self) -> Path:
        return self.run_dir / "encoder.weights.h5"

    def encoder_sha256(self) -> str:
        return self._encoder_sha256

    def encoder_model(self):
        """The run's own encoder as a Keras model (its file's checksum was verified by load_run):
        float32 0..255 images -> the features its decoder reads (pooled or grid)."""
        model, _ = enc.build_encoder(enc.spec_of_manifest(self.manifest).name, "none", self.image_size,
                                     output=self.features_kind)
        enc.load_encoder_weights(model, self.encoder_file)
        return model

    def encoder(self):
        """The run's own encoder, compiled (built once)."""
        if self._encoder is None:
            self._encoder = enc.compiled_forward(self.encoder_model())
        return self._encoder

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    # ---- captioning ------------------------------------------------------------------------
    def caption_features(self, features: np.ndarray, batch_size: int = 32) -> list[list[Caption]]:
        """Captions (best first) of each row of features, by the in-graph beam search."""
        out: list[list[Caption]] = []
        for i in range(0, len(features), batch_size):
            out += self._beam_search_graph(np.asarray(features[i:i + batch_size], np.float32))
        return out

    def caption_features_python(self, features: np.ndarray, batch_size: int = 32) -> list[list[Caption]]:
        """The same by the reference beam search (infer/beam_search.py: one step call per word)."""
        out: list[list[Caption]] = []
        for i in range(0, len(features), batch_size):
            state = self._init(features[i:i + batch_size])
            out += beam_search_batch(self._step, state, start_id=START_ID, end_id=END_ID, beam_size=self.beam_size,
                                     max_len=self.max_len, length_norm=self.length_norm)
        return out

    def _beam_search_graph(self, features: np.ndarray) -> list[list[Caption]]:
        if self._graph is None:
            import tensorflow as tf

            from model import decoding

            @tf.function(input_signature=[tf.TensorSpec([None, *self.model.feature_shape], tf.float32)])
            def search(f):
                return decoding.beam_search(self.model, f, beam_size=self.beam_size, max_len=self.max_len,
                                            length_norm=self.length_norm, guards=self.beam_guards)
            self._graph = search
        ids, lengths, lps, complete = (x.numpy() for x in self._graph(features))
        return [[Caption([int(w) for w in ids[i, j, :lengths[i, j]]], float(lps[i, j]),
                         float(lps[i, j]) / float(lengths[i, j]) ** self.length_norm if self.length_norm
                         else float(lps[i, j]), bool(complete[i, j]))
                 for j in range(ids.shape[1]) if np.isfinite(lps[i, j])] for i in range(len(ids))]

    def caption_files(self, paths: list[Path], batch_size: int = 32, progress: bool = True,
                      attention: bool = False) -> list[ImageCaptions]:
        from prepare.cli import progress_bar
        if attention:
            self.check_attention()
        forward = self.encoder()
        results: list[ImageCaptions] = []
        bar = progress_bar(progress, total=len(paths), desc="caption", unit="img")
        t0 = time.time()
        for b, (imgs, ok, why) in enumerate(image_dataset(paths, self.image_size, batch_size)):
            batch_paths = paths[b * batch_size:(b + 1) * batch_size]
            okn = ok.numpy()
            feats = forward(imgs).numpy()[okn]
            caps = self.caption_features(feats, batch_size) if okn.any() else []
            maps = self.attention_maps(feats, [c[0] for c in caps]) if attention and caps else [None] * len(caps)
            it = iter(zip(caps, maps))
            for p, good, reason in zip(batch_paths, okn, why.numpy()):
                if good:
                    c, m = next(it)
                    results.append(ImageCaptions(str(p), c, attention=m))
                else:
                    results.append(ImageCaptions(str(p), [], reason.decode()))
            bar.update(len(batch_paths))
            bar.set_postfix(img_s=f"{len(results) / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        return results

    def text(self, cap: Caption) -> str:
        return self.vocab.decode(cap.ids)

    def unsure(self, cap: Caption) -> bool:
        """Does the model itself rate the caption unlikely: mean log-probability per word (<end>
        counted) below the guards' unsure_below?"""
        from model.decoding import unsure
        return bool(unsure(cap.logprob, len(cap.ids), self.guards.unsure_below))

    def degenerate(self, text: str) -> bool:
        """Does the caption babble (model.metrics.degenerate, with this run's --no-end-after words)?"""
        from model.metrics import degenerate
        return degenerate(text, self.guards.no_end_after)

