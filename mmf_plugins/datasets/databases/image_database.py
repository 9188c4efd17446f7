"""ImageDatabase: decode one image file into an RGB ``uint8`` tensor ``[3, H, W]``.

Plays the part of MMF's ``mmf/datasets/databases/image_database.py`` (which opens files with PIL).
Deliberate differences:

* JPEG, PNG, GIF and WebP decode with ``torchvision.io.decode_image`` (libjpeg-turbo / libpng, EXIF
  orientation applied, result in ``ImageReadMode.RGB``); grayscale, palette, CMYK and RGBA become
  3-channel RGB (alpha is dropped, not composited) and 16-bit PNGs are scaled to 8 bits (v / 257);
* PIL is the fallback only for files torchvision cannot decode: formats it does not read (BMP, TIFF,
  PPM/PGM, ICO, and AVIF/HEIC where torchvision was built without them) and files its decoders reject
  (e.g. arithmetic-coded JPEG); a file both reject is corrupt;
* corrupt, truncated, zero-byte or too-small files raise ``ImageDecodeError`` (an ``OSError``, so
  ``BaseDataset`` counts and skips the item) naming the path and the reason;
* a ``max_pixels`` guard reads the size from the header first (PIL ``Image.open`` is lazy) and either
  refuses the image (default) or downscales it: JPEGs through libjpeg's DCT scaling (``Image.draft``),
  so the full-size bitmap is never materialised; other formats only when they are within PIL's own
  ``Image.MAX_IMAGE_PIXELS`` limit, else they are refused.

NOTE: torchvision 0.29 marks its image IO deprecated in favour of TorchCodec (not installed here);
``decode_image`` still ships and is the one call to change when the project moves.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Magic numbers of the formats torchvision.io.decode_image reads on every build.
_TORCHVISION_MAGIC = (
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"\x89PNG\r\n\x1a\n"),  # PNG
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (8, b"WEBP"),  # RIFF....WEBP
)


class ImageDecodeError(OSError):
    """An image file that cannot be decoded (corrupt, truncated, empty, unsupported or too large)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


def _torchvision_reads(head: bytes) -> bool:
    return any(head[off : off + len(magic)] == magic for off, magic in _TORCHVISION_MAGIC)


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:  # 16-bit PNG: 65535 -> 255
        return torch.div(img.to(torch.int32) + 128, 257, rounding_mode="floor").to(torch.uint8)
    raise TypeError(f"unexpected decoded dtype {img.dtype}")


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> uint8 [3, H, W] RGB."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: PIL's convert("RGB") would clip at 255; scale 16-bit range instead
        arr = np.array(im, dtype=np.int64)
        arr = np.clip((arr + 128) // 257, 0, 255).astype(np.uint8)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageDatabase:
    """Images under ``root``: ``load(path_or_name) -> uint8 [3, H, W]`` RGB.

    Args:
        root: folder that relative names are resolved against (``None``: names are paths).
        max_pixels: largest accepted ``W * H`` read from the header (default 100M).
        oversize: ``"refuse"`` (raise ``ImageDecodeError``) or ``"downscale"`` (fit into ``max_pixels``).
        min_side: smallest accepted image side in pixels (default 1).
        extensions: tried in order when a name has no file as given (``"COCO_..._9"`` -> ``.jpg``).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        max_pixels: int = 100_000_000,
        oversize: str = "refuse",
        min_side: int = 1,
        extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    ):
        if oversize not in ("refuse", "downscale"):
            raise ValueError(f"oversize must be 'refuse' or 'downscale', got {oversize!r}")
        if int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.root = os.fspath(root) if root is not None else None
        self.max_pixels = int(max_pixels)
        self.oversize = oversize
        self.min_side = int(min_side)
        self.extensions = tuple(extensions)

    # ------------------------------------------------------------------ paths
    def resolve(self, path_or_name: str | os.PathLike) -> str:
        """The file a name refers to; ``FileNotFoundError`` naming every path tried."""
        name = os.fspath(path_or_name)
        base = name if (self.root is None or os.path.isabs(name)) else os.path.join(self.root, name)
        tried = [base] + [base + ext for ext in self.extensions if not base.lower().endswith(ext)]
        for p in tried:
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(f"image not found: {name} (tried {', '.join(tried)})")

    def __contains__(self, path_or_name) -> bool:
        try:
            self.resolve(path_or_name)
        except FileNotFoundError:
            return False
        return True

    # ------------------------------------------------------------------ decode
    def load(self, path_or_name: str | os.PathLike) -> torch.Tensor:
        """Decode to ``uint8 [3, H, W]`` RGB, EXIF orientation applied."""
        path = self.resolve(path_or_name)
        with open(path, "rb") as f:
            data = bytearray(f.read())  # writable, so torch.frombuffer shares it without a copy
        if not data:
            raise ImageDecodeError(path, "zero-byte file")
        size = self._header_size(data)
        if size is not None and size[0] * size[1] > self.max_pixels:
            return self._check(path, self._load_oversize(path, size))
        if _torchvision_reads(data[:16]):
            try:
                img = decode_image(
                    torch.frombuffer(data, dtype=torch.uint8),
                    mode=ImageReadMode.RGB,
                    apply_exif_orientation=True,
                )
                return self._check(path, _to_uint8(img))
            except RuntimeError as e:
                tv_error = str(e).strip().splitlines()[-1]
        else:
            tv_error = None
        img = self._load_pil(path, tv_error)
        return self._check(path, img)

    __getitem__ = load

    def _check(self, path: str, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        if min(h, w) < self.min_side:
            raise ImageDecodeError(path, f"image is {w}x{h}, smaller than min_side={self.min_side}")
        if h * w > self.max_pixels:  # header lied or had no size
            raise ImageDecodeError(path, f"decoded image is {w}x{h} = {w * h} pixels > max_pixels={self.max_pixels}")
        return img

    @staticmethod
    def _header_size(data: bytes | bytearray) -> tuple[int, int] | None:
        """(W, H) from the header without decoding pixels; None when PIL cannot identify the file."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    return im.size
        except Image.DecompressionBombError:
            return (2**31, 2**31)  # beyond PIL's own limit: certainly over max_pixels
        except (OSError, ValueError, SyntaxError):  # not an image PIL knows: decide at decode time
            return None

    def _load_pil(self, path: str, tv_error: str | None, draft_to: tuple[int, int] | None = None) -> torch.Tensor:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if draft_to is not None and im.format == "JPEG":
                        im.draft("RGB", draft_to)  # libjpeg DCT scaling: decode at 1/2, 1/4 or 1/8 size
                    im.load()  # raises on truncated data
                    im = ImageOps.exif_transpose(im)
                    return _pil_to_tensor(im)
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(path, f"larger than PIL's MAX_IMAGE_PIXELS ({e})") from e
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
            reason = f"{type(e).__name__}: {e}"
            if tv_error:
                reason = f"torchvision: {tv_error}; PIL: {reason}"
            raise ImageDecodeError(path, reason) from e

    def _load_oversize(self, path: str, size: tuple[int, int]) -> torch.Tensor:
        w, h = size
        if self.oversize == "refuse":
            raise ImageDecodeError(
                path,
                f"image is {w}x{h} = {w * h} pixels > max_pixels={self.max_pixels}; raise max_pixels or use "
                "oversize='downscale'",
            )
        scale = math.sqrt(self.max_pixels / (w * h))
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))
        with Image.open(path) as probe:
            is_jpeg = probe.format == "JPEG"
        if not is_jpeg and w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
            raise ImageDecodeError(
                path, f"{w}x{h} non-JPEG image is too large to downscale safely (> PIL MAX_IMAGE_PIXELS)"
            )
        img = self._load_pil(path, None, draft_to=(tw, th))
        # EXIF rotation may have swapped the sides: fit the target to the decoded orientation
        if (img.shape[2] >= img.shape[1]) != (tw >= th):
            tw, th = th, tw
        if img.shape[1] * img.shape[2] > self.max_pixels:
            img = torch.nn.functional.interpolate(
                img[None].float(), size=(th, tw), mode="bilinear", antialias=True, align_corners=False
            )[0].round().clamp_(0, 255).to(torch.uint8)
        logger.info("%s: downscaled %dx%d -> %dx%d (max_pixels=%d)", path, w, h, img.shape[2], img.shape[1], self.max_pixels)
        return img
