"""Released VL-BERT checkpoints (jackroos/VL-BERT ``.model`` files) -> the ``vl_bert`` model's state dict.

Input: what ``torch.save`` wrote in the release (``{"state_dict": DDP state dict, "optimizer": ...,
["validation_monitor"]}``), the bare state dict, or a path to either. Base and large, ``prec`` and
``e2e`` checkpoints convert alike (e2e adds the ResNet). Key mapping, after stripping ``module.`` (DDP)
and ``vlbert._module.`` (VCR's TimeDistributed wrapper; becomes ``vlbert.``):

==================================================  ===================================================
release                                              ours
==================================================  ===================================================
vlbert.word_embeddings / position_embeddings /       vlbert.embeddings.word_embeddings / ... (token types:
token_type_embeddings ([3, H])                       3 rows, row 2 = visual)
vlbert.embedding_LayerNorm                           vlbert.embeddings.LayerNorm
vlbert.{end_embedding, visual_ln_text,               same
visual_ln_object, encoder.layer.N.*, pooler.dense}
vlbert.mlm_head.predictions.{transform.*, decoder,   mlm_head.{transform.*, decoder (tied to the word
bias}                                                embeddings), bias}
vlbert.mvrc_head.{transform.dense, region_cls_pred}  mvrc_head.{transform.dense, region_cls_pred}
object_linguistic_embeddings, object_mask_visual_    same
embedding, object_mask_word_embedding,
aux_text_visual_embedding, final_mlp.*
image_feature_extractor.obj_downsample.1             same
image_feature_extractor.backbone.{conv1, bn1}        image_feature_extractor.roi_features.trunk.stem.{conv1, bn1}
image_feature_extractor.backbone.layer1..3           image_feature_extractor.roi_features.trunk.layer1..3
image_feature_extractor.roi_head_feature_extractor   image_feature_extractor.roi_features.box_head.head.layer4
==================================================  ===================================================

Reported as unused, never dropped silently: ``image_feature_extractor.head.0.*`` (the release registers
the res5 module twice, so every tensor is saved again there; checked equal to
``roi_head_feature_extractor``), BN ``num_batches_tracked`` counters (frozen BN keeps none),
``vlbert.relationsip_head.*`` (the ITM head, off in the released configs), and anything without a
counterpart (``cnn_loss_reg``, ``special_word_embeddings``, ``visual_scale_*``, ``object_embed``, ...).

Fine-tuning initialisation (the release's ``PARTIAL_PRETRAIN_PREFIX_CHANGES``): ``prefix_changes`` is a
list of ``"old->new"`` rules applied to each released key (``module.`` stripped from both) before the
mapping; the first rule whose ``old`` prefixes the key wins, and the renamed key is taken as ours
(e.g. ``"vlbert.mlm_head.predictions.transform->final_mlp.0"`` starts the VQA head from the MLM
transform). ``task`` adds the release's rules for a head and drops the pretraining-only tensors the
fine-tuning model does not have (reported unused): ``vqa`` (MLM transform -> ``final_mlp.0``),
``refcoco`` (MVRC transform -> ``final_mlp.0``), ``multiple_choice`` (none), ``pretraining`` (keep all).
With ``model=`` the report also lists our keys left unfilled and shape mismatches.

Reading: ``load_weights_file`` (``torch.load(weights_only=True)``) refuses a ``.model`` file that pickles
custom objects (the release's ``validation_monitor``), and this converter never unpickles it. Strip such
a file once, in a TRUSTED environment: load it with ``torch.load`` and ``weights_only`` set to False
(this executes the pickle), keep only the tensors of ``ckpt["state_dict"]``, ``torch.save`` them as
``{"state_dict": tensors}`` to a temp file and ``os.replace`` it over the original.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmf_plugins.common.registry import registry
from mmf_plugins.zoo.conversion import (
    CheckpointError,
    ConversionReport,
    load_weights_file,
)

logger = logging.getLogger(__name__)

TASKS = ("pretraining", "vqa", "multiple_choice", "refcoco")
TASK_PREFIX_CHANGES = {
    "pretraining": [],
    "vqa": ["vlbert.mlm_head.predictions.transform->final_mlp.0"],
    "refcoco": ["vlbert.mvrc_head.transform->final_mlp.0"],
    "multiple_choice": [],
}
# tensors only the pretraining model has (dropped with a note for the fine-tuning tasks)
PRETRAINING_ONLY = ("mlm_head.", "mvrc_head.", "object_mask_visual_embedding.", "object_mask_word_embedding.",
                    "aux_text_visual_embedding.")
SENTINEL = "vlbert.word_embeddings.weight"
WORD = "vlbert.embeddings.word_embeddings.weight"
DECODER = "mlm_head.decoder.weight"
RES5 = "image_feature_extractor.roi_head_feature_extractor."
RES5_DUPLICATE = "image_feature_extractor.head.0."
_TRUNK = "image_feature_extractor.roi_features.trunk."
RENAMES = (  # (release prefix, our prefix), first match wins
    ("vlbert.word_embeddings.", "vlbert.embeddings.word_embeddings."),
    ("vlbert.position_embeddings.", "vlbert.embeddings.position_embeddings."),
    ("vlbert.token_type_embeddings.", "vlbert.embeddings.token_type_embeddings."),
    ("vlbert.embedding_LayerNorm.", "vlbert.embeddings.LayerNorm."),
    ("vlbert.mlm_head.predictions.", "mlm_head."),
    ("vlbert.mvrc_head.", "mvrc_head."),
    ("image_feature_extractor.backbone.conv1.", _TRUNK + "stem.conv1."),
    ("image_feature_extractor.backbone.bn1.", _TRUNK + "stem.bn1."),
    ("image_feature_extractor.backbone.layer", _TRUNK + "layer"),
    (RES5, "image_feature_extractor.roi_features.box_head.head.layer4."),
)
KEPT = ("vlbert.end_embedding.", "vlbert.visual_ln_text.", "vlbert.visual_ln_object.", "vlbert.encoder.layer.",
        "vlbert.pooler.", "object_linguistic_embeddings.", "object_mask_visual_embedding.",
        "object_mask_word_embedding.", "aux_text_visual_embedding.", "image_feature_extractor.obj_downsample.",
        "final_mlp.")
UNUSED_NOTES = (
    ("vlbert.relationsip_head.", "the caption-image relationship (ITM) head; off in the released configs"),
    ("vlbert.special_word_embeddings.", "frozen-word-embedding variant (word_embedding_frozen), not implemented"),
    ("vlbert.visual_scale_", "visual_ln: false scalars, not implemented (released configs use visual_ln)"),
    ("vlbert.visual_1x1_", "visual_size != hidden_size projections, not implemented"),
    ("cnn_loss_reg.", "VCR object-classification regulariser, not implemented"),
    ("image_feature_extractor.regularizing_predictor.", "CNN regularisation classifier, not implemented"),
    ("image_feature_extractor.object_embed.", "IMAGE_SEMANTIC class embedding, not implemented"),
)


# ------------------------------------------------------------------------------------------- keys
def rename_vl_bert_key(key: str) -> str:
    """One released key -> ours (``module.`` and ``vlbert._module.`` unwrapped; unknown keys unchanged)."""
    key = key.removeprefix("module.")
    if key.startswith("vlbert._module."):
        key = "vlbert." + key[len("vlbert._module."):]
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def parse_prefix_changes(changes: Sequence[Any] | None) -> list[tuple[str, str]]:
    """``["old->new", ...]`` (or pairs) -> ``[(old, new)]`` with ``module.`` stripped; duplicates dropped."""
    out: list[tuple[str, str]] = []
    for change in changes or []:
        if isinstance(change, str):
            if "->" not in change:
                raise ValueError(f"prefix change {change!r} must look like 'old.prefix->new.prefix'")
            old, new = (part.strip() for part in change.split("->", 1))
        elif isinstance(change, Sequence) and len(change) == 2:
            old, new = (str(part).strip() for part in change)
        else:
            raise ValueError(f"prefix change {change!r} must be 'old->new' or a pair (old, new)")
        pair = (old.removeprefix("module."), new.removeprefix("module."))
        if pair not in out:
            out.append(pair)
    return out


def _unwrap(source: Any) -> dict:
    if isinstance(source, (str, os.PathLike)):
        source = load_weights_file(os.path.expanduser(os.fspath(source)))
    if isinstance(source, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = source.get(wrapper)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if any(isinstance(v, torch.Tensor) for v in source.values()):
            return {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError("not a VL-BERT checkpoint: expected {'state_dict': {...}} as the release saves it, or a state dict")


# ------------------------------------------------------------------------------------- converter
@registry.register_converter("vl_bert")
def convert_vl_bert(source: Any, *, task: str | None = None, prefix_changes: Sequence[Any] | None = None,
                    model: nn.Module | None = None) -> tuple[dict, ConversionReport]:
    """Convert a released VL-BERT checkpoint (see the module docstring for ``task`` / ``prefix_changes``)."""
    sd = _unwrap(source)
    if task is not None and task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)} (or leave it unset)")
    rules = parse_prefix_changes([*(TASK_PREFIX_CHANGES[task] if task else []), *(prefix_changes or [])])
    stripped = {k.removeprefix("module."): v for k, v in sd.items()}
    if not any(rename_vl_bert_key(k) == WORD for k in stripped):
        sample = ", ".join(sorted(stripped)[:8])
        raise CheckpointError(f"not a VL-BERT checkpoint: no '{SENTINEL}' (with or without 'module.'); first keys: {sample}")
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    duplicates: list[tuple[str, torch.Tensor]] = []
    for original, value in sd.items():
        key = original.removeprefix("module.")
        changed = next((new + key[len(old):] for old, new in rules if key.startswith(old)), None)
        if key.endswith("num_batches_tracked"):
            report.unused.append(original)
            continue
        if key.startswith(RES5_DUPLICATE):
            duplicates.append((original, value))
            continue
        new = rename_vl_bert_key(changed if changed is not None else key)
        note = next((text for prefix, text in UNUSED_NOTES if key.startswith(prefix)), None)
        if changed is None and (note is not None or not new.startswith((*KEPT, *(n for _, n in RENAMES)))):
            report.unused.append(original)
            report.notes.append(f"{original}: {note or 'no counterpart in the vl_bert model'}")
            continue
        if task not in (None, "pretraining") and changed is None and new.startswith(PRETRAINING_ONLY):
            report.unused.append(original)
            continue
        if new in out:
            raise CheckpointError(f"two checkpoint keys map onto {new} (second: {original}); check prefix_changes")
        out[new] = value
        report.mapped.append((original, new))
    _check_duplicates(sd, duplicates, report)
    if any(k.endswith("num_batches_tracked") for k in sd):
        report.notes.append("BatchNorm num_batches_tracked counters dropped (frozen BN keeps running statistics only)")
    if task not in (None, "pretraining") and any(k.startswith(PRETRAINING_ONLY) for k in map(rename_vl_bert_key, sd)):
        report.notes.append(f"task={task}: pretraining-only tensors ({', '.join(p.rstrip('.') for p in PRETRAINING_ONLY)}) "
                            "not used by the fine-tuning model")
    if "mlm_head.bias" in out and DECODER not in out and WORD in out:
        out[DECODER] = out[WORD]
        report.notes.append(f"{DECODER} tied to {WORD}")
    if model is not None:
        _compare_with_model(out, model, report)
    return out, report


def _check_duplicates(sd: Mapping, duplicates: list, report: ConversionReport) -> None:
    if not duplicates:
        return
    differ = []
    for original, value in duplicates:
        twin = original.replace(RES5_DUPLICATE, RES5)
        report.unused.append(original)
        if twin not in sd or not torch.equal(sd[twin], value):
            differ.append(original)
    report.notes.append(f"{len(duplicates)} tensors under {RES5_DUPLICATE} are the res5 module saved twice; "
                        f"its copy under {RES5} is used")
    if differ:
        report.notes.append(f"WARNING: {len(differ)} of them differ from their {RES5} twin (first: {differ[0]})")


def _compare_with_model(out: dict, model: nn.Module, report: ConversionReport) -> None:
    own = model.state_dict()
    for k, v in out.items():
        if k not in own:
            report.unused.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
    report.missing = [k for k in own if k not in out]


# ---------------------------------------------------------------------------------- model config
_RESNET_BY_RES4_BLOCKS = {6: "resnet50", 23: "resnet101", 36: "resnet152"}


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``model_config.vl_bert`` entries implied by a CONVERTED state dict (heads: 64-d attention heads)."""
    sd = state_dict
    if WORD not in sd:
        raise CheckpointError(f"converted state dict lacks {WORD}; run convert_vl_bert first")
    vocab, hidden = (int(n) for n in sd[WORD].shape)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"vlbert\.encoder\.layer\.(\d+)\.", k))}
    cfg: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": int(sd["vlbert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(sd["vlbert.embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(sd["vlbert.embeddings.token_type_embeddings.weight"].shape[0]),
        "with_pooler": "vlbert.pooler.dense.weight" in sd,
    }
    res4 = {int(m.group(1)) for k in sd if (m := re.match(re.escape(_TRUNK) + r"layer3\.(\d+)\.", k))}
    if res4:
        cfg["visual_feature_mode"] = "e2e"
        if len(res4) in _RESNET_BY_RES4_BLOCKS:
            cfg["backbone"] = _RESNET_BY_RES4_BLOCKS[len(res4)]
    else:
        cfg["visual_feature_mode"] = "prec"
    if "mvrc_head.region_cls_pred.weight" in sd or "mlm_head.bias" in sd:
        cfg["training_head_type"] = "pretraining"
        if "mvrc_head.region_cls_pred.weight" in sd:
            cfg["visual_region_classes"] = int(sd["mvrc_head.region_cls_pred.weight"].shape[0])
    return cfg


def model_config_from_source(source: Any) -> dict:
    """The ``model_config.vl_bert`` that fits a released checkpoint (file, wrapper dict or state dict)."""
    converted, _ = convert_vl_bert(source)
    return config_from_state_dict(converted)


convert_vl_bert.model_config_from = model_config_from_source
