"""The tokenizer and vocabulary on text that is not English: other scripts, invisible characters,
scripts written without spaces, captions longer than --max-len."""
from prepare.vocabulary import Vocabulary, is_blank, tokenize


def test_accents_are_folded_for_latin_only_and_other_scripts_keep_their_marks():
    assert tokenize("Un café crème, naïve") == ["un", "cafe", "creme", ",", "naive"]   # Latin: folded
    assert tokenize("ビール と パン") == ["ビール", "と", "パン"]        # beer, not heel (ヒール)
    assert tokenize("かぎ") == ["かぎ"]                                  # key, not persimmon (かき)
    assert tokenize("دائرة") == ["دائرة"]                               # hamza kept
    assert tokenize("Круглый йогурт") == ["круглый", "йогурт"]          # й is a letter of its own


def test_words_with_combining_vowel_signs_stay_whole():
    assert tokenize("लाल वृत्त") == ["लाल", "वृत्त"]
    assert tokenize("நீல வட்டம்") == ["நீல", "வட்டம்"]
    assert tokenize("red ❤️!") == ["red", "❤️", "!"]                    # a symbol keeps its variation selector


def test_zero_width_characters_are_never_tokens():
    for invisible in ("\u200b\u200d\u200e\ufeff", "\u200b", "\ufeff \u200e", "\u2060\u00ad"):
        assert tokenize(invisible) == [] and is_blank(invisible), repr(invisible)
    assert tokenize("\ufeffa \u200ered star\u200d") == ["a", "red", "star"]
    assert tokenize("red\u200bstar") == ["red", "star"]                  # a zero-width *space* separates
    assert tokenize("می\u200cخواهم") == ["می\u200cخواهم"]                # ZWNJ inside a Persian word is kept
    assert not is_blank("\u200ba") and is_blank(" \t\n")


def test_chars_tokenizer_splits_scripts_without_spaces_and_decode_joins_them_back():
    text = "赤い星と青い丸。"
    assert tokenize(text) == ["赤い星と青い丸", "。"]                    # "words": one token per run
    toks = tokenize(text, "chars")
    assert toks == ["赤", "い", "星", "と", "青", "い", "丸", "。"]
    assert tokenize("A red star: 赤い星", "chars") == ["a", "red", "star", ":", "赤", "い", "星"]
    v = Vocabulary.build([toks], tokenizer="chars")
    assert v.decode(v.encode(toks)) == text
    assert v.decode(v.encode(tokenize("a star 赤い星。", "chars"))) == "<unk> <unk>赤い星。"
    assert Vocabulary.build([toks]).decode(v.encode(toks)) == " ".join(toks)     # "words" joins with spaces


def test_tokenizer_is_saved_with_the_vocabulary(tmp_path):
    v = Vocabulary.build([["赤", "い"]], tokenizer="chars")
    v.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").tokenizer == "chars"
    assert Vocabulary.from_json({"words": v.words, "counts": v.counts}).tokenizer == "words"   # older files


def test_vocabulary_counts_only_tokens_that_survive_truncation():
    long = ["a", "red", "star"] + [f"w{i}" for i in range(500)]
    v = Vocabulary.build([long, ["a", "blue", "circle"]], max_len=6)       # 4 tokens + <start>/<end>
    assert v.words[4:] == ["a", "blue", "circle", "red", "star", "w0"]
    assert v.encode(long, max_len=6).tolist() == [1, v.id("a"), v.id("red"), v.id("star"), v.id("w0"), 2]
