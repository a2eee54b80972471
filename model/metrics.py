"""Evaluation metrics shared by training (validation) and `infer evaluate`.

    score_content(text, truth)          what one caption of the built-in dataset says, checked
                                        against the image's true objects (per attribute)
    content_accuracy(captions, truth)   the share of images captioned exactly right, per attribute and
                                        by the number of objects in the image
    named_objects(words, objects)       the true object each colour or shape word of a caption names
    grounded_objects(words, objects, phrases)   attention supervision's targets: named_objects, and
                                        with phrases also size words and relations (the object named next)
    pointing(words, maps, objects, width, height)   grounding: for each word naming a true object,
                                        is the peak of its attention map inside that object's box?
    image_size_of(truth, path)          an image's (width, height): recorded, else its file's header
    box_cells(object, width, height, side)   the grid cells of an object's box (pointing's hits,
                                        attention supervision's targets)
    degenerate(text), count_degenerate(texts)   babble: a word three times in a row, a repeated
                                        trigram, or ending on a word no caption ends on
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from extract.encoder import grid_side
from model.decoding import NO_END_AFTER
from prepare.synth import RELATIONS, SIZES, parse_caption, relation_holds


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


def content_accuracy(captions: dict[int, str], truth: dict[int, list[dict]]) -> dict:
    """Share of images whose caption names exactly the true objects (and only true relations),
    per-attribute accuracies over the images where the caption makes that claim, and
    `by_objects`: {"1": {"images": n, "exact": share}, "2": ...} by the number of true objects."""
    tallies, by_count = defaultdict(list), defaultdict(list)
    for iid, text in captions.items():
        verdicts = score_content(text, truth[iid])
        by_count[str(len(truth[iid]))].append(bool(verdicts["exact"]))
        for k, v in verdicts.items():
            if v is not None:
                tallies[k].append(bool(v))
    by_objects = {n: {"images": len(v), "exact": float(np.mean(v))} for n, v in sorted(by_count.items())}
    return {k: float(np.mean(v)) for k, v in tallies.items()} | {"images": len(captions), "by_objects": by_objects}


def named_objects(words: list[str], objects: list[dict]) -> list[dict | None]:
    """Per word of a caption, the true object it names: the colour and the shape of each
    "<colour> <shape>" pair that matches a true object name it; every other word names none."""
    lookup = {(o["colour"], o["shape"]): o for o in objects}
    named: list[dict | None] = [None] * len(words)
    for t in range(len(words) - 1):
        o = lookup.get((words[t], words[t + 1]))
        if o is not None:
            named[t] = named[t + 1] = o
    return named


RELATION_WORDS = [tuple(r.split()) for r in RELATIONS]      # ("to", "the", "left", "of"), ("above",), ...


def grounded_objects(words: list[str], objects: list[dict], phrases: bool = False) -> list[dict | None]:
    """Per word of a caption, the true object attention supervision pulls it to: named_objects;
    with phrases also each size word just before a named colour (its object), and each word of a
    relation ("to the left of", "above", ...) the object the caption names next, the one the
    relation compares the first with ("a red star to the left of a blue circle": the relation's
    words and "blue circle" to the circle). A relation with no named object after it names none."""
    named = named_objects(words, objects)
    if not phrases:
        return named
    for t in range(len(words) - 1):
        if words[t] in SIZES and named[t + 1] is not None and named[t + 1]["colour"] == words[t + 1]:
            named[t] = named[t + 1]
    for t in range(len(words)):
        for rel in RELATION_WORDS:
            if tuple(words[t:t + len(rel)]) != rel:
                continue
            after = next((o for o in named[t + len(rel):] if o is not None), None)
            if after is not None:
                named[t:t + len(rel)] = [after] * len(rel)
    return named


def pointing(words: list[str], maps, objects: list[dict], width: int, height: int) -> tuple[int, int]:
    """Grounding of one caption: -> (hits, words scored). The words scored are those naming a true
    object (named_objects); one hits when its attention map peaks in one of that object's cells
    (box_cells). maps[t]: the attention while word t was chosen ([T, side * side], row-major)."""
    hits = scored = 0
    for m, o in zip(maps, named_objects(words, objects)):
        if o is None:
            continue
        hits += int(box_cells(o, width, height, grid_side(len(m)))[int(np.argmax(m))])
        scored += 1
    return hits, scored


def image_size_of(truth: dict, path) -> tuple[int, int] | None:
    """(width, height) of an image whose objects are recorded: from its caption file's entry, else
    from the image file's header (older captions.h5); None when the header cannot be read (a missing or
    broken file, a FIFO or device: extract.images.image_size)."""
    if isinstance(truth.get("width"), int) and isinstance(truth.get("height"), int):
        return truth["width"], truth["height"]
    from extract.images import BadImage, image_size
    try:
        return image_size(path)
    except BadImage:
        return None


def box_cells(o: dict, width: int, height: int, side: int) -> np.ndarray:
    """The cells of a side x side grid (row-major, bool [side * side]) that belong to object o: those
    whose centre lies inside its box (cx +- r, cy +- r, in pixels of a width x height image; the
    encoder sees the image squared, so cells scale per axis), and always the cell holding its centre
    (an object smaller than a cell). Pointing counts a hit there; attention supervision pulls there."""
    centres = np.arange(side) + 0.5
    inside_x = np.abs(centres * width / side - o["cx"]) <= o["r"]
    inside_y = np.abs(centres * height / side - o["cy"]) <= o["r"]
    cells = inside_y[:, None] & inside_x[None, :]
    row = min(max(int(o["cy"] * side / height), 0), side - 1)
    col = min(max(int(o["cx"] * side / width), 0), side - 1)
    cells[row, col] = True
    return cells.reshape(-1)


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
