"""Registered evaluation metrics: accumulate over an eval split, then report named floats.

Interface (what the trainer's evaluation loop calls): ``cls(**params)``, ``reset()``,
``update(batch: SampleList, output: dict)`` per batch, ``compute() -> {key: float}``; each key is
logged as ``<split>/<dataset>/<key>`` (MMF's names, so ``early_stop.criteria: vqa2/vqa_accuracy``
works). Single-number metrics use their registry name as key.

Follows MMF ``mmf/modules/metrics.py`` for names and inputs, with deliberate differences:

* ``vqa_accuracy`` is the OFFICIAL string-level VQA accuracy (``vqa_eval.vqa_score``: answer string
  of the argmax vs the 10 raw GT answers). MMF's ``vqa_accuracy`` is the soft-target training proxy;
  that one is registered here as ``vqa_soft_accuracy`` so the two are never confused. Both are in
  [0, 1] and, like MMF, never pick the ``<unk>`` column (``unk_index``, default 0).
* metrics accumulate over the whole split instead of MMF's concatenate-then-``calculate``; state is
  on CPU, so validation memory does not grow with the split on the GPU.
* retrieval recall is computed on the full image x text matrix of the split (``retrieval.py``), and
  caption metrics by coco-caption (``caption_metrics.py``), not per batch.
* a missing input field raises ``MissingFieldError`` (a ``KeyError``) naming the field, the metric and
  who provides it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.metrics.caption_metrics import java_available, score_captions
from mmf_plugins.metrics.retrieval import coco_1k_5k, retrieval_recall
from mmf_plugins.metrics.vqa_eval import VERSIONS, vqa_score

logger = logging.getLogger(__name__)


def _register(name: str):
    def wrap(cls):
        cls.name = name
        return registry.register_metric(name)(cls)

    return wrap


def _as_list(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    return list(value)


class MissingFieldError(KeyError):
    """A metric input is absent from the batch or the model output. ``str(e)`` is the full message."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class BaseMetric(abc.ABC):
    """Accumulating metric. Subclasses implement ``reset``, ``update`` and ``compute``."""

    name = "base"

    def __init__(self) -> None:
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated (called before each evaluation pass)."""

    @abc.abstractmethod
    def update(self, batch: Mapping, output: Mapping) -> None:
        """Accumulate one batch and the model's output for it."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric over everything accumulated since ``reset``: ``{key: value}``."""

    def _get(self, source: Mapping, key: str, where: str, provider: str) -> Any:
        if key not in source:
            have = ", ".join(str(k) for k in source)
            raise MissingFieldError(
                f"metric '{self.name}' needs {where} field '{key}' ({provider}); the {where} has: {have}"
            )
        return source[key]

    def _scores(self, output: Mapping, key: str = "scores") -> torch.Tensor:
        return self._get(output, key, "model output", "the model's forward returns it").detach().float().cpu()

    def _no_data(self) -> dict[str, float]:
        logger.warning("metric '%s' saw no samples; reporting nothing", self.name)
        return {}


class _CountingMetric(BaseMetric):
    """Mean of per-sample values, kept as a running sum."""

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def _add(self, values: torch.Tensor) -> None:
        self.total += float(values.double().sum())
        self.count += values.numel()

    def compute(self) -> dict[str, float]:
        return {self.name: self.total / self.count} if self.count else self._no_data()


def _class_targets(targets: torch.Tensor) -> torch.Tensor:
    """(B,) class ids, or (B, C) one-hot / soft targets -> their argmax."""
    targets = targets.detach().cpu()
    return targets.argmax(-1) if targets.dim() > 1 else targets.long()


@_register("accuracy")
class Accuracy(_CountingMetric):
    """Top-k accuracy of ``output[score_key]`` (B, C) against ``batch[target_key]``: (B,) class ids or
    (B, C) one-hot/soft targets (their argmax is the class)."""

    def __init__(self, score_key: str = "scores", target_key: str = "targets", topk: int = 1) -> None:
        if int(topk) < 1:
            raise ValueError(f"accuracy topk must be >= 1, got {topk}")
        self.score_key, self.target_key, self.topk = score_key, target_key, int(topk)
        super().__init__()

    def update(self, batch, output) -> None:
        scores = self._scores(output, self.score_key)
        targets = _class_targets(self._get(batch, self.target_key, "batch", "the dataset's label/answer processor"))
        top = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices  # (B, k)
        self._add((top == targets.view(-1, 1)).any(-1))


@_register("binary_accuracy")
class BinaryAccuracy(_CountingMetric):
    """Accuracy of a two-way decision (ITM, NLVR2 true/false): ``scores`` (B,) or (B, 1) logits
    (positive = logit > 0) or (B, 2) (positive = argmax 1), against ``batch.targets`` or, when absent,
    ``batch.is_correct``: (B,) 0/1 (bool, int or float >= 0.5) or (B, 2) one-hot."""

    def __init__(self, score_key: str = "scores", target_key: str | None = None) -> None:
        self.score_key, self.target_key = score_key, target_key
        super().__init__()

    def update(self, batch, output) -> None:
        scores = self._scores(output, self.score_key)
        if scores.dim() == 2 and scores.shape[1] == 2:
            pred = scores.argmax(-1)
        elif scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1):
            pred = (scores.view(-1) > 0).long()
        else:
            raise ValueError(
                f"binary_accuracy expects scores of shape (B,), (B, 1) or (B, 2), got {tuple(scores.shape)}"
            )
        key = self.target_key or ("targets" if "targets" in batch else "is_correct")
        targets = self._get(batch, key, "batch", "the dataset's label processor (targets) or ITM sampling (is_correct)")
        targets = torch.as_tensor(targets).detach().cpu()
        if targets.dim() == 2 and targets.shape[1] == 2:
            targets = targets.argmax(-1)
        else:
            targets = (targets.view(-1).float() >= 0.5).long()
        self._add(pred == targets)


def _answer_indices(scores: torch.Tensor, unk_index: int | None) -> torch.Tensor:
    if unk_index is not None and 0 <= unk_index < scores.shape[-1]:
        scores = scores.clone()
        scores[:, unk_index] = float("-inf")
    return scores.argmax(-1)


@_register("vqa_accuracy")
class VQAAccuracy(_CountingMetric):
    """Official VQA accuracy in [0, 1]: the answer string of the argmax of ``output.scores``
    (``registry.get(f"{batch.dataset_name}_answer_processor").idx2word``) scored against
    ``batch.answers`` (per sample: the raw GT answer strings) by ``vqa_score(..., version)``."""

    def __init__(self, version: str = "current", unk_index: int | None = 0) -> None:
        if version not in VERSIONS:
            raise ValueError(f"vqa_accuracy version must be one of {sorted(VERSIONS)}, got {version!r}")
        self.version, self.unk_index = version, unk_index
        super().__init__()

    def update(self, batch, output) -> None:
        scores = self._scores(output)
        answers = self._get(
            batch, "answers", "batch", "the VQA dataset's annotation loading: the 10 raw answers per question"
        )
        dataset = self._get(batch, "dataset_name", "batch", "the collate function")
        processor = registry.get(f"{dataset}_answer_processor")
        if processor is None:
            raise MissingFieldError(
                f"metric '{self.name}' needs the answer processor registered as '{dataset}_answer_processor' "
                "(the dataset builder registers its processors when it loads) to map indices to answer strings"
            )
        predicted = [processor.idx2word(int(i)) for i in _answer_indices(scores, self.unk_index)]
        if len(answers) != len(predicted):
            raise ValueError(f"batch.answers has {len(answers)} entries for {len(predicted)} score rows")
        self._add(torch.tensor([vqa_score(p, list(gt), self.version) for p, gt in zip(predicted, answers)]))


@_register("vqa_soft_accuracy")
class VQASoftAccuracy(_CountingMetric):
    """Training-time proxy (MMF's ``vqa_accuracy``): mean of ``batch.targets[b, argmax scores[b]]``
    with the soft VQA targets (min(1, count/3)-style scores per answer), in [0, 1]."""

    def __init__(self, unk_index: int | None = 0) -> None:
        self.unk_index = unk_index
        super().__init__()

    def update(self, batch, output) -> None:
        scores = self._scores(output)
        targets = self._get(batch, "targets", "batch", "the VQA answer processor (soft scores)").detach().float().cpu()
        if targets.shape != scores.shape:
            raise ValueError(
                f"vqa_soft_accuracy needs targets shaped like scores {tuple(scores.shape)}, got {tuple(targets.shape)}"
            )
        idx = _answer_indices(scores, self.unk_index)
        self._add(targets.gather(1, idx[:, None]).squeeze(1))


def _index_by_first_appearance(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (N,) -> (dense index 0..U-1 of each element numbered by first appearance, the U unique
    ids in that order)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)  # sorted
    positions = torch.arange(len(ids))
    first = torch.full((len(uniq),), len(ids), dtype=torch.long).scatter_reduce(0, inverse, positions, "amin")
    order = first.argsort()  # unique (sorted) index -> appearance rank via inverse permutation
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(uniq))
    return rank[inverse], uniq[order]


@_register("retrieval_recall")
class RetrievalRecall(BaseMetric):
    """Image<->text R@K (percent) over the eval split from per-pair scores.

    Each batch row is one (image, text) pair: ``batch.image_id``, ``batch.text_id``,
    ``batch.text_image_id`` (the GT image of that text; same kind of id as ``image_id``) and
    ``output.scores``: (B,) or (B, 1) pair scores, or (B, 2) ITM logits (score = logit[1] - logit[0]).
    The split must score every image with every text (a pair scored twice, e.g. by padded distributed
    sampling, keeps one of its scores). Images are ordered by first appearance (the dataset order),
    which fixes the 1K folds. ``protocol``: "5k" = all images of the split (COCO 5K, Flickr30K 1K),
    "1k" = mean over sequential folds of 1,000 images. Keys: ``r1_i2t r5_i2t r10_i2t r1_t2i r5_t2i
    r10_t2i rsum``. Integer ids stay tensors (COCO 5K is 125M pairs); string ids are coded once.
    """

    _PROVIDER = "the retrieval dataset's all-pairs evaluation sampling"

    def __init__(self, protocol: str = "5k", ks: Sequence[int] = (1, 5, 10)) -> None:
        if protocol not in ("5k", "1k"):
            raise ValueError(
                f"retrieval_recall protocol must be '5k' (whole split) or '1k' (5-fold mean), got {protocol!r}"
            )
        self.protocol, self.ks = protocol, tuple(int(k) for k in ks)
        super().__init__()

    def reset(self) -> None:
        self.fields: dict[str, list[torch.Tensor]] = {"image_id": [], "text_id": [], "text_image_id": []}
        self.scores: list[torch.Tensor] = []
        self._codes: dict[Any, int] = {}  # non-integer ids (e.g. "COCO_val2014_...") -> int codes
        self._kinds: dict[str, set[str]] = {key: set() for key in self.fields}

    def _ids(self, batch, key: str) -> torch.Tensor:
        value = self._get(batch, key, "batch", self._PROVIDER)
        if isinstance(value, torch.Tensor) and not value.dtype.is_floating_point:
            self._kinds[key].add("int")
            return value.detach().reshape(-1).to("cpu", torch.long)
        values = list(value)
        if all(isinstance(v, int) for v in values):
            self._kinds[key].add("int")
            return torch.tensor(values, dtype=torch.long)
        self._kinds[key].add("str")
        return torch.tensor([self._codes.setdefault(v, len(self._codes)) for v in values], dtype=torch.long)

    def update(self, batch, output) -> None:
        scores = self._scores(output)
        if scores.dim() == 2 and scores.shape[1] == 2:
            scores = scores[:, 1] - scores[:, 0]
        scores = scores.reshape(-1)
        ids = {key: self._ids(batch, key) for key in self.fields}
        if any(len(v) != scores.numel() for v in ids.values()):
            sizes = ", ".join(f"{len(v)} {k}" for k, v in ids.items())
            raise ValueError(
                f"retrieval_recall got {scores.numel()} scores for {sizes}; output.scores must hold one score per pair"
            )
        for key, value in ids.items():
            self.fields[key].append(value)
        self.scores.append(scores)

    def score_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (n_images, n_texts), text_to_image (n_texts,)) from the accumulated pairs."""
        if len(self._kinds["text_id"]) > 1:
            raise ValueError("text_id mixes integer and string ids; use one kind")
        if self._kinds["image_id"] != self._kinds["text_image_id"] or len(self._kinds["image_id"]) > 1:
            raise ValueError(
                f"image_id ({sorted(self._kinds['image_id'])}) and text_image_id ({sorted(self._kinds['text_image_id'])}) "
                "must be the same kind of id (all integers or all strings)"
            )
        image_ids, text_ids, gt_ids = (torch.cat(self.fields[k]) for k in ("image_id", "text_id", "text_image_id"))
        scores = torch.cat(self.scores)
        if torch.isnan(scores).any():
            raise ValueError(f"the model returned {int(torch.isnan(scores).sum())} NaN retrieval scores")
        rows, images = _index_by_first_appearance(image_ids)
        cols, texts = _index_by_first_appearance(text_ids)
        # GT image id of each pair -> its row (searchsorted over the sorted image ids)
        sorted_images, perm = images.sort()
        pos = torch.searchsorted(sorted_images, gt_ids).clamp(max=len(images) - 1)
        unknown = sorted_images[pos] != gt_ids
        if unknown.any():
            first = int(torch.nonzero(unknown)[0])
            raise ValueError(
                f"{int(unknown.sum())} pairs name a GT image (text_image_id) that never appears as image_id, "
                f"e.g. text {int(text_ids[first])} -> image {int(gt_ids[first])}; every GT image must be in the eval set"
            )
        gt_rows = perm[pos]
        text_to_image = torch.full((len(texts),), -1, dtype=torch.long)
        text_to_image[cols] = gt_rows
        if (text_to_image[cols] != gt_rows).any():
            raise ValueError("a text_id appears with two different text_image_id values; each text has one GT image")
        matrix = torch.full((len(images), len(texts)), float("nan"))
        matrix[rows, cols] = scores
        missing = int(torch.isnan(matrix).sum())
        if missing:
            raise ValueError(
                f"retrieval_recall needs a score for every (image, text) pair of the split: {missing} of "
                f"{matrix.numel()} pairs are missing; evaluate with the dataset's all-pairs retrieval mode"
            )
        return matrix, text_to_image

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return self._no_data()
        scores, text_to_image = self.score_matrix()
        if self.protocol == "1k":
            return coco_1k_5k(scores, text_to_image, self.ks)["1k"]
        return retrieval_recall(scores, text_to_image, self.ks)


class _CaptionMetric(BaseMetric):
    """Accumulates ``batch.image_id``, ``output.captions`` (list[str]) and ``batch.references`` (per
    sample, the GT caption strings); scores with coco-caption at ``compute``. An image seen twice
    (e.g. padded distributed sampling) keeps its first caption."""

    metrics: tuple[str, ...] = ()

    def __init__(self, use_java: bool | None = None) -> None:
        self.use_java = use_java
        super().__init__()

    def reset(self) -> None:
        self.res: dict = {}
        self.gts: dict = {}

    def update(self, batch, output) -> None:
        captions = self._get(output, "captions", "model output", "the captioning model's decoding (list of strings)")
        refs = self._get(batch, "references", "batch", "the caption dataset: all GT captions of each image")
        image_ids = _as_list(self._get(batch, "image_id", "batch", "the caption dataset"))
        if not len(captions) == len(refs) == len(image_ids):
            raise ValueError(
                f"{self.name}: {len(captions)} captions, {len(refs)} reference lists, {len(image_ids)} image ids in one batch"
            )
        for image_id, caption, ref in zip(image_ids, captions, refs):
            if image_id not in self.res:
                self.res[image_id] = [caption]
                self.gts[image_id] = list(ref)

    def compute(self) -> dict[str, float]:
        if not self.res:
            return self._no_data()
        return self._rename(score_captions(self.gts, self.res, self.metrics, self.use_java))

    def _rename(self, scores: dict[str, float]) -> dict[str, float]:
        return scores


class _SingleCaptionMetric(_CaptionMetric):
    score_key = ""

    def _rename(self, scores: dict[str, float]) -> dict[str, float]:
        return {self.name: scores[self.score_key]} if self.score_key in scores else {}


@_register("caption_metrics")
class CaptionMetrics(_CaptionMetric):
    """All coco-caption scores in one pass: ``bleu1..bleu4, cider, rouge_l`` (+ ``meteor`` with Java)."""

    metrics = None  # all available


@_register("caption_bleu4")
class CaptionBleu4(_SingleCaptionMetric):
    metrics, score_key = ("bleu",), "bleu4"


@_register("caption_cider")
class CaptionCider(_SingleCaptionMetric):
    metrics, score_key = ("cider",), "cider"


@_register("caption_rouge_l")
class CaptionRougeL(_SingleCaptionMetric):
    metrics, score_key = ("rouge_l",), "rouge_l"


@_register("caption_meteor")
class CaptionMeteor(_SingleCaptionMetric):
    """METEOR; reports nothing (with a warning from ``score_captions``) when Java is missing."""

    metrics, score_key = ("meteor",), "meteor"

    def __init__(self, use_java: bool | None = None) -> None:
        if use_java is False or (use_java is None and not java_available()):
            logger.warning("caption_meteor needs Java (meteor-1.5.jar); it will report nothing on this machine")
        super().__init__(use_java)
