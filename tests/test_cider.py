"""model/cider.py: CIDEr-D with fixed document frequencies equals pycocoevalcap's on the same set."""
import numpy as np
import pytest

from model.cider import CiderD, ngrams, with_end
from prepare.errors import UserError
from prepare.vocabulary import END_ID


def _random_set(seed: int, images: int = 30, vocab: int = 12):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    refs = {i: [[int(x) for x in rng.integers(4, vocab, size=rng.integers(3, 11))] for _ in range(rng.integers(1, 6))]
            for i in range(images)}
    hyps = {i: [int(x) for x in rng.integers(4, vocab, size=rng.integers(1, 12))] for i in range(images)}
    return words, refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_when_both_use_the_same_document_frequencies(seed):
    from pycocoevalcap.cider.cider import Cider
    words, refs, hyps = _random_set(seed)
    text = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    mean, per_image = Cider().compute_score({i: [text(r) for r in rs] for i, rs in refs.items()},
                                            {i: [text(h)] for i, h in hyps.items()})
    cider = CiderD.from_references(refs.values())          # df of this very set, as pycocoevalcap computes it
    ours = cider.scores([hyps[i] for i in refs], [cider.prepare(refs[i]) for i in refs])
    np.testing.assert_allclose(ours, per_image, rtol=1e-9, atol=1e-12)
    assert abs(ours.mean() - mean) < 1e-9
    assert ours.max() > 0                                   # some candidate shares n-grams with its references


def test_document_frequencies_stay_those_of_the_training_references():
    """Scoring a batch does not change the weights: an n-gram common in training is worth little,
    whatever the batch holds (pycocoevalcap would recompute df from the batch)."""
    train_refs = [[[5, 6, 7]], [[5, 6, 8]], [[5, 9, 10]], [[11, 12, 13]]]     # "5" in 3 of 4 images
    cider = CiderD.from_references(train_refs)
    assert cider.num_docs == 4 and cider.df[(5,)] == 3 and cider.df[(5, 6)] == 2 and (9, 10) in cider.df
    refs = cider.prepare([[5, 9, 10]])
    common, rare = cider.score([5], refs), cider.score([9], refs)
    assert 0 < common < rare


def test_a_perfect_caption_scores_highest_and_end_counts_as_a_token():
    cider = CiderD.from_references([[with_end([5, 6, 7]), with_end([5, 6, 8])], [with_end([9, 10, 11])]])
    refs = cider.prepare([with_end([5, 6, 7]), with_end([5, 6, 8])])
    exact, cut, other = (cider.score(with_end(c), refs) for c in ([5, 6, 7], [5, 6], [9, 10, 11]))
    assert exact > cut > other == 0.0
    assert (6, END_ID) in ngrams(with_end([5, 6]))          # "... 6 <end>": a bad ending costs n-grams


def test_saved_and_loaded_frequencies_score_the_same(tmp_path):
    words, refs, hyps = _random_set(3)
    cider = CiderD.from_references(refs.values())
    cider.save(tmp_path / "df.json.gz")
    again = CiderD.load(tmp_path / "df.json.gz")
    assert again.df == cider.df and again.num_docs == cider.num_docs
    assert again.score(hyps[0], again.prepare(refs[0])) == cider.score(hyps[0], cider.prepare(refs[0]))
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="bad.json.gz: not a CIDEr-D document-frequency file"):
        CiderD.load(tmp_path / "bad.json.gz")
