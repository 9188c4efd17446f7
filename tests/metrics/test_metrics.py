"""Every registered metric: update/compute on fake batches, checked against hand or direct values."""

import pytest
import torch

import mmf_plugins.metrics.metrics  # noqa: F401  (registers the metrics)
from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import SampleList
from mmf_plugins.metrics.caption_metrics import score_captions
from mmf_plugins.metrics.retrieval import retrieval_recall
from mmf_plugins.metrics.vqa_eval import vqa_score

EXPECTED = {
    "accuracy", "binary_accuracy", "vqa_accuracy", "vqa_soft_accuracy", "retrieval_recall",
    "caption_metrics", "caption_bleu4", "caption_cider", "caption_rouge_l", "caption_meteor",
}  # fmt: skip


def metric(name, **params):
    return registry.get_metric_class(name)(**params)


def test_all_metrics_are_registered():
    assert EXPECTED <= set(registry.names("metric"))


def test_accuracy_class_ids_one_hot_and_topk():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.4, 0.5, 0.1]])
    m = metric("accuracy")
    m.update(SampleList({"targets": torch.tensor([1, 0])}), {"scores": scores[:2]})
    m.update(SampleList({"targets": torch.tensor([1, 1])}), {"scores": scores[2:]})  # 3rd wrong
    assert m.compute() == {"accuracy": 0.75}
    m.reset()
    m.update(
        SampleList({"targets": torch.nn.functional.one_hot(torch.tensor([1, 0, 1, 1]), 3).float()}), {"scores": scores}
    )
    assert m.compute() == {"accuracy": 0.75}
    top2 = metric("accuracy", topk=2)
    top2.update(SampleList({"targets": torch.tensor([1, 0, 1, 2])}), {"scores": scores})  # 4th: class 2 is last
    assert top2.compute() == {"accuracy": 0.75}


def test_binary_accuracy_logits_and_two_way():
    m = metric("binary_accuracy")
    m.update(
        SampleList({"targets": torch.tensor([1.0, 0.0, 1.0, 0.0])}), {"scores": torch.tensor([2.0, -1.0, -0.5, 0.3])}
    )
    assert m.compute() == {"binary_accuracy": 0.5}
    m.reset()
    m.update(
        SampleList({"is_correct": torch.tensor([True, False, False])}),
        {"scores": torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])},
    )
    assert m.compute()["binary_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="is_correct"):
        m.update(SampleList({"image_id": torch.tensor([1])}), {"scores": torch.tensor([1.0])})


class ToyAnswerProcessor:
    def __init__(self):
        self.words = ["<unk>", "yes", "no", "two", "red"]

    def idx2word(self, index: int) -> str:
        return self.words[index]


@pytest.fixture
def toy_answers():
    registry.register("toyvqa_answer_processor", ToyAnswerProcessor())
    yield
    registry.unregister("toyvqa_answer_processor")


def vqa_batch():
    answers = [["yes"] * 10, ["2", "2"] + ["3"] * 8, ["red"] * 3 + ["blue"] * 7, ["two"] * 10]
    targets = torch.zeros(4, 5)
    targets[0, 1], targets[2, 4], targets[3, 3] = 1.0, 0.9, 1.0
    return SampleList({"answers": answers, "targets": targets, "dataset_name": "toyvqa", "dataset_type": "val"})


# argmax (with <unk> masked): yes, two, red, two; column 0 (<unk>) is the raw max of row 0
VQA_SCORES = torch.tensor(
    [[9.0, 5.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 4.0, 1.0]]
)


def test_vqa_accuracy_is_the_official_string_score(toy_answers):
    m = metric("vqa_accuracy")
    m.update(vqa_batch(), {"scores": VQA_SCORES})
    # yes -> 1.0; "two" vs 2x"2" -> 0.6; red 3/10 -> 0.9; "two" vs unanimous "two" -> 1.0 (raw match at HEAD)
    assert m.compute()["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.9 + 1.0) / 4)
    legacy = metric("vqa_accuracy", version="legacy")
    legacy.update(vqa_batch(), {"scores": VQA_SCORES})
    assert legacy.compute()["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.9 + 0.0) / 4)  # "2" vs raw "two"
    unmasked = metric("vqa_accuracy", unk_index=None)
    unmasked.update(vqa_batch(), {"scores": VQA_SCORES})
    assert unmasked.compute()["vqa_accuracy"] == pytest.approx(
        sum(vqa_score(p, a) for p, a in zip(["<unk>", "two", "red", "two"], vqa_batch().answers)) / 4
    )


def test_vqa_accuracy_names_missing_inputs(toy_answers):
    m = metric("vqa_accuracy")
    batch = vqa_batch()
    del batch["answers"]
    with pytest.raises(KeyError, match="'vqa_accuracy' needs batch field 'answers'"):
        m.update(batch, {"scores": VQA_SCORES})
    other = vqa_batch()
    other.dataset_name = "nowhere"
    with pytest.raises(KeyError, match="nowhere_answer_processor"):
        m.update(other, {"scores": VQA_SCORES})
    with pytest.raises(KeyError, match="model output field 'scores'"):
        m.update(vqa_batch(), {"losses": {}})
    with pytest.raises(ValueError, match="version"):
        metric("vqa_accuracy", version="2017")


def test_vqa_soft_accuracy_reads_the_target_at_the_argmax():
    m = metric("vqa_soft_accuracy")
    m.update(vqa_batch(), {"scores": VQA_SCORES})
    assert m.compute() == {"vqa_soft_accuracy": pytest.approx((1.0 + 0.0 + 0.9 + 1.0) / 4)}


# hand matrix of tests/metrics/test_retrieval.py
SCORES = torch.tensor(
    [[0.90, 0.10, 0.80, 0.20, 0.30, 0.00], [0.70, 0.60, 0.50, 0.40, 0.90, 0.80], [0.20, 0.30, 0.10, 0.00, 0.40, 0.95]]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])


def pair_batches(image_ids, text_ids, two_way=False, drop_last=0):
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(6), indexing="ij")
    order = torch.randperm(18, generator=torch.Generator().manual_seed(0))
    order = torch.cat([order[order // 6 == 0], order[order // 6 != 0]])  # image 0 first, then any order
    rows, cols = rows.flatten()[order], cols.flatten()[order]
    if drop_last:
        rows, cols = rows[:-drop_last], cols[:-drop_last]
    for chunk in torch.arange(len(rows)).split(7):
        r, c = rows[chunk], cols[chunk]
        s = SCORES[r, c]
        batch = SampleList(
            {
                "image_id": [image_ids[i] for i in r.tolist()],
                "text_id": [text_ids[t] for t in c.tolist()],
                "text_image_id": [image_ids[i] for i in TEXT_TO_IMAGE[c].tolist()],
                "dataset_name": "toyret",
            }
        )
        yield batch, {"scores": torch.stack([torch.zeros_like(s), s], 1) if two_way else s}


@pytest.mark.parametrize("two_way", [False, True])
def test_retrieval_recall_rebuilds_the_matrix_from_shuffled_pairs(two_way):
    m = metric("retrieval_recall", ks=(1, 2, 5))
    for batch, out in pair_batches(["imgA", "imgB", "imgC"], [10, 11, 12, 13, 14, 15], two_way):
        batch.image_id = torch.tensor([{"imgA": 7, "imgB": 8, "imgC": 9}[i] for i in batch.image_id])
        batch.text_image_id = torch.tensor([{"imgA": 7, "imgB": 8, "imgC": 9}[i] for i in batch.text_image_id])
        m.update(batch, out)
    expected = retrieval_recall(SCORES, TEXT_TO_IMAGE, ks=(1, 2, 5))
    assert m.compute() == pytest.approx(expected)
    assert expected["r1_i2t"] == pytest.approx(200 / 3) and expected["r1_t2i"] == pytest.approx(50.0)


def test_retrieval_recall_string_ids_missing_pairs_and_protocol():
    m = metric("retrieval_recall")
    for batch, out in pair_batches(["a.jpg", "b.jpg", "c.jpg"], ["t0", "t1", "t2", "t3", "t4", "t5"]):
        m.update(batch, out)
    assert m.compute() == pytest.approx(retrieval_recall(SCORES, TEXT_TO_IMAGE))
    m.reset()
    for batch, out in pair_batches(["a.jpg", "b.jpg", "c.jpg"], ["t0", "t1", "t2", "t3", "t4", "t5"], drop_last=2):
        m.update(batch, out)
    with pytest.raises(ValueError, match="2 of 18 pairs are missing"):
        m.compute()
    one_k = metric("retrieval_recall", protocol="1k")
    for batch, out in pair_batches(["a.jpg", "b.jpg", "c.jpg"], ["t0", "t1", "t2", "t3", "t4", "t5"]):
        one_k.update(batch, out)
    with pytest.raises(ValueError, match="not a multiple"):
        one_k.compute()
    with pytest.raises(KeyError, match="text_image_id"):
        m.update(
            SampleList({"image_id": torch.tensor([1]), "text_id": torch.tensor([2])}), {"scores": torch.tensor([0.5])}
        )
    with pytest.raises(ValueError, match="protocol"):
        metric("retrieval_recall", protocol="10k")


GTS = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse"],
    2: ["two dogs play in the grass", "dogs playing with a ball in a park"],
    3: ["a red bus on a city street", "a bus driving down the street"],
}
RES = {1: "A man riding a horse.", 2: "A dog playing in a park.", 3: "a red bus on the street"}


def caption_batches():
    ids = [1, 2, 3, 1]  # image 1 twice (padded sampler): its first caption is kept
    caps = [RES[i] for i in ids[:3]] + ["garbage"]
    yield (
        SampleList({"image_id": torch.tensor(ids[:2]), "references": [GTS[i] for i in ids[:2]]}),
        {"captions": caps[:2]},
    )
    yield (
        SampleList({"image_id": torch.tensor(ids[2:]), "references": [GTS[i] for i in ids[2:]]}),
        {"captions": caps[2:]},
    )


def test_caption_metrics_accumulate_and_score():
    expected = score_captions(GTS, {i: [c] for i, c in RES.items()}, use_java=False)
    results = {}
    for name in ("caption_metrics", "caption_bleu4", "caption_cider", "caption_rouge_l"):
        m = metric(name, use_java=False)
        for batch, out in caption_batches():
            m.update(batch, out)
        results[name] = m.compute()
    assert results["caption_metrics"] == pytest.approx(expected)
    assert results["caption_bleu4"] == pytest.approx({"caption_bleu4": expected["bleu4"]})
    assert results["caption_cider"] == pytest.approx({"caption_cider": expected["cider"]})
    assert results["caption_rouge_l"] == pytest.approx({"caption_rouge_l": expected["rouge_l"]})
    assert expected["cider"] > 0


def test_caption_meteor_reports_nothing_without_java():
    m = metric("caption_meteor", use_java=False)
    for batch, out in caption_batches():
        m.update(batch, out)
    assert m.compute() == {}


def test_caption_metric_names_missing_fields():
    m = metric("caption_bleu4", use_java=False)
    with pytest.raises(KeyError, match="'caption_bleu4' needs batch field 'references'"):
        m.update(SampleList({"image_id": torch.tensor([1])}), {"captions": ["a"]})
    with pytest.raises(KeyError, match="model output field 'captions'"):
        m.update(SampleList({"image_id": torch.tensor([1]), "references": [["a"]]}), {"scores": torch.zeros(1)})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_compute_without_data_reports_nothing(name):
    assert metric(name).compute() == {}
