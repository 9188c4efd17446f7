"""Captions of a ``shapes`` scene (COCO style, 5 per image) and the text-only corpus sentences.

Each image gets five captions from different templates (an enumeration of its objects, shape counts,
a spatial relation, colour and texture summaries, ...), so the five read differently, as COCO's five
annotators do. Every caption is true of the scene.

The text-only corpus (VL-BERT's BooksCorpus/Wikipedia stand-in for the MLM-aux loss) holds general
sentences about shapes plus captions of *unrendered* scenes drawn with their own random stream, so
it shares the vocabulary but not the images.
"""

from __future__ import annotations

import numpy as np

from mmf_plugins.datasets.builders.shapes import describe as d
from mmf_plugins.datasets.builders.shapes.scenes import (
    ATTRIBUTE_KINDS,
    TEXTURES,
    Scene,
    ShapeObject,
)

CAPTIONS_PER_IMAGE = 5


def _object_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    """Shape plus 1-3 random other attributes: "small red striped circle"."""
    others = [k for k in ATTRIBUTE_KINDS if k != "shape"]
    n = int(rng.integers(1, len(others) + 1))
    kinds = {"shape", *d.kind_subsets(others, n, rng)[0]}
    return d.phrase(d.describe(obj, kinds), rng)


def _noun(n: int, word: str = "shape") -> str:
    return word if n == 1 else word + "s"


def _enumerate(scene: Scene, rng: np.random.Generator) -> str | None:
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    parts = [d.with_article(_object_phrase(o, rng)) for o in objs[:4]]
    if len(objs) > 4:
        parts.append(f"{d.number_word(len(objs) - 4)} more {_noun(len(objs) - 4)}")
    return f"{d.join_list(parts)} on {d.with_article(scene.background)} background"


def _counts(scene: Scene, rng: np.random.Generator) -> str | None:
    n = len(scene.objects)
    if n == 1:
        return f"a single {_object_phrase(scene.objects[0], rng)} on {d.with_article(scene.background)} background"
    lead = d.pick(rng, ("{} shapes: {}", "{} geometric shapes, {}", "a picture with {} objects: {}"))
    return lead.format(d.number_word(n), d.shape_counts_phrase(scene.objects))


def _relation(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    for i in rng.permutation(len(pairs)):
        a, b = pairs[i]
        true_rel = [r for r in d.clear_relations(a, b) if d.relation_holds(a, b, r)]
        if true_rel:
            rel = d.RELATION_PHRASES[d.pick(rng, true_rel)]
            return f"{d.with_article(_object_phrase(a, rng))} {rel} {d.with_article(_object_phrase(b, rng))}"
    return None


def _color_summary(scene: Scene, rng: np.random.Generator) -> str | None:
    counts: dict[str, int] = {}
    for o in scene.objects:
        counts[o.color] = counts.get(o.color, 0) + 1
    parts = [f"{d.with_article(c) if n == 1 else d.number_word(n) + ' ' + c} {_noun(n, d.pick(rng, ('shape', 'object')))}"
             for c, n in counts.items()]
    lead = "there is {}" if len(scene.objects) == 1 else "there are {}"
    return d.pick(rng, (lead, "{} in the image", "an image showing {}")).format(d.join_list(parts))


def _texture_summary(scene: Scene, rng: np.random.Generator) -> str | None:
    counts = {t: sum(o.texture == t for o in scene.objects) for t in TEXTURES}
    present = [(t, n) for t, n in counts.items() if n]
    total = len(scene.objects)
    if len(present) == 1:
        return f"{'the only shape is' if total == 1 else 'all ' + d.number_word(total) + ' shapes are'} {present[0][0]}"
    return d.join_list([f"{d.number_word(n)} {t} {_noun(n)}" for t, n in present])


def _focus(scene: Scene, rng: np.random.Generator) -> str | None:
    if len(scene.objects) < 2:
        return None
    target = d.pick(rng, scene.objects)
    others = len(scene.objects) - 1
    template = d.pick(rng, ("{} together with {} other {}", "{} next to {} other {}", "{} and {} more {}"))
    return template.format(d.with_article(_object_phrase(target, rng)), d.number_word(others), _noun(others))


def _simple(scene: Scene, rng: np.random.Generator) -> str | None:
    n = len(scene.objects)
    return d.pick(rng, (f"a simple drawing of {d.shape_counts_phrase(scene.objects)}",
                        f"an image of {d.number_word(n)} colorful {_noun(n)}",
                        f"{d.number_word(n)} flat {_noun(n)} drawn on {d.with_article(scene.background)} background"))


_TEMPLATES = (_enumerate, _counts, _relation, _color_summary, _texture_summary, _focus, _simple)


def captions(scene: Scene, rng: np.random.Generator, num: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``num`` distinct captions (sentence-cased, with a final period) from different templates."""
    out: list[str] = []
    for i in rng.permutation(len(_TEMPLATES)):
        text = _TEMPLATES[i](scene, rng)
        if text is not None and text not in out:
            out.append(text)
        if len(out) == num:
            break
    while len(out) < num:  # a one-object scene can run out of distinct templates
        text = _enumerate(scene, rng)
        out.append(text if text not in out else f"{text} in a small picture")
    return [t[0].upper() + t[1:] + "." for t in out]


_FACTS = (
    "a triangle has three corners.", "a square has four equal sides.", "a hexagon has six sides.",
    "a star has five points.", "a circle has no corners.", "a diamond looks like a square standing on a corner.",
    "a striped shape is covered with parallel stripes.", "a dotted shape is covered with small dots.",
    "a checkered pattern looks like a chess board.", "a solid shape is filled with one color.",
    "mixing red and yellow gives orange.", "mixing blue and yellow gives green.",
    "mixing red and blue gives purple.", "cyan is a light blue green color.", "brown is a dark orange color.",
    "a large shape takes more space than a small one.", "the left side of a picture is opposite the right side.",
    "something above another thing is closer to the top of the picture.",
)


def corpus_sentences(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Two captions of an unrendered scene plus one general sentence about shapes."""
    return [c.lower() for c in captions(scene, rng, num=2)] + [d.pick(rng, _FACTS)]
