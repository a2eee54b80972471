"""CIDEr-D with document frequencies fixed once: the self-critical phase's reward and its
validation score.

The definition is pycocoevalcap's `Cider` (which is CIDEr-D, Vedantam et al. 2015): for n = 1..4,
each caption is a tf-idf vector of its n-grams, tf x (log(#documents) - log(max(1, df))); a
candidate's similarity to a reference is the cosine of the clipped vectors (min(candidate,
reference) x reference, over the norms), times a Gaussian penalty exp(-delta^2 / (2 sigma^2))
on their length difference (sigma 6); the score is the mean over n and over the image's
references, x 10. Two details kept exactly as pycocoevalcap computes them: `length` counts the
caption's bigrams (its code adds term frequencies where the n-gram index is 1), and df is the
number of images whose references contain the n-gram.

Where it differs from calling pycocoevalcap: pycocoevalcap recomputes the document frequencies
from whatever set it scores, so a reward computed over a batch would weigh n-grams by that batch;
here they come from the training references, computed once and stored with the run
(`save`/`load`). Captions are token ids; `<end>` is appended to every caption and reference and
counted as a token (ruotianluo's finding: this removes most bad endings).
"""
from __future__ import annotations

import gzip
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from prepare.errors import UserError
from prepare.vocabulary import END_ID

N = 4
SIGMA = 6.0
_PAIR = 1 << 32         # (pair, n-gram index) keys: pair * _PAIR + index


def ngrams(tokens: Sequence[int], n: int = N) -> Counter:
    """Counts of every k-gram of `tokens`, k = 1..n (tuples of ids)."""
    t = tuple(tokens)
    return Counter(t[i:i + k] for k in range(1, n + 1) for i in range(len(t) - k + 1))


def with_end(ids: Iterable[int]) -> tuple[int, ...]:
    """A caption's word ids (no <start>/<pad>) with <end> appended, as the reward counts it."""
    return (*(int(i) for i in ids), END_ID)


class CiderD:
    """CIDEr-D against fixed document frequencies: `df[ngram]` = number of the `num_docs`
    training images whose references hold the n-gram."""

    def __init__(self, df: dict[tuple, float], num_docs: int, sigma: float = SIGMA):
        self.df, self.num_docs, self.sigma = df, int(num_docs), float(sigma)
        self.ref_len = math.log(float(max(self.num_docs, 1)))
        self._index: dict[tuple, int] = {}      # n-gram -> index, for the n-grams of prepared references

    @classmethod
    def from_references(cls, refs: Iterable[Sequence[Sequence[int]]], sigma: float = SIGMA) -> "CiderD":
        """refs: for each image, its reference captions (token sequences, as the reward sees them)."""
        df: dict[tuple, float] = defaultdict(float)
        n_docs = 0
        for image_refs in refs:
            n_docs += 1
            for g in {g for r in image_refs for g in ngrams(r)}:
                df[g] += 1.0
        return cls(dict(df), n_docs, sigma)

    # ---- the maths --------------------------------------------------------------------------
    def vector(self, tokens: Sequence[int]) -> tuple[list[dict], np.ndarray, int]:
        """-> (tf-idf weights per n [dict n-gram -> weight], their norms [N], length)."""
        vec: list[dict] = [{} for _ in range(N)]
        norm = np.zeros(N)
        length = 0
        for g, tf in ngrams(tokens).items():
            k = len(g) - 1
            w = tf * (self.ref_len - math.log(max(1.0, self.df.get(g, 0.0))))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:                         # pycocoevalcap's length: the bigram count
                length += tf
        return vec, np.sqrt(norm), length

    def _arrays(self, tokens: Sequence[int], grow: bool) -> tuple:
        """A caption's vector as arrays: (n-gram index [g], weight [g], n - 1 [g], norms [N], length).
        References give their n-grams an index (grow); a candidate's n-grams that no reference of
        any prepared image holds can match nothing and are left out (their weight stays in the norm)."""
        vec, norm, length = self.vector(tokens)
        ids, weights, ks = [], [], []
        for k in range(N):
            for g, w in vec[k].items():
                i = self._index.get(g)
                if i is None and grow:
                    i = self._index[g] = len(self._index)
                if i is not None:
                    ids.append(i), weights.append(w), ks.append(k)
        return np.array(ids, np.int64), np.array(weights), np.array(ks, np.int64), norm, length

    def prepare(self, references: Sequence[Sequence[int]]) -> list:
        """An image's references as vectors, computed once and reused for every candidate."""
        return [self._arrays(r, grow=True) for r in references]

    def score(self, candidate: Sequence[int], prepared: list) -> float:
        """CIDEr-D of one candidate against one image's prepared references."""
        return float(self.scores([candidate], [prepared])[0])

    def scores(self, candidates: Sequence[Sequence[int]], prepared: Sequence[list]) -> np.ndarray:
        """One score per candidate; candidate i against prepared[i]. Vectorised over every
        (candidate, reference) pair at once: the n-grams they share are found by one sorted
        intersection of (pair, n-gram) keys, the clipped products summed per pair and n by bincount."""
        cand = [self._arrays(c, grow=False) for c in candidates]
        c_keys, c_w, c_k, r_keys, r_w, owner, delta, denom = [], [], [], [], [], [], [], []
        for i, (ids, w, ks, norm, length) in enumerate(cand):
            for r_ids, rw, _, r_norm, r_length in prepared[i]:
                pair = len(owner)
                c_keys.append(pair * _PAIR + ids), c_w.append(w), c_k.append(ks)
                r_keys.append(pair * _PAIR + r_ids), r_w.append(rw)
                owner.append(i), delta.append(length - r_length), denom.append(norm * r_norm)
        n_refs = np.array([max(len(p), 1) for p in prepared], np.float64)
        if not owner:
            return np.zeros(len(cand))
        _, ci, ri = np.intersect1d(np.concatenate(c_keys), np.concatenate(r_keys), assume_unique=True,
                                   return_indices=True)
        cw, rw = np.concatenate(c_w)[ci], np.concatenate(r_w)[ri]
        pairs = np.concatenate(c_keys)[ci] // _PAIR
        val = np.bincount(pairs * N + np.concatenate(c_k)[ci], weights=np.minimum(cw, rw) * rw,
                          minlength=N * len(owner)).reshape(-1, N)                        # [pairs, N]
        denom = np.array(denom)
        val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
        val *= np.exp(-np.square(np.array(delta, np.float64)) / (2 * self.sigma ** 2))[:, None]
        total = np.bincount(np.array(owner), weights=val.mean(1), minlength=len(cand))
        return total / n_refs * 10.0

    # ---- stored with the run ----------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        doc = {"num_docs": self.num_docs, "sigma": self.sigma, "n": N,
               "df": {" ".join(map(str, g)): c for g, c in self.df.items()}}
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(doc, f)

    @classmethod
    def load(cls, path: str | Path) -> "CiderD":
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                doc = json.load(f)
            df = {tuple(int(x) for x in k.split()): float(v) for k, v in doc["df"].items()}
            return cls(df, int(doc["num_docs"]), float(doc["sigma"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise UserError(f"{path}: not a CIDEr-D document-frequency file ({e}); restore the run directory "
                            f"from a copy or re-run `python -m model scst`") from None


def bench(images: int = 16, samples: int = 5, refs: int = 5, vocab: int = 10000, train_images: int = 5000,
          repeats: int = 7, seed: int = 0, log=print) -> dict:
    """CIDEr-D rewards per second for batches of `images` x `samples` captions, each image with
    `refs` references, document frequencies of `train_images` training images; Zipf words,
    COCO-like lengths (8-16 words). The references' vectors are prepared once (as the phase does)."""
    import time
    rng = np.random.default_rng(seed)

    def caption() -> tuple[int, ...]:
        words = np.minimum(rng.zipf(1.3, size=rng.integers(8, 17)) + 3, vocab - 1)
        return with_end(words.tolist())
    cider = CiderD.from_references([[caption() for _ in range(refs)] for _ in range(train_images)])
    prepared = [cider.prepare([caption() for _ in range(refs)]) for _ in range(images)]
    times = []
    for _ in range(repeats):
        cands = [caption() for _ in range(images * samples)]
        t0 = time.perf_counter()
        cider.scores(cands, [prepared[i // samples] for i in range(len(cands))])
        times.append(time.perf_counter() - t0)
    per_s = images * samples / float(np.median(times))
    log(f"CIDEr-D rewards: batches of {images} images x {samples} samples ({refs} references each, document "
        f"frequencies of {train_images} images): median {1e3 * float(np.median(times)):.2f} ms a batch, "
        f"{per_s:,.0f} rewards/s ({repeats} repeats)")
    return {"ms_per_batch": 1e3 * float(np.median(times)), "rewards_per_s": per_s}
