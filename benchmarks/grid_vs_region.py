"""Grid vs region features: end-to-end VQA inference on the same images and questions, at paper scale.

* grid path (SOHO, Huang et al. CVPR 2021, the paper's main model): uint8 image -> ImageNet normalisation,
  zero-pad to a multiple of 32 (with ``image_mask``) -> ResNet-101 C5 -> 2x2 max-pool + 1x1 conv -> 12-layer
  BERT over the question (16 tokens) and the visual tokens (144 at 600x1000) -> VQA head (3129 answers).
* region path (VinVL, Zhang et al. CVPR 2021): uint8 image -> X152-C4 detector (``vinvl_x152c4`` extractor,
  random weights: resize, ResNeXt-152 C4 trunk, RPN 6000 -> NMS 0.7 -> 300 proposals, RoIAlign + res5 on
  every proposal, class-agnostic NMS filter (the released features' mode 2), <= 100 boxes, attribute head)
  -> the first 50 regions (2048-d + 6 box dims) and their tags (one token per region label) -> VinVL base
  (12 layers) over ``[CLS] question [SEP] tags [SEP]`` + regions -> VQA head.

Both paths start from decoded uint8 tensors (JPEG decode is the same for both and left out) and end at the
answer scores; timings include every step between (resize, normalisation, NMS, building the VinVL batch).
Random weights give near-uniform class scores, so the detector's score threshold defaults to 0: it then keeps
``max_boxes`` (100) boxes, as a trained detector does on a busy image; the per-image cost is dominated by
the 300 proposals either way. FLOPs are counted with ``FlopCounterMode`` in a warm-up pass (convolutions and
matmuls; attention included); achieved FLOP/s is compared with a square-matmul peak measured in this run.
Anchors (reference/performance-anchors.md): SOHO ~44 ms vs region-based ~464 ms at 600x1000 on a V100
[unverified]; VinVL-Base ~650 ms on a P40 (ViLT Table 6); FLOPs differ by ~7.6x at batch 1.

    python benchmarks/grid_vs_region.py [--device cpu|cuda] [--quick] [--size 600x1000] [--batch_sizes 1,16]
                                        [--repeat 3] [--bf16] [--compile] [--threads N]

``--quick``: batch 1 and 300x500 input unless ``--size`` / ``--batch_sizes`` say otherwise (a few minutes on
2 CPU cores). Optional paths (``--bf16`` autocast, ``--compile`` of the two transformers' models) never stop
the run: a failure is reported in the table's note column. Results: ``benchmarks/results/grid_vs_region_<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, peak_rss_mib, print_table, sync, write_json

from mmf_plugins import setup_imports
from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import SampleList
from mmf_plugins.models.base_model import build_model

VOCAB, CLS, SEP = 30522, 101, 102
QUESTION_TOKENS = 16  # [CLS] + 14 words + [SEP]
MAX_REGIONS, MAX_TEXT = 50, 128  # VinVL VQA: max_img_seq_length 50, max_seq_length 128
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------ helpers
def flop_counter():
    """``FlopCounterMode`` that also counts PyTorch's CPU flash attention (not in its registry)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def forward(q, k, v, *args, out_shape=None, **kwargs):  # shapes: FlopCounterMode passes tensor shapes
        return sdpa_flop_count(q, k, v)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={op: forward} if op is not None else {})


def make_images(n: int, h: int, w: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random uint8 RGB images (3, h, w): upsampled noise, so NMS sees structured activations."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, h // 32 + 1, w // 32 + 1), generator=g).float()
    full = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return list(full.round().clamp(0, 255).to(torch.uint8))


def make_questions(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(1000, VOCAB, (n, QUESTION_TOKENS), generator=g)
    q[:, 0], q[:, -1] = CLS, SEP
    return q


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW in pixels, e.g. 600x1000") from None
    if h < 64 or w < 64:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be >= 64 px (one SOHO grid cell)")
    return h, w


def _num(value: float) -> float | int:
    """Whole numbers from 1000 up (keeps the table free of exponents)."""
    return round(value) if abs(value) >= 1000 else value


def _ms(seconds: float) -> float | int:
    return _num(1e3 * seconds)


# ------------------------------------------------------------------------------------ grid path
class GridPath:
    """SOHO R101 + 12 layers, VQA head: images -> normalise + pad /32 -> model -> scores."""

    name = "grid: SOHO R101 + 12L"

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.model = build_model("soho", {
            # NHWC trunk, as the region path's detector (VinVLDetectorConfig.channels_last)
            "training_head_type": "vqa", "backbone": {"arch": "resnet101", "channels_last": True},
            "bert": {"num_hidden_layers": 12},
        }).to(self.device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255
        self.forward = self.model

    def batch(self, images: list[torch.Tensor], questions: torch.Tensor) -> SampleList:
        x = torch.stack(images).to(self.device, non_blocking=True)
        b, _, h, w = x.shape
        x = (x.float() - self.mean) / self.std
        ph, pw = -h % 32, -w % 32
        mask = torch.zeros(b, h + ph, w + pw, dtype=torch.bool, device=self.device)
        mask[:, :h, :w] = True
        q = questions.to(self.device)
        return SampleList({"image": F.pad(x, (0, pw, 0, ph)), "image_mask": mask, "input_ids": q,
                           "input_mask": torch.ones_like(q), "segment_ids": torch.zeros_like(q),
                           "dataset_name": "vqa2", "dataset_type": "test"})

    def tokens(self, h: int, w: int) -> str:
        gh, gw = (h + (-h % 32)) // 64, (w + (-w % 32)) // 64
        return f"{QUESTION_TOKENS}+{gh * gw}"

    def run(self, images, questions, stages: dict | None = None) -> torch.Tensor:
        return self.forward(self.batch(images, questions))["scores"]


# ------------------------------------------------------------------------------------ region path
class RegionPath:
    """X152-C4 detector (random weights) + VinVL base, VQA head."""

    name = "region: X152-C4 + VinVL base 12L"

    def __init__(self, device: str, h: int, w: int, proposals: int, max_boxes: int, score_thresh: float):
        self.device = torch.device(device)
        extractor = registry.get_extractor_class("vinvl_x152c4")(
            random_weights=True, device=device, min_size=min(h, w), max_size=max(h, w), max_boxes=max_boxes,
            score_thresh=score_thresh, detector_options={"post_nms_top_n": proposals},
        )
        self.detector = extractor.model.eval()
        self.model = build_model("vinvl", {"training_head_type": "vqa", "max_img_seq_length": MAX_REGIONS}).to(self.device).eval()
        self.forward = self.model
        self.last_regions: list[int] = []
        self.last_text: list[int] = []

    def batch(self, records: list[dict], questions: torch.Tensor) -> SampleList:
        """Records -> VinVL batch: 50 regions (features + bbox for the 6 box dims), tags = region labels."""
        n = [min(int(r["num_boxes"]), MAX_REGIONS) for r in records]
        R, B = max(max(n), 1), len(records)
        dev = self.device
        feats = torch.zeros(B, R, records[0]["features"].shape[1], device=dev)
        bbox = torch.zeros(B, R, 4, device=dev)
        texts = []
        for i, (r, k) in enumerate(zip(records, n)):  # loop over the images of a batch
            feats[i, :k] = r["features"][:k].to(dev, torch.float32)
            bbox[i, :k] = r["bbox"][:k].to(dev, torch.float32)
            tags = 1000 + r["objects"][:k].to(dev) % (VOCAB - 1000)  # one word piece per region label
            tags = tags[: MAX_TEXT - QUESTION_TOKENS - 1]
            texts.append(torch.cat([questions[i].to(dev), tags, torch.tensor([SEP], device=dev)]))
        T = max(t.numel() for t in texts)
        ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        seg = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            ids[i, : t.numel()] = t
            seg[i, QUESTION_TOKENS : t.numel()] = 1
            mask[i, : t.numel()] = 1
        self.last_regions, self.last_text = n, [t.numel() for t in texts]
        info = SampleList({
            "bbox": bbox, "max_features": torch.tensor(n, device=dev),
            "image_width": torch.tensor([r["image_width"] for r in records], device=dev),
            "image_height": torch.tensor([r["image_height"] for r in records], device=dev),
        })
        return SampleList({"input_ids": ids, "input_mask": mask, "segment_ids": seg, "image_feature_0": feats,
                           "image_info_0": info, "dataset_name": "vqa2", "dataset_type": "test"})

    def tokens(self, h: int, w: int) -> str:
        if not self.last_text:
            return ""
        return f"{max(self.last_text)}+{max(self.last_regions)}"

    def run(self, images, questions, stages: dict | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        records = self.detector(images)
        if stages is not None:
            sync(self.device)
            t1 = time.perf_counter()
        scores = self.forward(self.batch(records, questions))["scores"]
        if stages is not None:
            sync(self.device)
            stages["detector_s"] = stages.get("detector_s", 0.0) + t1 - t0
            stages["transformer_s"] = stages.get("transformer_s", 0.0) + time.perf_counter() - t1
        return scores


# ------------------------------------------------------------------------------------ measurement
def measure(path, images, questions, device: str, precision: str, warmup: int, repeat: int,
            compiled=None, min_time: float = 0.0, max_repeat: int = 20) -> dict:
    """FLOPs (counted in a first, eager pass), then ``warmup`` plain passes (the first compiles when
    ``compiled`` is given; its time is returned as ``first_call_s``), then the best of at least ``repeat``
    timed passes, more (up to ``max_repeat``) while less than ``min_time`` seconds were spent: a fast path
    gets several tries, so one slice of a busy shared machine does not decide its number."""
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" \
        else contextlib.nullcontext()
    out: dict = {}
    with torch.inference_mode(), amp:
        path.forward = path.model
        with flop_counter() as counter:
            path.run(images, questions)
        out["flops"] = counter.get_total_flops()
        if compiled is not None:
            path.forward = compiled
            warmup = max(warmup, 2)
        for i in range(warmup):
            t0 = time.perf_counter()
            path.run(images, questions)
            sync(device)
            if i == 0:
                out["first_call_s"] = time.perf_counter() - t0
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        best, best_stages, spent, runs = float("inf"), {}, 0.0, 0
        while runs < repeat or (spent < min_time and runs < max_repeat):
            stages: dict = {}
            sync(device)
            t0 = time.perf_counter()
            path.run(images, questions, stages)
            sync(device)
            dt = time.perf_counter() - t0
            spent, runs = spent + dt, runs + 1
            if dt < best:
                best, best_stages = dt, stages
    out.update({"seconds": best, "runs": runs, **best_stages})
    if torch.device(device).type == "cuda":
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def compile_model(path):
    """``torch.compile`` of the path's VL model (the detector's NMS output sizes vary: it stays eager).
    Returns ``(compiled or None, note)``; compilation itself happens lazily at the first call."""
    try:
        return torch.compile(path.model, dynamic=True), ""
    except Exception as e:  # noqa: BLE001  (optional path: report, never stop)
        return None, f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="batch 1 and 300x500 unless --batch_sizes/--size are given")
    p.add_argument("--size", type=parse_size, help="input HxW (default 600x1000, the papers' test scale; quick 300x500)")
    p.add_argument("--batch_sizes", help="comma list (default 1,16; quick 1)")
    p.add_argument("--repeat", type=int, help="timed passes at least, best reported (default 3; quick 1)")
    p.add_argument("--min_time", type=float, default=3.0,
                   help="keep timing a path (up to 20 passes) until this many seconds were spent")
    p.add_argument("--warmup", type=int, help="untimed passes after the FLOP-counting one (default 1; quick 0)")
    p.add_argument("--proposals", type=int, default=300, help="RPN post-NMS proposals (VinVL test config: 300)")
    p.add_argument("--max_boxes", type=int, default=100, help="detector boxes kept (VinVL: 10..100)")
    p.add_argument("--score_thresh", type=float, default=0.0,
                   help="detector score threshold (0: keep max_boxes; random weights never pass VinVL's 0.2)")
    p.add_argument("--bf16", action="store_true", help="add bf16 autocast rows")
    p.add_argument("--compile", action="store_true", help="add rows with torch.compile on the VL models")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here; use --device cpu")
    size = args.size or ((300, 500) if args.quick else (600, 1000))
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1" if args.quick else "1,16")).split(",") if b.strip()]
    repeat = args.repeat or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_imports()
    device, (H, W) = args.device, size
    t_start = time.perf_counter()

    peaks = {"fp32": matmul_peak_flops(device, torch.float32)}
    if args.bf16:
        try:
            peaks["bf16"] = matmul_peak_flops(device, torch.bfloat16)
        except Exception as e:  # noqa: BLE001  (optional row: report, never stop)
            print(f"bf16 matmul peak failed: {type(e).__name__}: {e}", flush=True)
    print("matmul peak (this run, 1024^3): " + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peaks.items())
          + f" ({device}, {torch.get_num_threads()} threads)", flush=True)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    paths = [GridPath(device), RegionPath(device, H, W, args.proposals, args.max_boxes, args.score_thresh)]
    build_s = time.perf_counter() - t0
    variants = [("fp32", False)]
    if args.bf16:
        variants.append(("bf16", False))
    if args.compile:
        variants.append(("fp32", True))

    rows, summary = [], []
    for bs in batch_sizes:
        images, questions = make_images(bs, H, W), make_questions(bs)
        for precision, compiled in variants:
            per_path = {}
            for path in paths:
                label = precision + (" + compile" if compiled else "")
                row = {"path": path.name, "input": f"{H}x{W}", "batch": bs, "precision": label}
                compiled_fn, note = compile_model(path) if compiled else (None, "")
                if compiled and compiled_fn is None:
                    row["note"] = note
                    rows.append(row)
                    continue
                try:
                    m = measure(path, images, questions, device, precision, warmup, repeat, compiled_fn, args.min_time)
                except Exception as e:  # optional paths report their failure; fp32 eager must work
                    if precision == "fp32" and not compiled:
                        raise
                    row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    rows.append(row)
                    continue
                finally:
                    path.forward = path.model
                if compiled:
                    what = "VL model compiled, detector eager" if isinstance(path, RegionPath) else "model compiled"
                    note = f"{what}; first call {m['first_call_s']:.0f} s"
                elif precision == "bf16":
                    note = "torch.autocast bf16"
                peak = peaks.get(precision, peaks["fp32"])
                achieved = m["flops"] / m["seconds"]
                row.update({"tokens txt+img": path.tokens(H, W), "runs": m["runs"], "ms/batch": _ms(m["seconds"]),
                            "ms/image": _ms(m["seconds"] / bs), "GFLOP/image": _num(m["flops"] / bs / 1e9),
                            "TFLOP/s": achieved / 1e12, "% of matmul peak": 100 * achieved / peak})
                if "detector_s" in m:
                    row["detector / transformer ms"] = f"{_ms(m['detector_s']):.0f} / {_ms(m['transformer_s']):.0f}"
                if "peak_mem_mib" in m:
                    row["peak MiB"] = m["peak_mem_mib"]
                if note:
                    row["note"] = note
                rows.append(row)
                per_path[type(path).__name__] = m
            if len(per_path) == 2:
                g, r = per_path["GridPath"], per_path["RegionPath"]
                summary.append({"input": f"{H}x{W}", "batch": bs, "precision": label,
                                "grid ms/image": _ms(g["seconds"] / bs), "region ms/image": _ms(r["seconds"] / bs),
                                "latency ratio region/grid": r["seconds"] / g["seconds"],
                                "FLOP ratio region/grid": r["flops"] / g["flops"],
                                "region detector share %": 100 * r["detector_s"] / r["seconds"]})
    sync(device)
    size_note = "paper scale" if (H, W) == (600, 1000) else "SHRUNK input (paper: 600x1000)"
    t1 = print_table(
        f"End-to-end VQA inference, {H}x{W} ({size_note}), {device}, {torch.get_num_threads()} threads, best of 'runs'; "
        f"detector {args.proposals} proposals, <= {args.max_boxes} boxes, score_thresh {args.score_thresh}; "
        f"fp32 matmul peak {peaks['fp32'] / 1e12:.3g} TFLOP/s", rows)
    t2 = print_table(f"Region vs grid at {H}x{W} ({size_note}); issue: ~7.6x FLOPs at bs1, SOHO paper ~10x latency", summary)
    results = {
        "args": {**vars(args), "size": [H, W], "batch_sizes": batch_sizes, "repeat": repeat, "warmup": warmup},
        "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "build_s": build_s,
        "rows": rows, "summary": summary, "tables": [t1, t2], "peak_rss_mib": peak_rss_mib(),
        "wall_s": time.perf_counter() - t_start,
    }
    out = write_json("grid_vs_region", results, device)
    print(f"wrote {out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
