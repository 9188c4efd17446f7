"""SOHO speed: training throughput, inference latency, visual-dictionary share, peak memory and FLOP/s.

Sections (each a table; every ratio is taken inside one run on one device):

* ``train``: pretraining steps (MLM + MVM + ITM heads, visual dictionary on, ``--captions`` captions per
  image as the release's ``sentence_group`` so the CNN runs once per image; SGD on the backbone + AdamW on
  the rest, the model's own optimizer groups): step time p50, images/s, image-text pairs/s, peak memory;
* ``infer``: VQA forward passes (3129 answers, one ``--text_len``-token question per image, eval mode,
  ``no_grad``): latency p50/p95 and pairs/s;
* ``breakdown``: one profiled step per training configuration in the eager and bf16 modes, split into
  forward (backbone / neck / visual
  dictionary (assignment + EMA update + MVM logits) / fusion BERT / head) / backward / optimizer with
  ``torch.profiler.record_function`` ranges (CPU time on CPU, kernel time on CUDA); the target for the
  dictionary is < 5 % of the step;
* FLOPs per step from ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward for training,
  forward for inference; counted once at batch 1 and scaled by the batch: every layer is per-sample)
  and the achieved FLOP/s as a fraction of a square-matmul peak measured in the same run, in the dtype
  of the row (fp32 or bf16).

Each row is run in up to four modes: ``eager`` (fp32), ``bf16`` (``torch.autocast`` bf16), ``compile``
and ``compile_bf16`` (``torch.compile`` of the backbone and of each BERT layer, "regional" compilation: the
data-dependent parts of SOHO — MVM sampling, masked-token selection, the dictionary update — stay eager;
``--compile_scope model`` compiles the whole model instead). The modes of one (model, batch) are timed
interleaved (one call of each per round, after each was warmed up alone) so that a change in machine load
hits them alike. Compiled modes run in a child process with a time budget (``--compile_budget``); rows
that do not finish in it, or whose compilation fails, are reported as skipped with the reason, never as a
crash. ``compile_s`` is the first call (compilation + one step) with the user's inductor cache, or a cold
one with ``--fresh_compile_cache``.

Models: ``r18_3l`` (the released ResNet-18 + 3-layer BERT) and ``r101_12l`` (the paper's ResNet-101 +
12 layers), random weights (speed does not depend on the values). Images are padded to a multiple of 32
as the release (600x1000 -> 608x1024 with ``image_mask`` marking the real pixels -> 9x16 = 144 visual
tokens after the stride-64 neck).

    python benchmarks/soho.py [--device cpu|cuda] [--quick] [--models r18_3l,r101_12l] [--size 600x1000]
                              [--train_batches 1,32] [--infer_batches 1,32] [--modes eager,bf16,compile,compile_bf16]
                              [--captions 4] [--text_len 16] [--repeat 10] [--warmup 2] [--threads N]
                              [--compile_budget S] [--compile_scope blocks|model] [--fresh_compile_cache]

``--quick`` (CPU smoke run, ~2 min on 2 cores): ``r18_3l`` only, 320x480, batches 1 and 2, 3 repeats,
modes eager/bf16/compile with a 60 s compile budget. The full defaults are sized for a GPU; on a CPU pick
smaller ``--train_batches`` (R101 + 12 layers at batch 32 needs tens of GB and minutes per step).
Results: ``benchmarks/results/soho_<device>.json``. The measurement helpers here (interleaved timing, peak
memory, FLOP counting, profiler shares) are reused by ``benchmarks/vl_bert.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    device_tag,
    matmul_peak_flops,
    peak_rss_mib,
    print_table,
    sync,
    write_json,
)

from mmf_plugins.common.sample import SampleList
from mmf_plugins.models.base_model import build_model
from mmf_plugins.models.soho import modeling_soho  # noqa: F401  (registers "soho")
from mmf_plugins.trainers.optimizers import build_optimizers

MODELS = {"r18_3l": ("resnet18", 3), "r101_12l": ("resnet101", 12)}
MODES = ("eager", "bf16", "compile", "compile_bf16")
VOCAB, CLS, SEP, MASK = 30522, 101, 102, 103
MLM_POSITIONS = (3, 9)  # 2 of 16 tokens masked (~15 %), fixed so every step does the same work
NUM_ANSWERS = 3129
VD_TARGET = 0.05
OPTIMIZER = {"optimizer": {"type": "adamw", "params": {"lr": 1e-6, "eps": 1e-6, "weight_decay": 0.01}}}


# ------------------------------------------------------------------------------------------ inputs
def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must be HxW in pixels (e.g. 600x1000), got {text!r}") from None
    if h < 64 or w < 64:
        raise SystemExit(f"--size {text}: SOHO needs at least 64 px per side (one visual token)")
    return h, w


def make_batch(batch: int, size: tuple[int, int], *, captions: int, text_len: int, head: str, device: str,
               seed: int = 0) -> SampleList:
    """Random normalised images padded to /32 (``image_mask`` = real pixels) and BERT-style token ids.

    ``pretraining``: ``captions`` captions per image (B, K, T) with 2 masked tokens each and alternating
    ITM labels; ``vqa``: one question per image (B, T), no labels (inference)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ph, pw = 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)
    image = torch.zeros(batch, 3, ph, pw)
    image[:, :, :h, :w] = torch.randn(batch, 3, h, w, generator=g)
    mask = torch.zeros(batch, ph, pw, dtype=torch.bool)
    mask[:, :h, :w] = True
    k = captions if head == "pretraining" else 1
    ids = torch.randint(1000, VOCAB, (batch, k, text_len), generator=g)
    ids[..., 0], ids[..., -1] = CLS, SEP
    fields = {"image": image, "image_mask": mask, "dataset_name": "bench", "dataset_type": "train"}
    if head == "pretraining":
        labels = torch.full_like(ids, -1)
        for p in MLM_POSITIONS:
            if p < text_len - 1:
                labels[..., p] = ids[..., p]
                ids[..., p] = MASK
        fields["lm_label_ids"] = labels if k > 1 else labels[:, 0]
        itm = (torch.arange(batch * k) % 2 == 0).long().view(batch, k)
        fields["is_correct"] = itm if k > 1 else itm[:, 0]
    else:
        ids = ids[:, :1]
    text = {"input_ids": ids, "input_mask": torch.ones_like(ids), "segment_ids": torch.zeros_like(ids)}
    fields.update({name: (t if k > 1 else t[:, 0]) for name, t in text.items()})
    return SampleList({n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in fields.items()})


def build_soho(name: str, head: str, device: str, seed: int = 0):
    arch, layers = MODELS[name]
    torch.manual_seed(seed)
    model = build_model("soho", {"training_head_type": head, "backbone": {"arch": arch},
                                 "bert": {"num_hidden_layers": layers}, "num_answers": NUM_ANSWERS})
    return model.to(device).train(head == "pretraining")


def compile_model(model, scope: str) -> None:
    """In-place ``torch.compile``: ``blocks`` = the backbone and every BERT layer; ``model`` = everything."""
    if scope == "model":
        model.compile()
        return
    model.backbone.compile()
    for layer in model.bert.encoder.layer:
        layer.compile()


# ------------------------------------------------------------------------------------------ steps
def autocast(device: str, mode: str):
    if mode.endswith("bf16"):
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(model, optimizers, batch, device: str, mode: str):
    def step():
        with autocast(device, mode):
            out = model(batch)
        with torch.profiler.record_function("backward"):
            sum(out["losses"].values()).backward()
        with torch.profiler.record_function("optimizer"):
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)

    return step


def infer_step_fn(model, batch, device: str, mode: str):
    def step():
        with torch.no_grad(), autocast(device, mode):
            model(batch)

    return step


# ------------------------------------------------------------------------------- measurement tools
class PeakMemory:
    """Peak memory of one measurement: CUDA max allocated, or the process RSS high-water mark (VmHWM),
    reset through ``/proc/self/clear_refs`` (falls back to the peak since start where that is refused)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.kind = "CUDA max allocated" if self.cuda else "RSS high-water (VmHWM)"
        self._resettable = not self.cuda and self._clear()
        if not self.cuda and not self._resettable:
            self.kind = "RSS peak since start (ru_maxrss)"

    @staticmethod
    def _clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self._resettable:
            self._clear()

    def read_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self._resettable:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        return peak_rss_mib()


def interleaved_calls(fns: dict, warmup: int, repeat: int, device: str, memory: PeakMemory, on_error=None) -> dict:
    """Time variants of one step fairly: each variant is warmed up alone (its first call timed: compilation
    for compiled variants; peak memory read over its last warm-up call), then the timed calls alternate
    between the variants round by round, so a change in machine load hits all of them alike.

    Returns ``{name: {"first_s", "times", "peak_mib"}}``; a variant that raises gets ``{"error": message}``
    and ``on_error()`` is called (e.g. to free memory after an out-of-memory error)."""
    out: dict[str, dict] = {}

    def failed(name, e):
        out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
        if on_error is not None:
            on_error()

    for name, fn in fns.items():
        try:
            calls = max(1, warmup)
            first = None
            for i in range(calls):
                if i == calls - 1:
                    memory.reset()
                t0 = time.perf_counter()
                fn()
                sync(device)
                first = time.perf_counter() - t0 if first is None else first
            out[name] = {"first_s": first, "times": [], "peak_mib": memory.read_mib()}
        except Exception as e:  # noqa: BLE001  (report and go on: a benchmark never crashes)
            failed(name, e)
    for _ in range(repeat):
        for name, fn in fns.items():
            if "error" in out[name]:
                continue
            try:
                t0 = time.perf_counter()
                fn()
                sync(device)
                out[name]["times"].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                failed(name, e)
    return out


def flop_counter():
    """``FlopCounterMode`` that also counts PyTorch's CPU flash attention (absent from its registry)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def forward(q, k, v, *args, out_shape=None, **kwargs):
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


def count_flops(fn) -> int:
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def labelled(targets):
    """Wrap ``getattr(obj, attr)`` in ``record_function(label)`` for each ``(obj, attr, label)``; restore after."""
    saved = []
    try:
        for obj, attr, label in targets:
            original = getattr(obj, attr)
            had_own = attr in vars(obj)

            def wrapped(*args, _fn=original, _label=label, **kwargs):
                with torch.profiler.record_function(_label):
                    return _fn(*args, **kwargs)

            setattr(obj, attr, wrapped)
            saved.append((obj, attr, original, had_own))
        yield
    finally:
        for obj, attr, original, had_own in reversed(saved):
            if had_own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)


def profile_shares(step, labels: list[str], device: str, steps: int = 1) -> dict:
    """Run ``step`` under ``torch.profiler``; for each label the summed time of the events of that name
    (CPU time on CPU, kernel time on CUDA) as a share of the wall time of the profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    totals = dict.fromkeys(labels, 0.0)
    for event in prof.key_averages():
        if event.key in totals:
            us = event.device_time_total if device.startswith("cuda") else event.cpu_time_total
            totals[event.key] += us / 1e6
    return {"step_s": wall / steps, **{k: v / wall for k, v in totals.items()}}


MATMUL_N = {False: 1024, True: 4096}  # square matmul size of the peak reference on CPU / CUDA


def matmul_peaks(device: str) -> dict:
    """Achieved FLOP/s of a square matmul in fp32 and bf16 (the reference 'peaks' of this run)."""
    n = MATMUL_N[device.startswith("cuda")]
    return {"fp32": matmul_peak_flops(device, torch.float32, n=n), "bf16": matmul_peak_flops(device, torch.bfloat16, n=n)}


def add_peak_fractions(rows: list[dict], peaks: dict, dtype_of) -> None:
    """``frac_of_matmul_peak`` = achieved FLOP/s over the matmul peak of the row's dtype."""
    for r in rows:
        if "achieved_GFLOP/s" in r:
            items = list(r.items())
            at = [k for k, _ in items].index("achieved_GFLOP/s") + 1
            items.insert(at, ("frac_of_matmul_peak", r["achieved_GFLOP/s"] * 1e9 / peaks[dtype_of(r)]))
            r.clear()
            r.update(items)


def tidy_numbers(rows: list[dict]) -> list[dict]:
    """Whole numbers from 1000 up, so the tables carry no exponents."""
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and abs(v) >= 1000:
                r[k] = round(v)
    return rows


# ------------------------------------------------------------------------------------ measurements
def measure(model_name: str, kind: str, model, optimizers, batch_size: int, modes: list[str], args,
            memory: PeakMemory, flops_per_sample: float | None) -> list[dict]:
    """Rows of one (model, kind, batch) for every mode, timed interleaved; ``kind`` is ``train`` or
    ``infer``; for compile modes ``model`` is already compiled."""
    size = parse_size(args.size)
    head = "pretraining" if kind == "train" else "vqa"
    batch = make_batch(batch_size, size, captions=args.captions, text_len=args.text_len, head=head, device=args.device)
    steps = {mode: (train_step_fn(model, optimizers, batch, args.device, mode) if kind == "train"
                    else infer_step_fn(model, batch, args.device, mode)) for mode in modes}
    warmup = max(args.warmup, 2) if any(m.startswith("compile") for m in modes) else args.warmup
    results = interleaved_calls(steps, warmup, args.repeat, args.device, memory,
                                on_error=lambda: release_memory(optimizers, args.device))
    rows = []
    for mode, res in results.items():
        row = {"model": model_name, "input": f"{size[0]}x{size[1]}", "batch": batch_size}
        if kind == "train":
            row["captions"] = args.captions
        row["mode"] = mode
        if "error" in res:
            rows.append({**row, "note": f"failed: {res['error']}"})
            continue
        times = res["times"]
        p50, p95 = float(np.percentile(times, 50)), float(np.percentile(times, 95))
        if kind == "train":
            row.update({"step_ms_p50": 1e3 * p50, "images/s": batch_size / p50,
                        "pairs/s": batch_size * args.captions / p50})
        else:
            row.update({"latency_ms_p50": 1e3 * p50, "latency_ms_p95": 1e3 * p95, "pairs/s": batch_size / p50})
        if flops_per_sample:
            row.update({"GFLOP/img": flops_per_sample / 1e9,
                        "achieved_GFLOP/s": flops_per_sample * batch_size / p50 / 1e9})
        row.update({"peak_MiB": res["peak_mib"], "repeats": len(times)})
        if mode.startswith("compile"):
            row["compile_s"] = res["first_s"]
        rows.append(row)
    return rows


def breakdown(model_name: str, model, optimizers, batch_size: int, mode: str, args) -> dict:
    """Profiled training step split by module; the visual dictionary includes the MVM logits."""
    size = parse_size(args.size)
    batch = make_batch(batch_size, size, captions=args.captions, text_len=args.text_len, head="pretraining",
                       device=args.device, seed=1)
    step = train_step_fn(model, optimizers, batch, args.device, mode)
    vq = model.neck.vq
    parts = {"forward": model, "backbone": model.backbone, "neck": model.neck, "visual_dictionary": vq,
             "fusion_bert": model.bert, "head": model.head}
    targets = [(module, "forward", f"soho/{name}") for name, module in parts.items()]
    targets.append((vq, "cosine_logits", "soho/visual_dictionary"))  # MVM logits against the entries
    labels = [f"soho/{name}" for name in parts] + ["backward", "optimizer"]
    with labelled(targets):
        shares = profile_shares(step, labels, args.device, steps=args.profile_steps)
    vd = shares["soho/visual_dictionary"]
    return {"model": model_name, "input": f"{size[0]}x{size[1]}", "batch": batch_size, "mode": mode,
            "profiled_step_ms": 1e3 * shares["step_s"],
            **{f"{label.removeprefix('soho/')}_share": shares[label] for label in labels},
            "VD<5%": "yes" if vd < VD_TARGET else "NO"}


def flops_per_sample(model_name: str, kind: str, model, optimizers, args) -> float | None:
    """FLOPs of one step at batch 1 (training: forward + backward; inference: forward), fp32 eager."""
    head = "pretraining" if kind == "train" else "vqa"
    batch = make_batch(1, parse_size(args.size), captions=args.captions, text_len=args.text_len, head=head,
                       device=args.device, seed=2)
    step = (train_step_fn(model, optimizers, batch, args.device, "eager") if kind == "train"
            else infer_step_fn(model, batch, args.device, "eager"))
    try:
        return float(count_flops(step))
    except Exception as e:  # noqa: BLE001  (a counter failure must not stop the timings)
        print(f"note: FLOP count failed for {model_name} {kind}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def run_rows(args, modes: list[str], flops: dict, emit, want_breakdown: bool,
             kinds: tuple[str, ...] = ("train", "infer")) -> None:
    """Measure every (model, kind, batch, mode) in ``modes``; ``emit(section, row)`` receives each row."""
    memory = PeakMemory(args.device)
    batch_lists = {"train": args.train_batch_list, "infer": args.infer_batch_list}
    for name in args.model_list:
        for kind in kinds:
            batches = batch_lists[kind]
            if not batches:
                continue
            model = build_soho(name, "pretraining" if kind == "train" else "vqa", args.device)
            optimizers = build_optimizers(model, _omegaconf(OPTIMIZER)) if kind == "train" else []
            key = f"{name}/{kind}"
            if key not in flops:
                flops[key] = flops_per_sample(name, kind, model, optimizers, args)
            if any(m.startswith("compile") for m in modes):
                compile_model(model, args.compile_scope)
            for b in batches:
                try:
                    for row in measure(name, kind, model, optimizers, b, modes, args, memory, flops[key]):
                        emit(kind, row)
                except Exception as e:  # noqa: BLE001  (report and go on: a benchmark never crashes)
                    release_memory(optimizers, args.device)
                    for mode in modes:
                        emit(kind, {"model": name, "input": args.size, "batch": b, "mode": mode,
                                    "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                if not (want_breakdown and kind == "train"):
                    continue
                for mode in (m for m in modes if m in ("eager", "bf16")):
                    try:
                        emit("breakdown", breakdown(name, model, optimizers, b, mode, args))
                    except Exception as e:  # noqa: BLE001
                        release_memory(optimizers, args.device)
                        emit("breakdown", {"model": name, "input": args.size, "batch": b, "mode": mode,
                                           "note": f"failed: {type(e).__name__}: {e}"})
            del model, optimizers
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


def release_memory(optimizers, device: str) -> None:
    """After a failed step (e.g. out of memory): drop partial gradients and cached device blocks."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _omegaconf(d: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create(d)


# --------------------------------------------------------------------------------- compile worker
def run_compile_child(args, modes: list[str], flops: dict) -> list[tuple[str, dict]]:
    """Compiled modes in a child process under ``--compile_budget`` seconds; rows it did not finish are
    reported as skipped (compilation on a few CPU cores can take minutes)."""
    spec = {**{k: v for k, v in vars(args).items() if k not in ("worker",)}, "modes_run": modes,
            "flops": flops}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    rows: list[tuple[str, dict]] = []
    stderr_tail: list[str] = []
    env = dict(os.environ)
    cache = tempfile.mkdtemp(prefix="soho_inductor_") if args.fresh_compile_cache else None
    if cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    # own process group: a timeout also ends the inductor compile workers the child started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)

    def read_stdout():
        for line in proc.stdout:
            if line.startswith("ROW "):
                section, row = json.loads(line[4:])
                rows.append((section, row))

    def read_stderr():
        for line in proc.stderr:
            stderr_tail.append(line.rstrip())
            del stderr_tail[:-20]

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in readers:
        t.start()
    reason = None
    try:
        proc.wait(timeout=args.compile_budget)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reason = f"skipped: compile budget of {args.compile_budget:.0f} s used up (raise --compile_budget)"
    for t in readers:
        t.join(timeout=5)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    if reason is None and proc.returncode != 0:
        last = next((line for line in reversed(stderr_tail) if line.strip()), "no message")
        reason = f"skipped: compile worker exited {proc.returncode}: {last[:160]}"
    done = {(s, r.get("model"), r.get("batch"), r.get("mode")) for s, r in rows}
    for name in args.model_list:
        for kind, batches in (("train", args.train_batch_list), ("infer", args.infer_batch_list)):
            for mode in modes:
                for b in batches:
                    if (kind, name, b, mode) not in done:
                        rows.append((kind, {"model": name, "input": args.size, "batch": b, "mode": mode,
                                            "note": reason or "skipped: not reached"}))
    return rows


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    args = argparse.Namespace(**spec)
    if args.threads:
        torch.set_num_threads(args.threads)

    def emit(section, row):
        print("ROW " + json.dumps([section, row], default=str), flush=True)

    # inference first: it compiles faster than the training step, so a short budget still measures it
    run_rows(args, spec["modes_run"], spec["flops"], emit, want_breakdown=False,
             kinds=("infer", "train"))


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="CPU smoke sizes (r18_3l, 320x480, batch 1 and 2, 3 repeats)")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--size", default=None, help="HxW of the real image (padded to /32); default 600x1000")
    p.add_argument("--train_batches", default=None, help="comma list of images per training step; default 1,32")
    p.add_argument("--infer_batches", default=None, help="comma list of images per forward; default 1,32")
    p.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--captions", type=int, default=4, help="captions per image in pretraining (release sentence_group 4)")
    p.add_argument("--text_len", type=int, default=16, help="tokens per caption / question")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per row (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first, the first one is compile_s (default 2)")
    p.add_argument("--profile_steps", type=int, default=1, help="profiled steps per breakdown row")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--compile_budget", type=float, default=None, help="seconds for all compiled rows (default 1800; --quick 60)")
    p.add_argument("--compile_scope", choices=("blocks", "model"), default="blocks")
    p.add_argument("--fresh_compile_cache", action="store_true", help="compile with an empty inductor cache (cold)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.models = a.models or ("r18_3l" if q else "r18_3l,r101_12l")
    a.size = a.size or ("320x480" if q else "600x1000")
    a.train_batches = a.train_batches or ("1,2" if q else "1,32")
    a.infer_batches = a.infer_batches or ("1,2" if q else "1,32")
    a.modes = a.modes or ("eager,bf16,compile" if q else ",".join(MODES))
    a.repeat = a.repeat or (3 if q else 10)
    a.warmup = a.warmup or (1 if q else 2)
    a.compile_budget = a.compile_budget or (60.0 if q else 1800.0)
    a.model_list = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in a.model_list if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {', '.join(MODELS)}")
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.mode_list if m not in MODES]
    if bad:
        raise SystemExit(f"unknown --modes {bad}; choose from {', '.join(MODES)}")
    a.train_batch_list = [int(b) for b in a.train_batches.split(",") if b.strip()]
    a.infer_batch_list = [int(b) for b in a.infer_batches.split(",") if b.strip()]
    a.size = "{}x{}".format(*parse_size(a.size))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch.cuda.is_available() is False; use --device cpu")
    return a


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dev = args.device
    first_peaks = matmul_peaks(dev)
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    info = {"device": device_tag(dev), "gpu": gpu, "threads": torch.get_num_threads(), "size": args.size,
            "captions": args.captions, "text_len": args.text_len,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if gpu else None, "peak_memory": PeakMemory(dev).kind}

    sections: dict[str, list[dict]] = {"train": [], "infer": [], "breakdown": []}
    flops: dict = {}

    def emit(section, row):
        sections[section].append(row)

    eager_modes = [m for m in args.mode_list if not m.startswith("compile")]
    compile_modes = [m for m in args.mode_list if m.startswith("compile")]
    run_rows(args, eager_modes, flops, emit, want_breakdown=True)
    if compile_modes:
        t0 = time.perf_counter()
        for section, row in run_compile_child(args, compile_modes, flops):
            sections[section].append(row)
        info["compile_wall_s"] = time.perf_counter() - t0

    peaks = {k: max(v, matmul_peaks(dev)[k]) for k, v in first_peaks.items()}  # a busy machine lowers one of them
    info.update({"matmul_n": MATMUL_N[dev.startswith("cuda")], "matmul_peak_fp32_GFLOP/s": peaks["fp32"] / 1e9,
                 "matmul_peak_bf16_GFLOP/s": peaks["bf16"] / 1e9})
    for rows in (sections["train"], sections["infer"]):  # speed-up of each mode over eager, same model/batch
        eager = {(r["model"], r["batch"]): r for r in rows if r.get("mode") == "eager" and "note" not in r}
        for r in rows:
            ref = eager.get((r["model"], r["batch"]))
            metric = "step_ms_p50" if "step_ms_p50" in r else "latency_ms_p50"
            if ref and metric in r:
                r["speedup_vs_eager"] = ref[metric] / r[metric]
        rows.sort(key=lambda r: (args.model_list.index(r["model"]), r["batch"], args.mode_list.index(r["mode"])))
        add_peak_fractions(rows, peaks, lambda r: "bf16" if r["mode"].endswith("bf16") else "fp32")
    tables = [
        print_table("SOHO benchmark setup", tidy_numbers([info])),
        print_table(f"SOHO training: pretraining head (MLM+MVM+ITM), {args.captions} captions/image, "
                    f"{args.text_len} tokens ({dev}, {torch.get_num_threads()} threads)", tidy_numbers(sections["train"])),
        print_table(f"SOHO inference: VQA head, 1 question/image, {args.text_len} tokens, no_grad "
                    f"({dev}, {torch.get_num_threads()} threads)", tidy_numbers(sections["infer"])),
        print_table("SOHO training step breakdown (profiled; shares of step time; target: visual dictionary < 5%)",
                    tidy_numbers(sections["breakdown"])),
    ]
    notes = [("GFLOP/img: FlopCounterMode at batch 1 (train: fwd+bwd; infer: fwd); frac_of_matmul_peak uses the "
             "fp32 or bf16 square-matmul peak of this run (the higher of a measurement before and after the rows)"),
             f"peak_MiB: {PeakMemory(dev).kind}",
             (f"compile modes: torch.compile scope '{args.compile_scope}' in a child process, budget "
             f"{args.compile_budget:.0f} s; compile_s = first call, "
             f"{'cold inductor cache' if args.fresh_compile_cache else 'inductor cache as found (warm after a first run)'}")]
    for line in notes:
        print(f"note: {line}")
    info["wall_s"] = time.perf_counter() - t_start
    path = write_json("soho", {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "setup": info,
                               "flops_per_sample": flops, **sections, "notes": notes, "tables": tables}, dev)
    print(f"wrote {path} ({info['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
