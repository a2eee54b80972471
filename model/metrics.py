"""Evaluation metrics shared by training (validation) and `infer evaluate`.

    score_content(text, truth)          what one caption of the built-in dataset says, checked
                                        against the image's true objects (per attribute)
    content_accuracy(captions, truth)   the share of images captioned exactly right, and per attribute
    degenerate(text), count_degenerate(texts)   babble: a word three times in a row, a repeated
                                        trigram, or ending on a word no caption ends on
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from model.decoding import NO_END_AFTER
from prepare.synth import parse_caption, relation_holds


def score_content(text: str, truth: list[dict]) -> dict[str, bool | None]:
    """Does the caption name exactly the true objects, and only true relations?

    Returns per-attribute verdicts (None where the caption makes no such claim):
    `exact` (all of the below that apply), `colour`, `shape`, `count`, `size`, `relation`.
    """
    p = parse_caption(text)
    named = sorted((c, s) for _, c, s in p.objects)
    true = sorted((o["colour"], o["shape"]) for o in truth)
    res: dict[str, bool | None] = {
        "colour": sorted(c for c, _ in named) == sorted(c for c, _ in true),
        "shape": sorted(s for _, s in named) == sorted(s for _, s in true),
        "count": len(p.objects) == len(truth) and (p.count_word in (None, len(truth))),
    }
    lookup = {(o["colour"], o["shape"]): o for o in truth}
    matched = [lookup.get((c, s)) for _, c, s in p.objects]
    sized = [(sz, m) for (sz, _, _), m in zip(p.objects, matched) if sz is not None]
    res["size"] = None if not sized else all(m is not None and m["size"] == sz for sz, m in sized)
    if p.relations:
        res["relation"] = all(matched[a] is not None and matched[b] is not None
                              and relation_holds(matched[a], matched[b], rel)
                              for a, rel, b in p.relations)
    else:
        res["relation"] = None
    res["exact"] = (named == true and res["count"] and res["size"] is not False
                    and res["relation"] is not False)
    return res


def content_accuracy(captions: dict[int, str], truth: dict[int, list[dict]]) -> dict[str, float]:
    """Share of images whose caption names exactly the true objects (and only true relations),
    and per-attribute accuracies over the images where the caption makes that claim."""
    tallies = defaultdict(list)
    for iid, text in captions.items():
        for k, v in score_content(text, truth[iid]).items():
            if v is not None:
                tallies[k].append(bool(v))
    return {k: float(np.mean(v)) for k, v in tallies.items()} | {"images": len(captions)}


def degenerate(text: str, no_end_after=NO_END_AFTER) -> bool:
    """Does a caption (tokens joined by spaces) babble: a word three times in a row, a trigram twice,
    or its last word (a final '.', '!' or '?' aside) one that cannot end a sentence (no_end_after)?"""
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if any(a == b == c for a, b, c in grams) or len(set(grams)) < len(grams):
        return True
    while words and words[-1] in (".", "!", "?"):
        words = words[:-1]
    return bool(words) and words[-1] in set(no_end_after)


def count_degenerate(texts, no_end_after=NO_END_AFTER) -> int:
    """How many of the captions are degenerate (see degenerate)."""
    return sum(degenerate(t, no_end_after) for t in texts)
