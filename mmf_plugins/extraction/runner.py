"""The resumable feature-extraction job: list images, skip what is done, decode, batch, extract, write.

Plays the part of MMF's ``tools/scripts/features/extract_features_vinvl.py`` loop (sorted image list minus
what the output folder already holds, sliced by ``--start_index/--end_index``) and of scene_graph_benchmark's
``test_sg_net.py`` data path. Deliberate differences:

* image ids are file stems; two files with one stem (recursive walks) are reported, the second is skipped;
* sharding ``i/n`` takes every n-th image of the sorted, de-duplicated list (deterministic, balanced);
* resuming asks the writer (``writer.exists(id)``); writers are atomic per record, so a ``kill -9`` at any
  moment loses nothing already written and a re-run finishes the rest with no duplicates;
* images decode in DataLoader workers through ``ImageDatabase`` (corrupt, truncated, zero-byte, unreadable
  or over-size files raise ``ImageDecodeError``); every bad file is counted with its reason and the job
  goes on; huge JPEGs are downscaled while decoding (``oversize="downscale"``) and their boxes mapped back
  to original pixels;
* batches group images of one decoded size (``bucketing="size"``, the default): no image is ever padded
  for another, so its features do not depend on which images shared its batch and a resumed run equals an
  uninterrupted one; ``bucketing="aspect"`` groups by orientation only (detectron2's
  ``AspectRatioGroupedDataset``: fuller batches, but zero padding changes features near the border). At most
  ``4 * batch_size`` decoded images wait in buckets; beyond that the fullest bucket runs as a smaller batch.
  A batch that fails is retried image by image to isolate the bad one;
* records are written by a background thread behind a bounded queue, so extraction never waits on disk;
* a JSON summary (``done``, ``skipped_existing``, ``failed`` [{path, reason}], ``duplicates``, timing) is
  written atomically at the end (also after Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000


# ----------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class ImageItem:
    image_id: str
    path: str


@dataclass
class ImageListing:
    items: list[ImageItem]
    duplicates: list[dict] = field(default_factory=list)  # [{path, reason, image_id}]


def _walk(image_dir: Path, recursive: bool, extensions: Sequence[str]) -> list[str]:
    exts = tuple(e.lower() for e in extensions)
    if recursive:
        found = []
        for root, dirs, files in os.walk(image_dir, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(root, f) for f in files if f.lower().endswith(exts) and not f.startswith("."))
        return found
    with os.scandir(image_dir) as it:
        return [e.path for e in it if e.name.lower().endswith(exts) and not e.name.startswith(".") and e.is_file()]


def list_images(
    image_dir: str | os.PathLike | None = None,
    image_list: str | os.PathLike | None = None,
    *,
    recursive: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageListing:
    """Images to process, sorted by path, with file stems as ids (first path in sorted order wins a stem).

    ``image_list``: a text file with one path per line (blank lines and ``#`` comments ignored), relative to
    ``image_dir`` when given, else to the list file's folder; listed paths are taken as they are (a missing
    or non-image file fails later with its reason). Without ``image_list``, ``image_dir`` is walked for files
    with an image extension (``recursive`` descends into sub-folders).
    """
    if image_dir is None and image_list is None:
        raise ValueError("nothing to extract: give --image_dir DIR and/or --image_list FILE")
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(f"--image_dir {image_dir} is not a folder")
    if image_list is not None:
        list_path = Path(image_list)
        if not list_path.is_file():
            raise FileNotFoundError(f"--image_list {image_list} not found; expected a text file with one image path per line")
        base = Path(image_dir) if image_dir is not None else list_path.parent
        paths = []
        for line in list_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                paths.append(line if os.path.isabs(line) else str(base / line))
    else:
        paths = _walk(Path(image_dir), recursive, extensions)
    paths.sort()
    items, duplicates, owner = [], [], {}
    for p in paths:
        image_id = Path(p).stem
        if image_id in owner:
            duplicates.append(
                {
                    "path": p,
                    "image_id": image_id,
                    "reason": f"duplicate image id '{image_id}' (file stem): already taken by {owner[image_id]}; skipped",
                }
            )
            continue
        owner[image_id] = p
        items.append(ImageItem(image_id, p))
    return ImageListing(items, duplicates)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ValueError(f"invalid shard {spec!r}; expected 'i/n' with 0 <= i < n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"invalid shard {spec!r}; expected 'i/n' with 0 <= i < n, e.g. 0/4")
    return index, count


def shard_listing(listing: ImageListing, index: int, count: int) -> ImageListing:
    """Every ``count``-th item starting at ``index``; each duplicate goes with the shard of the id it repeats."""
    position = {item.image_id: i for i, item in enumerate(listing.items)}
    items = listing.items[index::count]
    dups = [d for d in listing.duplicates if position[d["image_id"]] % count == index]
    return ImageListing(items, dups)


# ------------------------------------------------------------------------------------- boxes
def load_boxes_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Boxes per image id (file stem), xyxy pixels.

    Accepts a COCO instances json (``images`` + ``annotations`` with ``bbox`` = [x, y, w, h]; ids are the
    stems of ``file_name``; images without annotations get no boxes) or ``{image_id: [[x1, y1, x2, y2], ...]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--boxes {path} not found; expected a COCO instances json or {{image_id: [[x1,y1,x2,y2], ...]}}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--boxes {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):  # bad file content: a ValueError for the CLI
        raise ValueError(  # noqa: TRY004
            f"--boxes {path}: expected a JSON object (COCO instances or {{image_id: boxes}}), got {type(data).__name__}"
        )
    if "images" in data and "annotations" in data:
        stems = {img["id"]: Path(img["file_name"]).stem for img in data["images"]}
        grouped: dict[str, list] = {stem: [] for stem in stems.values()}
        for ann in data["annotations"]:
            if ann["image_id"] not in stems:
                raise ValueError(f"--boxes {path}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
            x, y, w, h = ann["bbox"]
            grouped[stems[ann["image_id"]]].append([x, y, x + w, y + h])
    else:
        grouped = data
    out = {}
    for image_id, boxes in grouped.items():
        t = torch.as_tensor(boxes, dtype=torch.float32) if len(boxes) else torch.zeros((0, 4))
        if t.dim() != 2 or t.shape[1] != 4:
            raise ValueError(f"--boxes {path}: boxes of image '{image_id}' must be a list of [x1, y1, x2, y2], got shape {tuple(t.shape)}")
        out[str(image_id)] = t
    return out


# ------------------------------------------------------------------------------------ decode
def _identity(x):
    return x


def original_size(path: str, decoded_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the file as stored (EXIF orientation applied), read from the header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            return h, w
    except Exception:  # noqa: BLE001  header unreadable by PIL although decoding worked: trust the decoded size
        return decoded_hw


class ImageDecodeDataset(Dataset):
    """Decodes ``items[i]`` in a DataLoader worker: dict with ``index``, ``image`` (uint8 RGB or None),
    ``size`` (original H, W) and ``error`` (reason string or None)."""

    def __init__(self, items: Sequence[ImageItem], max_pixels: int = DEFAULT_MAX_PIXELS, oversize: str = "downscale"):
        from mmf_plugins.datasets.databases.image_database import ImageDatabase

        self.items = list(items)
        self.max_pixels = int(max_pixels)
        self.db = ImageDatabase(max_pixels=max_pixels, oversize=oversize)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        from mmf_plugins.datasets.databases.image_database import ImageDecodeError

        path = self.items[index].path
        out = {"index": index, "image": None, "size": None, "error": None}
        try:
            img = self.db.load(path)
        except ImageDecodeError as e:
            out["error"] = e.reason
            return out
        except Exception as e:  # noqa: BLE001  unreadable path, permission, I/O error: count it, never stop the job
            out["error"] = f"{type(e).__name__}: {e}"
            return out
        h, w = int(img.shape[1]), int(img.shape[2])
        # only a downscaled decode (ImageDatabase oversize="downscale") differs from the stored size
        out["size"] = original_size(path, (h, w)) if h * w * 4 >= self.max_pixels else (h, w)
        out["image"] = img
        return out


# ---------------------------------------------------------------------------------- summary
@dataclass
class ExtractionSummary:
    done: int = 0
    skipped_existing: int = 0
    failed: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    listed: int = 0
    to_process: int = 0
    interrupted: bool = False
    aborted: str | None = None
    timing: dict = field(default_factory=dict)
    job: dict = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and self.aborted is None

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        t = self.timing
        return (
            f"done {self.done}, skipped (existing) {self.skipped_existing}, failed {len(self.failed)}, "
            f"duplicates {len(self.duplicates)} of {self.listed} listed in {t.get('wall_s', 0):.1f}s "
            f"({t.get('images_per_s', 0):.2f} images/s)"
        )


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- writing
class BackgroundWriter:
    """Writes records on a thread behind a bounded queue; failures are reported through ``on_error``."""

    _STOP = object()

    def __init__(self, writer, maxsize: int, on_done, on_error):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self.on_done, self.on_error = on_done, on_error
        self.busy_s = 0.0
        self.thread = threading.Thread(target=self._loop, name="feature-writer", daemon=True)
        self.thread.start()

    def put(self, image_id: str, record: dict, path: str) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the feature writer thread stopped unexpectedly; see the log above")
        self.queue.put((image_id, record, path))

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._STOP:
                return
            image_id, record, path = item
            start = time.perf_counter()
            try:
                self.writer.write(image_id, record)
            except Exception as e:  # noqa: BLE001  a record that cannot be written is a failure of that image, not of the job
                self.on_error(path, f"write failed: {type(e).__name__}: {e}")
            else:
                self.on_done(path)
            self.busy_s += time.perf_counter() - start

    def close(self) -> None:
        self.queue.put(self._STOP)
        self.thread.join()


# ------------------------------------------------------------------------------------- runner
class ExtractionRunner:
    """Runs one extraction job; see :func:`run_extraction`."""

    def __init__(
        self,
        extractor,
        writer,
        *,
        boxes: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        resume: bool = True,
        max_failures: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        oversize: str = "downscale",
        write_queue_size: int = 64,
        progress: bool = True,
        bucketing: str = "size",
    ):
        if bucketing not in ("size", "aspect"):
            raise ValueError(f"bucketing must be 'size' (batch-invariant features) or 'aspect', got {bucketing!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_failures is not None and max_failures < 0:
            raise ValueError(f"max_failures must be >= 0 (or None for no limit), got {max_failures}")
        self.extractor, self.writer = extractor, writer
        self.boxes = boxes
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.resume, self.max_failures = resume, max_failures
        self.max_pixels, self.oversize = int(max_pixels), oversize
        self.write_queue_size, self.progress = int(write_queue_size), progress
        self.bucketing = bucketing
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- bookkeeping
    def _fail(self, path: str, reason: str) -> None:
        with self._lock:
            self.summary.failed.append({"path": path, "reason": reason})
            if self.pbar is not None:
                self.pbar.update(1)
                self.pbar.set_postfix(skipped=self.summary.skipped_existing, failed=len(self.summary.failed), refresh=False)

    def _done(self, path: str) -> None:
        with self._lock:
            self.summary.done += 1
            if self.pbar is not None:
                self.pbar.update(1)

    def _over_budget(self) -> bool:
        return self.max_failures is not None and len(self.summary.failed) > self.max_failures

    # ---------------------------------------------------------------- batches
    def _boxes_for(self, sample: dict, item: ImageItem) -> torch.Tensor | None:
        if self.boxes is None:
            return None
        b = self.boxes[item.image_id]
        h, w = sample["size"]
        dh, dw = sample["image"].shape[1:]
        if (dh, dw) != (h, w):  # decoded at reduced size: boxes into decoded pixels
            b = b * b.new_tensor([dw / w, dh / h, dw / w, dh / h])
        return b

    def _extract(self, samples: list[dict], items: Sequence[ImageItem]) -> list[tuple[dict, dict]]:
        images = [s["image"] for s in samples]
        boxes = None if self.boxes is None else [self._boxes_for(s, items[s["index"]]) for s in samples]
        start = time.perf_counter()
        records = self.extractor(images, boxes)
        self.extract_s += time.perf_counter() - start
        if len(records) != len(samples):
            raise RuntimeError(f"extractor returned {len(records)} records for {len(samples)} images")
        return list(zip(samples, records))

    def _run_batch(self, samples: list[dict], items: Sequence[ImageItem], sink: BackgroundWriter) -> None:
        try:
            pairs = self._extract(samples, items)
        except Exception as e:  # noqa: BLE001  any failure (bad image, OOM) costs one image, never the job
            if len(samples) == 1:
                self._fail(items[samples[0]["index"]].path, f"extractor error: {type(e).__name__}: {e}")
                return
            logger.warning("batch of %d failed (%s: %s); retrying image by image", len(samples), type(e).__name__, e)
            for s in samples:  # isolate the image that breaks the batch
                self._run_batch([s], items, sink)
            return
        for sample, record in pairs:
            item = items[sample["index"]]
            h, w = sample["size"]
            dh, dw = sample["image"].shape[1:]
            if (dh, dw) != (h, w) and record.get("bbox") is not None:  # back to original pixels
                record["bbox"] = torch.as_tensor(record["bbox"]) * torch.tensor([w / dw, h / dh, w / dw, h / dh])
            record["image_width"], record["image_height"] = w, h
            sink.put(item.image_id, record, item.path)

    # ---------------------------------------------------------------- main loop
    def run(self, listing: ImageListing, job: dict | None = None, summary_path: str | os.PathLike | None = None) -> ExtractionSummary:
        self.summary = ExtractionSummary(listed=len(listing.items) + len(listing.duplicates), duplicates=list(listing.duplicates))
        self.summary.job = dict(job or {})
        self.summary.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.pbar = None
        self.extract_s = 0.0
        t0 = time.perf_counter()
        todo: list[ImageItem] = []
        for item in listing.items:
            if self.resume and self.writer.exists(item.image_id):
                self.summary.skipped_existing += 1
            elif self.boxes is not None and item.image_id not in self.boxes:
                self.summary.failed.append(
                    {"path": item.path, "reason": f"no boxes for image id '{item.image_id}' in the boxes file"}
                )
            else:
                todo.append(item)
        self.summary.to_process = len(todo)
        logger.info(
            "%d images listed, %d already written, %d to extract, %d duplicate ids skipped",
            len(listing.items), self.summary.skipped_existing, len(todo), len(listing.duplicates),
        )
        sink = BackgroundWriter(self.writer, self.write_queue_size, self._done, self._fail)
        wait_s = 0.0
        try:
            if todo:
                from tqdm import tqdm

                self.pbar = tqdm(total=len(todo), unit="img", dynamic_ncols=True, disable=not self.progress, smoothing=0.1)
                self.pbar.set_postfix(skipped=self.summary.skipped_existing, failed=len(self.summary.failed), refresh=False)
                loader = DataLoader(
                    ImageDecodeDataset(todo, self.max_pixels, self.oversize),
                    batch_size=None,
                    shuffle=False,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    prefetch_factor=max(2, self.batch_size) if self.num_workers > 0 else None,
                )
                buckets: dict[tuple, list[dict]] = {}
                buffered, max_buffered = 0, max(4 * self.batch_size, self.batch_size + 1)
                it = iter(loader)
                while True:
                    start = time.perf_counter()
                    sample = next(it, None)
                    wait_s += time.perf_counter() - start
                    if sample is None:
                        break
                    if sample["error"] is not None:
                        self._fail(todo[sample["index"]].path, sample["error"])
                    else:
                        h, w = sample["image"].shape[1:]
                        key = (h, w) if self.bucketing == "size" else (w >= h,)
                        buckets.setdefault(key, []).append(sample)
                        buffered += 1
                        if len(buckets[key]) == self.batch_size or buffered > max_buffered:
                            key = key if len(buckets[key]) == self.batch_size else max(buckets, key=lambda k: len(buckets[k]))
                            batch = buckets.pop(key)
                            buffered -= len(batch)
                            self._run_batch(batch, todo, sink)
                    if self._over_budget():
                        self.summary.aborted = f"more than max_failures={self.max_failures} images failed"
                        logger.error("stopping: %s", self.summary.aborted)
                        break
                if self.summary.aborted is None:
                    for batch in buckets.values():
                        self._run_batch(batch, todo, sink)
        except KeyboardInterrupt:
            self.summary.interrupted = True
            logger.warning("interrupted; records already queued are still written, the rest resumes next run")
        finally:
            sink.close()
            if hasattr(self.writer, "flush"):
                self.writer.flush()
            if self.pbar is not None:
                self.pbar.close()
            wall = time.perf_counter() - t0
            self.summary.timing = {
                "wall_s": round(wall, 3),
                "images_per_s": round(self.summary.done / wall, 3) if wall > 0 else 0.0,
                "extract_s": round(self.extract_s, 3),
                "wait_for_decode_s": round(wait_s, 3),
                "write_s": round(sink.busy_s, 3),
            }
            self.summary.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
            if summary_path is not None:
                write_json_atomic(summary_path, self.summary.to_dict())
        return self.summary


def run_extraction(
    extractor,
    writer,
    listing: ImageListing,
    *,
    summary_path: str | os.PathLike | None = None,
    job: dict | None = None,
    **options,
) -> ExtractionSummary:
    """Extract features for ``listing`` with ``extractor`` into ``writer`` (which stays open; close it after).

    Options: ``boxes`` ({image_id: (N, 4) tensor}), ``batch_size``, ``num_workers``, ``resume``,
    ``max_failures`` (stop once more images failed; None = never), ``max_pixels`` / ``oversize`` (huge images),
    ``write_queue_size``, ``progress``, ``bucketing`` ("size": batch-invariant features; "aspect": fuller batches). The summary is written atomically to ``summary_path`` if given.
    """
    return ExtractionRunner(extractor, writer, **options).run(listing, job=job, summary_path=summary_path)


def default_summary_path(output_folder: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> Path:
    index, count = shard
    name = "extraction_summary.json" if count == 1 else f"extraction_summary.shard{index}of{count}.json"
    return Path(output_folder) / name


__all__ = [
    "IMAGE_EXTENSIONS",
    "ExtractionRunner",
    "ExtractionSummary",
    "ImageItem",
    "ImageListing",
    "default_summary_path",
    "list_images",
    "load_boxes_file",
    "parse_shard",
    "run_extraction",
    "shard_listing",
    "write_json_atomic",
]
