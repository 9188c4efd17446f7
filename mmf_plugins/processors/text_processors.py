"""Text processors: BERT WordPiece inputs, masked-LM masking, caption tokens, object tags as text.

Registered names (MMF ``mmf/datasets/processors/bert_processors.py`` keeps the first two):

* ``bert_tokenizer``: ``{"text", "text_b"?}`` -> ``[CLS] a [SEP] b [SEP]`` ids, mask, segment ids and
  (optionally) MLM labels, as Oscar's ``run_vqa.py tensorize_example`` / ``oscar_tsv.py
  convert_example_to_features`` build them (segments 0 for ``[CLS] a [SEP]``, 1 for ``b [SEP]``, 0 on
  padding; ``_truncate_seq_pair`` pops from the longer side).
* ``masked_token``: the MLM masking alone, over ``input_ids`` a dataset already built.
* ``caption``: decoder-side ``[CLS] caption [SEP]`` ids (Oscar ``CaptionTensorizer`` text part) and
  ``decode`` back to a string.
* ``tags``: detector object labels -> the tag string Oscar uses as ``text_b``.

MLM rules (Oscar ``random_word``, SOHO ``mask_tokens``, VL-BERT ``random_word_wwm``): each maskable
token is chosen with ``mask_probability`` (0.15); a chosen token becomes ``[MASK]`` with probability
0.8, a random vocabulary token with 0.1, and stays itself with 0.1; its label is its original id,
every other label is -1. ``[CLS]``/``[SEP]``/``[PAD]`` (any special token) are never chosen. With
``whole_word_mask`` (VL-BERT) the draws are per word: a word piece ``##x`` follows the choice and
the 80/10/10 decision of the word it continues.

Deliberate differences from the originals: random draws use ``torch``'s global generator (so
DataLoader worker seeding applies) and are vectorised; the random replacement token is drawn from
the non-special vocabulary (Oscar and VL-BERT draw from the whole vocabulary, so they occasionally
insert ``[PAD]``/``[CLS]``/``[SEP]`` mid-sentence); tokenizers are Hugging Face fast tokenizers
loaded from a local directory (no download at build time).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.processors.base_processor import BaseProcessor

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- helpers
def check_processor_params(config: Any, allowed: Iterable[str], name: str) -> None:
    """Raise ``ValueError`` for a parameter the processor ``name`` does not know (a typo such as
    ``mask_probabilty`` would otherwise be ignored silently)."""
    allowed = set(allowed)
    unknown = sorted(str(k) for k in config if k not in allowed)
    if unknown:
        raise ValueError(
            f"processor '{name}' got unknown params {unknown}; allowed: {sorted(allowed)}. "
            "Fix the spelling in the dataset's processors config."
        )


def resolve_path(path: str, data_dir: str | None) -> tuple[str, list[str]]:
    """Resolve a user path: absolute / ``~`` paths as given, relative ones against ``data_dir``
    (when given) and then the working directory. Returns ``(existing path or "", paths tried)``."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(os.path.expanduser(str(data_dir)), path)] if data_dir else []
        candidates.append(os.path.abspath(path))
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate, candidates
    return "", candidates


def load_tokenizer(tokenizer_config: Any, data_dir: str | None = None):
    """Load a Hugging Face fast tokenizer from MMF's ``tokenizer_config: {type, params}``.

    ``type`` is a local tokenizer directory (``tokenizer.json`` / ``vocab.txt``; relative paths are
    resolved against ``data_dir``) or a hub name already in the local Hugging Face cache. Nothing is
    downloaded. ``params.do_lower_case`` is applied to the tokenizer's BERT normalizer.
    """
    from transformers import AutoTokenizer

    if tokenizer_config is None or not tokenizer_config.get("type"):
        raise ValueError(
            "text processors need tokenizer_config: {type: <local tokenizer dir or cached hub name>, "
            f"params: {{do_lower_case: true}}}}, got {tokenizer_config!r}; e.g. type: shapes/tokenizer"
        )
    name = str(tokenizer_config["type"])
    params = dict(tokenizer_config.get("params", None) or {})
    unknown = sorted(set(params) - {"do_lower_case"})
    if unknown:
        raise ValueError(f"tokenizer_config.params: unknown keys {unknown}; allowed: ['do_lower_case']")
    found, tried = resolve_path(name, data_dir)
    if found:
        tokenizer = AutoTokenizer.from_pretrained(found)
    else:
        try:  # a hub name already cached locally (e.g. bert-base-uncased); never downloads
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            example = os.path.join(os.path.expanduser(str(data_dir)), "shapes", "tokenizer") if data_dir \
                else "<data_dir>/shapes/tokenizer"
            raise FileNotFoundError(
                f"tokenizer '{name}' not found: tried {tried} and the local Hugging Face cache ({e}). "
                "Offline use needs a local Hugging Face tokenizer directory (tokenizer.json or vocab.txt), "
                f"e.g. {example}; to use a hub tokenizer, save it once with "
                "AutoTokenizer.from_pretrained(name).save_pretrained(dir) and point tokenizer_config.type at dir"
            ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer '{name}' loaded as {type(tokenizer).__name__}; a fast (tokenizer.json) one is needed")
    if "do_lower_case" in params:
        _set_lower_case(tokenizer, bool(params["do_lower_case"]), name)
    return tokenizer


def _set_lower_case(tokenizer, lower: bool, name: str) -> None:
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    norm = backend.normalizer
    if isinstance(norm, normalizers.BertNormalizer):
        if norm.lowercase != lower:
            norm.lowercase = lower
            backend.normalizer = norm
        return
    lowers = norm is not None and "Lowercase" in repr(norm)
    if lowers != lower:
        logger.warning(
            "tokenizer '%s': do_lower_case=%s requested but its normalizer (%r) is not a BertNormalizer; "
            "left unchanged", name, lower, norm,
        )


class MLMMasker:
    """BERT masked-LM masking over a 1-D id tensor (see the module docstring for the rules).

    ``__call__(input_ids [L] long, maskable [L] bool) -> (masked_ids [L], labels [L])`` with labels
    = original id where chosen, -1 elsewhere.
    """

    def __init__(
        self,
        tokenizer,
        mask_probability: float = 0.15,
        mask_token_probability: float = 0.8,
        random_token_probability: float = 0.1,
        whole_word_mask: bool = False,
    ):
        for key, value in (("mask_probability", mask_probability),
                           ("mask_token_probability", mask_token_probability),
                           ("random_token_probability", random_token_probability)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}")
        if mask_token_probability + random_token_probability > 1.0 + 1e-9:
            raise ValueError(
                f"mask_token_probability + random_token_probability must be <= 1 (the rest keeps the token), "
                f"got {mask_token_probability} + {random_token_probability}"
            )
        self.probability = float(mask_probability)
        self.mask_token_probability = float(mask_token_probability)
        self.random_token_probability = float(random_token_probability)
        self.whole_word_mask = bool(whole_word_mask)
        if tokenizer.mask_token_id is None:
            raise ValueError("MLM masking needs a tokenizer with a [MASK] token")
        self.mask_id = int(tokenizer.mask_token_id)
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values()) + 1)
        self.is_special = torch.zeros(size, dtype=torch.bool)
        self.is_special[torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)] = True
        self.is_continuation = torch.zeros(size, dtype=torch.bool)
        cont = [i for tok, i in vocab.items() if tok.startswith("##")]
        if cont:
            self.is_continuation[torch.tensor(cont, dtype=torch.long)] = True
        present = torch.zeros(size, dtype=torch.bool)
        present[torch.tensor(list(vocab.values()), dtype=torch.long)] = True
        self.random_pool = torch.nonzero(present & ~self.is_special).flatten()

    def __call__(self, input_ids: torch.Tensor, maskable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = input_ids.long()
        table_ids = input_ids.clamp(0, self.is_special.numel() - 1)
        maskable = maskable.bool() & ~self.is_special[table_ids]
        length = input_ids.numel()
        if self.whole_word_mask:
            # a word starts at a maskable piece that is not "##x" or follows an unmaskable position
            prev = torch.cat([maskable.new_zeros(1), maskable[:-1]])
            starts = maskable & (~self.is_continuation[table_ids] | ~prev)
            word = torch.cumsum(starts.long(), 0) - 1
            num_words = int(starts.sum())
            word = word.clamp(min=0)
            choose = torch.rand(num_words) < self.probability
            decide = torch.rand(num_words)
            chosen = maskable & choose[word] if num_words else torch.zeros_like(maskable)
            decision = decide[word] if num_words else torch.zeros(length)
        else:
            chosen = maskable & (torch.rand(length) < self.probability)
            decision = torch.rand(length)
        to_mask = chosen & (decision < self.mask_token_probability)
        to_random = chosen & (decision >= self.mask_token_probability) & (
            decision < self.mask_token_probability + self.random_token_probability
        )
        out = input_ids.clone()
        out[to_mask] = self.mask_id
        if bool(to_random.any()):
            draws = self.random_pool[torch.randint(self.random_pool.numel(), (int(to_random.sum()),))]
            out[to_random] = draws
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -1))
        return out, labels


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
    """Oscar/BERT ``_truncate_seq_pair``: pop one token at a time from the longer list (``b`` on a
    tie) until ``len(a) + len(b) <= max_length``. Modifies the lists in place."""
    while len(tokens_a) + len(tokens_b) > max_length:
        if len(tokens_a) > len(tokens_b):
            tokens_a.pop()
        else:
            tokens_b.pop()


def _as_text(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " ".join(value)  # VL-BERT captions are word lists
    raise ValueError(f"'{key}' must be a string (or a list of words), got {type(value).__name__}: {value!r}")


class _TokenizerMixin:
    """Shared tokenizer attributes: ``.tokenizer``, ``.vocab_size``, ``.pad_id/cls_id/sep_id/mask_id``."""

    def _init_tokenizer(self, data_dir: str | None) -> None:
        self.tokenizer = load_tokenizer(self.config.get("tokenizer_config", None), data_dir)
        self._backend = self.tokenizer.backend_tokenizer
        self.vocab_size = len(self.tokenizer)
        ids = {}
        for attr in ("pad", "cls", "sep", "mask"):
            value = getattr(self.tokenizer, f"{attr}_token_id")
            if value is None:
                raise ValueError(
                    f"tokenizer {self.config.tokenizer_config.type!r} has no [{attr.upper()}] token; "
                    "a BERT WordPiece tokenizer is expected"
                )
            ids[attr] = int(value)
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = ids["pad"], ids["cls"], ids["sep"], ids["mask"]

    def _encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids


def _build_masker(config, tokenizer, default_probability: float) -> MLMMasker | None:
    probability = float(config.get("mask_probability", default_probability))
    if probability <= 0:
        return None
    return MLMMasker(
        tokenizer,
        mask_probability=probability,
        mask_token_probability=float(config.get("mask_token_probability", 0.8)),
        random_token_probability=float(config.get("random_token_probability", 0.1)),
        whole_word_mask=bool(config.get("whole_word_mask", False)),
    )


_MLM_PARAMS = ("mask_probability", "mask_token_probability", "random_token_probability", "whole_word_mask")


# --------------------------------------------------------------------------------- processors
@registry.register_processor("bert_tokenizer")
class BertTokenizerProcessor(_TokenizerMixin, BaseProcessor):
    """``{"text": str, "text_b": str?}`` -> BERT inputs of length ``max_seq_length``.

    Params: ``tokenizer_config {type, params: {do_lower_case}}``, ``max_seq_length`` (128),
    ``mask_probability`` (0 = no MLM), ``mask_token_probability`` (0.8), ``random_token_probability``
    (0.1), ``whole_word_mask`` (false).

    Returns ``input_ids, input_mask, segment_ids, lm_label_ids`` (long ``[max_seq_length]``; pad id /
    0 / 0 / -1 on padding), ``tokens`` (the unpadded tokens the model sees, after masking) and
    ``text``.
    """

    PARAMS = ("tokenizer_config", "max_seq_length", *_MLM_PARAMS)

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "bert_tokenizer")
        self.max_seq_length = int(self.config.get("max_seq_length", 128))
        if self.max_seq_length < 3:
            raise ValueError(f"max_seq_length must be >= 3 ([CLS] a [SEP]), got {self.max_seq_length}")
        self._init_tokenizer(data_dir)
        self.masker = _build_masker(self.config, self.tokenizer, 0.0)

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        if "text" not in item:
            raise KeyError(f"bert_tokenizer expects {{'text': str, 'text_b': str?}}, got keys {sorted(item)}")
        text = _as_text(item["text"], "text")
        text_b = item.get("text_b", None)
        ids_a = self._encode(text)
        ids_b = self._encode(_as_text(text_b, "text_b")) if text_b else []
        if ids_b:
            truncate_seq_pair(ids_a, ids_b, self.max_seq_length - 3)
        else:
            del ids_a[self.max_seq_length - 2:]
        ids = [self.cls_id, *ids_a, self.sep_id]
        segments = [0] * len(ids)
        if ids_b:
            ids += [*ids_b, self.sep_id]
            segments += [1] * (len(ids_b) + 1)
        length = len(ids)
        pad = self.max_seq_length - length
        input_ids = torch.tensor(ids + [self.pad_id] * pad, dtype=torch.long)
        maskable = torch.zeros(self.max_seq_length, dtype=torch.bool)
        maskable[1:1 + len(ids_a)] = True
        if ids_b:
            maskable[2 + len(ids_a):length - 1] = True
        if self.masker is not None:
            input_ids, lm_label_ids = self.masker(input_ids, maskable)
        else:
            lm_label_ids = torch.full((self.max_seq_length,), -1, dtype=torch.long)
        input_mask = torch.zeros(self.max_seq_length, dtype=torch.long)
        input_mask[:length] = 1
        return {
            "input_ids": input_ids,
            "input_mask": input_mask,
            "segment_ids": torch.tensor(segments + [0] * pad, dtype=torch.long),
            "lm_label_ids": lm_label_ids,
            "tokens": self.tokenizer.convert_ids_to_tokens(input_ids[:length].tolist()),
            "text": text,
        }


@registry.register_processor("masked_token")
class MaskedTokenProcessor(_TokenizerMixin, BaseProcessor):
    """MLM masking over ids a dataset already built: ``{"input_ids" [L], "input_mask"? [L]}`` ->
    ``{"input_ids" (masked), "lm_label_ids"}``. Padding (``input_mask == 0``) and special tokens are
    never masked. Params: ``tokenizer_config``, ``mask_probability`` (0.15) and the MLM options of
    ``bert_tokenizer``."""

    PARAMS = ("tokenizer_config", *_MLM_PARAMS)

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "masked_token")
        self._init_tokenizer(data_dir)
        self.masker = _build_masker(self.config, self.tokenizer, 0.15)

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        ids = item.get("input_ids", None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"masked_token expects 'input_ids' as a 1-D LongTensor, got {type(ids).__name__}"
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}")
        maskable = ids != self.pad_id
        if item.get("input_mask", None) is not None:
            maskable = maskable & item["input_mask"].bool()
        if self.masker is None:
            return {"input_ids": ids.clone(), "lm_label_ids": torch.full_like(ids, -1)}
        masked, labels = self.masker(ids, maskable)
        return {"input_ids": masked, "lm_label_ids": labels}


@registry.register_processor("caption")
class CaptionProcessor(_TokenizerMixin, BaseProcessor):
    """Decoder-side caption tokens: ``{"text"}`` -> ``caption_ids`` (``[CLS] caption [SEP]`` padded
    with [PAD] to ``max_length``, long), ``caption_len`` (tokens incl. [CLS]/[SEP]) and ``caption``
    (the text). ``decode(ids)`` turns ids back into a string. Params: ``tokenizer_config``,
    ``max_length`` (40 = Oscar's ``max_seq_a_length``)."""

    PARAMS = ("tokenizer_config", "max_length")

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "caption")
        self.max_length = int(self.config.get("max_length", 40))
        if self.max_length < 2:
            raise ValueError(f"caption max_length must be >= 2 ([CLS] [SEP]), got {self.max_length}")
        self._init_tokenizer(data_dir)

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        if "text" not in item:
            raise KeyError(f"caption expects {{'text': str}}, got keys {sorted(item)}")
        text = _as_text(item["text"], "text")
        ids = [self.cls_id, *self._encode(text)[: self.max_length - 2], self.sep_id]
        caption_ids = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        caption_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"caption_ids": caption_ids, "caption_len": len(ids), "caption": text}

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text: skips [CLS]/[PAD], stops at the first [SEP], joins ``##`` word pieces."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words: list[str] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.sep_id:
                break
            if token_id in (self.cls_id, self.pad_id):
                continue
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return " ".join(words)

    def batch_decode(self, batch: Iterable[Sequence[int]] | torch.Tensor) -> list[str]:
        return [self.decode(row) for row in batch]


@registry.register_processor("tags")
class TagsProcessor(BaseProcessor):
    """Detector object labels -> the tag text Oscar feeds as ``text_b``.

    Input ``{"objects": list[str] | list[int] | LongTensor, "num_boxes": int?}`` (``num_boxes`` cuts
    off padding); output ``{"tags": "circle square ..."}``. Params: ``label_map`` (file mapping ids
    to names: ``.txt`` one name per line, ``.json`` list, ``{"idx_to_label": {...}}`` (VinVL
    ``VG-SGG-dicts``), ``{"label_to_idx": {...}}`` or ``{id: name}``; relative to ``data_dir``),
    ``labels`` (the same map inline, a list), ``deduplicate`` (false: Oscar keeps repeats),
    ``max_tags`` (null = all), ``skip`` (names never emitted, default ``["__background__"]``),
    ``separator`` (" ").
    """

    PARAMS = ("label_map", "labels", "deduplicate", "max_tags", "skip", "separator")

    def __init__(self, config=None, *args, data_dir: str | None = None, **kwargs):
        super().__init__(config, *args, **kwargs)
        check_processor_params(self.config, self.PARAMS, "tags")
        self.deduplicate = bool(self.config.get("deduplicate", False))
        max_tags = self.config.get("max_tags", None)
        self.max_tags = None if max_tags is None else int(max_tags)
        self.skip = set(self.config.get("skip", None) or ["__background__"])
        self.separator = str(self.config.get("separator", " "))
        self.id_to_label: dict[int, str] | None = None
        if self.config.get("labels", None) is not None:
            self.id_to_label = {i: str(name) for i, name in enumerate(self.config.labels)}
        elif self.config.get("label_map", None):
            self.id_to_label = self._load_label_map(str(self.config.label_map), data_dir)

    @staticmethod
    def _load_label_map(path: str, data_dir: str | None) -> dict[int, str]:
        found, tried = resolve_path(path, data_dir)
        if not found:
            raise FileNotFoundError(f"tags label_map {path!r} not found; tried {tried}")
        if found.endswith(".txt"):
            with open(found, encoding="utf-8") as f:
                return {i: line.rstrip("\r\n") for i, line in enumerate(f)}
        if not found.endswith(".json"):
            raise ValueError(f"tags label_map {found!r}: expected a .txt (one name per line) or .json file")
        with open(found, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            return {i: str(name) for i, name in enumerate(data)}
        if isinstance(data, dict) and "idx_to_label" in data:
            return {int(k): str(v) for k, v in data["idx_to_label"].items()}
        if isinstance(data, dict) and "label_to_idx" in data:
            return {int(v): str(k) for k, v in data["label_to_idx"].items()}
        if isinstance(data, dict) and all(str(k).lstrip("-").isdigit() for k in data):
            return {int(k): str(v) for k, v in data.items()}
        raise ValueError(
            f"tags label_map {found!r}: expected a list of names, {{'idx_to_label': {{id: name}}}}, "
            "{'label_to_idx': {name: id}} or {id: name}"
        )

    def __call__(self, item: dict, *args, **kwargs) -> dict:
        if "objects" not in item:
            raise KeyError(f"tags expects {{'objects': list}}, got keys {sorted(item)}")
        objects = item["objects"]
        if isinstance(objects, torch.Tensor):
            objects = objects.flatten().tolist()
        objects = list(objects)
        if item.get("num_boxes", None) is not None:
            objects = objects[: int(item["num_boxes"])]
        names = []
        for obj in objects:
            if isinstance(obj, str):
                names.append(obj)
                continue
            if self.id_to_label is None:
                raise ValueError(
                    f"tags got class id {obj!r} but no label map; set params.label_map (a file) or params.labels"
                )
            try:
                names.append(self.id_to_label[int(obj)])
            except KeyError:
                raise KeyError(
                    f"tags: class id {obj} is not in the label map ({len(self.id_to_label)} entries)"
                ) from None
        names = [n for n in names if n and n not in self.skip]
        if self.deduplicate:
            names = list(dict.fromkeys(names))
        if self.max_tags is not None:
            names = names[: self.max_tags]
        return {"tags": self.separator.join(names)}
