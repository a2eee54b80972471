"""model/decoding.py: the in-graph beam search against the Python reference (infer/beam_search.py,
pinned on hand-made tables in tests/test_beam_search.py), greedy decoding against
the reference greedy_decode below, and sampling, on a graph version of the hand-made table and on small
random decoders of both kinds."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from infer.beam_search import beam_search_batch
from infer.captioner import numpy_decoding
from model import decoding
from model.config import ModelConfig
from model.decoders import build_decoder
from model.decoding import compiled_decoding
from prepare.vocabulary import END_ID, PAD_ID, START_ID
from tests.test_beam_search import DEFAULT, TABLE, PrefixModel, run


# The reference greedy decoding: a Python loop over the compiled initial_state/step (training's
# samples used it before the in-graph greedy replaced it)
def greedy_decode(init, step, features: np.ndarray, start_id: int, end_id: int, max_len: int) -> list[list[int]]:
    """Batched greedy captions (monitoring during training). Returns ids without <start>/<end>."""
    state = init(np.asarray(features, np.float32))
    words = np.full(len(features), start_id, np.int32)
    out = [[] for _ in features]
    done = np.zeros(len(features), bool)
    for _ in range(max_len - 1):
        logp, state = step(words, state)
        words = np.argmax(logp.numpy(), axis=-1).astype(np.int32)
        for i, w in enumerate(words):
            if not done[i]:
                if w == end_id:
                    done[i] = True
                else:
                    out[i].append(int(w))
        if done.all():
            break
    return out


# the table's words (<start>, <end>, A, B, C = 0..4) are vocabulary ids 1..5; 0 is <pad>
A, B = 3, 4


class TableDecoder:
    """test_beam_search's PrefixModel as a graph decoder: the state is the number of the prefix
    decoded so far, the logits are the logs of the table's probabilities (<pad> never)."""

    def __init__(self, table=TABLE, default=DEFAULT, depth=6):
        oracle = PrefixModel(table, default)
        prefixes = [(0,)]
        for p in prefixes:                                     # breadth first, up to `depth` words
            if len(p) <= depth:
                prefixes += [p + (w,) for w in range(len(default))]
        index = {p: i for i, p in enumerate(prefixes)}
        nxt = np.zeros((len(prefixes), len(default) + 1), np.int32)
        logits = np.full((len(prefixes), len(default) + 1), -np.inf, np.float32)
        for p, i in index.items():
            nxt[i] = i                                         # <pad> and the deepest prefixes: never fed
            for w in range(len(default)):
                full = p if len(p) == 1 and w == 0 else p + (w,)     # PrefixModel.full_prefix's rule
                nxt[i, w + 1] = index.get(full, i)
            with np.errstate(divide="ignore"):
                logits[i, 1:] = np.log(oracle.probs(p))
        self.next, self.logits = tf.constant(nxt), tf.constant(logits)

    def state_shapes(self):
        return ((1,),)

    def initial_state(self, features):
        return (tf.zeros([tf.shape(features)[0], 1], tf.int32),)

    def step_logits(self, word_ids, state):
        node = tf.gather_nd(self.next, tf.stack([state[0][:, 0], tf.cast(word_ids, tf.int32)], axis=1))
        return tf.gather(self.logits, node), (node[:, None],)


def _graph_captions(ids, lengths, lps):
    """decoding.beam_search's tensors -> per image [(ids, logprob)] of its real captions."""
    ids, lengths, lps = ids.numpy(), lengths.numpy(), lps.numpy()
    return [[(ids[i, j, :lengths[i, j]].tolist(), float(lps[i, j])) for j in range(ids.shape[1])
             if np.isfinite(lps[i, j])] for i in range(len(ids))]


def assert_same_beams(want, ids, lengths, lps, complete) -> None:
    """The graph search's beams (ids, lengths, log-probs, complete) are the Python reference's `want`,
    and the images' best captions differ (the features really reach the decoder)."""
    got = _graph_captions(ids, lengths, lps)
    for i, caps in enumerate(want):
        assert [c.ids for c in caps] == [c for c, _ in got[i]]
        np.testing.assert_allclose([c.logprob for c in caps], [lp for _, lp in got[i]], rtol=1e-4, atol=1e-4)
        assert [c.complete for c in caps] == list(complete.numpy()[i][:len(caps)])
    assert len({tuple(c[0][0]) for c in got}) > 1                      # the images really differ


# ---- beam search ---------------------------------------------------------------------------
@pytest.mark.parametrize("beam,max_len,norm", [(b, L, 0.0) for b in (1, 2, 3) for L in (1, 2, 3, 4)]
                         + [(2, 4, 1.0), (3, 6, 0.0), (2, 6, 0.7)])
def test_graph_beam_search_equals_the_python_one_on_the_hand_made_table(beam, max_len, norm):
    want = run(beam, max_len, norm)[0]
    ids, lengths, lps, complete = decoding.beam_search(TableDecoder(), tf.zeros([3, 1]), beam_size=beam,
                                                       max_len=max_len, length_norm=norm)
    for caps in _graph_captions(ids, lengths, lps):                    # three identical images
        assert [([w - 1 for w in c], round(math.exp(lp), 6)) for c, lp in caps] == want


def test_graph_beam_search_never_expands_a_word_of_zero_probability():
    table = {(0,): [0.0, 0.0, 0.6, 0.4, 0.0]}
    ids, lengths, lps, complete = decoding.beam_search(TableDecoder(table), tf.zeros([1, 1]), beam_size=3, max_len=2)
    assert [(c, round(math.exp(lp), 6)) for c, lp in _graph_captions(ids, lengths, lps)[0]] == \
        [([START_ID, A], 0.6), ([START_ID, B], 0.4)]
    assert not complete.numpy()[0, :2].any()



# ---- guards (issue #22): hand-made tables whose best path babbles --------------------------
S, E, TA, TB, TC = 0, 1, 2, 3, 4                 # the tables' words; vocabulary ids are one more (C = 5)
C = 5


def _by_last_word(rule, depth=6):
    """A table whose next-word probabilities depend on the last word only: rule[last word]."""
    import itertools
    return {(S, *rest): rule[rest[-1] if rest else S] for n in range(depth + 1)
            for rest in itertools.product(range(5), repeat=n)}


def _search(table, beam, max_len, guards, default=(0, 1, 0, 0, 0), n=1):
    ids, lengths, lps, complete = decoding.beam_search(TableDecoder(table, list(default)), tf.zeros([n, 1]),
                                                       beam_size=beam, max_len=max_len, guards=guards)
    assert not np.isnan(lps.numpy()).any()
    return [([w - 1 for w in c], round(math.exp(lp), 6)) for c, lp in _graph_captions(ids, lengths, lps)[0]]


REPEATS = {(S,): [0, .1, .6, .3, 0], (S, TA): [0, .05, .8, .15, 0], (S, TA, TA): [0, .9, .1, 0, 0],
           (S, TA, TB): [0, .9, .1, 0, 0], (S, TB): [0, .5, .4, .1, 0]}
#                         <s> <end>  A    B    C
TRIGRAMS = _by_last_word({S: [0, 0, .9, .1, 0], TA: [0, .1, 0, .9, 0], TB: [0, .3, .6, 0, .1],
                          TC: [0, .9, .1, 0, 0], E: [0, 1, 0, 0, 0]})
ENDS = {(S,): [0, .05, .8, .15, 0], (S, TA): [0, .1, 0, .2, .7], (S, TA, TC): [0, .8, 0, .2, 0],
        (S, TA, TC, TB): [0, .9, .1, 0, 0]}
ON = decoding.BeamGuards(no_end_after=(C,))               # C plays "the"


@pytest.mark.parametrize("table,beam,max_len,off,on", [
    (REPEATS, 1, 4, [([S, TA, TA, E], .432)], [([S, TA, TB, E], .081)]),
    (REPEATS, 2, 4, [([S, TA, TA, E], .432), ([S, TB, E], .15)],
     [([S, TB, E], .15), ([S, TB, TA, E], .12)]),          # S A B E (.081) falls out
    (TRIGRAMS, 1, 8, [([S, TA, TB, TA, TB, TA, TB, TA], .9 ** 4 * .6 ** 3)],
     [([S, TA, TB, TA, E], round(.9 * .9 * .6 * .1, 6))]),          # B would repeat the pair (A, B)
    (ENDS, 1, 5, [([S, TA, TC, E], .448)], [([S, TA, TC, TB, E], .1008)]),
])
def test_guarded_beam_search_gives_the_hand_computed_beams_and_unguarded_the_references(table, beam, max_len,
                                                                                        off, on):
    default = [0, 1, 0, 0, 0]
    assert _search(table, beam, max_len, None) == run(beam, max_len, table=table, default=default)[0] == \
        [(c, round(p, 6)) for c, p in off]
    assert _search(table, beam, max_len, ON) == [(c, round(p, 6)) for c, p in on]


def test_each_guard_alone_and_a_beam_whose_every_word_is_forbidden_dies_without_nan():
    only = lambda **kw: decoding.BeamGuards(**{"repeats": False, "trigrams": False, "finish": False, **kw})  # noqa: E731
    assert _search(REPEATS, 1, 4, only(repeats=True)) == [([S, TA, TB, E], .081)]
    assert _search(REPEATS, 1, 4, only(trigrams=True, no_end_after=(C,))) == [([S, TA, TA, E], .432)]
    assert _search(ENDS, 1, 5, only(no_end_after=(C,))) == [([S, TA, TC, TB, E], .1008)]
    assert _search(ENDS, 1, 5, only(no_end_after=(C + 1,))) == [([S, TA, TC, E], .448)]
    assert _search(TRIGRAMS, 1, 8, only(trigrams=True)) == [([S, TA, TB, TA, TB, E], round(.9 ** 3 * .6 * .3, 6))]
    assert _search(TRIGRAMS, 1, 8, only(repeats=True)) == [([S, TA, TB, TA, E], round(.9 * .9 * .6 * .1, 6))]
    # a word that ends a sentence (B plays ".") is forbidden after C ("the") like <end> itself
    assert _search(ENDS, 1, 5, only(no_end_after=(C,), enders=(TB + 1,))) == []
    assert _search(ENDS, 2, 5, only(no_end_after=(C,), enders=(TB + 1,))) == [([S, TA, TB, E], .16), ([S, TB, E], .15)]
    # A, then only A again (a repeat): the one beam dies; with beam 2 the other one lives on
    stuck = {(S,): [0, 0, .7, .3, 0], (S, TA): [0, 0, 1, 0, 0], (S, TB): [0, .5, .4, .1, 0]}
    assert _search(stuck, 1, 4, ON) == []
    assert _search(stuck, 1, 4, None) == [([S, TA, TA, E], .7)]
    assert _search(stuck, 2, 4, ON) == [([S, TB, E], .15), ([S, TB, TA, E], .12)]
    ids, lengths, lps, complete = decoding.beam_search(TableDecoder(stuck, [0, 1, 0, 0, 0]), tf.zeros([2, 1]),
                                                       beam_size=1, max_len=4, guards=ON)
    assert lps.numpy().tolist() == [[-np.inf]] * 2 and not complete.numpy().any()


def test_the_finish_guard_ends_a_caption_the_length_limit_would_cut_off():
    #                              <s> <end>  A    B    C
    ramble = _by_last_word({S: [0, 0, .9, .1, 0], TA: [0, .2, 0, .6, .2], TB: [0, .1, .7, 0, .2],
                            TC: [0, .3, .4, .3, 0], E: [0, 1, 0, 0, 0]})
    only = lambda **kw: decoding.BeamGuards(**{"repeats": False, "trigrams": False, "finish": False, **kw})  # noqa: E731
    assert _search(ramble, 1, 5, None) == _search(ramble, 1, 5, only()) == [([S, TA, TB, TA, TB], .2268)]
    assert _search(ramble, 1, 5, only(finish=True)) == [([S, TA, TB, TA, E], .0756)]    # .9 * .6 * .7 * .2
    ids, lengths, lps, complete = decoding.beam_search(TableDecoder(ramble, [0, 1, 0, 0, 0]), tf.zeros([1, 1]),
                                                       beam_size=2, max_len=5, guards=only(finish=True))
    assert complete.numpy().all()
    # a caption cannot end on C ("the"): so C is forbidden at the step before the last too, and it ends
    to_c = _by_last_word({S: [0, 0, .9, .1, 0], TA: [0, .1, 0, .3, .6], TB: [0, .1, .7, 0, .2],
                          TC: [0, .3, .4, .3, 0], E: [0, 1, 0, 0, 0]})
    assert _search(to_c, 1, 4, only(finish=True)) == [([S, TA, TC, E], .162)]
    assert _search(to_c, 1, 4, only(finish=True, no_end_after=(C,))) == [([S, TA, TB, E], .027)]   # not S A C
    ids, lengths, lps, complete = decoding.beam_search(TableDecoder(to_c, [0, 1, 0, 0, 0]), tf.zeros([1, 1]),
                                                       beam_size=1, max_len=4, guards=only(finish=True, no_end_after=(C,)))
    assert lengths.numpy().tolist() == [[4]] and complete.numpy().all()
    assert _search(to_c, 2, 4, only(finish=True, no_end_after=(C,))) == [([S, TA, E], .09), ([S, TA, TB, E], .027)]


@pytest.mark.parametrize("kind", ["show_and_tell", "attention"])
def test_guards_that_forbid_nothing_give_the_unguarded_search_and_guarded_beams_never_babble(kind):
    m, feats = _random_decoder(kind, sharp=4.0)
    f = tf.constant(feats)
    plain = decoding.beam_search(m, f, beam_size=3, max_len=9)
    none = decoding.beam_search(m, f, beam_size=3, max_len=9, guards=decoding.BeamGuards(False, False, (), False))
    np.testing.assert_array_equal(plain[0], none[0])
    np.testing.assert_allclose(plain[2], none[2], rtol=1e-5)
    ids, lengths, lps, _ = (x.numpy() for x in decoding.beam_search(m, f, beam_size=3, max_len=9,
                                                                     guards=decoding.BeamGuards(no_end_after=(5,))))
    seen = 0
    for i in range(len(ids)):
        for j in range(3):
            c = ids[i, j, :lengths[i, j]].tolist()
            if not np.isfinite(lps[i, j]):
                continue
            seen += 1
            assert all(a != b for a, b in zip(c, c[1:]))
            grams = [tuple(c[x:x + 3]) for x in range(len(c) - 2)]
            assert len(grams) == len(set(grams))
            assert not (c[-1] == END_ID and c[-2] == 5)
    assert seen > 10
    babble = sum(any(a == b for a, b in zip(c, c[1:])) for c in plain[0].numpy().reshape(-1, 9).tolist())
    assert babble > 0                                                    # the guards had work to do


def test_unsure_marks_a_low_mean_log_prob_per_word():
    lp, lengths = np.array([[-1.0, -6.0, -np.inf]]), np.array([[3, 4, 1]])
    assert decoding.unsure(lp, lengths, -1.5).tolist() == [[False, True, False]]       # -0.5, -2 per word
    assert decoding.unsure(tf.constant(lp, tf.float32), tf.constant(lengths), -1.5).numpy().tolist() == \
        [[False, True, False]]
    g = decoding.Guards(no_end_after=("the", "zebra", ","))
    assert g.resolve(["<pad>", "<start>", "<end>", "<unk>", ",", "the"]) == decoding.BeamGuards(no_end_after=(4, 5))
    assert decoding.Guards(on=False).resolve(["<pad>"]) is None

def _random_decoder(kind, vocab=13, sharp=25.0, seed=3):
    """A small decoder whose logits are scaled up: distributions peaked enough that no two
    captions tie to float32 rounding."""
    grid = kind == "attention"
    m = build_decoder(ModelConfig(vocab_size=vocab, decoder=kind, feature_dim=6, grid_positions=4 if grid else 0,
                                  embedding_size=8, lstm_units=5, attention_units=7, dropout=0.0), seed=seed)
    m.logits.kernel.assign(m.logits.kernel * sharp)
    feats = np.random.default_rng(seed).normal(size=(7, *m.feature_shape)).astype(np.float32) * 2
    return m, feats


@pytest.mark.parametrize("kind", ["show_and_tell", "attention"])
@pytest.mark.parametrize("beam,max_len,norm", [(1, 6, 0.0), (3, 8, 0.0), (4, 7, 0.7)])
def test_graph_beam_search_equals_the_python_one_on_random_decoders(kind, beam, max_len, norm):
    m, feats = _random_decoder(kind)
    init, step = numpy_decoding(m)
    want = beam_search_batch(step, init(feats), start_id=START_ID, end_id=END_ID, beam_size=beam, max_len=max_len,
                             length_norm=norm)
    ids, lengths, lps, complete = decoding.beam_search(m, tf.constant(feats), beam_size=beam, max_len=max_len,
                                                       length_norm=norm)
    assert_same_beams(want, ids, lengths, lps, complete)


def test_in_graph_beam_search_equals_the_python_one_on_the_same_features(tiny_run):
    from infer.captioner import Captioner
    cap = Captioner(tiny_run, beam_size=3, max_len=12)
    f = np.load(Path(json.loads((tiny_run / "config.json").read_text())["data"]["features"]) / "test.npy")
    want = cap.caption_features_python(f)
    ids, lengths, lp, complete = decoding.beam_search(cap.model, tf.constant(f), beam_size=3, max_len=12)
    text = decoding.ids_to_text(tf.constant(cap.vocab.words), ids).numpy().astype(str)
    for i, caps in enumerate(want):
        assert [cap.text(c) for c in caps] == list(text[i][:len(caps)])
        np.testing.assert_allclose([c.logprob for c in caps], lp.numpy()[i][:len(caps)], rtol=1e-4, atol=1e-4)
        assert [len(c.ids) for c in caps] == list(lengths.numpy()[i][:len(caps)])
        assert [c.complete for c in caps] == list(complete.numpy()[i][:len(caps)])


def test_top_k_by_blocks_equals_tf_top_k_ties_and_infinities_included():
    rng = np.random.default_rng(6)
    for V in (12000, 12003, 640, 100):
        x = rng.normal(size=(4, 3, V)).astype(np.float32)
        x[1] = np.round(x[1] * 2) / 2                      # many ties
        x[2, 0] = -np.inf
        x[2, 0, V - 1] = 1.0                               # one finite word, at the very end
        x[3, 1, :5] = 7.0                                  # the best words tied, first block
        for k in (1, 3, 5):
            want, got = tf.math.top_k(x, k), decoding.top_k_words(tf.constant(x), k)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


# ---- greedy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["show_and_tell", "attention"])
def test_greedy_equals_greedy_decode(kind):
    m, feats = _random_decoder(kind)
    init, step = compiled_decoding(m)
    for max_len in (1, 2, 5, 12):
        want = greedy_decode(init, step, feats, START_ID, END_ID, max_len)
        assert decoding.greedy(m, feats, max_len) == want
        assert decoding.greedy(m, feats[2:5], max_len) == want[2:5]            # another batch size
    assert len({tuple(c) for c in want}) > 1 and any(len(c) < 11 for c in want)   # differ, some end early


def test_greedy_ids_pads_after_the_last_word_and_stops_when_every_row_ended():
    table = TableDecoder()
    ids, lengths = decoding.greedy_ids(table, tf.zeros([2, 1]), 6)
    assert ids.numpy().tolist() == [[A, B, PAD_ID, PAD_ID, PAD_ID]] * 2 and lengths.numpy().tolist() == [2, 2]
    ids, lengths = decoding.greedy_ids(table, tf.zeros([1, 1]), 3)                  # stopped by max_len
    assert ids.numpy().tolist() == [[A, B]] and lengths.numpy().tolist() == [2]
    calls = []
    step = table.step_logits
    table.step_logits = lambda w, s: (calls.append(1), step(w, s))[1]
    ids, lengths = tf.function(lambda f: decoding.greedy_ids(table, f, 40))(tf.zeros([2, 1]))
    assert lengths.numpy().tolist() == [2, 2] and ids.shape == (2, 39)
    assert len(calls) == 1                                                    # one while_loop body, traced once


# ---- sampling --------------------------------------------------------------------------------
def test_sampling_at_low_temperature_is_greedy_and_respects_end():
    table = TableDecoder()
    ids, lengths, lps = decoding.sample(table, tf.zeros([2, 1]), samples=2, max_len=6, temperature=1e-4, seed=0)
    greedy = run(1, 6)[0][0][0]
    assert greedy[-1] == 1                                                    # the table's <end>
    assert ids.numpy().tolist() == [[w + 1 for w in greedy[1:]] + [PAD_ID, PAD_ID]] * 4
    assert lengths.numpy().tolist() == [3] * 4
    np.testing.assert_allclose(lps.numpy(), [math.log(0.5 * 0.55 * 0.5)] * 4, rtol=1e-5)
    ids, lengths, lps = decoding.sample(table, tf.zeros([4, 1]), samples=50, max_len=3, temperature=1.0, seed=1)
    firsts = np.bincount(ids.numpy()[:, 0], minlength=6) / 200
    assert abs(firsts[A] - 0.5) < 0.1 and abs(firsts[B] - 0.3) < 0.1 and firsts[START_ID] == firsts[PAD_ID] == 0
    assert ((lengths.numpy() == 1) == (ids.numpy()[:, 0] == END_ID)).all()


def test_the_same_seed_gives_the_same_samples_eager_or_compiled():
    m, feats = _random_decoder("show_and_tell", sharp=3.0)
    f = tf.constant(feats)
    a = decoding.sample(m, f, samples=3, max_len=9, seed=7)
    b = tf.function(lambda x: decoding.sample(m, x, samples=3, max_len=9, seed=7))(f)
    c = decoding.sample(m, f, samples=3, max_len=9, seed=[7, 1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert a[0].shape == (7 * 3, 8) and a[1].shape == a[2].shape == (21,)
    assert not np.array_equal(a[0].numpy(), c[0].numpy())
    assert len({tuple(r) for r in a[0].numpy()[:3]}) > 1                      # an image's K samples differ


@pytest.mark.parametrize("kind", ["show_and_tell", "attention"])
def test_sample_log_probs_are_the_teacher_forced_ones_of_the_sampled_words(kind):
    m, feats = _random_decoder(kind, sharp=3.0)
    K, max_len = 4, 7
    ids, lengths, lps = (x.numpy() for x in decoding.sample(m, tf.constant(feats), samples=K, max_len=max_len,
                                                            seed=3, temperature=1.3))
    T = max_len - 1
    pos = np.arange(T)[None, :]
    ended = (ids == END_ID) & (pos == lengths[:, None] - 1)
    assert ((ids == END_ID).sum(1) == ended.sum(1)).all()                      # <end> only as the last word
    assert (ids[pos >= lengths[:, None]] == PAD_ID).all() and (lengths[~ended.any(1)] == T).all()
    assert ended.any() and (~ended.any(1)).any()
    inputs = np.concatenate([np.full((len(ids), 1), START_ID, np.int32), ids[:, :-1]], axis=1)
    logp = m(np.repeat(feats, K, axis=0), inputs).numpy()                     # [N*K, T, V]
    forced = np.take_along_axis(logp, ids[:, :, None], axis=2)[:, :, 0]
    np.testing.assert_allclose(lps, np.where(pos < lengths[:, None], forced, 0.0).sum(1), rtol=1e-4, atol=1e-4)


def test_ids_to_text_joins_as_vocabulary_decode_for_both_tokenizers():
    """The SavedModel's in-graph join equals Vocabulary.decode, spaces included, on random captions
    mixing Latin words with characters of scripts written without spaces."""
    from prepare.vocabulary import Vocabulary
    words = ["<pad>", "<start>", "<end>", "<unk>", "犬", "が", "red", "ball", "。", "A", "วั", "ก", "x1"]
    rng = np.random.default_rng(0)
    seqs = [[1, *rng.integers(3, len(words), size=rng.integers(1, 9)).tolist(), 2] for _ in range(40)]
    L = max(map(len, seqs))
    ids = tf.constant([[s + [0] * (L - len(s))] for s in seqs], tf.int32)               # [40, 1, L]
    for tokenizer in ("words", "chars"):
        v = Vocabulary(words, tokenizer=tokenizer)
        got = [b.decode() for b in decoding.ids_to_text(tf.constant(words), ids, tokenizer).numpy()[:, 0]]
        assert got == [v.decode(s) for s in seqs]
    assert Vocabulary(words, tokenizer="chars").decode([1, 9, 4, 5, 6, 7, 8, 2]) == "A犬がred ball。"
