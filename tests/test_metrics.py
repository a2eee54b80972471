"""model/metrics.py: the content scorer of the built-in dataset's captions."""
from model.metrics import score_content


def test_content_scoring_reads_claims():
    truth = [{"shape": "circle", "colour": "red", "size": "large", "cx": 10, "cy": 50, "r": 5},
             {"shape": "star", "colour": "blue", "size": "small", "cx": 90, "cy": 50, "r": 5}]
    ok = score_content("a large red circle to the left of a blue star .", truth)
    assert ok == {"colour": True, "shape": True, "count": True, "size": True, "relation": True, "exact": True}
    assert score_content("a red circle to the right of a blue star", truth)["relation"] is False
    assert score_content("a small red circle and a blue star", truth)["size"] is False
    assert score_content("a red circle", truth)["exact"] is False
    assert score_content("two shapes : a red square and a blue star", truth)["shape"] is False
