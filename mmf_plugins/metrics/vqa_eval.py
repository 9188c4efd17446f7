"""The official VQA accuracy, re-implemented in Python 3 as pure functions.

Follows GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (Python 2, BSD), in its
two published versions:

* ``version="current"``: HEAD ``a013f00`` (2021-03-11, "Fixed processing answers bug"). Both the
  prediction and the ten ground-truth (GT) answers get newline/tab -> space + strip; then, ONLY when
  the (stripped) GT answers are not all identical, both get ``process_punctuation`` and
  ``process_digit_article``. With unanimous GT the raw strings are compared: "Yes" vs 10x "yes"
  scores 0.
* ``version="legacy"``: ``458a8b2`` (2016-10-08), the copy LAVIS/ALBEF/BLIP/X-VLM ship. The
  prediction is always cleaned and fully normalized; GT answers are used raw (not even stripped) and
  get ``process_punctuation`` only, and only when they are not all identical. So "two" vs 10x "two"
  scores 0 (the prediction became "2", the unanimous GT stayed "two").

Score of one question: for each of the n GT answers, ``min(1, #matches among the other n-1 / 3)``;
the question scores the mean of those n values (2 of 10 matching -> 0.6).

Parity notes (``NOTE(parity)`` in the code): the period regex's typo'd look-behind ``(?!<=\\d)`` is a
look-ahead for the literal "<=" and never fires, so every "." not followed by a digit goes; the
official passes ``re.UNICODE`` (== 32) where ``sub`` expects ``count``, so at most 32 periods are
removed; ``\\d`` is ASCII-only as in Python 2 (``re.ASCII`` here); the contraction keys "Im", "Ive",
"Id've", "I'dve" never match because words are lower-cased first; percentages are rounded like
Python 2's ``round`` (exact binary value, ties away from zero), not Python 3's ties-to-even.

Per-type tables: both versions above append each question's averaged score to its question-type and
answer-type lists. Versions before ``f8b1ce3`` (2015-09, "bug removed") appended the last
leave-one-out ``acc`` of the loop instead, and copies taken from them report different per-type
numbers (overall is unaffected). We report the averaged per-type numbers, i.e. the correct ones.

Deliberate differences: inputs are never mutated (the official rewrites the GT answers inside the
loaded annotations, so a second ``evaluate()`` on the same object normalizes twice); leave-one-out is
by position (the official removes answer dicts equal to the held-out one, the same thing whenever
``answer_id`` is unique, as in every VQA v1/v2 file); bad input raises ``ValueError`` instead of
``assert``; no progress bar.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

logger = logging.getLogger(__name__)

VERSIONS = {"current": "a013f00", "legacy": "458a8b2"}

# Marks handled one by one by process_punctuation. ": ' # $ % & * ~ |" are NOT in it (never stripped);
# "." is handled by the period regex below.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)", re.ASCII)
# NOTE(parity): official "(?!<=\d)(\.)(?!\d)": the first group is a look-ahead for "<=" followed by
# a digit, which can never hold where a "." starts, so it is equivalent to this pattern.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)", re.ASCII)
# NOTE(parity): official ``periodStrip.sub("", text, re.UNICODE)`` passes re.UNICODE (32) as count.
PERIOD_STRIP_MAX = 32

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table (120 entries, plain ASCII apostrophes in both versions; curly ones
# only existed before 458a8b2), written here as canonical form -> spellings that map to it.
# NOTE(parity): "somebody'd" maps to "somebodyd" (reversed in the original) and the capitalised keys
# ("Im", "Ive", "Id've", "I'dve") can never match lower-cased words; both kept as is.
_CONTRACTION_SPELLINGS = {
    "'ow's'at": ("ow's'at", "'ows'at", "'ow'sat"),
    "'twas": ("twas",),
    "I'd've": ("Id've", "I'dve"),
    "I'm": ("Im",),
    "I've": ("Ive",),
    "ain't": ("aint",),
    "aren't": ("arent",),
    "can't": ("cant",),
    "could've": ("couldve",),
    "couldn't": ("couldnt",),
    "couldn't've": ("couldn'tve", "couldnt've"),
    "didn't": ("didnt",),
    "doesn't": ("doesnt",),
    "don't": ("dont",),
    "hadn't": ("hadnt",),
    "hadn't've": ("hadnt've", "hadn'tve"),
    "hasn't": ("hasnt",),
    "haven't": ("havent",),
    "he'd": ("hed",),
    "he'd've": ("hed've", "he'dve"),
    "he's": ("hes",),
    "how'd": ("howd",),
    "how'll": ("howll",),
    "how's": ("hows",),
    "isn't": ("isnt",),
    "it'd": ("itd",),
    "it'd've": ("itd've", "it'dve"),
    "it'll": ("itll",),
    "let's": ("let's",),
    "ma'am": ("maam",),
    "might've": ("mightve",),
    "mightn't": ("mightnt",),
    "mightn't've": ("mightnt've", "mightn'tve"),
    "must've": ("mustve",),
    "mustn't": ("mustnt",),
    "needn't": ("neednt",),
    "not've": ("notve",),
    "o'clock": ("oclock",),
    "oughtn't": ("oughtnt",),
    "shan't": ("shant",),
    "she'd've": ("shed've", "she'dve"),
    "she's": ("she's",),
    "should've": ("shouldve",),
    "shouldn't": ("shouldnt",),
    "shouldn't've": ("shouldnt've", "shouldn'tve"),
    "somebody'd've": ("somebodyd've", "somebody'dve"),
    "somebody'll": ("somebodyll",),
    "somebody's": ("somebodys",),
    "somebodyd": ("somebody'd",),
    "someone'd": ("someoned",),
    "someone'd've": ("someoned've", "someone'dve"),
    "someone'll": ("someonell",),
    "someone's": ("someones",),
    "something'd": ("somethingd",),
    "something'd've": ("somethingd've", "something'dve"),
    "something'll": ("somethingll",),
    "that's": ("thats",),
    "there'd": ("thered",),
    "there'd've": ("thered've", "there'dve"),
    "there're": ("therere",),
    "there's": ("theres",),
    "they'd": ("theyd",),
    "they'd've": ("theyd've", "they'dve"),
    "they'll": ("theyll",),
    "they're": ("theyre",),
    "they've": ("theyve",),
    "wasn't": ("wasnt",),
    "we'd've": ("wed've", "we'dve"),
    "we've": ("weve",),
    "weren't": ("werent",),
    "what'll": ("whatll",),
    "what're": ("whatre",),
    "what's": ("whats",),
    "what've": ("whatve",),
    "when's": ("whens",),
    "where'd": ("whered",),
    "where's": ("wheres",),
    "where've": ("whereve",),
    "who'd": ("whod",),
    "who'd've": ("whod've", "who'dve"),
    "who'll": ("wholl",),
    "who's": ("whos",),
    "who've": ("whove",),
    "why'll": ("whyll",),
    "why're": ("whyre",),
    "why's": ("whys",),
    "won't": ("wont",),
    "would've": ("wouldve",),
    "wouldn't": ("wouldnt",),
    "wouldn't've": ("wouldnt've", "wouldn'tve"),
    "y'all": ("yall",),
    "y'all'd've": ("yall'd've", "y'alld've", "y'all'dve"),
    "y'all'll": ("yall'll", "y'allll"),
    "you'd": ("youd",),
    "you'd've": ("youd've", "you'dve"),
    "you'll": ("youll",),
    "you're": ("youre",),
    "you've": ("youve",),
}
CONTRACTIONS = {spelling: canon for canon, spellings in _CONTRACTION_SPELLINGS.items() for spelling in spellings}


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``.

    If ``text`` has a digit-comma-digit anywhere ("3,5"), every mark in ``PUNCTUATION`` is deleted
    ("3,5" -> "35"). Otherwise each mark is deleted when it occurs next to a space anywhere in the
    text ("yes , it" -> "yes  it") and replaced by a space otherwise ("t-shirt" -> "t shirt"). Then
    the first ``PERIOD_STRIP_MAX`` periods not followed by a digit are removed ("3.5" stays).
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # NOTE(parity): the test looks at the ORIGINAL text, the replacement acts on the running one.
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=PERIOD_STRIP_MAX)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits
    ("none"/"zero".."ten" -> "0".."10"), drop "a"/"an"/"the", expand contractions ("dont" ->
    "don't"), join with single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Full normalization (what the official applies to a prediction): clean, punctuation, digits/articles."""
    return process_digit_article(process_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(
            f"unknown VQA eval version {version!r}; expected one of {sorted(VERSIONS)} "
            "('current' = GT-Vision-Lab/VQA a013f00, 'legacy' = 458a8b2 as copied by LAVIS/ALBEF/BLIP)"
        )


def vqa_score(prediction: str, gt_answers: Sequence[str], version: str = "current") -> float:
    """Official accuracy of one prediction against the question's GT answers, in [0, 1].

    ``gt_answers``: the raw annotator answers (10 in VQA v1/v2). Returns the mean over the
    leave-one-out subsets of ``min(1, #matches / 3)``, computed in the official order of float
    operations so that sums over a split match the official to the last bit.
    """
    _check_version(version)
    if isinstance(gt_answers, str) or not len(gt_answers):
        raise ValueError(
            f"gt_answers must be a non-empty list of answer strings (10 per VQA question), got {gt_answers!r}"
        )
    if version == "current":
        pred = _clean(prediction)
        gts = [_clean(a) for a in gt_answers]
        if len(set(gts)) > 1:
            gts = [normalize_answer(a) for a in gts]
            pred = normalize_answer(pred)
    else:
        pred = normalize_answer(prediction)
        gts = list(gt_answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    matches = [gt == pred for gt in gts]
    total = sum(matches)
    per_subset = [min(1, float(total - held_out) / 3) for held_out in matches]
    return float(sum(per_subset)) / len(per_subset)


def round_like_python2(value: float, ndigits: int = 2) -> float:
    """Python 2.7 ``round``: correctly rounded on the exact binary value, ties away from zero."""
    quantum = Decimal(1).scaleb(-ndigits)
    return float(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))


def _percent(values: list[float], ndigits: int) -> float:
    return round_like_python2(100 * float(sum(values)) / len(values), ndigits)


def evaluate(
    predictions: Iterable[Mapping],
    annotations: Mapping,
    questions: Mapping | None = None,
    version: str = "current",
    ndigits: int = 2,
) -> dict:
    """Official ``VQA.loadRes`` + ``VQAEval.evaluate`` on in-memory json objects.

    Args:
        predictions: ``[{"question_id": int, "answer": str}, ...]`` (the EvalAI submission format);
            must cover exactly the annotated question ids (a later duplicate wins, as officially).
        annotations: a VQA ``*_annotations.json`` dict (``{"annotations": [{question_id,
            question_type, answer_type, answers: [{answer, ...}]}]}``).
        questions: the matching ``*_questions.json`` dict, optional; when its ``task_type`` is
            "Multiple Choice" every answer must be one of the question's ``multiple_choices``.
        version: "current" (a013f00) or "legacy" (458a8b2), see the module docstring.

    Returns:
        ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float}}``,
        percentages rounded to ``ndigits`` like the official (per-type numbers are averages of the
        per-question scores, see the module docstring).
    """
    _check_version(version)
    anns = annotations.get("annotations") if isinstance(annotations, Mapping) else None
    if not isinstance(anns, list) or not anns:
        got = f"keys {list(annotations)[:10]}" if isinstance(annotations, Mapping) else type(annotations).__name__
        raise ValueError(
            "annotations must be a VQA annotations dict with a non-empty 'annotations' list "
            f"(v2_mscoco_<split>_annotations.json); got {got}"
        )
    answers_by_qid: dict = {}
    for pred in predictions:
        if not isinstance(pred, Mapping) or "question_id" not in pred or "answer" not in pred:
            raise ValueError(f"each prediction must be {{'question_id': int, 'answer': str}}, got {pred!r}")
        if pred["question_id"] in answers_by_qid:
            logger.warning("question_id %s predicted twice; the later answer is scored", pred["question_id"])
        answers_by_qid[pred["question_id"]] = pred["answer"]

    ann_qids = [ann["question_id"] for ann in anns]
    missing = set(ann_qids) - set(answers_by_qid)
    extra = set(answers_by_qid) - set(ann_qids)
    if missing or extra:
        raise ValueError(
            "predictions do not correspond to the annotated questions: "
            f"{len(missing)} annotated question ids have no prediction (e.g. {sorted(missing)[:5]}), "
            f"{len(extra)} predicted ids are not annotated (e.g. {sorted(extra)[:5]}); "
            "predict every question of the split, and only those"
        )
    if questions is not None and questions.get("task_type") == "Multiple Choice":
        choices = {q["question_id"]: q["multiple_choices"] for q in questions["questions"]}
        wrong = [qid for qid in ann_qids if answers_by_qid[qid] not in choices.get(qid, ())]
        if wrong:
            raise ValueError(
                f"{len(wrong)} predicted answers are not among the question's multiple_choices "
                f"(e.g. question {wrong[0]}: {answers_by_qid[wrong[0]]!r})"
            )

    overall: list[float] = []
    per_question_type: dict[str, list[float]] = {}
    per_answer_type: dict[str, list[float]] = {}
    for ann in anns:
        gt = [a["answer"] for a in ann["answers"]]
        score = vqa_score(answers_by_qid[ann["question_id"]], gt, version)
        overall.append(score)
        per_question_type.setdefault(ann["question_type"], []).append(score)
        per_answer_type.setdefault(ann["answer_type"], []).append(score)
    return {
        "overall": _percent(overall, ndigits),
        "perAnswerType": {k: _percent(v, ndigits) for k, v in per_answer_type.items()},
        "perQuestionType": {k: _percent(v, ndigits) for k, v in per_question_type.items()},
    }
