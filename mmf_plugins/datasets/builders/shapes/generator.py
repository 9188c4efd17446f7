"""Generate the ``shapes`` demo corpus: images plus every annotation file the demo tasks read.

``generate_shapes(out_dir)`` writes, under ``out_dir`` (the ``<data_dir>/shapes`` folder)::

    images/{train,val,test}/shapes_{split}_{image_id:012d}.jpg
    annotations/v2_OpenEnded_mscoco_{split}_questions.json   VQA v2 questions (train, val, test)
    annotations/v2_mscoco_{split}_annotations.json             VQA v2 annotations (train, val)
    annotations/answers_vqa.txt                                <unk> + every normalized train answer
    annotations/captions_{split}.json, instances_{split}.json  COCO captions / instances (+ attributes)
    annotations/dataset_coco.json                              Karpathy split file
    annotations/nlvr2_{train,dev,test}.jsonl, snli_ve_{train,dev,test}.jsonl
    annotations/vcr_{train,val}.jsonl, refcoco+_{train,val}.json
    annotations/text_corpus.txt, pretrain_{train,val}.jsonl
    tokenizer/                                                 uncased BERT WordPiece (HF folder)
    .built                                                     JSON marker, written last

Schemas are the real ones (VQA v2, COCO, Karpathy, NLVR2, SNLI-VE, VCR as read by VL-BERT, RefCOCO+
as VL-BERT's refcoco loader flattens it); see the task modules for what each text says. Image ids
are ``100000 + i`` (train), ``200000 + i`` (val), ``300000 + i`` (test); question ids are
``image_id * 1000 + k`` as in VQA v2. NLVR2 and SNLI-VE call the val split "dev".

Determinism: every image and every text stream has its own ``numpy`` generator seeded by
``SeedSequence([seed, split, image index, stream])``, so the same arguments give byte-identical
files, and growing a split leaves its first images unchanged. Every file is written atomically, and
``.built`` (generator version + arguments) is written last: a killed run is simply redone, and a
finished one is reused at once.

Deliberate differences from the real corpora: the VQA test split has no ``test-dev`` subset; the
Karpathy file has no ``restval`` images (train/val/test map to the image splits); captions and
instances are given for the test split too (demo captioning is evaluated on it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmf_plugins.datasets.builders.shapes import atomic
from mmf_plugins.datasets.builders.shapes.captions import captions, corpus_sentences
from mmf_plugins.datasets.builders.shapes.grounding import (
    proposals,
    refcoco_expression,
    vcr_item,
)
from mmf_plugins.datasets.builders.shapes.questions import (
    annotator_answers,
    vqa_questions,
)
from mmf_plugins.datasets.builders.shapes.scenes import (
    KIND_VALUES,
    SHAPES,
    Scene,
    encode_jpeg,
    render_scene,
    sample_scene,
)
from mmf_plugins.datasets.builders.shapes.statements import (
    SNLI_VE_LABELS,
    nlvr2_sentence,
    snli_ve_hypothesis,
)
from mmf_plugins.datasets.builders.shapes.tokenizer import save_tokenizer
from mmf_plugins.metrics.vqa_eval import normalize_answer, vqa_score

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_RATIO = {"train": 4, "val": 1, "test": 1}
DEFAULT_NUM_IMAGES = 1800  # 1200 train / 300 val / 300 test
ID_BASE = {"train": 100_000, "val": 200_000, "test": 300_000}
MAX_PER_SPLIT = 99_999
TASK_SPLIT_NAME = {"train": "train", "val": "dev", "test": "test"}  # NLVR2 / SNLI-VE naming
_STREAMS = {"scene": 0, "render": 1, "vqa": 2, "captions": 3, "snli_ve": 4, "vcr": 5, "refcoco": 6, "corpus": 7, "nlvr2": 8}
_MARKER = ".built"
_INFO = {"description": "shapes: a generated demo corpus in the VQA v2 / COCO formats", "url": "", "version": "2.0",
         "contributor": "mmf_plugins shapes generator"}
_LICENSE = {"name": "generated data, no third-party content", "url": ""}
NLVR2_PER_IMAGE = 2
VCR_PER_IMAGE = 2
REFS_PER_IMAGE = 3
CORPUS_SCENES_PER_TRAIN_IMAGE = 2


# ------------------------------------------------------------------------------------------ params
def split_sizes(num_images: int | None = None, splits: Sequence[str] = SPLITS) -> dict[str, int]:
    """Images per split: ``num_images`` (total, default 1800) shared 4:1:1 over train/val/test."""
    splits = tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names from {SPLITS}, got {splits!r}")
    if "train" not in splits:
        raise ValueError(f"splits must include 'train' (the answer vocabulary and corpus come from it), got {splits!r}")
    total = DEFAULT_NUM_IMAGES if num_images is None else num_images
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)):
        raise TypeError(f"num_images must be an int or None, got {num_images!r}")
    weight = sum(SPLIT_RATIO[s] for s in splits)
    sizes = {s: int(total) * SPLIT_RATIO[s] // weight for s in splits}
    sizes["train"] += int(total) - sum(sizes.values())
    small = {s: n for s, n in sizes.items() if n < 2}
    if small:
        raise ValueError(
            f"num_images={num_images} gives {small} image(s) per split; every split needs at least 2 (NLVR2 pairs "
            f"images): use num_images >= {2 * weight // min(SPLIT_RATIO[s] for s in splits)}"
        )
    big = {s: n for s, n in sizes.items() if n > MAX_PER_SPLIT}
    if big:
        raise ValueError(f"num_images={num_images} gives {big}; at most {MAX_PER_SPLIT} images per split")
    return {s: sizes[s] for s in SPLITS if s in sizes}


def _rng(seed: int, split: str, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index, _STREAMS[stream]]))


def image_id_of(split: str, index: int) -> int:
    return ID_BASE[split] + index + 1


# --------------------------------------------------------------------------------------------- I/O
def _dump_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def _dump_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / _MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _split_files(split: str) -> list[str]:
    task = TASK_SPLIT_NAME[split]
    return [f"v2_OpenEnded_mscoco_{split}_questions.json", f"v2_mscoco_{split}_annotations.json",
            f"captions_{split}.json", f"instances_{split}.json", f"nlvr2_{task}.jsonl", f"snli_ve_{task}.jsonl",
            f"vcr_{split}.jsonl", f"refcoco+_{split}.json", f"pretrain_{split}.jsonl"]


def _clean_stale(out: Path, sizes: dict[str, int]) -> None:
    """Remove temp files of a killed run and files of splits/images the new parameters do not make."""
    for sub in ("images", "annotations", "tokenizer"):
        for tmp in (out / sub).rglob(f".*{atomic.TEMP_SUFFIX}"):
            tmp.unlink()
    for split in SPLITS:
        keep = {f"shapes_{split}_{image_id_of(split, i):012d}.jpg" for i in range(sizes.get(split, 0))}
        folder = out / "images" / split
        if folder.is_dir():
            for f in folder.glob(f"shapes_{split}_*.jpg"):
                if f.name not in keep:
                    f.unlink()
        if split not in sizes:
            for name in _split_files(split):
                (out / "annotations" / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- builders
def _image_entry(s: Scene) -> dict:
    return {"id": s.image_id, "file_name": s.file_name, "width": s.width, "height": s.height}


def _attribute_table() -> list[dict]:
    rows = []
    for kind in ("size", "color", "texture"):
        for value in KIND_VALUES[kind]:
            rows.append({"id": len(rows) + 1, "name": value, "supercategory": kind})
    return rows


def _instances(scenes: list[Scene]) -> dict:
    attr_ids = {row["name"]: row["id"] for row in _attribute_table()}
    annotations = []
    for s in scenes:
        for k, o in enumerate(s.objects):
            x1, y1, x2, y2 = o.bbox
            names = [o.size, o.color, o.texture]
            annotations.append({
                "id": s.image_id * 10 + k + 1, "image_id": s.image_id, "category_id": SHAPES.index(o.shape) + 1,
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": o.area, "iscrowd": 0,
                "segmentation": [[round(v, 2) for xy in o.polygon() for v in xy]],
                "attributes": names, "attribute_ids": [attr_ids[n] for n in names],
            })
    return {"info": _INFO, "licenses": [_LICENSE], "images": [_image_entry(s) for s in scenes], "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)],
            "attribute_categories": _attribute_table()}


def _karpathy_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


class _Corpus:
    """All text of one generation, kept in memory until the files are written."""

    def __init__(self) -> None:
        self.questions: dict[str, list[dict]] = {}
        self.annotations: dict[str, list[dict]] = {}
        self.captions: dict[str, list[tuple[int, int, str]]] = {}  # (caption id, image id, text)
        self.nlvr2: dict[str, list[dict]] = {}
        self.snli_ve: dict[str, list[dict]] = {}
        self.vcr: dict[str, list[dict]] = {}
        self.refcoco: dict[str, list[dict]] = {}
        self.text_corpus: list[str] = []

    def texts(self) -> Iterable[str]:
        """Every sentence, question and answer (the tokenizer's training text)."""
        for rows in self.questions.values():
            yield from (r["question"] for r in rows)
        for rows in self.annotations.values():
            for r in rows:
                yield from (a["answer"] for a in r["answers"])
        for rows in self.captions.values():
            yield from (t for _, _, t in rows)
        for rows in self.nlvr2.values():
            yield from (r["sentence"] for r in rows)
        for rows in self.snli_ve.values():
            yield from (r["sentence2"] for r in rows)
        for rows in self.vcr.values():
            for r in rows:
                for tokens in [r["question"], *r["answer_choices"]]:
                    yield " ".join(t for t in tokens if isinstance(t, str))
        for rows in self.refcoco.values():
            yield from (r["sentence"] for r in rows)
        yield from self.text_corpus


def _make_text(split: str, scenes: list[Scene], seed: int, corpus: _Corpus) -> None:
    questions, annotations, caps, snli, vcr, refs = [], [], [], [], [], []
    for i, s in enumerate(scenes):
        rng = _rng(seed, split, i, "vqa")
        for k, q in enumerate(vqa_questions(s, rng, int(rng.integers(5, 9)))):
            qid = s.image_id * 1000 + k
            questions.append({"image_id": s.image_id, "question": q.question[0].upper() + q.question[1:], "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": s.image_id, "question_type": q.question_type, "answer_type": q.answer_type,
                "multiple_choice_answer": q.answer, "answers": annotator_answers(q, rng),
            })
        rng = _rng(seed, split, i, "captions")
        caps.extend((s.image_id * 10 + j, s.image_id, text) for j, text in enumerate(captions(s, rng)))
        rng = _rng(seed, split, i, "snli_ve")
        premise = caps[-1][2]
        for label in SNLI_VE_LABELS:
            snli.append({"Flickr30K_ID": str(s.image_id), "image_id": s.image_id, "file_name": s.file_name,
                         "captionID": f"{s.image_id}.jpg#0", "pairID": f"{s.image_id}.jpg#0r1{label[0]}",
                         "sentence1": premise, "sentence2": snli_ve_hypothesis(s, rng, label), "gold_label": label})
        if split in ("train", "val"):
            rng = _rng(seed, split, i, "vcr")
            for _ in range(VCR_PER_IMAGE):
                item = vcr_item(s, rng)
                if item is not None:
                    vcr.append({"annot_id": f"{split}-{len(vcr)}", "img_fn": f"images/{split}/{s.file_name}",
                                "image_id": s.image_id, "width": s.width, "height": s.height,
                                "objects": [o.shape for o in s.objects],
                                "boxes": [[*o.bbox, 1.0] for o in s.objects], **item})
            rng = _rng(seed, split, i, "refcoco")
            for k in rng.permutation(len(s.objects))[:REFS_PER_IMAGE]:
                k = int(k)
                sentence = refcoco_expression(s, k, rng)
                if sentence is None:
                    continue
                x1, y1, x2, y2 = s.objects[k].bbox
                refs.append({"ref_id": ID_BASE[split] * 10 + len(refs), "ann_id": s.image_id * 10 + k + 1,
                             "image_id": s.image_id, "file_name": s.file_name, "width": s.width, "height": s.height,
                             "category_id": SHAPES.index(s.objects[k].shape) + 1, "sentence": sentence,
                             "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "proposals": proposals(s, rng),
                             "split": split})
    # NLVR2: each image is the left image of NLVR2_PER_IMAGE pairs; labels exactly balanced
    rng = _rng(seed, split, 0, "nlvr2")
    n = len(scenes) * NLVR2_PER_IMAGE
    wants = [bool(w) for w in rng.permutation(np.arange(n) % 2)]
    task = TASK_SPLIT_NAME[split]
    nlvr2 = []
    for k in range(n):
        left = scenes[k // NLVR2_PER_IMAGE]
        right = scenes[(k // NLVR2_PER_IMAGE + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes)]
        sentence, truth = nlvr2_sentence(left, right, rng, wants[k])
        nlvr2.append({"identifier": f"{task}-{k}-0-0", "sentence": sentence, "label": str(truth),
                      "left_url": f"images/{split}/{left.file_name}", "right_url": f"images/{split}/{right.file_name}",
                      "left_image": left.file_name, "right_image": right.file_name,
                      "left_image_id": left.image_id, "right_image_id": right.image_id})
    corpus.questions[split], corpus.annotations[split], corpus.captions[split] = questions, annotations, caps
    corpus.snli_ve[split], corpus.nlvr2[split] = snli, nlvr2
    if split in ("train", "val"):
        corpus.vcr[split], corpus.refcoco[split] = vcr, refs


def _make_text_corpus(seed: int, n_train: int) -> list[str]:
    lines = []
    for i in range(n_train * CORPUS_SCENES_PER_TRAIN_IMAGE):
        rng = _rng(seed, "train", i, "corpus")
        lines.extend(corpus_sentences(sample_scene(rng, 0, "train"), rng))
    return lines


def _answer_vocab(annotations: list[dict]) -> list[str]:
    counts = Counter(normalize_answer(a["answer"]) for r in annotations for a in r["answers"])
    counts.update(r["multiple_choice_answer"] for r in annotations)
    return ["<unk>"] + [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if a and a != "<unk>"]


def _write_annotations(ann: Path, scenes: dict[str, list[Scene]], corpus: _Corpus, seed: int) -> None:
    for split, split_scenes in scenes.items():
        header = {"info": _INFO, "license": _LICENSE, "data_subtype": split}
        _dump_json(ann / f"v2_OpenEnded_mscoco_{split}_questions.json",
                   {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": corpus.questions[split]})
        if split != "test":  # like VQA v2 test2015: questions only
            _dump_json(ann / f"v2_mscoco_{split}_annotations.json",
                       {**header, "data_type": "mscoco", "annotations": corpus.annotations[split]})
        _dump_json(ann / f"captions_{split}.json", {
            "info": _INFO, "licenses": [_LICENSE], "images": [_image_entry(s) for s in split_scenes],
            "annotations": [{"id": cid, "image_id": iid, "caption": t} for cid, iid, t in corpus.captions[split]]})
        _dump_json(ann / f"instances_{split}.json", _instances(split_scenes))
        task = TASK_SPLIT_NAME[split]
        _dump_jsonl(ann / f"nlvr2_{task}.jsonl", corpus.nlvr2[split])
        _dump_jsonl(ann / f"snli_ve_{task}.jsonl", corpus.snli_ve[split])
        if split in corpus.vcr:
            _dump_jsonl(ann / f"vcr_{split}.jsonl", corpus.vcr[split])
            _dump_json(ann / f"refcoco+_{split}.json", corpus.refcoco[split])
            by_image = {s.image_id: s for s in split_scenes}
            _dump_jsonl(ann / f"pretrain_{split}.jsonl", (
                {"image_id": iid, "file_name": by_image[iid].file_name, "image_path": f"images/{split}/{by_image[iid].file_name}",
                 "caption": t} for _, iid, t in corpus.captions[split]))
    atomic.write_text(ann / "answers_vqa.txt", "\n".join(_answer_vocab(corpus.annotations["train"])) + "\n")
    atomic.write_text(ann / "text_corpus.txt", "\n".join(corpus.text_corpus) + "\n")
    # Karpathy split file over all generated images
    images = []
    for split, split_scenes in scenes.items():
        by_image = defaultdict(list)
        for cid, iid, t in corpus.captions[split]:
            by_image[iid].append((cid, t))
        for s in split_scenes:
            imgid = len(images)
            sentences = [{"tokens": _karpathy_tokens(t), "raw": t, "imgid": imgid, "sentid": cid} for cid, t in by_image[s.image_id]]
            images.append({"filepath": split, "filename": s.file_name, "imgid": imgid, "split": split, "cocoid": s.image_id,
                           "sentids": [x["sentid"] for x in sentences], "sentences": sentences})
    _dump_json(ann / "dataset_coco.json", {"dataset": "coco", "images": images})


# ------------------------------------------------------------------------------------------ public
def generate_shapes(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_images: int | None = None,
    splits: Sequence[str] = SPLITS,
    progress: bool = True,
) -> Path:
    """Write the ``shapes`` corpus under ``out_dir`` (the ``<data_dir>/shapes`` folder) and return it.

    ``num_images``: total over ``splits`` (default 1800 -> 1200/300/300), shared 4:1:1. If
    ``out_dir/.built`` records this generator version and these arguments, returns at once.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    sizes = split_sizes(num_images, splits)
    out = Path(out_dir).expanduser()
    params = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "num_images": sum(sizes.values()),
              "split_sizes": sizes}
    if _read_marker(out) == params:
        logger.info("shapes corpus already built in %s (%s)", out, params)
        return out
    start = time.perf_counter()
    (out / _MARKER).unlink(missing_ok=True)
    ann = out / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for split in sizes:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    _clean_stale(out, sizes)

    scenes = {split: [sample_scene(_rng(seed, split, i, "scene"), image_id_of(split, i), split) for i in range(n)]
              for split, n in sizes.items()}
    bar = tqdm(total=sum(sizes.values()), desc="shapes images", unit="img", disable=not progress)
    for split, split_scenes in scenes.items():
        for i, s in enumerate(split_scenes):
            atomic.write_bytes(out / "images" / split / s.file_name, encode_jpeg(render_scene(s, _rng(seed, split, i, "render"))))
            bar.update(1)
    bar.close()

    corpus = _Corpus()
    for split, split_scenes in scenes.items():
        _make_text(split, split_scenes, seed, corpus)
    corpus.text_corpus = _make_text_corpus(seed, sizes["train"])
    _write_annotations(ann, scenes, corpus, seed)
    save_tokenizer(corpus.texts(), out / "tokenizer")
    atomic.write_text(out / _MARKER, json.dumps(params, indent=2) + "\n")
    logger.info("shapes corpus (%s) written to %s in %.1f s", sizes, out, time.perf_counter() - start)
    return out


def score_answer(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one answer (official normalization, leave-one-out min(#matches / 3, 1))."""
    return vqa_score(prediction, gt_answers)


def text_only_prior_accuracy(out_dir: str | os.PathLike) -> dict:
    """Val accuracy (VQA score, in [0, 1]) of answering from the question text's type alone.

    The prior answers each val question with the most frequent train ``multiple_choice_answer`` of its
    ``question_type`` (ties: alphabetical). Returns ``{"per_question_type_prior": overall accuracy,
    "most_frequent_answer": accuracy of answering every question with the overall most frequent
    train answer, "most_frequent_answer_text", "per_question_type": {type: accuracy},
    "per_answer_type": {type: accuracy}, "num_questions": int}``.
    """
    ann = Path(out_dir).expanduser() / "annotations"
    files = {split: ann / f"v2_mscoco_{split}_annotations.json" for split in ("train", "val")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"VQA annotation file(s) not found: {missing}; run generate_shapes({str(out_dir)!r}) first")
    train = json.loads(files["train"].read_text())["annotations"]
    val = json.loads(files["val"].read_text())["annotations"]
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        by_type[r["question_type"]][r["multiple_choice_answer"]] += 1
    overall = Counter(r["multiple_choice_answer"] for r in train)
    top_overall = min(overall.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    prior = {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in by_type.items()}
    per_q, per_a = defaultdict(list), defaultdict(list)
    prior_scores, top_scores = [], []
    for r in val:
        gts = [a["answer"] for a in r["answers"]]
        s = score_answer(prior.get(r["question_type"], top_overall), gts)
        prior_scores.append(s)
        top_scores.append(score_answer(top_overall, gts))
        per_q[r["question_type"]].append(s)
        per_a[r["answer_type"]].append(s)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0
    return {
        "per_question_type_prior": mean(prior_scores),
        "most_frequent_answer": mean(top_scores),
        "most_frequent_answer_text": top_overall,
        "per_question_type": {t: mean(v) for t, v in sorted(per_q.items())},
        "per_answer_type": {t: mean(v) for t, v in sorted(per_a.items())},
        "num_questions": len(val),
    }
