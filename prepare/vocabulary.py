"""The one vocabulary implementation: tokenizer, build, encode, decode, save, load.

Special ids are fixed: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3; real words follow in
order of decreasing training count (ties broken alphabetically, so a build is reproducible).

Tokenization (documented in the README): Unicode NFKC, accents dropped from Latin letters only
("café" -> "cafe"; every other script keeps its marks: "ビール", "دائرة"), invisible format
characters (zero-width space, BOM, direction marks) dropped (ZWJ/ZWNJ only kept inside a word),
lower-case; a word is a letter, digit or apostrophe followed by more of them and the combining
marks that belong to them (so "वृत्त" stays one word); any other character is its own token when
it is punctuation and a separator otherwise.
    "A man, riding a WAVE!"  ->  ["a", "man", ",", "riding", "a", "wave", "!"]
Two tokenizers (stored with the vocabulary, so decoding matches):
    "words": the above; a script written without spaces (Chinese, Japanese, Thai...) gives one
             token per run of text.
    "chars": as "words", but each character of such a script is its own token; decoding joins
             those tokens without spaces ("赤い星" -> ["赤", "い", "星"] -> "赤い星").
"""
from __future__ import annotations

import functools
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

TOKENIZERS = ("words", "chars")

# Scripts written without spaces between words (Han, kana, CJK punctuation, Bopomofo, Yi, Thai,
# Lao, Tibetan, Myanmar, Khmer): code point ranges, inclusive.
_NO_SPACE_RANGES = ((0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x19E0, 0x19FF),
                    (0x2E80, 0x2FDF), (0x3001, 0x303F), (0x3040, 0x31FF), (0x3200, 0x4DBF), (0x4E00, 0xA4CF),
                    (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F), (0xF900, 0xFAFF), (0xFF61, 0xFF9F), (0x1B000, 0x1B16F),
                    (0x20000, 0x3FFFF))
_NO_SPACE = "".join(f"{chr(a)}-{chr(b)}" for a, b in _NO_SPACE_RANGES)
_NO_SPACE_RE = re.compile(f"[{_NO_SPACE}]")
# The same class in RE2's syntax, for TensorFlow's regex ops (the SavedModel joins tokens in the graph)
NO_SPACE_RE2 = "[" + "".join(f"\\x{{{a:04X}}}-\\x{{{b:04X}}}" for a, b in _NO_SPACE_RANGES) + "]"
_JOINERS = "\u200c\u200d"       # ZWNJ, ZWJ: needed inside words of some scripts (Persian, Indic)


@functools.cache
def _marks() -> str:
    """A character class body of every combining mark (Unicode categories Mn, Mc, Me)."""
    codes = [c for r in (range(0x20000), range(0xE0100, 0xE01F0))
             for c in r if unicodedata.category(chr(c))[0] == "M"]
    out, start = [], codes[0]
    for prev, c in zip(codes, codes[1:] + [None]):
        if c != prev + 1:
            out.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
            start = c
    return "".join(out)


@functools.cache
def _patterns() -> tuple:
    m = _marks()
    token = re.compile(rf"[\w'][\w'{m}{_JOINERS}]*|[^\w\s][{m}]*", re.UNICODE)
    no_space = re.compile(rf"[{_JOINERS}]*([{_NO_SPACE}][{m}]*)[{_JOINERS}]*")
    joiner = re.compile(rf"(?<![\w{m}])[{_JOINERS}]+|[{_JOINERS}]+(?![\w])")
    return token, no_space, joiner


@functools.cache
def _is_latin(c: str) -> bool:
    return unicodedata.name(c, "").startswith("LATIN ")


def _fold(text: str) -> tuple[str, bool]:
    """-> (NFKD text with the combining marks of Latin letters dropped, whether any was)."""
    out, latin, folded = [], False, False
    for c in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(c):
            if latin:
                folded = True
                continue
        else:
            latin = _is_latin(c)
        out.append(c)
    return "".join(out), folded


def _visible(text: str) -> str:
    """Format characters (Unicode Cf: BOM, direction marks, soft hyphen) dropped, except ZWJ/ZWNJ
    between two word characters; control characters and the zero-width space become spaces."""
    text = _patterns()[2].sub("", text)
    if text.isprintable():
        return text
    out = []
    for c in text:
        cat = unicodedata.category(c)
        out.append(" " if cat == "Cc" or c == "\u200b" else "" if cat == "Cf" and c not in _JOINERS else c)
    return "".join(out)


def is_blank(text: str) -> bool:
    """True when nothing visible is left: white space and invisible characters only."""
    return not _visible(text).strip()


def normalize_text(text: str) -> str:
    """Invisible characters dropped, NFKC, accents of Latin letters dropped, lower-case. Other
    scripts keep their marks ("かぎ" stays "かぎ", "دائرة" stays "دائرة")."""
    if text.isascii() and text.isprintable():
        return text.lower()
    return unicodedata.normalize("NFC", _fold(_visible(text))[0]).lower()


def folds_accents(text: str) -> bool:
    """Does normalize_text drop an accent of a Latin letter in `text`?"""
    return not text.isascii() and _fold(text)[1]


def has_no_space_script(text: str) -> bool:
    """Does `text` hold a character of a script written without spaces (Chinese, Japanese, Thai...)?"""
    return not text.isascii() and _NO_SPACE_RE.search(text) is not None


def tokenize(text: str, tokenizer: str = "words") -> list[str]:
    """Caption text -> tokens (see the module docstring)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r} (known: {', '.join(TOKENIZERS)})")
    token, no_space, _ = _patterns()
    text = normalize_text(text).replace("_", " ")
    if tokenizer == "chars":
        text = no_space.sub(r" \1 ", text)
    return token.findall(text)


def kept_tokens(tokens: Sequence[str], max_len: int | None) -> Sequence[str]:
    """The tokens of a caption that survive truncation to `max_len` ids (with <start> and <end>)."""
    if max_len is None:
        return tokens
    if max_len < 2:
        raise ValueError("max_len must be at least 2 (<start> and <end>)")
    return tokens[: max_len - 2]


def join_tokens(tokens: Sequence[str], tokenizer: str = "words") -> str:
    """Tokens -> text: separated by spaces; with "chars", no space next to a token of a script
    written without spaces."""
    if tokenizer != "chars":
        return " ".join(tokens)
    out = []
    for i, t in enumerate(tokens):
        if i and not (_NO_SPACE_RE.match(t) or _NO_SPACE_RE.match(tokens[i - 1])):
            out.append(" ")
        out.append(t)
    return "".join(out)


@dataclass
class Vocabulary:
    words: list[str]                      # id -> word; words[:4] are SPECIALS
    counts: list[int] = field(default_factory=list)  # training count per id (0 for specials)
    tokenizer: str = "words"              # how captions were split (TOKENIZERS); decode joins alike

    def __post_init__(self):
        if tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        if not self.counts:
            self.counts = [0] * len(self.words)
        if len(self.counts) != len(self.words):
            raise ValueError("vocabulary words and counts differ in length")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r} (known: {', '.join(TOKENIZERS)})")
        self._ids = {w: i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise ValueError("vocabulary has duplicate words")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r} (known: {', '.join(TOKENIZERS)})")

    # ---- build ---------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], max_size: int | None = None,
              min_count: int = 1, max_len: int | None = None, tokenizer: str = "words") -> "Vocabulary":
        """From tokenized training captions. `max_size` counts the 4 special tokens too. With
        `max_len`, only the tokens that survive encode's truncation are counted (a word seen only
        after the cut can never be a training target)."""
        counter = Counter()
        for tokens in captions:
            counter.update(kept_tokens(tokens, max_len))
        for s in SPECIALS:
            counter.pop(s, None)
        ranked = sorted(((w, c) for w, c in counter.items() if c >= min_count),
                        key=lambda wc: (-wc[1], wc[0]))
        if max_size is not None:
            if max_size < len(SPECIALS) + 1:
                raise ValueError(f"vocabulary size must be at least {len(SPECIALS) + 1}")
            ranked = ranked[: max_size - len(SPECIALS)]
        return cls(list(SPECIALS) + [w for w, _ in ranked], [0] * 4 + [c for _, c in ranked], tokenizer)

    # ---- use -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        return self._ids.get(word, UNK_ID)

    def tokenize(self, text: str) -> list[str]:
        """Text -> tokens, split the way this vocabulary's captions were."""
        return tokenize(text, self.tokenizer)

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> np.ndarray:
        """Tokens -> int32 ids `[<start>, w1..wn, <end>, <pad>...]` of length `max_len`.

        A caption longer than `max_len` is truncated and keeps its `<end>` as last token.
        Without `max_len` the result is unpadded.
        """
        ids = [START_ID] + [self.id(t) for t in kept_tokens(tokens, max_len)] + [END_ID]
        if max_len is not None:
            ids = ids + [PAD_ID] * (max_len - len(ids))
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int], strip: bool = True) -> str:
        """Ids -> text. With `strip`, stops at `<end>` and drops `<start>` and `<pad>`. Tokens are
        joined by spaces (with the "chars" tokenizer, none next to a script written without them)."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == END_ID:
                break
            if strip and i in (PAD_ID, START_ID):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return join_tokens(out, self.tokenizer)

    # ---- persistence ---------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"words": self.words, "counts": [int(c) for c in self.counts], "tokenizer": self.tokenizer}

    @classmethod
    def from_json(cls, obj: dict) -> "Vocabulary":
        return cls(list(obj["words"]), [int(c) for c in obj["counts"]], obj.get("tokenizer", "words"))

    def save(self, path: str | Path) -> None:
        from prepare.files import write_json_atomic
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_json(json.loads(Path(path).read_text()))
