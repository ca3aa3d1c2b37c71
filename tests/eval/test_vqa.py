"""VQA accuracy (official protocol), soft answer targets, classification accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.errors import ConfigError
from vlp.eval import (
    ClassificationAccuracy,
    VQAAccuracy,
    format_vqa_table,
    meter_answer_score,
    normalize_answer,
    vqa_accuracy,
    vqa_answer_score,
    vqa_soft_scores,
    vqa_soft_target,
)

# -- normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # lower-case, number word -> digit
        ("none", "0"),
        ("ten", "10"),
        ("the dog.", "dog"),  # article dropped, trailing period stripped
        ("yes!", "yes"),  # "!" not next to a space -> space, then split
        ("isnt", "isn't"),  # contractions table
        ("dont", "don't"),
        ("whats", "what's"),
        ("a  red  ball", "red ball"),  # article dropped, runs of spaces collapsed
        ("  Red\tBall\n", "red ball"),  # tab / newline to space, strip
        ("2.5", "2.5"),  # a period followed by a digit stays
        (".5", ".5"),
        ("2.", "2"),
        ("mr. smith", "mr smith"),
        ("3,000", "3000"),  # digit,digit: every punctuation char is deleted, not spaced
        ("1,000 people, mostly", "1000 people mostly"),
        ("black/white", "black white"),  # in-word punctuation becomes a space
        ("t-shirt", "t shirt"),
        ("yes , no", "yes no"),  # punctuation next to a space is deleted
        ("(red)", "red"),
        ("it's", "it's"),  # the apostrophe is not in the punctuation list
        ("10:30", "10:30"),  # nor is the colon
        ("An Apple", "apple"),
    ],
)
def test_normalize_answer_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_rejects_non_str():
    with pytest.raises(ConfigError, match="expects a str"):
        normalize_answer(None)


# -- per-question accuracy ---------------------------------------------------------------------


def answers_with(k: int, n: int = 10) -> list[str]:
    return ["cat"] * k + ["dog"] * (n - k)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),  # (0 + 10 * 0) / 10
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10
        (10, 1.0),  # (10 * 1) / 10
    ],
)
def test_vqa_accuracy_leave_one_out_ten_answers(k, expected):
    assert vqa_accuracy("cat", answers_with(k)) == pytest.approx(expected)


def test_vqa_accuracy_fewer_answers_same_leave_one_out():
    # 5 answers, 2 match: the 2 subsets that drop a match have 1 match (1/3), the 3 others 2 (2/3)
    assert vqa_accuracy("cat", answers_with(2, n=5)) == pytest.approx((2 * (1 / 3) + 3 * (2 / 3)) / 5)
    # 2 answers, both match: each subset of 1 has 1 match -> 1/3
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)


def test_vqa_accuracy_single_answer_is_exact_match():
    assert vqa_accuracy("Cat.", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["two", "Two", "2!", "the 2", "three"] * 2) == pytest.approx(1.0)


def test_vqa_accuracy_empty_answers_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ConfigError, match="list of str"):
        vqa_accuracy("yes", "yes")


# -- soft targets ------------------------------------------------------------------------------

VOCAB = {"yes": 0, "no": 1, "2": 2, "red": 3}


def test_answer_scores():
    assert [meter_answer_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert [vqa_answer_score(c) for c in range(5)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    with pytest.raises(ConfigError):
        meter_answer_score(-1)


def test_vqa_soft_scores_vilt_scheme_and_dropped():
    # normalised: yes x4, 2 x2 ("two", "2"), no x1, blue x2 (not in vocab), purple x1 (not in vocab)
    answers = ["yes", "Yes", "yes!", "yes", "two", "2", "no", "blue", "blue", "purple"]
    labels, scores, dropped = vqa_soft_scores(answers, VOCAB)
    assert labels == [0, 1, 2]
    assert scores == pytest.approx([1.0, 0.3, 0.6])
    assert dropped == 3


def test_vqa_soft_scores_vqa_scheme():
    answers = ["yes", "yes", "no", "red", "red", "red", "red"]
    out = vqa_soft_scores(answers, VOCAB, scheme="vqa")
    assert out.labels == [0, 1, 3]
    assert out.scores == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert out.dropped == 0


def test_vqa_soft_scores_nothing_in_vocab_and_bad_scheme():
    assert tuple(vqa_soft_scores(["maybe", "perhaps"], VOCAB)) == ([], [], 2)
    with pytest.raises(ConfigError, match="scheme"):
        vqa_soft_scores(["yes"], VOCAB, scheme="bce")


def test_vqa_soft_target_dense():
    target = vqa_soft_target(["no", "no", "no", "2", "blue"], VOCAB)
    assert target.shape == (4,) and target.dtype == torch.float32
    assert target.tolist() == pytest.approx([0.0, 0.9, 0.3, 0.0])


# -- VQAAccuracy -------------------------------------------------------------------------------

TYPES = ["what color", "how many", "is the"]
# (prediction, 10 human answers, question type, hand-computed accuracy)
SAMPLES = [
    ("red", ["red"] * 10, "what color", 1.0),
    ("blue", ["blue"] * 2 + ["red"] * 8, "what color", 0.6),
    ("Two", ["2"] * 3 + ["3"] * 7, "how many", 0.9),
    ("4", ["3"] * 10, "how many", 0.0),
    ("yes", ["yes"] * 1 + ["no"] * 9, "is the", 0.3),
    ("dog", ["dog"] * 5 + ["cat"] * 5, "what animal", 1.0),  # unknown type -> "other"
]


def run(metric: VQAAccuracy, samples) -> None:
    metric.update([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples])


def test_vqa_accuracy_metric_per_type():
    metric = VQAAccuracy(question_types=TYPES)
    assert metric.question_types == ["how many", "is the", "what color"]  # sorted
    run(metric, SAMPLES[:2])
    run(metric, SAMPLES[2:5])
    run(metric, SAMPLES[5:])
    out = metric.compute()
    assert list(out) == ["overall", "how many", "is the", "what color", "other"]
    assert out["overall"] == pytest.approx(100 * (1.0 + 0.6 + 0.9 + 0.0 + 0.3 + 1.0) / 6)
    assert out["what color"] == pytest.approx(80.0)
    assert out["how many"] == pytest.approx(45.0)
    assert out["is the"] == pytest.approx(30.0)
    assert out["other"] == pytest.approx(100.0)


def test_vqa_accuracy_metric_omits_empty_types_and_untyped_updates():
    metric = VQAAccuracy(question_types=TYPES)
    run(metric, SAMPLES[:2])  # only "what color"
    metric.update(["no"], [["no"] * 10])  # no types: counts in overall only
    out = metric.compute()
    assert out == pytest.approx({"overall": 100 * (1.0 + 0.6 + 1.0) / 3, "what color": 80.0})


def test_vqa_accuracy_metric_merge_equals_single_instance():
    whole, a, b = (VQAAccuracy(question_types=TYPES) for _ in range(3))
    run(whole, SAMPLES)
    run(a, SAMPLES[:3])
    run(b, SAMPLES[3:])
    a.merge_state(b)
    merged, single = a.compute(), whole.compute()
    assert merged.keys() == single.keys()
    assert merged == pytest.approx(single)
    assert int(a.count) == 6 and a.type_count.tolist() == [2, 1, 2, 1]


def test_vqa_accuracy_metric_refuses_mismatched_merge_and_bad_input():
    a, b = VQAAccuracy(question_types=TYPES), VQAAccuracy(question_types=["what color"])
    with pytest.raises(ConfigError, match="merge"):
        a.merge_state(b)
    with pytest.raises(ConfigError, match="2 predicted answers but 1"):
        a.update(["yes", "no"], [["yes"]])
    with pytest.raises(ConfigError, match="question 1 .* empty"):
        a.update(["yes", "no"], [["yes"], []])
    with pytest.raises(ConfigError, match="overall"):
        VQAAccuracy(question_types=["overall"])


def test_vqa_accuracy_metric_empty_is_nan():
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(VQAAccuracy().compute()["overall"])


# -- ClassificationAccuracy --------------------------------------------------------------------


def test_classification_accuracy_indices_and_logits():
    metric = ClassificationAccuracy(num_classes=3)  # SNLI-VE
    metric.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))  # 3 / 4
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 5.0], [0.3, 0.2, 0.1], [0.0, 1.0, 0.0]])  # argmax 0 2 0 1
    metric.update(logits, torch.tensor([0, 1, 0, 2]))  # 2 / 4
    assert metric.compute() == pytest.approx(100 * 5 / 8)


def test_classification_accuracy_binary_merge_and_errors():
    a, b = ClassificationAccuracy(num_classes=2), ClassificationAccuracy(num_classes=2)  # NLVR2
    a.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]))  # 2 / 3
    b.update(torch.tensor([[0.2, 0.8]]), torch.tensor([0]))  # 0 / 1
    a.merge_state(b)
    assert a.compute() == pytest.approx(50.0)
    with pytest.raises(ConfigError, match="class indices"):
        a.update(torch.tensor([0.7, 0.2]), torch.tensor([1, 0]))
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        a.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="num_classes"):
        ClassificationAccuracy(num_classes=1)


# -- table -------------------------------------------------------------------------------------


def test_format_vqa_table_rows_and_baseline_column():
    results = {"overall": 71.25, "how many": 45.0, "what color": 80.0, "other": 100.0}
    baseline = {"overall": 40.5, "how many": 33.0, "what color": 20.0, "majority_answer": {"how many": "2"}}
    table = format_vqa_table(results, baseline, title="VQA val")
    lines = table.splitlines()
    assert lines[0] == "VQA val"
    assert "baseline %" in lines[1]
    body = {line.rsplit(maxsplit=2)[0].strip(): line.split()[-2:] for line in lines[2:]}
    assert body == {
        "overall": ["71.25", "40.50"],
        "how many": ["45.00", "33.00"],
        "what color": ["80.00", "20.00"],
        "other": ["100.00", "-"],
    }
    assert lines[2].startswith("overall")
    plain = format_vqa_table(results)
    assert "baseline" not in plain and len(plain.splitlines()) == 1 + len(results)
