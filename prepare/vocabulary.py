"""The one vocabulary implementation: tokenizer, build, encode, decode, save, load.

Special ids are fixed: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3; real words follow in
order of decreasing training count (ties broken alphabetically, so a build is reproducible).

Tokenization (documented in the README): Unicode NFKD with accents dropped ("café" -> "cafe"),
lower-case, every character that is not a letter or digit or apostrophe becomes its own token
when it is punctuation and a separator otherwise, white space collapsed.
    "A man, riding a WAVE!"  ->  ["a", "man", ",", "riding", "a", "wave", "!"]
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

_TOKEN_RE = re.compile(r"[\w']+|[^\w\s]", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKD, accents dropped, lower-case. Other non-ASCII letters are kept as they are."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", stripped).lower()


def tokenize(text: str) -> list[str]:
    """Caption text -> tokens (see the module docstring)."""
    return _TOKEN_RE.findall(normalize_text(text).replace("_", " "))


@dataclass
class Vocabulary:
    words: list[str]                      # id -> word; words[:4] are SPECIALS
    counts: list[int] = field(default_factory=list)  # training count per id (0 for specials)

    def __post_init__(self):
        if tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        if not self.counts:
            self.counts = [0] * len(self.words)
        if len(self.counts) != len(self.words):
            raise ValueError("vocabulary words and counts differ in length")
        self._ids = {w: i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("vocabulary has duplicate words")

    # ---- build ---------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], max_size: int | None = None,
              min_count: int = 1) -> "Vocabulary":
        """From tokenized training captions. `max_size` counts the 4 special tokens too."""
        counter = Counter()
        for tokens in captions:
            counter.update(tokens)
        for s in SPECIALS:
            counter.pop(s, None)
        ranked = sorted(((w, c) for w, c in counter.items() if c >= min_count),
                        key=lambda wc: (-wc[1], wc[0]))
        if max_size is not None:
            if max_size < len(SPECIALS) + 1:
                raise ValueError(f"vocabulary size must be at least {len(SPECIALS) + 1}")
            ranked = ranked[: max_size - len(SPECIALS)]
        return cls(list(SPECIALS) + [w for w, _ in ranked], [0] * 4 + [c for _, c in ranked])

    # ---- use -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        return self._ids.get(word, UNK_ID)

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> np.ndarray:
        """Tokens -> int32 ids `[<start>, w1..wn, <end>, <pad>...]` of length `max_len`.

        A caption longer than `max_len` is truncated and keeps its `<end>` as last token.
        Without `max_len` the result is unpadded.
        """
        ids = [START_ID] + [self.id(t) for t in tokens] + [END_ID]
        if max_len is not None:
            if max_len < 2:
                raise ValueError("max_len must be at least 2 (<start> and <end>)")
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + [END_ID]
            ids = ids + [PAD_ID] * (max_len - len(ids))
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int], strip: bool = True) -> str:
        """Ids -> text. With `strip`, stops at `<end>` and drops `<start>` and `<pad>`."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == END_ID:
                break
            if strip and i in (PAD_ID, START_ID):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(out)

    # ---- persistence ---------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"words": self.words, "counts": [int(c) for c in self.counts]}

    @classmethod
    def from_json(cls, obj: dict) -> "Vocabulary":
        return cls(list(obj["words"]), [int(c) for c in obj["counts"]])

    def save(self, path: str | Path) -> None:
        from prepare.files import write_json_atomic
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_json(json.loads(Path(path).read_text()))
