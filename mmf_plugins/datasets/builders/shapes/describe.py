"""Referring to objects of a ``shapes`` scene: attribute descriptors, their English, spatial relations.

A descriptor is a dict ``{kind: value}`` over the attribute kinds (size, color, texture, shape); an
object matches when it has every listed value. Every task's text (VQA, captions, NLVR2, SNLI-VE,
VCR, RefCOCO+) is phrased with these helpers so all tasks speak one small language, and every
statement they make is checked against the scene here.

Relations follow CLEVR: "A left of B" compares box centres; a relation is only *asked* when the
centres are clearly apart on that axis (``clear_relations``), so no answer hinges on a pixel.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from mmf_plugins.datasets.builders.shapes.scenes import (
    ATTRIBUTE_KINDS,
    KIND_VALUES,
    SHAPE_PLURALS,
    ShapeObject,
)

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZE_SYNONYMS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

Descriptor = dict


def matches(obj: ShapeObject, desc: Descriptor) -> bool:
    return all(obj.attribute(kind) == value for kind, value in desc.items())


def select(objects: Iterable[ShapeObject], desc: Descriptor) -> list[ShapeObject]:
    return [o for o in objects if matches(o, desc)]


def count(objects: Iterable[ShapeObject], desc: Descriptor) -> int:
    return sum(1 for o in objects if matches(o, desc))


def describe(obj: ShapeObject, kinds: Iterable[str]) -> Descriptor:
    return {kind: obj.attribute(kind) for kind in ATTRIBUTE_KINDS if kind in set(kinds)}


def pick(rng: np.random.Generator, items: Sequence):
    """One element of a non-empty sequence."""
    return items[int(rng.integers(len(items)))]


def kind_subsets(kinds: Sequence[str], size: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    subsets = list(itertools.combinations(kinds, size))
    return [subsets[i] for i in rng.permutation(len(subsets))]


def unique_descriptor(
    objects: Sequence[ShapeObject],
    target: ShapeObject,
    rng: np.random.Generator,
    exclude: Iterable[str] = (),
    extra: float = 0.0,
    min_kinds: int = 0,
) -> Descriptor | None:
    """Smallest attribute descriptor (random among ties) that matches ``target`` and nothing else.

    ``exclude``: kinds that may not be used (the one a question asks about). ``extra``: probability
    of adding one more (redundant) kind, for varied referring expressions. None if the object has
    an attribute twin among the allowed kinds.
    """
    kinds = [k for k in ATTRIBUTE_KINDS if k not in set(exclude)]
    for size in range(min_kinds, len(kinds) + 1):
        for subset in kind_subsets(kinds, size, rng):
            desc = describe(target, subset)
            if count(objects, desc) == 1:
                spare = [k for k in kinds if k not in desc]
                if spare and rng.random() < extra:
                    desc = describe(target, set(desc) | {pick(rng, spare)})
                return desc
    return None


def phrase(desc: Descriptor, rng: np.random.Generator | None = None, plural: bool = False, noun: str | None = None) -> str:
    """English noun phrase without article: "large red striped circle", "small objects".

    With ``rng``, sizes sometimes use a synonym ("big", "little"). Without a shape in ``desc`` the
    noun is ``noun`` if given, else "object" (with ``rng``: sometimes "shape" or "thing").
    """
    words = []
    if "size" in desc:
        words.append(pick(rng, SIZE_SYNONYMS[desc["size"]]) if rng is not None else desc["size"])
    for kind in ("color", "texture"):
        if kind in desc:
            words.append(desc[kind])
    if "shape" in desc:
        words.append(SHAPE_PLURALS[desc["shape"]] if plural else desc["shape"])
    else:
        if noun is None:
            noun = pick(rng, ("object", "object", "shape", "thing")) if rng is not None else "object"
        words.append(noun + "s" if plural else noun)
    return " ".join(words)


def with_article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """CLEVR-style relation on centres: is ``a`` <relation> ``b``."""
    (ax, ay), (bx, by) = a.center, b.center
    if relation == "left of":
        return ax < bx
    if relation == "right of":
        return ax > bx
    if relation == "above":
        return ay < by
    if relation == "below":
        return ay > by
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def clear_relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    """Relations (true or false) whose axis separates the two centres by at least half their radii."""
    margin = 0.5 * (a.r + b.r)
    (ax, ay), (bx, by) = a.center, b.center
    out = []
    if abs(ax - bx) > margin:
        out += ["left of", "right of"]
    if abs(ay - by) > margin:
        out += ["above", "below"]
    return out


def shape_counts_phrase(objects: Sequence[ShapeObject]) -> str:
    """"two circles, a star and a square" (shapes in order of first appearance)."""
    order: dict[str, int] = {}
    for o in objects:
        order[o.shape] = order.get(o.shape, 0) + 1
    parts = [with_article(s) if n == 1 else f"{number_word(n)} {SHAPE_PLURALS[s]}" for s, n in order.items()]
    return join_list(parts)


def join_list(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def all_descriptors(max_kinds: int = 2) -> list[Descriptor]:
    """Every descriptor over at most ``max_kinds`` kinds, in a fixed order (the empty one first)."""
    out: list[Descriptor] = []
    for size in range(max_kinds + 1):
        for subset in itertools.combinations(ATTRIBUTE_KINDS, size):
            for values in itertools.product(*(KIND_VALUES[k] for k in subset)):
                out.append(dict(zip(subset, values)))
    return out


DESCRIPTORS_2 = all_descriptors(2)
_SUBSETS_2 = [subset for size in range(3) for subset in itertools.combinations(ATTRIBUTE_KINDS, size)]


def descriptor_counts(objects: Iterable[ShapeObject]) -> dict[tuple, int]:
    """Count of every descriptor over at most 2 kinds, keyed by ``key(desc)`` (absent = 0)."""
    counts: dict[tuple, int] = {}
    for o in objects:
        for subset in _SUBSETS_2:
            k = tuple((kind, o.attribute(kind)) for kind in subset)
            counts[k] = counts.get(k, 0) + 1
    return counts


def key(desc: Descriptor) -> tuple:
    """Hashable form of a descriptor, in attribute-kind order."""
    return tuple((kind, desc[kind]) for kind in ATTRIBUTE_KINDS if kind in desc)
