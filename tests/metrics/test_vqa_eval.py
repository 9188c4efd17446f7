"""Official VQA accuracy: each normalization rule and both versions on hand-worked examples."""

import copy

import pytest

from mmf_plugins.metrics.vqa_eval import (
    CONTRACTIONS,
    evaluate,
    process_digit_article,
    process_punctuation,
    round_like_python2,
    vqa_score,
)


# ------------------------------------------------------------------------------ process_punctuation
@pytest.mark.parametrize(
    "text, expected",
    [
        ("t-shirt", "t shirt"),  # inside a word -> space
        ("yes, it is", "yes it is"),  # next to a space -> deleted
        ("a,b", "a b"),
        ("hi !", "hi "),  # " !" -> deleted
        ("hello!", "hello "),  # not next to a space -> space (no strip afterwards)
        ("a-b - c", "ab  c"),  # one "-" next to a space deletes EVERY "-"
        ("3,5", "35"),  # digit,digit -> every mark deleted
        ("3,5 (approx)", "35 approx"),
        ("1,000-2,000", "10002000"),
        ("(red)", " red "),
        ("x/y", "x y"),
        ("back\\slash", "back slash"),
        ("it's 5:30 #1 $5 50% a&b a*b ~ |", "it's 5:30 #1 $5 50% a&b a*b ~ |"),  # never stripped
        ("end.", "end"),  # period not before a digit -> removed
        ("3.5", "3.5"),  # period before a digit kept
        ("1.5.", "1.5"),
        ("a.b.c", "abc"),
        ("", ""),
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_removes_at_most_32_periods():
    # the official passes re.UNICODE (== 32) as the regex count
    assert process_punctuation("a." * 40) == "a" * 32 + "a." * 8


# ---------------------------------------------------------------------------- process_digit_article
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two Dogs", "2 dogs"),
        ("none", "0"),
        ("zero ten eleven", "0 10 eleven"),
        ("the cat", "cat"),
        ("a an the", ""),
        ("  on   a  table ", "on table"),
        ("dont", "don't"),
        ("hes here", "he's here"),
        ("Im", "im"),  # capitalised table keys never match (lower-cased first)
        ("somebody'd", "somebodyd"),  # the table's reversed entry
        ("youre", "you're"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_contraction_table_is_complete():
    assert len(CONTRACTIONS) == 120
    assert all("\u2019" not in k + v for k, v in CONTRACTIONS.items())  # ASCII apostrophes in both versions
    assert CONTRACTIONS["y'all'dve"] == "y'all'd've" and CONTRACTIONS["couldnt've"] == "couldn't've"


# ------------------------------------------------------------------------------------------ vqa_score
@pytest.mark.parametrize("version", ["current", "legacy"])
@pytest.mark.parametrize(
    "n_match, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_average(version, n_match, expected):
    # k of 10 match: the k matching GT answers see k-1 others, the rest see k; each min(1, m/3).
    gts = ["cat"] * n_match + ["dog", "cow", "pig", "hen", "fox", "owl", "elk", "yak", "emu", "ram"][: 10 - n_match]
    assert vqa_score("cat", gts, version) == pytest.approx(expected, abs=1e-15)


def test_two_of_ten_is_exactly_the_official_float():
    # official order of operations: sum of [1/3, 1/3, 2/3 x 8] then / 10
    assert vqa_score("cat", ["cat", "cat"] + ["dog"] * 8) == float(sum([1 / 3] * 2 + [2 / 3] * 8)) / 10


def test_unanimous_gt_compares_raw_strings_at_head():
    assert vqa_score("Yes", ["yes"] * 10, "current") == 0.0  # no normalization at all
    assert vqa_score("yes", ["yes"] * 10, "current") == 1.0
    assert vqa_score(" yes\n", ["yes"] * 10, "current") == 1.0  # but newline/tab/strip cleaning applies
    assert vqa_score("two", ["two"] * 10, "current") == 1.0
    assert vqa_score("yes", ["yes "] * 10, "current") == 1.0  # GT stripped at HEAD


def test_legacy_always_normalizes_prediction_but_not_unanimous_gt():
    assert vqa_score("Yes", ["yes"] * 10, "legacy") == 1.0
    assert vqa_score("two", ["two"] * 10, "legacy") == 0.0  # "2" vs raw "two"
    assert vqa_score("yes", ["yes "] * 10, "legacy") == 0.0  # legacy never strips GT


def test_disagreeing_gt_gets_digit_article_only_at_head():
    gts = ["two"] * 9 + ["2"]
    assert vqa_score("two", gts, "current") == 1.0  # every GT -> "2"
    assert vqa_score("two", gts, "legacy") == pytest.approx(0.3)  # GT punctuation only: one "2"
    gts = ["the dog"] * 8 + ["a dog"] * 2
    assert vqa_score("dog", gts, "current") == 1.0
    assert vqa_score("dog", gts, "legacy") == 0.0


@pytest.mark.parametrize("version", ["current", "legacy"])
def test_rules_shared_by_both_versions(version):
    assert vqa_score("35", ["3,5"] * 4 + ["4"] * 6, version) == 1.0
    assert vqa_score("dont", ["don't"] * 5 + ["no"] * 5, version) == 1.0
    assert vqa_score("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7, version) == pytest.approx(0.9)


def test_vqa_score_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_score("yes", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_score("yes", "yes")
    with pytest.raises(ValueError, match="legacy"):
        vqa_score("yes", ["yes"], version="v2")


# ------------------------------------------------------------------------------------------- evaluate
def _ann(qid, qtype, atype, answers):
    return {
        "question_id": qid,
        "image_id": 1,
        "question_type": qtype,
        "answer_type": atype,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


ANNOTATIONS = {
    "annotations": [
        _ann(1, "is the", "yes/no", ["yes"] * 10),
        _ann(2, "how many", "number", ["2", "2"] + ["3"] * 8),  # 2 of 10 match; the LAST loop acc would be 2/3
        _ann(3, "what color", "other", ["red"] * 3 + ["blue"] * 7),
        _ann(4, "is the", "yes/no", ["yes"] * 10),
    ]
}
QUESTIONS = {
    "task_type": "Open-Ended",
    "questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in (1, 2, 3, 4)],
}
PREDICTIONS = [
    {"question_id": 1, "answer": "yes"},
    {"question_id": 2, "answer": "two"},
    {"question_id": 3, "answer": "Red"},
    {"question_id": 4, "answer": "Yes"},
]


def test_evaluate_current_by_hand():
    annotations = copy.deepcopy(ANNOTATIONS)
    out = evaluate(PREDICTIONS, annotations, QUESTIONS, version="current")
    # per question: 100, 60, 90, 0 ("Yes" vs unanimous "yes")
    assert out["overall"] == 62.5
    assert out["perAnswerType"] == {"yes/no": 50.0, "number": 60.0, "other": 90.0}  # 60, not 66.67: averaged
    assert out["perQuestionType"] == {"is the": 50.0, "how many": 60.0, "what color": 90.0}
    assert annotations == ANNOTATIONS  # inputs are not mutated (the official rewrites GT answers)


def test_evaluate_legacy_by_hand():
    out = evaluate(PREDICTIONS, ANNOTATIONS, QUESTIONS, version="legacy")
    assert out["overall"] == 87.5  # 100, 60, 90, 100
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 60.0, "other": 90.0}


def test_evaluate_rounds_like_python2():
    assert round_like_python2(0.125) == 0.13  # Python 3's round gives 0.12
    assert round_like_python2(65.625) == 65.63
    assert round_like_python2(2.675) == 2.67  # binary value is below the tie
    # 21 of 32 right: 100 * 21 / 32 = 65.625 exactly; the official (Python 2) reports 65.63
    anns = {"annotations": [_ann(q, "what", "other", ["cat"] * 10) for q in range(32)]}
    preds = [{"question_id": q, "answer": "cat" if q < 21 else "dog"} for q in range(32)]
    out = evaluate(preds, anns)
    assert out["overall"] == 65.63 and out["perAnswerType"]["other"] == 65.63
    assert round(100 * 21 / 32, 2) == 65.62  # what a naive Python 3 port reports


def test_evaluate_checks_prediction_coverage():
    with pytest.raises(ValueError, match="1 annotated question ids have no prediction"):
        evaluate(PREDICTIONS[:3], ANNOTATIONS)
    with pytest.raises(ValueError, match="not annotated"):
        evaluate(PREDICTIONS + [{"question_id": 99, "answer": "yes"}], ANNOTATIONS)
    with pytest.raises(ValueError, match="question_id"):
        evaluate([{"answer": "yes"}], ANNOTATIONS)
    with pytest.raises(ValueError, match="annotations"):
        evaluate(PREDICTIONS, {"questions": []})


def test_evaluate_multiple_choice_answers_must_be_choices():
    mc = {
        "task_type": "Multiple Choice",
        "questions": [{"question_id": q, "multiple_choices": ["yes", "no", "two", "red"]} for q in (1, 2, 3, 4)],
    }
    with pytest.raises(ValueError, match="multiple_choices"):
        evaluate(PREDICTIONS, ANNOTATIONS, mc)  # "Red" / "Yes" are not choices
