"""model/metrics.py: the content scorer of the built-in dataset's captions, the degenerate-caption counter."""
from model.metrics import count_degenerate, degenerate, score_content


def test_content_scoring_reads_claims():
    truth = [{"shape": "circle", "colour": "red", "size": "large", "cx": 10, "cy": 50, "r": 5},
             {"shape": "star", "colour": "blue", "size": "small", "cx": 90, "cy": 50, "r": 5}]
    ok = score_content("a large red circle to the left of a blue star .", truth)
    assert ok == {"colour": True, "shape": True, "count": True, "size": True, "relation": True, "exact": True}
    assert score_content("a red circle to the right of a blue star", truth)["relation"] is False
    assert score_content("a small red circle and a blue star", truth)["size"] is False
    assert score_content("a red circle", truth)["exact"] is False
    assert score_content("two shapes : a red square and a blue star", truth)["shape"] is False


def test_degenerate_captions_are_counted():
    bad = [", , , , a , ,", "there there a yellow a yellow a yellow", "an orange green green an green green an",
           "a red circle to the left of the", "a red circle next to a .", "a red star ,"]
    good = ["a red circle to the left of a blue star .", "a a red circle", "the red circle and the blue circle",
            "a red circle", ""]
    assert [degenerate(t) for t in bad] == [True] * 6 and [degenerate(t) for t in good] == [False] * 5
    assert count_degenerate(bad + good) == 6
    assert not degenerate("a red star ,", no_end_after=["the"]) and degenerate("a red circle", no_end_after=["circle"])
