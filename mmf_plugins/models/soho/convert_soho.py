"""Convert researchmm/soho checkpoints to :class:`~mmf_plugins.models.soho.modeling_soho.SohoModel` keys.

Source format (reference §2.2/§2.5): an mmcv checkpoint ``{"meta": {...}, "state_dict": {...}[, "optimizer"]}``
saved from ``SOHOSingleStreamPre`` (the published ``soho_res18_fp16_40-9441cdd3.pth``) or
``SOHOSingleStreamVQA``, keys possibly prefixed ``module.`` (DDP). Renames:

==========================================================  ==========================================
official                                                    ours
==========================================================  ==========================================
``backbone.*`` (mmcls ResNet = torchvision names)           ``backbone.*``
``neck.conv.{conv,bn}.*``, ``neck.ln.*``                    same
``neck.mask_emb.weight``, ``neck.vq.{embed,cluster_size,    same (only when the target has the visual
cluster_sum,embed_avg}``, ``neck.pos_line.*``,              dictionary: pretraining, or
``neck.gate_fc.{conv,bn}.*``                                ``use_visual_dictionary: true``)
``language.bert.{embeddings,encoder}.*``                    ``bert.{embeddings,encoder}.*``
``mask_l_fc.weight`` (tied copy of the word embeddings)     ``bert.embeddings.word_embeddings.weight``
``head.match_class.weight``                                 same (pretraining, retrieval)
``head.vqa.{0,3}.*``                                        same (vqa)
==========================================================  ==========================================

Keys the target model has no place for are reported as unused with the reason (e.g. converting the
pretrained checkpoint for VQA drops the VD, gate, MVM embedding and ITM head, as the release's VQA
training loads it with ``strict=False``); target keys the checkpoint does not fill are reported as
missing (e.g. the new VQA classifier). fp16 tensors are cast to fp32. The converter never unpickles:
read the file with :func:`mmf_plugins.zoo.conversion.load_weights_file` first.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.zoo.conversion import ConversionReport, strip_prefix

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^backbone\.(.+)$"), r"backbone.\1"),
    (re.compile(r"^neck\.(conv\.(?:conv|bn)\..+)$"), r"neck.\1"),
    (re.compile(r"^neck\.(gate_fc\.(?:conv|bn)\..+)$"), r"neck.\1"),
    (re.compile(r"^neck\.((?:ln|pos_line)\.(?:weight|bias))$"), r"neck.\1"),
    (re.compile(r"^neck\.(mask_emb\.weight)$"), r"neck.\1"),
    (re.compile(r"^neck\.(vq\.(?:embed|cluster_size|cluster_sum|embed_avg))$"), r"neck.\1"),
    (re.compile(r"^language\.bert\.((?:embeddings|encoder)\..+)$"), r"bert.\1"),
    (re.compile(r"^mask_l_fc\.weight$"), "bert.embeddings.word_embeddings.weight"),
    (re.compile(r"^head\.((?:match_class|vqa)\..+)$"), r"head.\1"),
]
TIED_KEY = "mask_l_fc.weight"
WORD_EMBEDDINGS = "language.bert.embeddings.word_embeddings.weight"

_DROP_REASONS = [
    (re.compile(r"^neck\.(vq|mask_emb|pos_line|gate_fc)\."), (
        "visual dictionary / gate / MVM part; the target has no VD "
        "(downstream heads use the conv features, as the release's VQA model)")),
    (re.compile(r"^head\.match_class\."), "ITM classifier; the target head has none"),
    (re.compile(r"^head\.vqa\."), "VQA classifier; the target head is not vqa"),
    (re.compile(r"^mask_l_fc\."), "MLM decoder tied to the word embeddings"),
    (re.compile(r"num_batches_tracked$"), "BatchNorm counter; the target uses FrozenBatchNorm2d"),
    (re.compile(r"^language\.bert\.pooler\."), "BERT pooler; SOHO uses the last hidden states, no pooler"),
    (re.compile(r"position_ids$"), "non-persistent position ids buffer"),
]


def rename_official_key(key: str) -> str | None:
    """Our key for an official key (``module.`` stripped), or ``None`` when SOHO has no such tensor."""
    key = key.removeprefix("module.")
    for pattern, repl in _RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return None


def unwrap_checkpoint(checkpoint: dict) -> tuple[dict, dict]:
    """``(state_dict without module. prefixes, meta)`` from an mmcv checkpoint or a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), dict) else {}
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), dict) else checkpoint
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError("the checkpoint holds no tensors; expected an mmcv dict with 'state_dict' or a state dict")
    return strip_prefix(state, "module."), meta


# ----------------------------------------------------------------------------- architecture inference
_RESNET_DEPTHS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
}


def _backbone_arch(state: dict) -> str:
    blocks = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"^backbone\.layer{i}\.(\d+)\.", k)] if m}
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(re.match(r"^backbone\.layer1\.0\.conv3\.weight$", k) for k in state)
    depth = _RESNET_DEPTHS.get((bottleneck, tuple(blocks)))
    if depth is None:
        raise ValueError(f"backbone with blocks {blocks} (bottleneck={bottleneck}) is not a ResNet-18/34/50/101/152")
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    groups = conv2.shape[0] // conv2.shape[1] if conv2 is not None and bottleneck else 1
    if groups == 1:
        return f"resnet{depth}"
    width = conv2.shape[0] // groups
    arch = f"resnext{depth}_{groups}x{width}d"
    return arch


def official_model_config(state: dict, training_head_type: str | None = None, num_attention_heads: int | None = None) -> dict:
    """``model_config.soho`` overrides that reproduce the checkpoint's architecture."""
    def shape(key):
        if key not in state:
            raise KeyError(f"official SOHO checkpoint lacks '{key}'; is it a researchmm/soho checkpoint?")
        return tuple(state[key].shape)

    vocab, hidden = shape(WORD_EMBEDDINGS)
    layers = {int(m.group(1)) for k in state for m in [re.match(r"^language\.bert\.encoder\.layer\.(\d+)\.", k)] if m}
    has_vd = "neck.vq.embed" in state
    if training_head_type is None:
        if any(k.startswith("head.vqa.") for k in state):
            training_head_type = "vqa"
        elif has_vd:
            training_head_type = "pretraining"
        else:
            training_head_type = "retrieval" if "head.match_class.weight" in state else "vqa"
    ve: dict[str, Any] = {}
    if has_vd and training_head_type == "pretraining":
        ve.update(num_embeddings=shape("neck.vq.embed")[0], gate="neck.gate_fc.conv.weight" in state,
                  pos_align="neck.pos_line.weight" in state)
    cfg: dict[str, Any] = {
        "training_head_type": training_head_type,
        "backbone": {"arch": _backbone_arch(state)},
        "visual_embedding": ve,
        "bert": {
            "num_hidden_layers": max(layers) + 1 if layers else 0,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_attention_heads": num_attention_heads or max(1, hidden // 64),
            "intermediate_size": shape("language.bert.encoder.layer.0.intermediate.dense.weight")[0],
            "max_position_embeddings": shape("language.bert.embeddings.position_embeddings.weight")[0],
            "type_vocab_size": shape("language.bert.embeddings.token_type_embeddings.weight")[0],
        },
    }
    if "head.vqa.3.weight" in state and training_head_type == "vqa":
        cfg["num_answers"] = shape("head.vqa.3.weight")[0]
    return cfg


def _target_shapes(model, model_config: dict) -> dict[str, tuple]:
    if model is not None:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from mmf_plugins.models.soho.modeling_soho import SohoModel

    # shapes only: never read weight files while building the reference model
    model_config = _deep_merge(model_config, {"backbone": {"pretrained": None}, "bert": {"bert_model_name": None}})
    with torch.device("meta"):
        meta_model = SohoModel(model_config)
        meta_model.build()
    return {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------- converter
@registry.register_converter("soho")
def convert(official_state_dict: dict, *, training_head_type: str | None = None, model=None,
            model_config: dict | None = None, num_attention_heads: int | None = None) -> tuple[dict, ConversionReport]:
    """Map a researchmm/soho checkpoint to our keys.

    ``training_head_type``: the head the converted weights are for (default: the checkpoint's own).
    ``model``: a built SohoModel to match against (else one is built on the meta device from the
    checkpoint's architecture plus ``model_config`` overrides). ``num_attention_heads`` cannot be read
    from shapes; default hidden/64 (12 for the release).
    """
    state, meta = unwrap_checkpoint(official_state_dict)
    report = ConversionReport()
    if meta:
        info = {k: meta[k] for k in ("epoch", "iter", "mmcv_version") if k in meta}
        if info:
            report.notes.append(f"mmcv meta: {info}")
    inferred = official_model_config(state, training_head_type, num_attention_heads)
    target = _target_shapes(model, _deep_merge(inferred, model_config or {}))

    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    for key, value in state.items():
        new = rename_official_key(key)
        if key == TIED_KEY:
            if WORD_EMBEDDINGS in state and torch.equal(value.float(), state[WORD_EMBEDDINGS].float()):
                report.mapped.append((key, new))
                report.notes.append(f"{key} is the MLM decoder tied to {WORD_EMBEDDINGS}; ours reads the word embeddings")
            else:
                report.unused.append(key)
                report.notes.append(f"{key} differs from the word embeddings (untied decoder); not representable, dropped")
            continue
        if new is None or new not in target:
            report.unused.append(key)
            reason = next((r for p, r in _DROP_REASONS if p.search(key)), "no SOHO tensor of that name")
            dropped.setdefault(reason, []).append(key)
            continue
        if tuple(value.shape) != target[new]:
            report.mismatched.append((new, tuple(value.shape), target[new]))
            continue
        if value.dtype == torch.float16 or value.dtype == torch.bfloat16:
            value = value.float()
        out[new] = value
        report.mapped.append((key, new))
    for reason, keys in dropped.items():
        shown = ", ".join(keys[:4]) + (f", ... (+{len(keys) - 4})" if len(keys) > 4 else "")
        report.notes.append(f"unused ({len(keys)}): {reason}: {shown}")
    report.missing = [k for k in target if k not in out]
    if any(v.dtype == torch.float16 for v in state.values()):
        report.notes.append("fp16 tensors cast to fp32")
    return out, report


# ----------------------------------------------------------------------------- test helper
def make_official_state_dict(*, depth: int = 18, hidden_size: int = 768, num_hidden_layers: int = 3,
                             intermediate_size: int = 3072, vocab_size: int = 30522, max_position_embeddings: int = 512,
                             type_vocab_size: int = 2, num_embeddings: int = 2048, head: str = "pretraining",
                             gate: bool = True, pos_align: bool = True, num_answers: int = 3129, seed: int = 0,
                             mmcv_format: bool = True, ddp_prefix: bool = True) -> dict:
    """A random checkpoint with the release's key names and shapes (reference §2.2), for tests and docs.

    ``head``: ``pretraining`` (SOHOSingleStreamPre: VD, gate, MVM, tied MLM decoder, ITM) or ``vqa``
    (SOHOSingleStreamVQA). Returned mmcv-style (``{"meta", "state_dict"}``) with ``module.`` prefixes
    unless told otherwise.
    """
    import torchvision

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)  # He-initialised convs: sane activations
    for k, v in resnet.state_dict().items():
        if k.startswith("fc."):
            continue
        if k.endswith("num_batches_tracked"):
            sd[f"backbone.{k}"] = torch.tensor(7, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[f"backbone.{k}"] = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.endswith("running_mean") or (k.endswith(".bias") and v.dim() == 1):
            sd[f"backbone.{k}"] = rand(*v.shape, scale=0.1)
        elif k.endswith(".weight") and v.dim() == 1:
            sd[f"backbone.{k}"] = 1.0 + rand(*v.shape, scale=0.1)
        else:
            sd[f"backbone.{k}"] = v.clone()
    c5 = 512 if depth in (18, 34) else 2048
    h = hidden_size

    def bn(prefix, n):
        sd[f"{prefix}.weight"] = 1.0 + rand(n, scale=0.1)
        sd[f"{prefix}.bias"] = rand(n, scale=0.1)
        sd[f"{prefix}.running_mean"] = rand(n, scale=0.1)
        sd[f"{prefix}.running_var"] = torch.rand(n, generator=g) + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7, dtype=torch.long)

    sd["neck.conv.conv.weight"] = rand(h, c5, 1, 1, scale=0.05)
    bn("neck.conv.bn", h)
    sd["neck.ln.weight"] = 1.0 + rand(h, scale=0.1)
    sd["neck.ln.bias"] = rand(h, scale=0.1)
    if head == "pretraining":
        sd["neck.mask_emb.weight"] = rand(1, h, scale=1.0)
        sd["neck.vq.embed"] = torch.randn(num_embeddings, h, generator=g)
        sd["neck.vq.cluster_size"] = torch.rand(num_embeddings, generator=g) * 10
        sd["neck.vq.cluster_sum"] = torch.rand(num_embeddings, generator=g) * 1000
        sd["neck.vq.embed_avg"] = torch.randn(num_embeddings, h, generator=g)
        if pos_align:
            sd["neck.pos_line.weight"] = rand(h, h, scale=0.05)
            sd["neck.pos_line.bias"] = rand(h)
        if gate:
            sd["neck.gate_fc.conv.weight"] = rand(2, 2 * h, 1, 1, scale=0.05)
            bn("neck.gate_fc.bn", 2)
    p = "language.bert"
    sd[f"{p}.embeddings.word_embeddings.weight"] = rand(vocab_size, h)
    sd[f"{p}.embeddings.position_embeddings.weight"] = rand(max_position_embeddings, h)
    sd[f"{p}.embeddings.token_type_embeddings.weight"] = rand(type_vocab_size, h)
    sd[f"{p}.embeddings.LayerNorm.weight"] = 1.0 + rand(h, scale=0.1)
    sd[f"{p}.embeddings.LayerNorm.bias"] = rand(h)
    for i in range(num_hidden_layers):
        lp = f"{p}.encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[f"{lp}.{name}.weight"] = rand(h, h, scale=0.05)
            sd[f"{lp}.{name}.bias"] = rand(h)
        sd[f"{lp}.intermediate.dense.weight"] = rand(intermediate_size, h, scale=0.05)
        sd[f"{lp}.intermediate.dense.bias"] = rand(intermediate_size)
        sd[f"{lp}.output.dense.weight"] = rand(h, intermediate_size, scale=0.05)
        sd[f"{lp}.output.dense.bias"] = rand(h)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[f"{lp}.{ln}.weight"] = 1.0 + rand(h, scale=0.1)
            sd[f"{lp}.{ln}.bias"] = rand(h)
    if head == "pretraining":
        sd["mask_l_fc.weight"] = sd[f"{p}.embeddings.word_embeddings.weight"]
        sd["head.match_class.weight"] = rand(2, h, scale=0.1)
    elif head == "vqa":
        sd["head.vqa.0.weight"] = rand(4 * h, h, scale=0.05)
        sd["head.vqa.0.bias"] = rand(4 * h)
        sd["head.vqa.3.weight"] = rand(num_answers, 4 * h, scale=0.05)
        sd["head.vqa.3.bias"] = rand(num_answers)
    else:
        raise ValueError(f"head must be 'pretraining' or 'vqa' (the released models), got {head!r}")
    if ddp_prefix:
        sd = {f"module.{k}": v for k, v in sd.items()}
    if mmcv_format:
        return {"meta": {"epoch": 40, "iter": 0, "mmcv_version": "0.4.3"}, "state_dict": sd}
    return sd


__all__ = ["convert", "make_official_state_dict", "official_model_config", "rename_official_key", "unwrap_checkpoint"]
