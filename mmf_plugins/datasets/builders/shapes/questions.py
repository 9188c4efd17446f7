"""VQA v2-style questions and ten annotator answers for one ``shapes`` scene.

Question families (the ``question_type`` field is the question's opening words, as in VQA v2):
existence ("is there a", "are there any"), counting ("how many"), attribute queries about an object
named by its other attributes ("what color is the", "what shape is the", "how big is the", "what
texture is the", ...), spatial relations ("is the ... left of the ..."), attribute comparison ("are
the ... the same color") and count comparison ("are there more/fewer ... than ...").

Balancing, so that a text-only prior is weak: every yes/no family first draws the answer (50/50)
and then looks for a question with that answer; counting first draws the count uniformly among the
counts some descriptor reaches in the scene; for existence the number of adjectives is drawn before
the answer, so question length does not give the answer away.

Annotator noise, as in VQA v2: each question gets 10 answers. Most are the canonical answer, some
are surface variants that the official normalization maps back ("Two", "2.", "the red", "Yes"), and
some disagree ("3" for 2, "big" for large, "polka dot" for dotted), more of them on a few "hard"
questions. The canonical answer always keeps at least 5 exact copies, so it is the
``multiple_choice_answer``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mmf_plugins.datasets.builders.shapes import describe as d
from mmf_plugins.datasets.builders.shapes.scenes import (
    ATTRIBUTE_KINDS,
    KIND_VALUES,
    Scene,
)
from mmf_plugins.metrics.vqa_eval import normalize_answer

ANSWER_TYPES = ("yes/no", "number", "other")


@dataclass(frozen=True)
class VQAQuestion:
    question: str
    answer: str  # canonical answer (already in official normalized form)
    question_type: str
    answer_type: str  # "yes/no" | "number" | "other"
    family: str  # generator family, e.g. "exist", "count", "query_color"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _exist(scene: Scene, rng: np.random.Generator, want: bool) -> VQAQuestion | None:
    n_kinds = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    kinds = d.kind_subsets(ATTRIBUTE_KINDS, n_kinds, rng)[0]
    if want:
        desc = d.describe(d.pick(rng, scene.objects), kinds)
    else:
        for _ in range(40):
            desc = {k: d.pick(rng, KIND_VALUES[k]) for k in kinds}
            if d.count(scene.objects, desc) == 0:
                break
        else:
            return None
    if rng.random() < 0.6:
        question, qtype = f"is there {d.with_article(d.phrase(desc, rng))}?", "is there a"
    else:
        question, qtype = f"are there any {d.phrase(desc, rng, plural=True)}?", "are there any"
    return VQAQuestion(question, _yes_no(want), qtype, "yes/no", "exist")


def _count(scene: Scene, rng: np.random.Generator, want: bool) -> VQAQuestion | None:
    by_count: dict[int, list[dict]] = {}
    counts = d.descriptor_counts(scene.objects)
    for desc in d.DESCRIPTORS_2:
        by_count.setdefault(counts.get(d.key(desc), 0), []).append(desc)
    # higher counts are reachable in fewer scenes: weight them up so the answers spread out
    counts = sorted(by_count)
    weights = np.array([1.0 + 0.45 * c for c in counts])
    target = counts[int(rng.choice(len(counts), p=weights / weights.sum()))]
    desc = d.pick(rng, by_count[target])
    template = d.pick(rng, ("how many {} are there?", "how many {} are in the picture?",
                            "how many {} can you see?", "how many {} are in the image?"))
    return VQAQuestion(template.format(d.phrase(desc, rng, plural=True)), str(target), "how many", "number", "count")


_QUERY_TEMPLATES = {
    "color": (("what color is the {}?", "what color is the"), ("what is the color of the {}?", "what is the color of the")),
    "shape": (("what shape is the {}?", "what shape is the"), ("what is the shape of the {}?", "what is the shape of the")),
    "size": (("what size is the {}?", "what size is the"), ("how big is the {}?", "how big is the")),
    "texture": (("what texture is the {}?", "what texture is the"), ("what pattern does the {} have?", "what pattern does the")),
}


def _query(scene: Scene, rng: np.random.Generator, want: bool, kind: str) -> VQAQuestion | None:
    obj = d.pick(rng, scene.objects)
    desc = d.unique_descriptor(scene.objects, obj, rng, exclude=[kind], extra=0.25)
    if desc is None:
        return None
    # "what shape is the red shape?" reads badly: shape queries name the object "object"/"thing"
    noun = d.pick(rng, ("object", "object", "thing")) if kind == "shape" else None
    template, qtype = d.pick(rng, _QUERY_TEMPLATES[kind])
    text = d.phrase(desc, rng, noun=noun)
    return VQAQuestion(template.format(text), obj.attribute(kind), qtype, "other", f"query_{kind}")


def _pairs(scene: Scene, rng: np.random.Generator, ordered: bool) -> list:
    pairs = list((itertools.permutations if ordered else itertools.combinations)(scene.objects, 2))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _spatial(scene: Scene, rng: np.random.Generator, want: bool) -> VQAQuestion | None:
    for a, b in _pairs(scene, rng, ordered=True):
        relations = [r for r in d.clear_relations(a, b) if d.relation_holds(a, b, r) == want]
        if not relations:
            continue
        da = d.unique_descriptor(scene.objects, a, rng, extra=0.2)
        db = d.unique_descriptor(scene.objects, b, rng, extra=0.2)
        if da is None or db is None:
            continue
        rel = d.pick(rng, relations)
        question = f"is the {d.phrase(da, rng)} {d.RELATION_PHRASES[rel]} the {d.phrase(db, rng)}?"
        return VQAQuestion(question, _yes_no(want), "is the", "yes/no", "spatial")
    return None


def _compare_attribute(scene: Scene, rng: np.random.Generator, want: bool) -> VQAQuestion | None:
    kind = d.pick(rng, ATTRIBUTE_KINDS)
    for a, b in _pairs(scene, rng, ordered=False):
        if (a.attribute(kind) == b.attribute(kind)) != want:
            continue
        da = d.unique_descriptor(scene.objects, a, rng, exclude=[kind])
        db = d.unique_descriptor(scene.objects, b, rng, exclude=[kind])
        if da is None or db is None:
            continue
        noun = "object" if kind == "shape" else None
        pa, pb = d.phrase(da, rng, noun=noun), d.phrase(db, rng, noun=noun)
        if rng.random() < 0.6:
            return VQAQuestion(f"are the {pa} and the {pb} the same {kind}?", _yes_no(want), "are the", "yes/no", "compare_attribute")
        return VQAQuestion(f"do the {pa} and the {pb} have the same {kind}?", _yes_no(want), "do the", "yes/no", "compare_attribute")
    return None


_COUNT_COMPARISONS = {
    "more": ("are there more {} than {}?", "are there more", lambda x, y: x > y),
    "fewer": ("are there fewer {} than {}?", "are there fewer", lambda x, y: x < y),
    "as many": ("are there as many {} as {}?", "are there as many", lambda x, y: x == y),
}


def _compare_count(scene: Scene, rng: np.random.Generator, want: bool) -> VQAQuestion | None:
    form = d.pick(rng, ("more", "more", "fewer", "as many"))
    template, qtype, holds = _COUNT_COMPARISONS[form]
    candidates = []
    for kind in ATTRIBUTE_KINDS:
        counts = Counter(o.attribute(kind) for o in scene.objects)
        for va, vb in itertools.permutations(KIND_VALUES[kind], 2):
            ca, cb = counts[va], counts[vb]
            if max(ca, cb) > 0 and holds(ca, cb) == want:
                candidates.append((kind, va, vb))
    if not candidates:
        return None
    kind, va, vb = d.pick(rng, candidates)
    question = template.format(d.phrase({kind: va}, rng, plural=True), d.phrase({kind: vb}, rng, plural=True))
    return VQAQuestion(question, _yes_no(want), qtype, "yes/no", "compare_count")


_FAMILIES = (  # weights: about 44% yes/no, 16% number, 40% other (VQA v2: 38 / 12 / 50)
    (0.12, _exist),
    (0.16, _count),
    (0.10, lambda s, r, w: _query(s, r, w, "color")),
    (0.10, lambda s, r, w: _query(s, r, w, "shape")),
    (0.10, lambda s, r, w: _query(s, r, w, "size")),
    (0.10, lambda s, r, w: _query(s, r, w, "texture")),
    (0.12, _spatial),
    (0.08, _compare_attribute),
    (0.12, _compare_count),
)
_FAMILY_P = np.array([w for w, _ in _FAMILIES]) / sum(w for w, _ in _FAMILIES)


def vqa_questions(scene: Scene, rng: np.random.Generator, num_questions: int) -> list[VQAQuestion]:
    """Up to ``num_questions`` distinct questions about ``scene`` (fewer only for tiny scenes).

    The yes/no answer (``want``, ignored by open families) is drawn before the family is tried, and
    the family is retried with the same ``want`` a few times, so a scene where "no" is hard to ask
    does not tilt the answer balance towards "yes".
    """
    out: list[VQAQuestion] = []
    seen: set[str] = set()
    for _ in range(num_questions * 4):
        if len(out) == num_questions:
            break
        family = _FAMILIES[int(rng.choice(len(_FAMILIES), p=_FAMILY_P))][1]
        want = bool(rng.random() < 0.5)
        for _attempt in range(6):
            q = family(scene, rng, want)
            if q is not None and q.question not in seen:
                seen.add(q.question)
                out.append(q)
                break
    return out


# ----------------------------------------------------------------------------- annotator answers
_CONFUSABLE = {
    "red": ("orange", "brown", "purple"), "orange": ("red", "yellow", "brown"), "yellow": ("orange", "green"),
    "green": ("cyan", "yellow"), "cyan": ("blue", "green"), "blue": ("cyan", "purple"),
    "purple": ("blue", "red"), "brown": ("orange", "red"),
    "circle": ("hexagon", "oval"), "hexagon": ("circle", "octagon"), "square": ("diamond", "rectangle"),
    "diamond": ("square", "triangle"), "triangle": ("diamond", "star"), "star": ("hexagon", "triangle"),
    "small": ("medium", "little", "large"), "large": ("medium", "big", "small"),
    "solid": ("plain", "striped"), "striped": ("stripes", "lined", "checkered"),
    "dotted": ("polka dot", "spotted", "checkered"), "checkered": ("checked", "plaid", "striped"),
}


def _variants(answer: str) -> list[str]:
    """Spellings the official normalization maps back to ``answer``."""
    candidates = [answer.capitalize(), answer + ".", "the " + answer, d.with_article(answer)]
    if answer.isdigit():
        word = d.number_word(int(answer))
        candidates = [word, word.capitalize(), answer + "."]
    elif answer in ("yes", "no"):
        candidates = [answer.capitalize(), answer + ".", answer + "!"]
    return [c for c in candidates if c != answer and normalize_answer(c) == answer]


def _wrong(answer: str, rng: np.random.Generator) -> str:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer.isdigit():
        n = int(answer)
        return str(max(0, n + int(d.pick(rng, (-1, 1, 1, 2)))) if n > 0 else d.pick(rng, ("1", "1", "2")))
    for values in KIND_VALUES.values():
        if answer in values and rng.random() < 0.5:
            return d.pick(rng, [v for v in values if v != answer])
    return d.pick(rng, _CONFUSABLE[answer])


def annotator_answers(question: VQAQuestion, rng: np.random.Generator) -> list[dict]:
    """Ten VQA v2 answer dicts ``{"answer", "answer_confidence", "answer_id"}`` for one question."""
    hard = rng.random() < 0.1
    n_wrong = int(rng.integers(2, 4)) if hard else min(2, int(rng.binomial(10, 0.04)))
    variants = _variants(question.answer)
    n_variant = min(5 - n_wrong, int(rng.binomial(10, 0.15))) if variants else 0
    slots = ["exact"] * (10 - n_wrong - n_variant) + ["variant"] * n_variant + ["wrong"] * n_wrong
    answers = []
    for i, slot in enumerate(slots[j] for j in rng.permutation(10)):
        if slot == "wrong":
            text = _wrong(question.answer, rng)
            confidence = str(rng.choice(["yes", "maybe", "no"], p=[0.3, 0.5, 0.2]))
        else:
            text = d.pick(rng, variants) if slot == "variant" else question.answer
            confidence = str(rng.choice(["yes", "maybe", "no"], p=[0.86, 0.12, 0.02]))
        answers.append({"answer": text, "answer_confidence": confidence, "answer_id": i + 1})
    return answers
