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

    def prepare(self, references: Sequence[Sequence[int]]) -> list:
        """An image's references as vectors, computed once and reused for every candidate."""
        return [self.vector(r) for r in references]

    def score(self, candidate: Sequence[int], prepared: list) -> float:
        """CIDEr-D of one candidate against one image's prepared references."""
        vec, norm, length = self.vector(candidate)
        total = np.zeros(N)
        for rvec, rnorm, rlength in prepared:
            val = np.zeros(N)
            for k in range(N):
                ref_k = rvec[k]
                val[k] = sum(min(w, ref_k.get(g, 0.0)) * ref_k.get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and rnorm[k] != 0:
                    val[k] /= norm[k] * rnorm[k]
            total += val * math.exp(-((length - rlength) ** 2) / (2 * self.sigma ** 2))
        return float(np.mean(total) / max(len(prepared), 1) * 10.0)

    def scores(self, candidates: Sequence[Sequence[int]], prepared: Sequence[list]) -> np.ndarray:
        """One score per candidate; candidate i against prepared[i]."""
        return np.array([self.score(c, p) for c, p in zip(candidates, prepared)], np.float64)

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
