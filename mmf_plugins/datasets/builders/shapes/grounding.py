"""Box-grounded text for the VL-BERT tasks: VCR-style multiple choice and RefCOCO+-style expressions.

VCR (Zellers et al. 2019, as read by VL-BERT's ``vcr/data/datasets/vcr.py``): the question and each
of the four answer choices are token lists in which an object reference is a list of box indices
(``[[0], "is", "red", "."]``); ``answer_label`` is the index of the right choice. Questions ask for
an object's colour, shape or texture, how many objects share one of its attributes, or where one
object is relative to another (asked only when exactly one axis separates them, so exactly one of
the four relation choices holds). Deliberate difference: no rationales (Q->A only).

RefCOCO+ (Yu et al. 2016): one expression per referred object, written without absolute location
words ("left", "top", ...), so it names the object by attributes ("the big striped one") or by
comparison with another object ("the circle with the same color as the blue star"). Proposals are
the ground-truth boxes plus jittered and random distractors, as VL-BERT trains on GT + proposals.
"""

from __future__ import annotations

import numpy as np

from mmf_plugins.datasets.builders.shapes import describe as d
from mmf_plugins.datasets.builders.shapes.scenes import KIND_VALUES, Scene

# --------------------------------------------------------------------------------------------- VCR


def _choices(rng: np.random.Generator, truth: str, pool: tuple[str, ...] | list[str]) -> tuple[list[str], int]:
    """``truth`` plus three distinct distractors from ``pool``, shuffled; returns (values, label)."""
    others = [v for v in pool if v != truth]
    picked = [others[i] for i in rng.permutation(len(others))[:3]]
    values = picked + [truth]
    order = rng.permutation(4)
    values = [values[i] for i in order]
    return values, values.index(truth)


def vcr_item(scene: Scene, rng: np.random.Generator) -> dict | None:
    """``{"question", "answer_choices", "answer_label"}`` with box-index references, or None."""
    n = len(scene.objects)
    i = int(rng.integers(n))
    obj = scene.objects[i]
    form = int(rng.integers(5))
    if form == 0:
        values, label = _choices(rng, obj.color, KIND_VALUES["color"])
        return {"question": ["what", "color", "is", [i], "?"],
                "answer_choices": [[[i], "is", v, "."] for v in values], "answer_label": label}
    if form == 1:
        values, label = _choices(rng, obj.shape, KIND_VALUES["shape"])
        return {"question": ["what", "shape", "is", [i], "?"],
                "answer_choices": [[[i], "is", d.with_article(v).split()[0], v, "."] for v in values], "answer_label": label}
    if form == 2:
        values, label = _choices(rng, obj.texture, KIND_VALUES["texture"])
        return {"question": ["what", "pattern", "does", [i], "have", "?"],
                "answer_choices": [[[i], "is", v, "."] for v in values], "answer_label": label}
    if form == 3:
        kind = d.pick(rng, ("color", "shape", "texture", "size"))
        same = d.count(scene.objects, {kind: obj.attribute(kind)})
        values, label = _choices(rng, str(same), [str(k) for k in range(1, 7)])
        return {"question": ["how", "many", "objects", "have", "the", "same", kind, "as", [i], "?"],
                "answer_choices": [["exactly", v, "."] for v in values], "answer_label": label}
    others = [j for j in rng.permutation(n) if j != i]
    for j in others:
        rel = d.clear_relations(obj, scene.objects[int(j)])
        if len(rel) != 2:  # both axes (or none) separate them: more than one choice could hold
            continue
        j = int(j)
        truth = next(r for r in rel if d.relation_holds(obj, scene.objects[j], r))
        values, label = _choices(rng, truth, d.RELATIONS)
        return {"question": ["where", "is", [i], "relative", "to", [j], "?"],
                "answer_choices": [[[i], "is", *d.RELATION_PHRASES[v].split(), [j], "."] for v in values],
                "answer_label": label}
    return None


# ----------------------------------------------------------------------------------------- RefCOCO+


def _attribute_expression(scene: Scene, index: int, rng: np.random.Generator) -> str | None:
    target = scene.objects[index]
    desc = d.unique_descriptor(scene.objects, target, rng, extra=0.3)
    if desc is None:
        return None
    if "shape" not in desc and desc and rng.random() < 0.5:
        words = d.phrase(desc, rng, noun="one")  # "the big striped one"
    elif "shape" in desc and len(desc) > 1 and rng.random() < 0.3:
        rest = {k: v for k, v in desc.items() if k != "shape"}
        words = f"{desc['shape']} that is {d.phrase(rest, rng, noun='').strip()}"  # "circle that is red striped"
    else:
        words = d.phrase(desc, rng)
    return words if rng.random() < 0.5 else f"the {words}"


def _relative_expression(scene: Scene, index: int, rng: np.random.Generator) -> str | None:
    """"the <noun> with the same <kind> as the <other>" when that picks exactly the target."""
    target = scene.objects[index]
    for j in rng.permutation(len(scene.objects)):
        other = scene.objects[int(j)]
        if other is target:
            continue
        for kind in [("color", "texture", "shape", "size")[k] for k in rng.permutation(4)]:
            if other.attribute(kind) != target.attribute(kind):
                continue
            use_shape = kind != "shape" and rng.random() < 0.6
            noun_desc = {"shape": target.shape} if use_shape else {}
            hits = [o for o in scene.objects if o is not other and o.attribute(kind) == other.attribute(kind)
                    and d.matches(o, noun_desc)]
            other_desc = d.unique_descriptor(scene.objects, other, rng)
            if hits == [target] and other_desc is not None:
                noun = target.shape if use_shape else "one"
                return f"the {noun} with the same {kind} as the {d.phrase(other_desc, rng)}"
    return None


def refcoco_expression(scene: Scene, index: int, rng: np.random.Generator) -> str | None:
    """A RefCOCO+-style expression for ``scene.objects[index]`` (lower case, no location words)."""
    if len(scene.objects) > 1 and rng.random() < 0.3:
        text = _relative_expression(scene, index, rng)
        if text is not None:
            return text
    return _attribute_expression(scene, index, rng)


def proposals(scene: Scene, rng: np.random.Generator) -> list[list[float]]:
    """GT boxes + one jittered copy of each + two random boxes, shuffled; ``[x, y, w, h]`` pixels."""
    W, H = scene.width, scene.height
    boxes = []
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.bbox
        boxes.append((x1, y1, x2, y2))
        w, h = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2 + rng.normal(0, 0.3) * w, (y1 + y2) / 2 + rng.normal(0, 0.3) * h
        s = float(np.exp(rng.normal(0, 0.3)))
        boxes.append((cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2))
    for _ in range(2):
        w, h = rng.uniform(0.1, 0.4) * W, rng.uniform(0.1, 0.4) * H
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        boxes.append((x, y, x + w, y + h))
    out = []
    for k in rng.permutation(len(boxes)):
        x1, y1, x2, y2 = boxes[int(k)]
        x1, y1 = min(max(0.0, x1), W - 2.0), min(max(0.0, y1), H - 2.0)
        x2, y2 = min(max(x1 + 2.0, x2), float(W)), min(max(y1 + 2.0, y2), float(H))
        out.append([round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)])
    return out
