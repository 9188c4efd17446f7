"""VQA answer processor: answer vocabulary + soft-score training targets.

Follows MMF ``VQAAnswerProcessor`` (``mmf/datasets/processors/processors.py``: ``answers``,
``answers_indices``, leave-one-out soft scores, ``word2idx``/``idx2word``/``get_true_vocab_size``)
and the official VQA accuracy (GT-Vision-Lab/VQA ``vqaEval.py``).

Target of an answer given by ``c`` of the ``n`` annotators = the official accuracy a prediction of
that answer would get: the mean over the ``n`` leave-one-out subsets of ``min(1, matches / 3)``,
i.e. ``(c * min(1, (c-1)/3) + (n-c) * min(1, c/3)) / n``. For ``n = 10`` this is 0, 0.3, 0.6, 0.9,
1.0 for ``c`` = 0, 1, 2, 3, >=4 — the same values as the BUTD/Oscar ``min(1, 0.3 c)`` table, and it
stays exact for questions with fewer than 10 answers (MMF's choice).

Answers are normalized with the official ``process_punctuation`` + ``process_digit_article``
(``mmf_plugins.metrics.vqa_eval.normalize_answer``: "Two" -> "2", "a dog" -> "dog") before the
vocabulary lookup; each vocabulary entry is indexed under its raw and its normalized spelling, so
vocabularies built either way (BUTD/Oscar normalized, VL-BERT punctuation-only) match.

Deliberate differences: no pickle (Oscar's ``trainval_ans2label.pkl``) — vocabularies are ``.txt``
(one answer per line, VL-BERT/MMF) or ``.json`` (a list, or a dict answer -> index); the unknown
token (``<unk>`` when the file lists it) never receives a score; when every answer of a question is
outside the vocabulary the target is all zero and ``num_out_of_vocab`` counts it (per process: each
DataLoader worker has its own copy).
"""

from __future__ import annotations

import json

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.metrics.vqa_eval import normalize_answer
from mmf_plugins.processors.base_processor import BaseProcessor
from mmf_plugins.processors.text_processors import check_processor_params, resolve_path


def load_answer_vocab(path: str) -> list[str]:
    """Answers in index order from a ``.txt`` (one per line; blank lines skipped, as VL-BERT) or
    ``.json`` (list, or dict answer -> index covering 0..V-1) file."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            answers = [line.strip("\r\n") for line in f]
        answers = [a for a in answers if a.strip()]
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            answers = [str(a) for a in data]
        elif isinstance(data, dict):
            if sorted(int(i) for i in data.values()) != list(range(len(data))):
                raise ValueError(
                    f"answer vocab {path!r}: a json dict must map answer -> index with indices 0..{len(data) - 1} "
                    "each used once"
                )
            answers = [""] * len(data)
            for answer, index in data.items():
                answers[int(index)] = str(answer)
        else:
            raise ValueError(f"answer vocab {path!r}: expected a json list or dict answer -> index")
    else:
        raise ValueError(
            f"answer vocab {path!r}: expected .txt (one answer per line) or .json (list or answer -> index); "
            "pickle files (Oscar's trainval_ans2label.pkl) are not read: convert them once to json"
        )
    if not answers:
        raise ValueError(f"answer vocab {path!r} is empty")
    seen: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer in seen:
            raise ValueError(f"answer vocab {path!r}: {answer!r} appears twice (indices {seen[answer]} and {i})")
        seen[answer] = i
    return answers


def soft_scores(counts: torch.Tensor, num_annotators: int) -> torch.Tensor:
    """Official leave-one-out accuracy of each answer given how many of ``num_annotators`` gave it."""
    c = counts.double()
    n = float(num_annotators)
    score = (c * ((c - 1) / 3).clamp(0, 1) + (n - c) * (c / 3).clamp(max=1)) / n
    return score.float()


@registry.register_processor("vqa_answer")
class VQAAnswerProcessor(BaseProcessor):
    """``{"answers": [str] * 10}`` -> ``{"answers", "answers_indices", "targets"}``.

    Params: ``vocab_file`` (required; relative to ``data_dir``), ``num_answers`` (10: length of
    ``answers_indices``), ``unk_token`` ("<unk>"), ``normalize`` (true).

    Returns ``answers`` (the raw list), ``answers_indices`` (long ``[num_answers]``: vocabulary index
    of each answer; unknown answers and padding get the unk index, or -1 without an unk token) and
    ``targets`` (float ``[vocab size]`` soft scores, see the module docstring). Answers may also be
    VQA annotation dicts ``{"answer": str, ...}``.
    """

    PARAMS = ("vocab_file", "num_answers", "unk_token", "normalize")

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "vqa_answer")
        vocab_file = self.config.get("vocab_file", None)
        if not vocab_file:
            raise ValueError("vqa_answer needs params.vocab_file (e.g. shapes/annotations/answers_vqa.txt)")
        found, tried = resolve_path(str(vocab_file), data_dir)
        if not found:
            raise FileNotFoundError(f"answer vocab {vocab_file!r} not found; tried {tried}")
        self.vocab_file = found
        self.num_answers = int(self.config.get("num_answers", 10))
        self.normalize = bool(self.config.get("normalize", True))
        self.answer_list = load_answer_vocab(found)
        self.word2idx_dict = {a: i for i, a in enumerate(self.answer_list)}
        # normalized spellings as a fallback (first entry wins when two normalize alike)
        self._normalized = {}
        if self.normalize:
            for i, answer in enumerate(self.answer_list):
                self._normalized.setdefault(normalize_answer(answer), i)
        unk = self.config.get("unk_token", "<unk>")
        self.unk_token = unk
        self.unk_index = self.word2idx_dict.get(unk) if unk is not None else None
        self.num_out_of_vocab = 0

    # --------------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        return len(self.answer_list)

    def get_true_vocab_size(self) -> int:
        """Number of answers in the vocabulary file (= length of ``targets``, the classifier size)."""
        return len(self.answer_list)

    def get_vocab_size(self) -> int:
        return len(self.answer_list)

    def _lookup(self, answer: str) -> int:
        index = self.word2idx_dict.get(answer)
        if index is None and self.normalize:
            normalized = normalize_answer(answer)
            index = self.word2idx_dict.get(normalized, self._normalized.get(normalized))
        if index is None or index == self.unk_index:
            return -1
        return index

    def word2idx(self, word: str) -> int:
        """Index of an answer (normalized when ``normalize``); the unk index when unknown."""
        index = self._lookup(word)
        if index >= 0:
            return index
        if self.unk_index is None:
            raise KeyError(
                f"answer {word!r} is not in the vocabulary {self.vocab_file!r} and it has no "
                f"{self.unk_token!r} entry"
            )
        return self.unk_index

    def predict_indices(self, scores, k: int = 1):
        """Top-``k`` answer indices from ``scores`` (B, num_answers), never the unk answer (as MMF and
        the official evaluation: ``<unk>`` is not an answer). Returns (values, indices)."""
        import torch

        scores = scores.float()
        if self.unk_index is not None and scores.shape[-1] > 1:
            scores = scores.clone()
            scores[..., self.unk_index] = float("-inf")
        return torch.topk(scores, min(k, scores.shape[-1]), dim=-1)

    def idx2word(self, index: int) -> str:
        if not 0 <= int(index) < len(self.answer_list):
            raise IndexError(f"answer index {index} outside the vocabulary (size {len(self.answer_list)})")
        return self.answer_list[int(index)]

    # ----------------------------------------------------------------------- targets
    def __call__(self, item: dict, *args, **kwargs) -> dict:
        if "answers" not in item:
            raise KeyError(f"vqa_answer expects {{'answers': [str, ...]}}, got keys {sorted(item)}")
        answers = item["answers"]
        if isinstance(answers, str):
            answers = [answers]
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        for a in answers:
            if not isinstance(a, str):  # ValueError: a data error the dataset counts as a bad item
                raise ValueError(  # noqa: TRY004
                    f"vqa_answer: each answer must be a string, got {type(a).__name__}: {a!r}")
        indices = torch.tensor([self._lookup(a) for a in answers], dtype=torch.long)
        known = indices >= 0
        targets = torch.zeros(len(self.answer_list), dtype=torch.float)
        if bool(known.any()):
            counts = torch.bincount(indices[known], minlength=len(self.answer_list))
            present = counts > 0
            targets[present] = soft_scores(counts[present], len(answers))
        elif answers:
            self.num_out_of_vocab += 1
        fill = self.unk_index if self.unk_index is not None else -1
        answers_indices = torch.full((self.num_answers,), fill, dtype=torch.long)
        kept = indices[: self.num_answers]
        answers_indices[: kept.numel()] = torch.where(kept >= 0, kept, torch.full_like(kept, fill))
        return {"answers": list(item["answers"]), "answers_indices": answers_indices, "targets": targets}
