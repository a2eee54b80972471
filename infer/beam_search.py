"""Beam search over a step function (im2txt's caption_generator semantics), no TensorFlow inside:
the reference that model/decoding.py's in-graph beam search is tested against.

    step_fn(word_ids [N] int32, state) -> (log_probs [N, V], new_state)
    state: a tuple of arrays with one row per beam on the first axis.

* `max_len` counts tokens including <start>: at most max_len - 1 steps are taken.
* Each live beam is expanded with its `beam_size` best next words (words at -inf never); of all
  expansions the `beam_size` best partial captions stay alive, and those ending in <end> join
  the complete list (also capped at `beam_size`).
* Complete captions are ranked by logprob / len(ids) ** length_norm; if none completed within
  max_len, the partial captions are returned instead (ranked the same way).
* Ties are broken by the word ids (smaller first), so results are deterministic.

`beam_search_batch` decodes many images at once: all live beams of all images go through one
step_fn call per time step, and each image gets exactly what `beam_search` would give it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Caption:
    ids: list[int]        # starts with start_id; ends with end_id when complete
    logprob: float        # sum of the log-probabilities of the chosen words
    score: float          # logprob / len(ids) ** length_norm (the ranking key)
    complete: bool


def _take(state, rows: np.ndarray):
    return tuple(np.asarray(s)[rows] for s in state)


def _rank(caps: list[Caption]) -> list[Caption]:
    return sorted(caps, key=lambda c: (-c.score, c.ids))


def beam_search_batch(step_fn, initial_state, *, start_id: int, end_id: int, beam_size: int = 3,
                      max_len: int = 20, length_norm: float = 0.0) -> list[list[Caption]]:
    """initial_state rows = images. Returns, per image, its captions best first (<= beam_size)."""
    if beam_size < 1 or max_len < 1:
        raise ValueError("beam_size and max_len must be at least 1")
    initial_state = tuple(np.asarray(s) for s in initial_state)
    n_images = initial_state[0].shape[0]
    # live[i]: list of (Caption, row in `state`)
    live = [[(Caption([start_id], 0.0, 0.0, False), i)] for i in range(n_images)]
    done: list[list[Caption]] = [[] for _ in range(n_images)]
    state = initial_state

    def score(logprob: float, length: int) -> float:
        return logprob / length ** length_norm if length_norm else logprob

    for _ in range(max_len - 1):
        rows = [(img, cap, row) for img in range(n_images) for cap, row in live[img]]
        if not rows:
            break
        words = np.array([cap.ids[-1] for _, cap, _ in rows], np.int32)
        logp, new_state = step_fn(words, _take(state, np.array([r for _, _, r in rows])))
        logp = np.asarray(logp, np.float64)
        new_state = tuple(np.asarray(s) for s in new_state)
        k = min(beam_size, logp.shape[1])
        # top-k per row, ties by smaller word id: sort on (-logp, id)
        cand = np.argpartition(-logp, k - 1, axis=1)[:, :k] if k < logp.shape[1] else \
            np.tile(np.arange(logp.shape[1]), (len(rows), 1))
        expansions: list[list[tuple[Caption, int]]] = [[] for _ in range(n_images)]
        for r, (img, cap, _) in enumerate(rows):
            # argpartition may cut ties arbitrarily: widen to every word tied with the k-th best
            kth = np.sort(logp[r, cand[r]])[0]
            ws = np.flatnonzero(logp[r] >= kth)
            ws = sorted(ws, key=lambda w: (-logp[r, w], w))[:k]
            for w in ws:
                lp = logp[r, w]
                if lp == -np.inf:
                    continue
                ids = cap.ids + [int(w)]
                total = cap.logprob + float(lp)
                c = Caption(ids, total, score(total, len(ids)), int(w) == end_id)
                if c.complete:
                    done[img].append(c)
                else:
                    expansions[img].append((c, r))   # r: its state row in new_state
        for img in range(n_images):
            done[img] = _rank(done[img])[:beam_size]
            live[img] = sorted(expansions[img], key=lambda cr: (-cr[0].score, cr[0].ids))[:beam_size]
        state = new_state
    return [_rank(done[i]) if done[i] else _rank([c for c, _ in live[i]]) for i in range(n_images)]


def beam_search(step_fn, initial_state, *, start_id: int, end_id: int, beam_size: int = 3, max_len: int = 20,
                length_norm: float = 0.0) -> list[Caption]:
    """One image (initial_state with a single row): its captions, best first."""
    return beam_search_batch(step_fn, initial_state, start_id=start_id, end_id=end_id, beam_size=beam_size,
                             max_len=max_len, length_norm=length_norm)[0]

