"""Official VinVL / OSCAR+ weights -> the ``vinvl`` model's state dict, plus the matching model config.

Two source layouts, told apart by sentinel keys (after stripping a DDP ``module.`` prefix):

(a) microsoft/Oscar ``save_pretrained`` directories (``pytorch_model.bin`` + ``config.json``; sentinel
    ``bert.embeddings.word_embeddings.weight``). Keys are already ours (``bert.*``, ``bert.img_embedding``,
    ``bert.LayerNorm`` = image LayerNorm, ``classifier.*``, ``cls.predictions.*``, ``cls.seq_relationship.*``).
    Renames: LayerNorm ``gamma``/``beta`` -> ``weight``/``bias`` (pytorch-pretrained-bert era);
    ``cls.predictions.decoder.bias`` (HF >= 4 saves) -> ``cls.predictions.bias``; a missing tied
    ``cls.predictions.decoder.weight`` is filled from the word embeddings. ``training_args.bin`` is a pickle
    of Oscar's argparse Namespace: never opened. ``config.json`` gives the model config
    (:func:`config_from_oscar_json`).
(b) MMF's VinVL port (``mmf/models/vinvl.py``; sentinel prefix ``vinvl.bert.``): ``vinvl.bert.img_embedding.0``
    (Linear) / ``.1`` (LayerNorm, when present) -> ``bert.img_embedding`` / ``bert.LayerNorm``; the MMF head
    pooler (``vinvl.classifier.pooler`` or ``vinvl.contrast_head.contrast_head.pooler``) -> ``bert.pooler``;
    ``vinvl.classifier.classifier.*`` -> ``classifier.*`` (one Linear -> ``linear``, else MMF's MLP ->
    ``mmf_mlp``); ``vinvl.mlm_head.cls.predictions.*`` -> ``cls.predictions.*``;
    ``vinvl.contrast_head.contrast_head.classifier.0`` -> ``cls.seq_relationship``. MMF never ties its MLM
    decoder: our pretraining head does, so the decoder is set to the word embeddings and MMF's own decoder
    matrix is reported unused. MMF's MLM / MLP heads use LayerNorm eps 1e-5 / 1e-6 (ours 1e-12 / 1e-6):
    reported as a note.

Nothing is dropped silently: every source key is in ``report.mapped`` or ``report.unused`` (with a
note saying why); with ``model=`` the report also lists our keys the checkpoint does not fill and
shape mismatches. :func:`model_config_from_source` (also ``convert_vinvl.model_config_from``) builds the
``model_config.vinvl`` that fits a checkpoint, so ``checkpoint.resume_zoo`` can build a matching model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
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

OSCAR_SENTINEL = "bert.embeddings.word_embeddings.weight"
MMF_SENTINEL = "vinvl.bert.embeddings.word_embeddings.weight"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
WORD = "bert.embeddings.word_embeddings.weight"
DECODER = "cls.predictions.decoder.weight"
BERT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps",
)
OSCAR_CONFIG_KEYS = (
    "img_feature_dim", "use_img_layernorm", "img_layer_norm_eps", "num_labels", "classifier", "cls_hidden_scale",
    "loss_type", "num_choice", "num_contrast_classes", "tie_weights", "freeze_embedding", "label_smoothing",
    "drop_worst_ratio", "drop_worst_after",
)
_LN_OLD = re.compile(r"(LayerNorm|layer_norm)\.(gamma|beta)$")


# ------------------------------------------------------------------------------------ renames
def rename_oscar_key(key: str) -> str:
    """``module.`` prefix off; old LayerNorm ``gamma``/``beta`` -> ``weight``/``bias``."""
    key = key.removeprefix("module.")
    return _LN_OLD.sub(lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", key)


def _unwrap(obj: Any, origin: str) -> dict:
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{origin} holds no state dict (expected a mapping of tensors, or one under 'model'/'state_dict')")


def _read_source(source: Any) -> tuple[dict, dict | None, list[str]]:
    """(state dict, config.json dict or None, notes) from a dict, a weights file or a save_pretrained dir."""
    notes: list[str] = []
    if isinstance(source, Mapping):
        return _unwrap(source, "the given object"), None, notes
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(
                f"no {' or '.join(WEIGHT_FILES)} in {path}; point at the unzipped Oscar/VinVL checkpoint folder "
                "(e.g. checkpoint-2000000/ or best/)"
            )
        config = None
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        else:
            notes.append(f"{path} has no config.json; model config inferred from tensor shapes only")
        if (path / "training_args.bin").exists():
            notes.append("training_args.bin ignored (a pickled argparse Namespace; never unpickled)")
        return _unwrap(load_weights_file(weights), str(weights)), config, notes
    if path.is_file():
        return _unwrap(load_weights_file(path), str(path)), None, notes
    raise FileNotFoundError(f"VinVL checkpoint not found: {path} (give a save_pretrained folder or a weights file)")


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """``'oscar'`` or ``'mmf'`` by sentinel key; anything else is an error naming the sentinels."""
    keys = {k.removeprefix("module.") for k in state_dict}
    if MMF_SENTINEL in keys:
        return "mmf"
    if OSCAR_SENTINEL in keys:
        return "oscar"
    sample = ", ".join(sorted(keys)[:8])
    raise CheckpointError(
        f"not a VinVL/OSCAR checkpoint: neither '{OSCAR_SENTINEL}' (Oscar save_pretrained) nor '{MMF_SENTINEL}' "
        f"(MMF vinvl) is present; first keys: {sample}"
    )


# ------------------------------------------------------------------------------- conversions
def _convert_oscar(sd: dict, report: ConversionReport) -> dict:
    out: dict[str, torch.Tensor] = {}
    decoder_bias = None
    for key, value in sd.items():
        new = rename_oscar_key(key)
        if new.endswith("embeddings.position_ids"):
            report.unused.append(key)
            report.notes.append(f"{key}: position-id buffer, rebuilt by the model")
            continue
        if new.startswith(("bert.code_embeddings", "bert.input_embeddings")):
            report.unused.append(key)
            report.notes.append(f"{key}: discrete-code image input (img_feature_type dis_code*), not supported")
            continue
        if new == "cls.predictions.decoder.bias":
            decoder_bias = (key, value)
            continue
        out[new] = value
        report.mapped.append((key, new))
    _fold_decoder_bias(out, decoder_bias, report)
    return out


def _fold_decoder_bias(out: dict, decoder_bias, report: ConversionReport) -> None:
    if decoder_bias is None:
        return
    key, value = decoder_bias
    if "cls.predictions.bias" not in out:
        out["cls.predictions.bias"] = value
        report.mapped.append((key, "cls.predictions.bias"))
    else:
        report.unused.append(key)
        same = torch.equal(out["cls.predictions.bias"], value)
        report.notes.append(
            f"{key}: duplicate of cls.predictions.bias" + ("" if same else " with DIFFERENT values; cls.predictions.bias kept")
        )


def _fill_tied_decoder(out: dict, report: ConversionReport, force: bool) -> None:
    """Tied heads need ``cls.predictions.decoder.weight``: fill it from the word embeddings when absent
    (or always, ``force``, for MMF's untied decoder under our tied pretraining head)."""
    if "cls.predictions.bias" not in out or WORD not in out:
        return
    if DECODER not in out or force:
        out[DECODER] = out[WORD]
        report.notes.append(f"{DECODER} tied to {WORD} ({tuple(out[WORD].shape)})")


def _convert_mmf(sd: dict, report: ConversionReport) -> dict:
    out: dict[str, torch.Tensor] = {}
    sd = {(k.removeprefix("module.")): v for k, v in sd.items()}
    cls_layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"vinvl\.classifier\.classifier\.(\d+)\.", k))})
    contrast_layers = sorted(
        {int(m.group(1)) for k in sd if (m := re.match(r"vinvl\.contrast_head\.contrast_head\.classifier\.(\d+)\.", k))}
    )
    decoder_bias = None
    mmf_decoder = None
    for key, value in sd.items():
        if key.endswith("embeddings.position_ids"):
            report.unused.append(key)
            report.notes.append(f"{key}: position-id buffer, rebuilt by the model")
            continue
        if key == "vinvl.mlm_head.cls.predictions.decoder.bias":
            decoder_bias = (key, value)
            continue
        if key == "vinvl.mlm_head.cls.predictions.decoder.weight":
            mmf_decoder = key
            continue
        new = _mmf_key(key, single_classifier=len(cls_layers) == 1, single_contrast=len(contrast_layers) == 1)
        if new is None:
            report.unused.append(key)
            report.notes.append(f"{key}: no counterpart in the vinvl model")
            continue
        if new in out:
            raise CheckpointError(f"MMF checkpoint maps two keys onto {new} (second: {key}); the checkpoint mixes heads")
        out[new] = value
        report.mapped.append((key, new))
    _fold_decoder_bias(out, decoder_bias, report)
    if mmf_decoder is not None:
        report.unused.append(mmf_decoder)
        report.notes.append(f"{mmf_decoder}: MMF's MLM decoder is untied; the vinvl pretraining head ties it to {WORD}")
    if any(k.startswith("cls.predictions.transform.LayerNorm") for k in out):
        report.notes.append("MMF's MLM head used LayerNorm eps 1e-5; the vinvl head uses layer_norm_eps (1e-12)")
    _fill_tied_decoder(out, report, force=mmf_decoder is not None)
    return out


def _mmf_key(key: str, *, single_classifier: bool, single_contrast: bool) -> str | None:
    """Our name for one MMF vinvl key (None: no counterpart)."""
    if key.startswith("vinvl.bert.img_embedding.0."):
        return "bert.img_embedding." + key.rsplit(".", 1)[1]
    if key.startswith("vinvl.bert.img_embedding.1."):
        return "bert.LayerNorm." + key.rsplit(".", 1)[1]
    if key.startswith("vinvl.bert."):
        return rename_oscar_key(key[len("vinvl."):])
    if key.startswith(("vinvl.classifier.pooler.", "vinvl.contrast_head.contrast_head.pooler.")):
        return "bert.pooler." + key.split(".pooler.", 1)[1]
    if key.startswith("vinvl.classifier.classifier."):
        rest = key[len("vinvl.classifier.classifier."):]
        return "classifier." + (rest.split(".", 1)[1] if single_classifier else rest)
    if key.startswith("vinvl.mlm_head.cls.predictions."):
        return "cls." + key[len("vinvl.mlm_head.cls."):]
    if key.startswith("vinvl.contrast_head.contrast_head.classifier.") and single_contrast:
        return "cls.seq_relationship." + key.rsplit(".", 1)[1]
    return None


@registry.register_converter("vinvl")
def convert_vinvl(source: Any, *, model: nn.Module | None = None) -> tuple[dict, ConversionReport]:
    """Convert an Oscar/VinVL ``save_pretrained`` folder, a weights file, or a state dict (Oscar or MMF
    layout) to the ``vinvl`` model's keys. With ``model``, the report also lists our keys left unfilled
    and keys / shapes that do not fit it."""
    sd, _config, notes = _read_source(source)
    report = ConversionReport(notes=list(notes))
    layout = detect_layout(sd)
    if layout == "oscar":
        out = _convert_oscar(sd, report)
        _fill_tied_decoder(out, report, force=False)
    else:
        out = _convert_mmf(sd, report)
    report.notes.append(
        f"layout: {layout}; image LayerNorm {'present' if 'bert.LayerNorm.weight' in out else 'absent'} "
        "(use_img_layernorm decided by key presence)"
    )
    if model is not None:
        own = model.state_dict()
        for k, v in out.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
            elif k not in own:
                report.unused.append(k)
        report.missing = [k for k in own if k not in out]
    return out, report


convert_vinvl.accepts_directory = True


# ------------------------------------------------------------------------------ model config
def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``model_config.vinvl`` entries implied by a converted state dict's keys and shapes.

    ``num_attention_heads`` is not stored in weights: ``hidden_size // 64`` (BERT base 12, large 16).
    """
    sd = state_dict
    if WORD not in sd:
        raise CheckpointError(f"converted state dict lacks {WORD}; convert it with convert_vinvl first")
    vocab, hidden = sd[WORD].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    cfg: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, int(hidden) // 64),
        "max_position_embeddings": int(sd["bert.embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(sd["bert.embeddings.token_type_embeddings.weight"].shape[0]),
        "use_img_layernorm": "bert.LayerNorm.weight" in sd,
    }
    if "bert.encoder.layer.0.intermediate.dense.weight" in sd:
        cfg["intermediate_size"] = int(sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0])
    if "bert.img_embedding.weight" in sd:
        cfg["img_feature_dim"] = int(sd["bert.img_embedding.weight"].shape[1])
    if "cls.seq_relationship.weight" in sd:
        cfg.update(training_head_type="pretraining", num_contrast_classes=int(sd["cls.seq_relationship.weight"].shape[0]))
    elif "cls.predictions.bias" in sd:
        tied = DECODER not in sd or torch.equal(sd[DECODER], sd[WORD])
        cfg.update(training_head_type="captioning", tie_weights=bool(tied))
    else:
        cfg.update(_classifier_config(sd, int(hidden)))
    return cfg


def _classifier_config(sd: Mapping[str, torch.Tensor], hidden: int) -> dict:
    if "classifier.weight" in sd:
        kind, first, last = "linear", sd["classifier.weight"], sd["classifier.weight"]
        cfg: dict[str, Any] = {"classifier": "linear"}
    elif "classifier.1.dense.weight" in sd:
        idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"classifier\.(\d+)\.", k))})
        first, last = sd["classifier.1.dense.weight"], sd[f"classifier.{idx[-1]}.weight"]
        kind = "mmf_mlp"
        cfg = {"classifier": kind, "cls_num_layers": len(idx) - 1}
    elif "classifier.0.weight" in sd:
        idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"classifier\.(\d+)\.", k))})
        first, last = sd["classifier.0.weight"], sd[f"classifier.{idx[-1]}.weight"]
        kind = "mlp"
        cfg = {"classifier": kind}
    else:
        return {}
    num_labels, in_dim = int(last.shape[0]), int(first.shape[1])
    if kind != "linear":
        cfg["cls_hidden_scale"] = max(1, int(first.shape[0]) // hidden)
    cfg["num_labels"] = num_labels
    if in_dim == 2 * hidden:
        cfg.update(training_head_type="nlvr2", num_choice=2, loss_type="xe")
    elif num_labels == 2:
        cfg.update(training_head_type="retrieval", loss_type="sfmx")
    else:
        cfg.update(training_head_type="vqa")
    return cfg


def config_from_oscar_json(config_json: str | os.PathLike | Mapping, state_dict: Mapping | None = None) -> dict:
    """``model_config.vinvl`` from an Oscar ``config.json`` (path or dict); with the converted ``state_dict``
    the head type and every shape-bearing value come from the tensors (they win over the json)."""
    if isinstance(config_json, Mapping):
        raw = dict(config_json)
    else:
        path = Path(os.fspath(config_json))
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"Oscar config.json not found: {path}")
        raw = json.loads(path.read_text())
    img_type = raw.get("img_feature_type", "faster_r-cnn")
    if img_type not in ("faster_r-cnn", "frcnn"):
        raise ValueError(
            f"config.json img_feature_type={img_type!r}: only region features (faster_r-cnn / frcnn) are supported"
        )
    cfg: dict[str, Any] = {k: raw[k] for k in BERT_CONFIG_KEYS if k in raw}
    cfg.update({k: raw[k] for k in OSCAR_CONFIG_KEYS if k in raw and raw[k] is not None})
    cfg["use_img_layernorm"] = bool(raw.get("use_img_layernorm", False))
    for key in ("use_img_layernorm", "tie_weights", "freeze_embedding"):
        if key in cfg:
            cfg[key] = bool(cfg[key])
    if cfg.get("classifier") not in (None, "linear", "mlp"):
        cfg.pop("classifier")
    if "loss_type" in cfg and cfg["loss_type"] not in ("bce", "xe", "sfmx", "kl"):
        cfg.pop("loss_type")
    if state_dict is not None:
        inferred = config_from_state_dict(state_dict)
        if "num_attention_heads" in raw:  # not recoverable from shapes; the json knows
            inferred.pop("num_attention_heads")
        cfg.update(inferred)
    return cfg


def model_config_from_source(source: Any) -> dict:
    """The ``model_config.vinvl`` that fits a checkpoint (folder, weights file or state dict)."""
    sd, config_json, _ = _read_source(source)
    converted, _ = convert_vinvl(sd)
    if config_json is not None:
        return config_from_oscar_json(config_json, converted)
    return config_from_state_dict(converted)


convert_vinvl.model_config_from = model_config_from_source
