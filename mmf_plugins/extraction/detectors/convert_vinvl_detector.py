"""Official VinVL X152-C4 checkpoint (``vinvl_vg_x152c4.pth``) and labelmap -> our ``VinVLX152C4``.

Source format: maskrcnn-benchmark checkpoints from microsoft/scene_graph_benchmark 8e14944
(``{"model": state_dict, ...}``, keys possibly prefixed ``module.`` by DDP). The official loader strips
``module.`` and matches keys by suffix; we use an explicit rename table instead (house rule 7):

==============================================  =========================================
official key                                    ours
==============================================  =========================================
``backbone.body.{stem,layer1..3}.*``            same
``rpn.head.{conv,cls_logits,bbox_pred}.*``      same
``rpn.anchor_generator.cell_anchors.0``         ``rpn.anchor_generator.cell_anchors``
``roi_heads.box.feature_extractor.head.*``      same
``roi_heads.box.predictor.{cls_score,bbox_pred}.*``  same
``attribute.feature_extractor.head.*``          same (the module is shared with the box head)
``attribute.predictor.{cls_embedding,fc_attr,attr_score}.*``  same
``roi_heads.attribute.*`` (older exports)       ``attribute.*``
==============================================  =========================================

The labelmap ``VG-SGG-dicts-vgoi6-clipped.json`` holds ``label_to_idx`` / ``idx_to_label`` (1-based object
ids, 1594) and ``attribute_to_idx`` / ``idx_to_attribute`` (1-based, 524); id 0 is background / no attribute.

``official_vinvl_state_dict`` writes the official key names and shapes from the structure of the official
code (maskrcnn-benchmark ``ResNet``/``ResNetHead``/``RPNHead``/``FastRCNNPredictor`` and
``AttributeRCNNPredictor``), independently of our modules, so tests can check that the converter fills every
key of our model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.extraction.detectors.vinvl import (
    VinVLDetectorConfig,
    VinVLX152C4,
    legacy_cell_anchors,
)
from mmf_plugins.zoo.conversion import (
    CheckpointError,
    ConversionReport,
    load_state_dict_with_report,
    load_weights_file,
    strip_prefix,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "vinvl_vg_x152c4.pth"
LABELMAP_FILE = "VG-SGG-dicts-vgoi6-clipped.json"
CHECKPOINT_URL = "https://penzhanwu2.blob.core.windows.net/sgg/sgg_benchmark/vinvl_model_zoo/vinvl_vg_x152c4.pth"

_ANCHORS_OFFICIAL = "rpn.anchor_generator.cell_anchors.0"
_ANCHORS_OURS = "rpn.anchor_generator.cell_anchors"
_SHARED = ("roi_heads.box.feature_extractor.", "attribute.feature_extractor.")


# ------------------------------------------------------------------------------ official layout
def official_vinvl_key_shapes(config: VinVLDetectorConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Official state-dict keys and shapes of the AttrRCNN X152-C4 model (no ``module.`` prefix)."""
    cfg = config or VinVLDetectorConfig()
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, out_ch: int, in_ch: int, k: int, bias: bool = False) -> None:
        shapes[f"{prefix}.weight"] = (out_ch, in_ch, k, k)
        if bias:
            shapes[f"{prefix}.bias"] = (out_ch,)

    def frozen_bn(prefix: str, ch: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (ch,)

    def stage(prefix: str, blocks: int, in_ch: int, bottleneck: int, out_ch: int) -> None:
        for b in range(blocks):
            p = f"{prefix}.{b}"
            conv(f"{p}.conv1", bottleneck, in_ch, 1)
            frozen_bn(f"{p}.bn1", bottleneck)
            conv(f"{p}.conv2", bottleneck, bottleneck // cfg.num_groups, 3)  # grouped 3x3
            frozen_bn(f"{p}.bn2", bottleneck)
            conv(f"{p}.conv3", out_ch, bottleneck, 1)
            frozen_bn(f"{p}.bn3", out_ch)
            if in_ch != out_ch:  # maskrcnn-benchmark adds a projection only when channels change
                conv(f"{p}.downsample.0", out_ch, in_ch, 1)
                frozen_bn(f"{p}.downsample.1", out_ch)
            in_ch = out_ch

    stem_out, res2_out = 64, 256
    conv("backbone.body.stem.conv1", stem_out, 3, 7)
    frozen_bn("backbone.body.stem.bn1", stem_out)
    in_ch = stem_out
    for index in (1, 2, 3):  # stages res2..res4 (StageSpec index 1..3)
        factor = 2 ** (index - 1)
        bottleneck = cfg.num_groups * cfg.width_per_group * factor
        stage(f"backbone.body.layer{index}", cfg.stage_blocks[index - 1], in_ch, bottleneck, res2_out * factor)
        in_ch = res2_out * factor
    c4 = in_ch
    anchors = len(cfg.anchor_sizes) * len(cfg.aspect_ratios)
    shapes[_ANCHORS_OFFICIAL] = (anchors, 4)
    conv("rpn.head.conv", c4, c4, 3, bias=True)
    conv("rpn.head.cls_logits", anchors, c4, 1, bias=True)
    conv("rpn.head.bbox_pred", anchors * 4, c4, 1, bias=True)
    res5_bottleneck = cfg.num_groups * cfg.width_per_group * 8
    c5 = res2_out * 8
    heads = ["roi_heads.box.feature_extractor.head.layer4"]
    if cfg.attribute_on:
        heads.append("attribute.feature_extractor.head.layer4")
    for prefix in heads:
        stage(prefix, cfg.stage_blocks[3], c4, res5_bottleneck, c5)
    shapes["roi_heads.box.predictor.cls_score.weight"] = (cfg.num_classes, c5)
    shapes["roi_heads.box.predictor.cls_score.bias"] = (cfg.num_classes,)
    shapes["roi_heads.box.predictor.bbox_pred.weight"] = (cfg.num_classes * 4, c5)
    shapes["roi_heads.box.predictor.bbox_pred.bias"] = (cfg.num_classes * 4,)
    if cfg.attribute_on:
        shapes["attribute.predictor.cls_embedding.weight"] = (cfg.num_classes, cfg.cls_embedding_dim)
        shapes["attribute.predictor.fc_attr.weight"] = (cfg.attr_hidden_dim, c5 + cfg.cls_embedding_dim)
        shapes["attribute.predictor.fc_attr.bias"] = (cfg.attr_hidden_dim,)
        shapes["attribute.predictor.attr_score.weight"] = (cfg.num_attributes, cfg.attr_hidden_dim)
        shapes["attribute.predictor.attr_score.bias"] = (cfg.num_attributes,)
    return shapes


def official_vinvl_state_dict(
    config: VinVLDetectorConfig | None = None,
    *,
    device: str | torch.device = "meta",
    generator: torch.Generator | None = None,
    module_prefix: bool = False,
    wrap: bool = False,
) -> dict:
    """A state dict with the official key names and shapes (for tests and conversion round trips).

    ``device="meta"`` costs no memory; on a real device the values are random (BN variances positive) and the
    anchors are the real ones. ``module_prefix`` adds DDP's ``module.``; ``wrap`` returns ``{"model": sd}``.
    """
    cfg = config or VinVLDetectorConfig()
    sd = {}
    for key, shape in official_vinvl_key_shapes(cfg).items():
        if torch.device(device).type == "meta":
            t = torch.empty(shape, device="meta")
        elif key == _ANCHORS_OFFICIAL:
            t = legacy_cell_anchors(cfg.anchor_stride, cfg.anchor_sizes, cfg.aspect_ratios).to(device)
        elif key.endswith("running_var"):
            t = torch.rand(shape, generator=generator).add_(0.5).to(device)
        else:
            t = (torch.randn(shape, generator=generator) * 0.02).to(device)
        sd[("module." if module_prefix else "") + key] = t
    if cfg.attribute_on and torch.device(device).type != "meta":
        for key in list(sd):  # the attribute head shares the box feature extractor: identical values
            bare = key[len("module.") :] if module_prefix else key
            if bare.startswith(_SHARED[1]):
                sd[key] = sd[key.replace(_SHARED[1], _SHARED[0])]
    return {"model": sd} if wrap else sd


def _our_key_shapes(config: VinVLDetectorConfig) -> dict[str, tuple[int, ...]]:
    return {_rename(k): v for k, v in official_vinvl_key_shapes(config).items()}


def _rename(key: str) -> str:
    if key == _ANCHORS_OFFICIAL:
        return _ANCHORS_OURS
    if key.startswith("roi_heads.attribute."):
        return key[len("roi_heads.") :]
    return key


# ---------------------------------------------------------------------------------- converter
@registry.register_converter("vinvl_x152c4")
def convert_vinvl_x152c4(
    official_state_dict: dict, *, config: VinVLDetectorConfig | None = None, **overrides
) -> tuple[dict, ConversionReport]:
    """Map an official VinVL detector state dict (or ``{"model": sd}``) onto ``VinVLX152C4`` keys."""
    cfg = config or VinVLDetectorConfig(**overrides)
    sd = official_state_dict.get("model", official_state_dict) if isinstance(official_state_dict, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(
            f"expected a state dict or {{'model': state_dict}}, got {type(official_state_dict).__name__}; "
            f"pass the contents of {CHECKPOINT_FILE}"
        )
    sd = strip_prefix(sd, "module.")
    expected = _our_key_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    report = ConversionReport()
    for key, value in sd.items():
        ours = _rename(key)
        if not isinstance(value, torch.Tensor) or ours not in expected:
            report.unused.append(key)
            continue
        if tuple(value.shape) != expected[ours]:
            report.mismatched.append((key, tuple(value.shape), expected[ours]))
            continue
        out[ours] = value
        report.mapped.append((key, ours))
    # The attribute head shares the box feature extractor; checkpoints saved with only one copy fill the other.
    for src, dst in (_SHARED, _SHARED[::-1]):
        filled = 0
        for key in [k for k in expected if k.startswith(dst) and k not in out]:
            twin = src + key[len(dst) :]
            if twin in out:
                out[key] = out[twin]
                filled += 1
        if filled:
            report.notes.append(f"{filled} keys under {dst} filled from the shared {src}* (one module in the model)")
    if _ANCHORS_OURS in expected:
        generated = legacy_cell_anchors(cfg.anchor_stride, cfg.anchor_sizes, cfg.aspect_ratios)
        if _ANCHORS_OURS not in out:
            out[_ANCHORS_OURS] = generated
            report.notes.append(f"{_ANCHORS_OFFICIAL} not in the checkpoint: generated from the config")
        elif out[_ANCHORS_OURS].device.type != "meta" and not torch.allclose(out[_ANCHORS_OURS].float().cpu(), generated):
            report.notes.append(
                f"{_ANCHORS_OFFICIAL} differs from the anchors of the config (sizes {cfg.anchor_sizes}, ratios "
                f"{cfg.aspect_ratios}); the checkpoint's anchors are used"
            )
    report.missing = [k for k in expected if k not in out]
    return out, report


# ----------------------------------------------------------------------------------- labelmap
@dataclass
class VinVLLabelmap:
    """Names by id: ``object_names[0] == "__background__"``, ``attribute_names[0] == "__no_attribute__"``."""

    object_names: list[str]
    attribute_names: list[str] | None


def _names_by_id(data: dict, idx_to_name: str, name_to_idx: str, zero_name: str, path: Path) -> list[str] | None:
    if idx_to_name in data:
        table = {int(k): v for k, v in data[idx_to_name].items()}
    elif name_to_idx in data:
        table = {int(v): k for k, v in data[name_to_idx].items()}
    else:
        return None
    ids = sorted(table)
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(
            f"labelmap {path}: '{idx_to_name}' ids must be 1..{len(ids)} without gaps (0 is {zero_name}), "
            f"got ids {ids[:3]}...{ids[-3:]}"
        )
    return [zero_name] + [table[i] for i in ids]


def load_vinvl_labelmap(path: str | os.PathLike) -> VinVLLabelmap:
    """Read ``VG-SGG-dicts-vgoi6-clipped.json`` (or any json with the same keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"labelmap not found: {path}; expected {LABELMAP_FILE} (distributed with {CHECKPOINT_FILE}, "
            "see microsoft/scene_graph_benchmark / pzzhang/VinVL README)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"labelmap {path} is not valid JSON ({e}); expected {LABELMAP_FILE}") from e
    if not isinstance(data, dict):  # bad file content: a ValueError like every other labelmap error
        raise ValueError(f"labelmap {path} must be a JSON object with 'label_to_idx' / 'idx_to_label'")  # noqa: TRY004
    objects = _names_by_id(data, "idx_to_label", "label_to_idx", "__background__", path)
    if objects is None:
        raise ValueError(
            f"labelmap {path} has neither 'idx_to_label' nor 'label_to_idx' (keys: {sorted(data)[:8]}); "
            f"expected the VinVL labelmap {LABELMAP_FILE}"
        )
    attributes = _names_by_id(data, "idx_to_attribute", "attribute_to_idx", "__no_attribute__", path)
    return VinVLLabelmap(objects, attributes)


# -------------------------------------------------------------------------------------- loading
def load_vinvl_detector(
    model_file: str | os.PathLike | None = None,
    *,
    labelmap: str | os.PathLike | None = None,
    config: VinVLDetectorConfig | None = None,
    **overrides,
) -> VinVLX152C4:
    """Build ``VinVLX152C4`` and load the official checkpoint (converted, strict: every key must be filled).

    Without ``labelmap``, ``VG-SGG-dicts-vgoi6-clipped.json`` next to the checkpoint is used if present;
    otherwise names are ``class_<id>`` / ``attribute_<id>``. ``model_file=None`` keeps random weights.
    """
    model = VinVLX152C4(config, **overrides)
    if model_file is not None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(
                f"VinVL detector checkpoint not found: {model_file}; download {CHECKPOINT_FILE} from "
                f"{CHECKPOINT_URL} (and {LABELMAP_FILE}) and pass its path"
            )
        state, report = convert_vinvl_x152c4(load_weights_file(model_file), config=model.config)
        if report.mismatched or report.missing:
            raise CheckpointError(f"{model_file} does not fit the VinVL X152-C4 detector:\n" + report.summary())
        load_state_dict_with_report(model, state, strict=True)
        if report.unused:
            logger.warning("unused keys in %s: %s", model_file, report.summary())
        if labelmap is None and (model_file.parent / LABELMAP_FILE).is_file():
            labelmap = model_file.parent / LABELMAP_FILE
    if labelmap is not None:
        names = load_vinvl_labelmap(labelmap)
        model.set_labelmap(names.object_names, names.attribute_names if model.config.attribute_on else None)
    return model
