"""The generated ``shapes`` corpus: determinism, real schemas, answers true to the drawn scenes."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mmf_plugins.datasets.builders.shapes.generator import (
    generate_shapes,
    split_sizes,
    text_only_prior_accuracy,
)
from mmf_plugins.datasets.builders.shapes.scenes import COLORS
from mmf_plugins.metrics.vqa_eval import vqa_score

N = 24  # 16 train / 4 val / 4 test
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
NUMBERS = {w: i for i, w in enumerate(["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "shapes", seed=0, num_images=N, progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(corpus: Path, name: str):
    return json.loads((corpus / "annotations" / name).read_text())


def _scene_objects(corpus: Path, split: str) -> dict[int, list[dict]]:
    """image id -> [{"shape", "size", "color", "texture", "bbox"}] read back from instances_<split>.json."""
    data = _load(corpus, f"instances_{split}.json")
    cats = {c["id"]: c["name"] for c in data["categories"]}
    kinds = {a["id"]: a["supercategory"] for a in data["attribute_categories"]}
    out: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        obj = {"shape": cats[a["category_id"]], "bbox": a["bbox"]}
        obj.update({kinds[i]: name for i, name in zip(a["attribute_ids"], a["attributes"])})
        out[a["image_id"]].append(obj)
    return out


def _parse_np(words: list[str]) -> dict:
    """Noun phrase ("little red striped circles") -> descriptor, independently of the generator."""
    desc = {}
    *adjs, noun = words
    noun = noun.removesuffix("s")
    if noun not in ("object", "shape", "thing"):
        desc["shape"] = noun
    for w in adjs:
        if w in SIZE_WORDS:
            desc["size"] = SIZE_WORDS[w]
        elif w in COLORS:
            desc["color"] = w
        else:
            desc["texture"] = w
    return desc


def _count(objects: list[dict], desc: dict) -> int:
    return sum(all(o[k] == v for k, v in desc.items()) for o in objects)


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    again = generate_shapes(tmp_path / "again", seed=0, num_images=N, progress=False)
    assert _hashes(again) == _hashes(corpus)
    other = _hashes(generate_shapes(tmp_path / "other", seed=1, num_images=N, progress=False))
    first = _hashes(corpus)
    for name in ("images/train/shapes_train_000000100001.jpg", "annotations/v2_mscoco_train_annotations.json",
                 "annotations/captions_val.json", "annotations/instances_train.json"):
        assert other[name] != first[name], name


def test_layout_and_split_sizes(corpus):
    assert split_sizes(N) == {"train": 16, "val": 4, "test": 4}
    assert split_sizes() == {"train": 1200, "val": 300, "test": 300}
    for split, n in split_sizes(N).items():
        files = sorted((corpus / "images" / split).glob("*.jpg"))
        assert len(files) == n
        assert all(re.fullmatch(rf"shapes_{split}_\d{{12}}\.jpg", f.name) for f in files)
    names = {p.name for p in (corpus / "annotations").iterdir()}
    expected = {"answers_vqa.txt", "dataset_coco.json", "text_corpus.txt", "v2_OpenEnded_mscoco_test_questions.json"}
    for s in ("train", "val"):
        expected |= {f"v2_OpenEnded_mscoco_{s}_questions.json", f"v2_mscoco_{s}_annotations.json", f"vcr_{s}.jsonl",
                     f"refcoco+_{s}.json", f"pretrain_{s}.jsonl"}
    for s in ("train", "val", "test"):
        expected |= {f"captions_{s}.json", f"instances_{s}.json"}
    for s in ("train", "dev", "test"):
        expected |= {f"nlvr2_{s}.jsonl", f"snli_ve_{s}.jsonl"}
    assert names == expected
    assert not (corpus / "annotations" / "v2_mscoco_test_annotations.json").exists()  # test: questions only
    assert json.loads((corpus / ".built").read_text())["split_sizes"] == split_sizes(N)
    with pytest.raises(ValueError, match="at least 2"):
        split_sizes(6)


def test_coco_files_load_and_boxes_match_pixels(corpus):
    instances = COCO(str(corpus / "annotations" / "instances_train.json"))
    captions = COCO(str(corpus / "annotations" / "captions_train.json"))
    assert len(instances.getImgIds()) == 16 and set(captions.getImgIds()) == set(instances.getImgIds())
    assert all(len(captions.getAnnIds(imgIds=[i])) == 5 for i in captions.getImgIds())
    palette = np.array(list(COLORS.values()), np.float32)
    names = list(COLORS)
    checked = 0
    for img in instances.loadImgs(instances.getImgIds()):
        pixels = np.asarray(Image.open(corpus / "images" / "train" / img["file_name"]).convert("RGB"), np.float32)
        assert pixels.shape == (img["height"], img["width"], 3) and img["width"] != img["height"]
        for a in instances.loadAnns(instances.getAnnIds(imgIds=[img["id"]])):
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            mask = instances.annToMask(a)  # the polygon segmentation: its area matches and it fills the box
            assert abs(int(mask.sum()) - a["area"]) < 0.1 * a["area"] + 2 * (w + h)
            ys, xs = np.nonzero(mask)
            assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5 and abs(ys.min() - y) <= 1.5
            if "solid" in a["attributes"]:
                cx, cy = int(x + w / 2), int(y + h / 2)
                centre = np.median(pixels[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3), axis=0)
                nearest = names[int(np.argmin(((palette - centre) ** 2).sum(1)))]
                assert nearest in a["attributes"], (img["file_name"], a["attributes"], centre)
                checked += 1
    assert checked >= 5


def test_vqa_files_follow_the_official_schema(corpus):
    for split in ("train", "val", "test"):
        q = _load(corpus, f"v2_OpenEnded_mscoco_{split}_questions.json")
        assert {"info", "task_type", "data_type", "license", "data_subtype", "questions"} <= set(q)
        assert q["task_type"] == "Open-Ended" and q["data_type"] == "mscoco"
        ids = [x["question_id"] for x in q["questions"]]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
        image_ids = {img["id"] for img in _load(corpus, f"instances_{split}.json")["images"]}
        assert {x["image_id"] for x in q["questions"]} == image_ids
        assert all(set(x) == {"image_id", "question", "question_id"} and x["question"].endswith("?") for x in q["questions"])
        if split == "test":
            continue
        a = _load(corpus, f"v2_mscoco_{split}_annotations.json")
        assert {"info", "license", "data_subtype", "annotations"} <= set(a)
        assert sorted(x["question_id"] for x in a["annotations"]) == sorted(ids)
        for ann in a["annotations"]:
            assert ann["answer_type"] in ("yes/no", "number", "other")
            assert len(ann["answers"]) == 10
            assert [x["answer_id"] for x in ann["answers"]] == list(range(1, 11))
            assert {x["answer_confidence"] for x in ann["answers"]} <= {"yes", "maybe", "no"}
            assert vqa_score(ann["multiple_choice_answer"], [x["answer"] for x in ann["answers"]]) == 1.0
    vocab = (corpus / "annotations" / "answers_vqa.txt").read_text().splitlines()
    train = _load(corpus, "v2_mscoco_train_annotations.json")["annotations"]
    assert vocab[0] == "<unk>" and len(vocab) == len(set(vocab))
    assert {x["multiple_choice_answer"] for x in train} <= set(vocab)
    raw = [x["answer"] for ann in train for x in ann["answers"]]
    assert any(r != r.lower() or r.endswith((".", "!")) or r in NUMBERS for r in raw)  # annotator noise exists


def test_answers_agree_with_the_instances(corpus):
    checked = defaultdict(int)
    for split in ("train", "val"):
        objects = _scene_objects(corpus, split)
        questions = {x["question_id"]: x for x in _load(corpus, f"v2_OpenEnded_mscoco_{split}_questions.json")["questions"]}
        for ann in _load(corpus, f"v2_mscoco_{split}_annotations.json")["annotations"]:
            text = questions[ann["question_id"]]["question"].lower().rstrip("?")
            objs = objects[ann["image_id"]]
            m = re.fullmatch(r"how many ([a-z ]+?) (are there|are in the picture|can you see|are in the image)", text)
            if m:
                assert ann["multiple_choice_answer"] == str(_count(objs, _parse_np(m.group(1).split()))), text
                checked["count"] += 1
            m = re.fullmatch(r"(is there an?|are there any) ([a-z ]+)", text)
            if m:
                present = _count(objs, _parse_np(m.group(2).split())) > 0
                assert ann["multiple_choice_answer"] == ("yes" if present else "no"), text
                checked["exist"] += 1
            m = re.fullmatch(r"what (color|shape|size|texture) is the ([a-z ]+)", text) or re.fullmatch(
                r"what is the (color|shape) of the ([a-z ]+)", text)
            if m:  # the phrase names exactly one object, and the answer is its attribute
                (target,) = [o for o in objs if _count([o], _parse_np(m.group(2).split()))]
                assert ann["multiple_choice_answer"] == target[m.group(1)], text
                checked["query"] += 1
            m = re.fullmatch(r"is the ([a-z ]+?) (to the left of|to the right of|above|below) the ([a-z ]+)", text)
            if m:  # CLEVR-style relation on box centres
                (a,) = [o for o in objs if _count([o], _parse_np(m.group(1).split()))]
                (b,) = [o for o in objs if _count([o], _parse_np(m.group(3).split()))]
                ca = (a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2)
                cb = (b["bbox"][0] + b["bbox"][2] / 2, b["bbox"][1] + b["bbox"][3] / 2)
                holds = {"to the left of": ca[0] < cb[0], "to the right of": ca[0] > cb[0],
                         "above": ca[1] < cb[1], "below": ca[1] > cb[1]}[m.group(2)]
                assert ann["multiple_choice_answer"] == ("yes" if holds else "no"), text
                checked["spatial"] += 1
    assert min(checked["count"], checked["exist"], checked["query"], checked["spatial"]) >= 3, dict(checked)


def test_pair_and_grounding_tasks(corpus):
    objects = _scene_objects(corpus, "train")
    nlvr2 = [json.loads(line) for line in (corpus / "annotations" / "nlvr2_train.jsonl").read_text().splitlines()]
    assert {r["label"] for r in nlvr2} == {"True", "False"}
    assert abs(sum(r["label"] == "True" for r in nlvr2) - len(nlvr2) / 2) <= 2
    verified = 0
    for r in nlvr2:
        m = re.fullmatch(r"the (left|right) image contains (exactly )?([a-z]+) ([a-z ]+)\.", r["sentence"].lower())
        if m:
            objs = objects[r[f"{m.group(1)}_image_id"]]
            truth = _count(objs, _parse_np(m.group(4).split())) == NUMBERS[m.group(3)]
            assert r["label"] == str(truth), r
            verified += 1
    assert verified >= 1
    snli = [json.loads(line) for line in (corpus / "annotations" / "snli_ve_train.jsonl").read_text().splitlines()]
    labels = [r["gold_label"] for r in snli]
    assert labels.count("entailment") == labels.count("neutral") == labels.count("contradiction") == 16
    assert all(r["Flickr30K_ID"] == str(r["image_id"]) for r in snli) and len({r["pairID"] for r in snli}) == len(snli)
    for r in (json.loads(line) for line in (corpus / "annotations" / "vcr_train.jsonl").read_text().splitlines()):
        assert len(r["answer_choices"]) == 4 and 0 <= r["answer_label"] < 4 and len(r["boxes"]) == len(r["objects"])
        refs = [i for tokens in [r["question"], *r["answer_choices"]] for t in tokens if isinstance(t, list) for i in t]
        assert refs and all(0 <= i < len(r["objects"]) for i in refs)
    location_words = {"left", "right", "top", "bottom", "above", "below", "middle", "center"}
    for ref in _load(corpus, "refcoco+_train.json"):
        assert ref["bbox"] in ref["proposals"] and ref["bbox"] in [o["bbox"] for o in objects[ref["image_id"]]]
        assert not set(ref["sentence"].split()) & location_words
    karpathy = _load(corpus, "dataset_coco.json")
    assert karpathy["dataset"] == "coco" and len(karpathy["images"]) == N
    assert all(len(img["sentences"]) == 5 and img["sentids"] == [s["sentid"] for s in img["sentences"]] for img in karpathy["images"])


def test_tokenizer_loads_with_transformers_and_round_trips(corpus):
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = corpus / "tokenizer"
    for cls in (BertTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(str(folder), local_files_only=True)
        assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(0) == "[PAD]"
        question = "Is the LARGE red striped circle to the left of the small star?"
        ids = tok(question)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == question.lower()
    assert len(tok) <= 1000
    questions = _load(corpus, "v2_OpenEnded_mscoco_val_questions.json")["questions"]
    assert all(tok.unk_token_id not in tok(q["question"])["input_ids"] for q in questions)


def test_built_marker_reuse_and_rebuild(tmp_path):
    out = generate_shapes(tmp_path / "s", seed=3, num_images=12, progress=False)
    before = _hashes(out)
    start = time.perf_counter()
    generate_shapes(out, seed=3, num_images=12, progress=False)
    assert time.perf_counter() - start < 0.5
    # a killed run: marker gone, a half-written temp file and a truncated annotation file left behind
    (out / ".built").unlink()
    (out / "annotations" / ".captions_val.json.x1y2.tmp").write_text("{")
    (out / "annotations" / "captions_val.json").write_text("{")
    generate_shapes(out, seed=3, num_images=12, progress=False)
    assert _hashes(out) == before
    # new parameters: regenerated, and images the new size does not make are gone
    generate_shapes(out, seed=3, num_images=18, progress=False)
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 12
    generate_shapes(out, seed=3, num_images=12, progress=False)
    assert _hashes(out) == before


def test_text_only_prior_is_weak(corpus):
    result = text_only_prior_accuracy(corpus)
    val = _load(corpus, "v2_mscoco_val_annotations.json")["annotations"]
    assert result["num_questions"] == len(val)
    # the prior, recomputed by hand from train
    train = _load(corpus, "v2_mscoco_train_annotations.json")["annotations"]
    by_type = defaultdict(lambda: defaultdict(int))
    for r in train:
        by_type[r["question_type"]][r["multiple_choice_answer"]] += 1
    overall = defaultdict(int)
    for r in train:
        overall[r["multiple_choice_answer"]] += 1
    def most_frequent(counts):
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    top = most_frequent(overall)
    expected = np.mean([
        vqa_score(most_frequent(by_type[r["question_type"]]) if r["question_type"] in by_type else top,
                  [a["answer"] for a in r["answers"]])
        for r in val
    ])
    assert result["per_question_type_prior"] == pytest.approx(expected)
    assert 0.05 < result["per_question_type_prior"] < 0.75
