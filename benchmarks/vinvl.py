"""VinVL / OSCAR+ speed: training from cached region features, caption decoding, attention kernels.

Sections (each a table; all numbers come from one run on one device):

* ``data``: the feature LMDB read through ``open_feature_database`` and a ``DataLoader`` alone
  (samples/s, MB/s of features handed to the model) with fp32 and fp16 features in flight;
* ``train``: OSCAR+ pretraining (masked tokens + 3-way contrastive, 35 text tokens) and VQA fine-tuning
  (3129 answers, text padded to 128 as ``oscar/run_vqa.py``) over the same LMDB: samples/s, share of the
  step spent waiting on data, FLOP per sample (``FlopCounterMode``) and achieved FLOP/s against a matmul
  peak measured in this run;
* ``decode``: captioning tokens/s with the per-layer KV cache vs re-encoding the sequence each step
  (``model.generate(..., use_cache=True/False)``; target >= 3x), greedy and beam search;
* ``attention``: transformers' SDPA vs eager attention on the VQA model (same weights, same batch).

Models are OSCAR+ base (BERT-base, 12 layers, 50 regions of 2048-d features + 6 box dims) with random
weights: speed does not depend on the values. The records are random (10-50 regions per image) and are
written with the registered ``lmdb`` feature writer; the record contract stores features as float32, so
``--fp16_features`` halves the bytes from the reader onwards (worker -> main process -> device), not on
disk.

    python benchmarks/vinvl.py [--device cpu|cuda] [--quick] [--parts data,train,decode,attention]
                               [--records 512] [--batch_size 32] [--steps 10] [--workers 2]
                               [--fp16_features] [--amp none|bf16|fp16] [--threads N]

Results: ``benchmarks/results/vinvl_<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, print_table, sync, timeit, write_json

from mmf_plugins import setup_imports
from mmf_plugins.common.registry import registry
from mmf_plugins.common.sample import Sample, collate
from mmf_plugins.datasets.databases.feature_database import open_feature_database
from mmf_plugins.datasets.databases.feature_record import pad_features
from mmf_plugins.models.base_model import build_model

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB, CLS, SEP, MASK = 30522, 101, 102, 103
FEATURE_DIM, MAX_REGIONS, NUM_ANSWERS = 2048, 50, 3129
# text lengths of the official scripts: run_oscarplus_pretrain.py --max_seq_length 35, run_vqa.py 128
TEXT_LEN = {"pretraining": 35, "vqa": 128}


# ------------------------------------------------------------------------------------ FLOP counting
def flop_counter():
    """``FlopCounterMode`` that also counts PyTorch's CPU flash attention (not in its registry)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def forward(q, k, v, *args, out_shape=None, **kwargs):  # shapes: FlopCounterMode passes tensor shapes
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    extra = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            extra[op] = formula
    return FlopCounterMode(display=False, custom_mapping=extra)


def autocast(device: str, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ------------------------------------------------------------------------------------ data
def write_records(folder: Path, n: int, seed: int = 0) -> float:
    """``n`` random feature records (10-50 regions of 2048-d) in an LMDB; returns MB written."""
    rng = np.random.default_rng(seed)
    writer = registry.get_feature_writer_class("lmdb")(str(folder))
    for i in range(n):
        k = int(rng.integers(10, MAX_REGIONS + 1))
        xy = rng.uniform(0, 400, (k, 2)).astype(np.float32)
        wh = rng.uniform(16, 200, (k, 2)).astype(np.float32)
        writer.write(f"img{i}", {
            "features": rng.standard_normal((k, FEATURE_DIM), dtype=np.float32),
            "bbox": np.concatenate([xy, np.minimum(xy + wh, [639, 479])], 1),
            "num_boxes": k, "image_width": 640, "image_height": 480,
            "objects": rng.integers(1, 1595, k),
        })
    writer.close()
    return (folder / "data.mdb").stat().st_size / 1e6


class CachedFeatureDataset(torch.utils.data.Dataset):
    """One OSCAR+ sample per record: region features from the store, random text and labels for ``head``.

    Text is ``[CLS] text_a [SEP] tags [SEP]`` with a random real length (padding masked out) and segment
    ids 0 / 1; pretraining adds ``lm_label_ids`` (15% of real tokens) and ``contrastive_labels`` (0-2),
    VQA adds soft ``targets`` over 3129 answers.
    """

    def __init__(self, path: str, ids: list[str], head: str, fp16_features: bool = False):
        self.db = open_feature_database(path)
        self.ids, self.head, self.fp16 = ids, head, fp16_features
        self.text_len = TEXT_LEN[head]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        record = self.db.get(self.ids[index])
        feats, _, info = pad_features(record, MAX_REGIONS)
        rng = np.random.default_rng(index)
        T = self.text_len
        real = int(rng.integers(T // 2, T + 1))
        ids = np.zeros(T, dtype=np.int64)
        ids[:real] = rng.integers(1000, VOCAB, real)
        ids[0], ids[real - 1] = CLS, SEP
        split = real // 2
        ids[split] = SEP
        seg = np.zeros(T, dtype=np.int64)
        seg[split + 1 : real] = 1
        mask = np.zeros(T, dtype=np.int64)
        mask[:real] = 1
        sample = Sample(
            input_ids=torch.from_numpy(ids), input_mask=torch.from_numpy(mask), segment_ids=torch.from_numpy(seg),
            image_feature_0=feats.half() if self.fp16 else feats,
            image_info_0={k: info[k] for k in ("bbox", "image_width", "image_height", "max_features")},
        )
        if self.head == "pretraining":
            labels = np.full(T, -1, dtype=np.int64)
            picked = rng.random(real) < 0.15
            picked[[0, split, real - 1]] = False
            picked[1] = True  # at least one target per sample
            labels[:real][picked] = ids[:real][picked]
            sample.lm_label_ids = torch.from_numpy(labels)
            sample.contrastive_labels = int(rng.integers(0, 3))
        else:
            targets = np.zeros(NUM_ANSWERS, dtype=np.float32)
            targets[rng.integers(0, NUM_ANSWERS, 3)] = (1.0, 0.6, 0.3)
            sample.targets = torch.from_numpy(targets)
        return sample


def collate_train(samples):
    return collate(samples, dataset_name="bench", dataset_type="train")


def make_loader(ds, batch_size: int, workers: int, num_batches: int, device: str):
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=num_batches * batch_size,
                                             generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_train, pin_memory=device.startswith("cuda"),
                                       persistent_workers=False)


def loader_rows(path: str, ids: list[str], batch_size: int, workers: int, batches: int, device: str) -> list[dict]:
    rows = []
    for fp16 in (False, True):
        ds = CachedFeatureDataset(path, ids, "vqa", fp16_features=fp16)
        it = iter(make_loader(ds, batch_size, workers, batches + 1, device))
        next(it)  # worker start-up excluded
        t0, n, nbytes = time.perf_counter(), 0, 0
        for _ in range(batches):
            b = next(it)
            n += b.get_batch_size()
            nbytes += b.image_feature_0.numel() * b.image_feature_0.element_size()
        dt = time.perf_counter() - t0
        rows.append({"features": "fp16" if fp16 else "fp32", "workers": workers, "batch": batch_size,
                     "samples/s": n / dt, "feature MB/s": nbytes / dt / 1e6,
                     "KB/sample": nbytes / n / 1e3})
    return rows


# ------------------------------------------------------------------------------------ models
def vinvl(head: str, attn: str = "sdpa", **extra):
    cfg = {"training_head_type": head, "attn_implementation": attn, "max_img_seq_length": MAX_REGIONS, **extra}
    return build_model("vinvl", cfg)


def train_step(model, optimizer, batch, device: str, amp: str) -> None:
    with autocast(device, amp):
        losses = model(batch)["losses"]
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_rows(path, ids, args, peak: float) -> list[dict]:
    rows = []
    for head in ("pretraining", "vqa"):
        torch.manual_seed(0)
        model = vinvl(head).to(args.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ds = CachedFeatureDataset(path, ids, head, fp16_features=args.fp16_features)
        it = iter(make_loader(ds, args.batch_size, args.workers, args.steps + 1, args.device))
        # step 0: worker start-up, allocator warm-up and the FLOP count (slow under the counter; not timed)
        batch = next(it).to(args.device)
        with flop_counter() as counter:
            train_step(model, optimizer, batch, args.device, args.amp)
        flops_per_step = counter.get_total_flops()
        sync(args.device)
        wait = 0.0
        t_start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(it).to(args.device)
            wait += time.perf_counter() - t0
            train_step(model, optimizer, batch, args.device, args.amp)
            sync(args.device)
        wall = time.perf_counter() - t_start
        sps = args.steps * args.batch_size / wall
        achieved = flops_per_step * args.steps / wall
        rows.append({
            "task": "pretrain (MTL + CL3)" if head == "pretraining" else "fine-tune VQA",
            "batch": args.batch_size, "tokens": f"{TEXT_LEN[head]}+{MAX_REGIONS}",
            "features": "fp16" if args.fp16_features else "fp32", "amp": args.amp, "workers": args.workers,
            "samples/s": sps, "step ms": _ms(wall / args.steps), "data wait %": 100 * wait / wall,
            "GFLOP/sample": flops_per_step / args.batch_size / 1e9, "TFLOP/s": achieved / 1e12,
            "% of matmul peak": 100 * achieved / peak,
        })
        del model, optimizer, it
    return rows


# ------------------------------------------------------------------------------------ decoding
def caption_batch(batch_size: int, tags: int, device: str, seed: int = 0):
    from mmf_plugins.common.sample import SampleList

    g = torch.Generator().manual_seed(seed)
    tag_ids = torch.randint(1000, VOCAB, (batch_size, tags), generator=g)
    ids = torch.cat([torch.tensor([[CLS, SEP]]).expand(batch_size, 2), tag_ids], 1)
    seg = torch.cat([torch.zeros(batch_size, 2, dtype=torch.long), torch.ones(batch_size, tags, dtype=torch.long)], 1)
    return SampleList({
        "input_ids": ids, "input_mask": torch.ones_like(ids), "segment_ids": seg,
        "image_feature_0": torch.randn(batch_size, MAX_REGIONS, FEATURE_DIM + 6, generator=g),
        "dataset_name": "bench", "dataset_type": "val",
    }).to(device)


def decode_rows(args) -> list[dict]:
    torch.manual_seed(0)
    model = vinvl("captioning").to(args.device).eval()
    rows_decoded: list[int] = []
    original = model._next_token_log_probs

    def counting(hidden):  # one call = one decoding step over ``hidden.shape[0]`` rows (images x beams)
        rows_decoded.append(hidden.shape[0])
        return original(hidden)

    model._next_token_log_probs = counting
    batch = caption_batch(args.decode_batch, args.decode_tags, args.device)
    rows = []
    for beams in args.decode_beams:
        results = {}
        for use_cache in (False, True):
            with autocast(args.device, args.amp):  # short warm-up (allocator, thread pool)
                model.generate(batch, num_beams=beams, max_length=3, use_cache=use_cache)
            times = []
            for _ in range(args.repeat):
                rows_decoded.clear()
                sync(args.device)
                t0 = time.perf_counter()
                with autocast(args.device, args.amp):
                    out = model.generate(batch, num_beams=beams, max_length=args.decode_length, use_cache=use_cache)
                sync(args.device)
                times.append(time.perf_counter() - t0)
            ids = out["caption_ids"] if "caption_ids" in out else out["captions"]  # token ids, (B, max_length - 1)
            results[use_cache] = (min(times), sum(rows_decoded), len(rows_decoded), ids)
        same = torch.equal(results[True][3], results[False][3])
        for use_cache in (False, True):
            t, tokens, steps, _ = results[use_cache]
            row = {"search": "greedy" if beams == 1 else f"beam {beams}", "images": args.decode_batch,
                   "context": f"{args.decode_tags} tags+{MAX_REGIONS} regions", "steps": steps,
                   "kv cache": "yes" if use_cache else "no", "tokens/s": tokens / t, "ms/image": _ms(t / args.decode_batch)}
            if use_cache:
                speedup = results[False][0] / t
                row.update({"speedup": speedup, "target >=3x": "met" if speedup >= 3 else "MISSED",
                            "same captions": "yes" if same else "NO"})
            rows.append(row)
    del model
    return rows


def _ms(seconds: float) -> float | int:
    """Milliseconds; whole numbers from 1 s up (keeps the table free of exponents)."""
    ms = 1e3 * seconds
    return round(ms) if ms >= 1000 else ms


# ------------------------------------------------------------------------------------ attention
def attention_rows(path, ids, args) -> list[dict]:
    ds = CachedFeatureDataset(path, ids, "vqa")
    batch = collate_train([ds[i] for i in range(args.batch_size)]).to(args.device)
    torch.manual_seed(0)
    models = {"sdpa": vinvl("vqa", "sdpa").to(args.device)}
    models["eager"] = vinvl("vqa", "eager").to(args.device)
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    times, scores = {}, {}
    for name, model in models.items():
        model.train()

        def fwd_bwd(model=model):
            with autocast(args.device, args.amp):
                loss = sum(model(batch)["losses"].values())
            loss.backward()
            model.zero_grad(set_to_none=True)

        t_train = min(timeit(fwd_bwd, warmup=1, repeat=args.repeat, device=args.device))
        model.eval()

        def infer(model=model):
            with torch.inference_mode(), autocast(args.device, args.amp):
                return model(batch)["scores"]

        t_infer = min(timeit(infer, warmup=1, repeat=args.repeat, device=args.device))
        scores[name] = infer().float()
        times[name] = (t_train, t_infer)
    diff = (scores["sdpa"] - scores["eager"]).abs().max().item()
    rows = []
    for name, (t_train, t_infer) in times.items():
        rows.append({"attention": name, "batch": args.batch_size, "tokens": f"{TEXT_LEN['vqa']}+{MAX_REGIONS}",
                     "amp": args.amp, "train fwd+bwd ms": _ms(t_train), "inference ms": _ms(t_infer),
                     "train speedup vs eager": times["eager"][0] / t_train,
                     "inference speedup vs eager": times["eager"][1] / t_infer,
                     "max |score diff| vs eager": diff})
    del models
    return rows


# ------------------------------------------------------------------------------------ main
QUICK = {"records": 96, "batch_size": 4, "steps": 3, "workers": 1, "loader_batches": 8, "decode_batch": 1,
         "decode_length": 20, "decode_beams": "1,5", "decode_tags": 30, "repeat": 1}
FULL = {"records": 512, "batch_size": 32, "steps": 10, "workers": 2, "loader_batches": 20, "decode_batch": 8,
        "decode_length": 20, "decode_beams": "1,5", "decode_tags": 30, "repeat": 3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes on 2 CPU cores)")
    p.add_argument("--parts", default="data,train,decode,attention")
    p.add_argument("--records", type=int, help="records written to the LMDB (quick 96, else 512)")
    p.add_argument("--batch_size", type=int, help="training / attention batch (quick 4, else 32)")
    p.add_argument("--steps", type=int, help="timed training steps per task (quick 3, else 10)")
    p.add_argument("--workers", type=int, help="DataLoader workers (quick 1, else 2)")
    p.add_argument("--loader_batches", type=int, help="batches timed in the loader-only rows")
    p.add_argument("--fp16_features", action="store_true", help="hand fp16 features to the model (half the bytes)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--decode_batch", type=int, help="images captioned at once")
    p.add_argument("--decode_length", type=int, help="max_gen_length of decoding")
    p.add_argument("--decode_beams", help="comma list of beam sizes (1 = greedy)")
    p.add_argument("--decode_tags", type=int, help="tag tokens per image")
    p.add_argument("--repeat", type=int, help="timed repeats (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    args.decode_beams = [int(b) for b in str(args.decode_beams).split(",") if b.strip()]
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    unknown = parts - {"data", "train", "decode", "attention"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; choose from data, train, decode, attention")
    args.parts = parts
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here; use --device cpu")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_imports()
    t_start = time.perf_counter()
    results = {"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}}
    tables = []
    peak_dtype = AMP_DTYPES[args.amp] or torch.float32
    peak = matmul_peak_flops(args.device, peak_dtype)
    results["matmul_peak_tflops"] = peak / 1e12
    print(f"matmul peak ({args.device}, {peak_dtype}, 1024^3, this run): {peak / 1e12:.3g} TFLOP/s "
          f"({torch.get_num_threads()} threads)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.lmdb"
        if args.parts & {"data", "train", "attention"}:
            t0 = time.perf_counter()
            mb = write_records(path, args.records)
            write_s = time.perf_counter() - t0
            ids = [f"img{i}" for i in range(args.records)]
            results["store"] = {"records": args.records, "MB": mb, "write_records_per_s": args.records / write_s}
        if "data" in args.parts:
            rows = loader_rows(str(path), ids, args.batch_size, args.workers, args.loader_batches, args.device)
            tables.append(print_table(
                f"Feature loader alone: LMDB ({args.records} records, {mb:.0f} MB) -> open_feature_database -> "
                f"DataLoader (VQA samples, {MAX_REGIONS} regions padded)", rows))
            results["loader"] = rows
        if "train" in args.parts:
            rows = train_rows(str(path), ids, args, peak)
            tables.append(print_table(
                f"Training from cached features ({args.device}, {torch.get_num_threads()} threads, AdamW step included; "
                f"matmul peak {peak / 1e12:.3g} TFLOP/s)", rows))
            results["train"] = rows
        if "attention" in args.parts:
            rows = attention_rows(str(path), ids, args)
            tables.append(print_table(f"SDPA vs eager attention, VQA model (best of {args.repeat})", rows))
            results["attention"] = rows
    if "decode" in args.parts:
        rows = decode_rows(args)
        tables.append(print_table(
            f"Caption decoding with / without the KV cache ({args.device}, best of {args.repeat}; tokens = rows x steps)", rows))
        results["decode"] = rows
    results["tables"] = tables
    results["wall_s"] = time.perf_counter() - t_start
    path = write_json("vinvl", results, args.device)
    print(f"wrote {path} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
