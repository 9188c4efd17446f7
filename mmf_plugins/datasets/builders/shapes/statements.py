"""True/false statements about ``shapes`` scenes: NLVR2 sentences (image pairs) and SNLI-VE hypotheses.

NLVR2 (Suhr et al. 2019): a sentence about a *pair* of images, label "True"/"False". We draw the
label first (50/50) and then search templates ("the left image contains exactly two circles", "both
images contain a red star", "there are more squares in the left image than in the right image", ...)
for a sentence with that truth value, so labels are balanced and every label is computed from the
scenes.

SNLI-VE (Xie et al. 2019): an image premise and a text hypothesis labelled entailment / neutral /
contradiction; each image gets one hypothesis per label. Entailed and contradicted hypotheses are
checked against the scene; neutral ones speak of what a picture cannot show (what a shape is made
of, who drew it, which was drawn first), as SNLI's neutral hypotheses add unverifiable detail.
"""

from __future__ import annotations

import numpy as np

from mmf_plugins.datasets.builders.shapes import describe as d
from mmf_plugins.datasets.builders.shapes.scenes import (
    ATTRIBUTE_KINDS,
    BACKGROUNDS,
    KIND_VALUES,
    Scene,
)


def _random_descriptor(scenes: list[Scene], rng: np.random.Generator, max_kinds: int = 2) -> dict:
    """1-``max_kinds`` kinds; values taken from a real object 70% of the time, else random."""
    n = int(rng.integers(1, max_kinds + 1))
    kinds = d.kind_subsets(ATTRIBUTE_KINDS, n, rng)[0]
    objects = [o for s in scenes for o in s.objects]
    if objects and rng.random() < 0.7:
        return d.describe(d.pick(rng, objects), kinds)
    return {k: d.pick(rng, KIND_VALUES[k]) for k in kinds}


def _counted(n: int, desc: dict, rng: np.random.Generator) -> str:
    """"exactly two red circles", "exactly one star", "no squares"."""
    if n == 0:
        return f"no {d.phrase(desc, rng, plural=True)}"
    return f"exactly {d.number_word(n)} {d.phrase(desc, rng, plural=n != 1)}"


def _nlvr2_candidate(left: Scene, right: Scene, rng: np.random.Generator, want: bool) -> tuple[str, bool]:
    """One templated sentence and its truth value (numbers are chosen to aim at ``want``)."""
    desc = _random_descriptor([left, right], rng)
    cl, cr = d.count(left.objects, desc), d.count(right.objects, desc)
    form = int(rng.integers(7))
    if form == 0:
        side, c = d.pick(rng, (("left", cl), ("right", cr)))
        n = c if want else max(0, c + int(d.pick(rng, (-1, 1, 1))))
        return f"the {side} image contains {_counted(n, desc, rng)}.", n == c
    if form == 1:
        return f"both images contain {d.with_article(d.phrase(desc, rng))}.", cl > 0 and cr > 0
    if form == 2:
        return f"exactly one image contains {d.with_article(d.phrase(desc, rng))}.", (cl > 0) != (cr > 0)
    if form == 3:
        return f"neither image contains any {d.phrase(desc, rng, plural=True)}.", cl == 0 and cr == 0
    if form == 4:
        more, less = d.pick(rng, (("left", "right"), ("right", "left")))
        cm, cs = (cl, cr) if more == "left" else (cr, cl)
        return f"there are more {d.phrase(desc, rng, plural=True)} in the {more} image than in the {less} image.", cm > cs
    if form == 5:
        n = cl + cr if want else max(0, cl + cr + int(d.pick(rng, (-1, 1, 2))))
        verb = "is" if n == 1 else "are"
        return f"there {verb} {_counted(n, desc, rng)} in the two images together.", n == cl + cr
    nl, nr = len(left.objects), len(right.objects)
    return "the two images contain the same number of shapes.", nl == nr


def nlvr2_sentence(left: Scene, right: Scene, rng: np.random.Generator, want: bool) -> tuple[str, bool]:
    """A sentence whose truth on (left, right) is ``want`` when one is found in 60 tries."""
    sentence, truth = _nlvr2_candidate(left, right, rng, want)
    for _ in range(60):
        if truth == want:
            break
        sentence, truth = _nlvr2_candidate(left, right, rng, want)
    return sentence[0].upper() + sentence[1:], truth


# ----------------------------------------------------------------------------------------- SNLI-VE
_MATERIALS = ("paper", "wood", "plastic", "metal", "glass", "felt")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _unique_pair(scene: Scene, rng: np.random.Generator):
    """Two distinct objects with unique descriptors, or None."""
    if len(scene.objects) < 2:
        return None
    ia, ib = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[int(ia)], scene.objects[int(ib)]
    da, db = d.unique_descriptor(scene.objects, a, rng), d.unique_descriptor(scene.objects, b, rng)
    if da is None or db is None:
        return None
    return a, b, d.phrase(da, rng), d.phrase(db, rng)


def _entailment(scene: Scene, rng: np.random.Generator) -> str | None:
    form = int(rng.integers(6))
    if form == 0:
        kinds = d.kind_subsets(ATTRIBUTE_KINDS, int(rng.integers(1, 4)), rng)[0]
        desc = d.describe(d.pick(rng, scene.objects), kinds)
        return f"there is {d.with_article(d.phrase(desc, rng))} in the picture."
    if form == 1:
        n = len(scene.objects)
        return f"the image shows {d.number_word(n)} {'shape' if n == 1 else 'shapes'}."
    if form == 2:
        return f"at least one shape is {d.pick(rng, scene.objects).color}."
    if form == 3:
        absent = [c for c in KIND_VALUES["color"] if all(o.color != c for o in scene.objects)]
        return f"none of the shapes are {d.pick(rng, absent)}."
    if form == 4:
        return f"the background is {scene.background}."
    pair = _unique_pair(scene, rng)
    if pair is None:
        return None
    a, b, pa, pb = pair
    true_rel = [r for r in d.clear_relations(a, b) if d.relation_holds(a, b, r)]
    return f"the {pa} is {d.RELATION_PHRASES[d.pick(rng, true_rel)]} the {pb}." if true_rel else None


def _contradiction(scene: Scene, rng: np.random.Generator) -> str | None:
    form = int(rng.integers(6))
    if form == 0:
        for _ in range(30):
            desc = _random_descriptor([scene], rng, 3)
            if d.count(scene.objects, desc) == 0:
                return f"there is {d.with_article(d.phrase(desc, rng))} in the picture."
        return None
    if form == 1:
        n = len(scene.objects) + int(d.pick(rng, (-1, 1, 2)))
        return f"the image shows {d.number_word(n)} {'shape' if n == 1 else 'shapes'}." if n > 0 else None
    if form == 2:
        shape = d.pick(rng, KIND_VALUES["shape"])
        if all(o.shape == shape for o in scene.objects):
            return None
        return f"all of the shapes are {shape}s."
    if form == 3:
        return f"there are no {d.pick(rng, scene.objects).color} shapes in the picture."
    if form == 4:
        return f"the background is {d.pick(rng, [b for b in BACKGROUNDS if b != scene.background])}."
    pair = _unique_pair(scene, rng)
    if pair is None:
        return None
    a, b, pa, pb = pair
    true_rel = [r for r in d.clear_relations(a, b) if d.relation_holds(a, b, r)]
    return f"the {pa} is {d.RELATION_PHRASES[d.OPPOSITE[d.pick(rng, true_rel)]]} the {pb}." if true_rel else None


def _neutral(scene: Scene, rng: np.random.Generator) -> str | None:
    form = int(rng.integers(6))
    if form == 1:
        return f"the person who drew this likes the color {d.pick(rng, KIND_VALUES['color'])}."
    if form == 2:
        return f"the picture was made on a {d.pick(rng, _WEEKDAYS)}."
    if form in (0, 3):
        desc = d.unique_descriptor(scene.objects, d.pick(rng, scene.objects), rng)
        if desc is None:
            return None
        if form == 0:
            return f"the {d.phrase(desc, rng)} is made of {d.pick(rng, _MATERIALS)}."
        return f"the {d.phrase(desc, rng)} is someone's favorite shape."
    pair = _unique_pair(scene, rng)
    if pair is None:
        return "the shapes were drawn by a child."
    _, _, pa, pb = pair
    return f"the {pa} was drawn before the {pb}." if form == 4 else f"the {pa} is heavier than the {pb}."


SNLI_VE_LABELS = {"entailment": _entailment, "neutral": _neutral, "contradiction": _contradiction}


def snli_ve_hypothesis(scene: Scene, rng: np.random.Generator, label: str) -> str:
    """A hypothesis with gold ``label`` for the image premise ``scene``."""
    make = SNLI_VE_LABELS[label]
    for _ in range(60):
        text = make(scene, rng)
        if text is not None:
            return text[0].upper() + text[1:]
    raise RuntimeError(f"no {label} hypothesis found for image {scene.image_id} in 60 tries")
