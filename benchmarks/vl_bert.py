"""VL-BERT speed: pretraining throughput from precomputed features (prec) and from pixels (e2e), SDPA vs
eager attention, share of the step in the geometry embedding and in RoIAlign, FLOP/s against a matmul peak.

Sections (each a table; every ratio is taken inside one run on one device):

* ``train``: pretraining steps (MLM with visual clues + masked RoI classification against ``cls_prob``,
  the model's own region masking; AdamW) for each visual mode x attention kernel x precision: step time
  p50, samples/s, peak memory, FLOPs per sample (``FlopCounterMode``, forward + backward, counted at
  batch 1 and scaled) and the achieved FLOP/s as a fraction of a square-matmul peak measured in this run
  (fp32 or bf16, as the row); ``sdpa_speedup`` = eager step time / SDPA step time, same weights and batch;
  The variants of one visual mode are timed interleaved (one step of each per round, after each was warmed
  up alone), so a change in machine load hits them alike;
* ``breakdown``: one profiled step per (mode, precision) with SDPA, split with
  ``torch.profiler.record_function`` ranges and op events (CPU time on CPU, kernel time on CUDA):
  geometry embedding (sin/cos box encoding), RoIAlign forward + backward (``torchvision::roi_align`` /
  ``_roi_align_backward``, e2e only), the e2e C4 trunk and RoI res5 head, the visual-feature embedding
  (``obj_downsample``), the BERT encoder, backward and optimizer.

Sizes: ``base`` is the release (BERT-base: 768 x 12 layers, 2048-d RoI features, 8 x 256 geometry dims,
1601 MVRC classes; e2e: ResNet-101 C4 + dilated res5 on 14x14 RoIs at 600x1000); ``lite`` (``--quick``)
keeps the feature, geometry and vocabulary widths but has 384 x 4 layers, and its e2e path is ResNet-18
C4 + strided res5 at 320x480 with fewer regions. Random weights and inputs (speed does not depend on the
values): ``--text_len`` tokens with 15 % masked, ``--regions`` boxes per image plus the whole-image box the
model adds, no ``max_seq_length`` cut.

    python benchmarks/vl_bert.py [--device cpu|cuda] [--quick] [--size base|lite] [--modes prec,e2e]
                                 [--attn sdpa,eager] [--precisions fp32,bf16] [--batch 64] [--e2e_batch 8]
                                 [--text_len 24] [--regions 36] [--e2e_regions 36] [--repeat 10] [--threads N]

``--quick`` (CPU smoke run, about a minute on 2 cores): size ``lite``, prec batch 8, e2e batch 2 with 16
regions, 3 repeats. Results: ``benchmarks/results/vl_bert_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_tag, print_table, write_json

# measurement helpers shared with the SOHO benchmark (peak memory, timing, FLOP counting, profiler shares)
from soho import (
    MATMUL_N,
    PeakMemory,
    add_peak_fractions,
    autocast,
    count_flops,
    interleaved_calls,
    labelled,
    matmul_peaks,
    profile_shares,
    release_memory,
    tidy_numbers,
)

from mmf_plugins.common.sample import SampleList
from mmf_plugins.models.base_model import build_model
from mmf_plugins.models.vl_bert import modeling_vl_bert as M
from mmf_plugins.trainers.optimizers import build_optimizers

VOCAB, CLS, SEP, MASK = 30522, 101, 102, 103
MVRC_CLASSES = 1601
SIZES = {
    "base": {"bert": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
             "e2e": {"backbone": "resnet101", "res5_dilation": 2, "stride_in_1x1": True}, "image": (600, 1000)},
    "lite": {"bert": {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 1536},
             "e2e": {"backbone": "resnet18", "res5_dilation": 1, "stride_in_1x1": False}, "image": (320, 480)},
}
OPTIMIZER = {"optimizer": {"type": "adamw", "params": {"lr": 1e-6, "eps": 1e-6, "weight_decay": 1e-4}}}
ROI_OPS = ("torchvision::roi_align", "torchvision::_roi_align_backward")


# ------------------------------------------------------------------------------------------ inputs
def make_batch(batch: int, *, mode: str, text_len: int, regions: int, image_hw: tuple[int, int], device: str,
               seed: int = 0) -> SampleList:
    """``[CLS] w.. [SEP]`` with ~15 % of the words masked, ``regions`` random boxes (xyxy px) with a detector
    class distribution; prec: 2048-d non-negative RoI features; e2e: the normalised image itself."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    ids = torch.randint(1000, VOCAB, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    labels = torch.full_like(ids, -1)
    words = text_len - 2
    picked = torch.linspace(1, words, max(1, round(0.15 * words))).round().long()
    labels[:, picked] = ids[:, picked]
    ids[:, picked] = MASK
    size = torch.tensor([w, h], dtype=torch.float32)
    xy = torch.rand(batch, regions, 2, generator=g) * size * 0.7
    wh = torch.rand(batch, regions, 2, generator=g) * size * 0.3 + 16
    boxes = torch.cat([xy, torch.minimum(xy + wh, size - 1)], dim=-1)
    info = {"bbox": boxes, "max_features": torch.full((batch,), regions), "image_width": torch.full((batch,), w),
            "image_height": torch.full((batch,), h),
            "cls_prob": torch.softmax(torch.randn(batch, regions, MVRC_CLASSES, generator=g) * 3, dim=-1)}
    fields = {"input_ids": ids, "input_mask": torch.ones_like(ids), "segment_ids": torch.zeros_like(ids),
              "lm_label_ids": labels, "dataset_name": "bench", "dataset_type": "train"}
    if mode == "prec":
        fields["image_feature_0"] = torch.randn(batch, regions, 2048, generator=g).relu()
    else:
        fields["image"] = torch.randn(batch, 3, h, w, generator=g)
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
    fields["image_info_0"] = SampleList({k: v.to(device) for k, v in info.items()})
    return SampleList(fields)


def build_vl_bert(size: str, mode: str, attn: str, device: str, seed: int = 0):
    spec = SIZES[size]
    cfg = {"training_head_type": "pretraining", "visual_feature_mode": mode, "attn_implementation": attn,
           "with_pooler": False, "visual_region_classes": MVRC_CLASSES, **spec["bert"]}
    if mode == "e2e":
        cfg.update(spec["e2e"])
    torch.manual_seed(seed)
    return build_model("vl_bert", cfg).to(device).train()


def train_step_fn(model, optimizers, batch, device: str, precision: str):
    def step():
        with autocast(device, precision):
            out = model(batch)
        with torch.profiler.record_function("backward"):
            sum(out["losses"].values()).backward()
        with torch.profiler.record_function("optimizer"):
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------ measurements
def workload(args, mode: str) -> dict:
    image = SIZES[args.size]["image"]
    if mode == "prec":
        return {"batch": args.batch, "regions": args.regions, "image_hw": image}
    return {"batch": args.e2e_batch, "regions": args.e2e_regions, "image_hw": image}


def measure(models: dict, mode: str, args, memory: PeakMemory, flops: float | None) -> list[dict]:
    """Rows of one visual mode for every (attention kernel, precision), timed interleaved on one batch;
    ``models`` maps the kernel to ``(model, optimizers)`` built from the same seed (same weights)."""
    w = workload(args, mode)
    batch = make_batch(w["batch"], mode=mode, text_len=args.text_len, regions=w["regions"], image_hw=w["image_hw"],
                       device=args.device)
    steps = {(attn, precision): train_step_fn(model, optimizers, batch, args.device, precision)
             for attn, (model, optimizers) in models.items() for precision in args.precisions_list}

    def free():
        for _, optimizers in models.values():
            release_memory(optimizers, args.device)

    results = interleaved_calls(steps, args.warmup, args.repeat, args.device, memory, on_error=free)
    rows = []
    for (attn, precision), res in results.items():
        row = {"size": args.size, "mode": mode, "attn": attn, "precision": precision, "batch": w["batch"],
               "tokens": f"{args.text_len}+{w['regions'] + 1}+1"}
        if mode == "e2e":
            row["image"] = "{}x{}".format(*w["image_hw"])
        if "error" in res:
            rows.append({**row, "note": f"failed: {res['error']}"})
            continue
        p50 = float(np.percentile(res["times"], 50))
        row.update({"step_ms_p50": 1e3 * p50, "samples/s": w["batch"] / p50})
        if flops:
            row.update({"GFLOP/sample": flops / 1e9, "achieved_GFLOP/s": flops * w["batch"] / p50 / 1e9})
        row.update({"peak_MiB": res["peak_mib"], "repeats": len(res["times"])})
        rows.append(row)
    return rows


def breakdown(model, optimizers, mode: str, attn: str, precision: str, args) -> dict:
    w = workload(args, mode)
    batch = make_batch(w["batch"], mode=mode, text_len=args.text_len, regions=w["regions"], image_hw=w["image_hw"],
                       device=args.device, seed=1)
    step = train_step_fn(model, optimizers, batch, args.device, precision)
    extractor = model.image_feature_extractor
    targets = [(M, "geometry_embedding", "vl_bert/geometry_embedding"),
               (extractor.obj_downsample, "forward", "vl_bert/obj_downsample"),
               (model.vlbert, "forward", "vl_bert/encoder")]
    if extractor.roi_features is not None:
        targets += [(extractor.roi_features.trunk, "forward", "vl_bert/c4_trunk"),
                    (extractor.roi_features.box_head, "forward", "vl_bert/roi_res5_head")]
    labels = [t[2] for t in targets] + list(ROI_OPS) + ["backward", "optimizer"]
    with labelled(targets):
        shares = profile_shares(step, labels, args.device, steps=args.profile_steps)
    row = {"size": args.size, "mode": mode, "attn": attn, "precision": precision, "batch": w["batch"],
           "profiled_step_ms": 1e3 * shares["step_s"],
           "geometry_share": shares["vl_bert/geometry_embedding"]}
    if mode == "e2e":
        row.update({"roi_align_fwd+bwd_share": shares[ROI_OPS[0]] + shares[ROI_OPS[1]],
                    "roi_align_bwd_share": shares[ROI_OPS[1]],
                    "c4_trunk_fwd_share": shares["vl_bert/c4_trunk"],
                    "roi_res5_head_fwd_share": shares["vl_bert/roi_res5_head"]})
    row.update({"obj_downsample_fwd_share": shares["vl_bert/obj_downsample"],
                "encoder_fwd_share": shares["vl_bert/encoder"], "backward_share": shares["backward"],
                "optimizer_share": shares["optimizer"]})
    return row


def flops_per_sample(model, optimizers, mode: str, args) -> float | None:
    w = workload(args, mode)
    batch = make_batch(1, mode=mode, text_len=args.text_len, regions=w["regions"], image_hw=w["image_hw"],
                       device=args.device, seed=2)
    try:
        return float(count_flops(train_step_fn(model, optimizers, batch, args.device, "fp32")))
    except Exception as e:  # noqa: BLE001  (a counter failure must not stop the timings)
        print(f"note: FLOP count failed for {mode}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="CPU smoke sizes (lite, prec batch 8, e2e batch 2)")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="base (release) or lite; default base")
    p.add_argument("--modes", default="prec,e2e", help="comma list of prec, e2e")
    p.add_argument("--attn", default="sdpa,eager", help="comma list of sdpa, eager")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (torch.autocast)")
    p.add_argument("--batch", type=int, default=None, help="prec samples per step (default 64; --quick 8)")
    p.add_argument("--e2e_batch", type=int, default=None, help="e2e images per step (default 8; --quick 2)")
    p.add_argument("--text_len", type=int, default=24)
    p.add_argument("--regions", type=int, default=36, help="prec boxes per image (the model adds the image box)")
    p.add_argument("--e2e_regions", type=int, default=None, help="e2e boxes per image (default 36; --quick 16)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps per row (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    p.add_argument("--profile_steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    a = p.parse_args(argv)
    q = a.quick
    a.size = a.size or ("lite" if q else "base")
    a.batch = a.batch or (8 if q else 64)
    a.e2e_batch = a.e2e_batch or (2 if q else 8)
    a.e2e_regions = a.e2e_regions or (16 if q else 36)
    a.repeat = a.repeat or (3 if q else 10)
    a.warmup = a.warmup or (1 if q else 2)
    lists = {"modes": ("prec", "e2e"), "attn": ("sdpa", "eager"), "precisions": ("fp32", "bf16")}
    for key, allowed in lists.items():
        values = [v.strip() for v in getattr(a, key).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise SystemExit(f"--{key} {getattr(a, key)!r}: choose from {', '.join(allowed)}")
        setattr(a, f"{key}_list", values)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch.cuda.is_available() is False; use --device cpu")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dev = args.device
    first_peaks = matmul_peaks(dev)
    memory = PeakMemory(dev)
    info = {"device": device_tag(dev), "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
            "threads": torch.get_num_threads(), "size": args.size,
            **{k: v for k, v in SIZES[args.size]["bert"].items()}, "e2e_backbone": SIZES[args.size]["e2e"]["backbone"],
            "peak_memory": memory.kind}
    from omegaconf import OmegaConf

    train_rows, breakdown_rows, flops = [], [], {}
    for mode in args.modes_list:
        models = {}
        for attn in args.attn_list:
            try:
                model = build_vl_bert(args.size, mode, attn, dev)
                models[attn] = (model, build_optimizers(model, OmegaConf.create(OPTIMIZER)))
            except Exception as e:  # noqa: BLE001  (report and go on: a benchmark never crashes)
                train_rows.append({"size": args.size, "mode": mode, "attn": attn,
                                   "note": f"build failed: {type(e).__name__}: {e}"})
        if not models:
            continue
        model, optimizers = next(iter(models.values()))
        flops[mode] = flops_per_sample(model, optimizers, mode, args)
        try:
            train_rows.extend(measure(models, mode, args, memory, flops[mode]))
        except Exception as e:  # noqa: BLE001
            train_rows.append({"size": args.size, "mode": mode,
                               "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        attn = next(iter(models))
        for precision in args.precisions_list:
            try:
                breakdown_rows.append(breakdown(model, optimizers, mode, attn, precision, args))
            except Exception as e:  # noqa: BLE001
                release_memory(optimizers, dev)
                breakdown_rows.append({"size": args.size, "mode": mode, "attn": attn, "precision": precision,
                                       "note": f"failed: {type(e).__name__}: {e}"})
        del models, model, optimizers
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    peaks = {k: max(v, matmul_peaks(dev)[k]) for k, v in first_peaks.items()}  # a busy machine lowers one of them
    info.update({"matmul_n": MATMUL_N[dev.startswith("cuda")], "matmul_peak_fp32_GFLOP/s": peaks["fp32"] / 1e9,
                 "matmul_peak_bf16_GFLOP/s": peaks["bf16"] / 1e9})
    add_peak_fractions(train_rows, peaks, lambda r: r["precision"])
    eager = {(r["mode"], r["precision"]): r for r in train_rows if r.get("attn") == "eager" and "step_ms_p50" in r}
    for r in train_rows:
        ref = eager.get((r.get("mode"), r.get("precision")))
        if r.get("attn") == "sdpa" and ref and "step_ms_p50" in r:
            r["sdpa_speedup"] = ref["step_ms_p50"] / r["step_ms_p50"]
    order = {k: i for i, k in enumerate(args.modes_list + args.precisions_list + args.attn_list)}
    train_rows.sort(key=lambda r: (order.get(r.get("mode"), 0), order.get(r.get("precision"), 0), order.get(r.get("attn"), 0)))
    tables = [
        print_table("VL-BERT benchmark setup", tidy_numbers([info])),
        print_table(f"VL-BERT pretraining steps (MLM + MVRC), size {args.size} ({dev}, {torch.get_num_threads()} threads)",
                    tidy_numbers(train_rows)),
        print_table(f"VL-BERT step breakdown (profiled, {args.attn_list[0]} attention; shares of step time)", tidy_numbers(breakdown_rows)),
    ]
    notes = ["tokens = text + regions (incl. the whole-image box) + [END]",
             ("GFLOP/sample: FlopCounterMode at batch 1, forward + backward, fp32; frac_of_matmul_peak against the "
             "fp32 or bf16 square-matmul peak of this run (the higher of a measurement before and after the rows)"),
             f"peak_MiB: {memory.kind}",
             ("*_fwd_share: forward only (backward of every part is inside backward_share); roi_align shares are "
             "op events and include the backward kernel")]
    for line in notes:
        print(f"note: {line}")
    info["wall_s"] = time.perf_counter() - t_start
    path = write_json("vl_bert", {"args": vars(args), "setup": info, "flops_per_sample": flops, "train": train_rows,
                                  "breakdown": breakdown_rows, "notes": notes, "tables": tables}, dev)
    print(f"wrote {path} ({info['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
