"""Scenes of the generated ``shapes`` corpus: what is in each image, and how it is drawn.

A scene is a non-square RGB canvas (320-800 px per side) with a mildly textured background and 1-6
flat geometric objects. Each object has four attributes drawn from small closed vocabularies (shape,
color, size, texture) and a position; objects never overlap, so every ground-truth box holds exactly
one object and spatial relations are read off the box centres (as in CLEVR).

Determinism: sampling and drawing use only the ``numpy.random.Generator`` passed in and PIL drawing
calls; JPEGs are written with fixed settings and no metadata, so the same seed gives the same bytes.

Deliberate differences from real photos (COCO): no occlusion, no rotation, axis-aligned shapes, and a
closed attribute vocabulary. That is what makes the answers computable from the scene, so the demo
tasks can be checked and learned in minutes on a CPU.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SHAPE_PLURALS = {s: s + "s" for s in SHAPES}
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (240, 130, 25),
    "cyan": (30, 190, 205),
    "brown": (120, 75, 35),
}
SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "gray": (192, 192, 190),
    "beige": (226, 212, 186),
    "white": (238, 238, 234),
    "pale blue": (205, 216, 232),
    "pale green": (208, 224, 204),
}
# Attribute kinds in the order adjectives are spoken ("large red striped circle").
ATTRIBUTE_KINDS = ("size", "color", "texture", "shape")
KIND_VALUES = {"size": SIZES, "color": tuple(COLORS), "texture": TEXTURES, "shape": SHAPES}

MIN_SIDE, MAX_SIDE = 320, 800
MAX_OBJECTS = 6
JPEG_QUALITY = 88
_SUPERSAMPLE = 3  # masks are drawn at 3x and box-filtered down: anti-aliased edges


def _regular(points: int, radius_of, start_deg: float) -> tuple[tuple[float, float], ...]:
    return tuple(
        (radius_of(k) * math.cos(math.radians(start_deg + 360.0 * k / points)),
         radius_of(k) * math.sin(math.radians(start_deg + 360.0 * k / points)))
        for k in range(points)
    )


# Unit outlines (image coordinates: +y is down), scaled by the object's radius r.
UNIT_POLYGONS = {
    "circle": _regular(48, lambda k: 1.0, 0.0),
    "square": ((-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)),
    "triangle": ((0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)),
    "star": _regular(10, lambda k: 1.0 if k % 2 == 0 else 0.45, -90.0),
    "diamond": ((0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)),
    "hexagon": _regular(6, lambda k: 1.0, 0.0),
}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: attributes plus centre ``(cx, cy)`` and radius ``r`` in pixels."""

    shape: str
    color: str
    size: str
    texture: str
    cx: float
    cy: float
    r: float

    def attribute(self, kind: str) -> str:
        return getattr(self, kind)

    def polygon(self) -> list[tuple[float, float]]:
        """Outline in image pixels (a 48-gon for circles)."""
        return [(self.cx + self.r * x, self.cy + self.r * y) for x, y in UNIT_POLYGONS[self.shape]]

    @cached_property
    def bbox(self) -> tuple[float, float, float, float]:
        """Tight box ``(x1, y1, x2, y2)`` in pixels, rounded to 1/100 px."""
        if self.shape == "circle":
            box = (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)
        else:
            xs, ys = zip(*self.polygon())
            box = (min(xs), min(ys), max(xs), max(ys))
        return tuple(round(v, 2) for v in box)

    @cached_property
    def center(self) -> tuple[float, float]:
        """Centre of the box (what relations compare: a model sees boxes, not outlines)."""
        x1, y1, x2, y2 = self.bbox
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)

    @property
    def area(self) -> float:
        """Polygon area (shoelace) in square pixels."""
        pts = self.polygon()
        s = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))
        return round(abs(s) / 2.0, 2)


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    width: int
    height: int
    background: str
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    @property
    def file_name(self) -> str:
        return f"shapes_{self.split}_{self.image_id:012d}.jpg"


def sample_scene(rng: np.random.Generator, image_id: int, split: str) -> Scene:
    """Sample sizes, background and 1-6 non-overlapping objects.

    Attributes are uniform, except that with probability 0.35 a new object copies one attribute of an
    earlier one, so "same color?" and counts above one occur often enough to be learned.
    """
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    while abs(width - height) < 24:  # keep every image visibly non-square
        height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    side = min(width, height)
    objects: list[ShapeObject] = []
    for _ in range(wanted):
        attrs = {kind: values[int(rng.integers(len(values)))] for kind, values in KIND_VALUES.items()}
        if objects and rng.random() < 0.35:
            kind = ATTRIBUTE_KINDS[int(rng.integers(len(ATTRIBUTE_KINDS)))]
            attrs[kind] = objects[int(rng.integers(len(objects)))].attribute(kind)
        if attrs["size"] == "small":
            r = side * float(rng.uniform(0.055, 0.07))
        else:
            r = side * float(rng.uniform(0.11, 0.14))
        for _attempt in range(80):
            cx = float(rng.uniform(r + 6, width - r - 6))
            cy = float(rng.uniform(r + 6, height - r - 6))
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + 8 for o in objects):
                objects.append(ShapeObject(cx=round(cx, 2), cy=round(cy, 2), r=round(r, 2), **attrs))
                break
    return Scene(image_id, split, width, height, background, tuple(objects))


def _mask(obj: ShapeObject, origin: tuple[int, int], patch: tuple[int, int], shrink: float) -> Image.Image:
    """Anti-aliased 'L' mask of ``obj`` scaled by ``shrink`` about its centre, in patch coordinates."""
    s = _SUPERSAMPLE
    big = Image.new("L", (patch[0] * s, patch[1] * s), 0)
    draw = ImageDraw.Draw(big)
    ox, oy = origin
    r = obj.r * shrink
    if obj.shape == "circle":
        draw.ellipse([(obj.cx - r - ox) * s, (obj.cy - r - oy) * s, (obj.cx + r - ox) * s, (obj.cy + r - oy) * s], fill=255)
    else:
        pts = [((obj.cx + r * x - ox) * s, (obj.cy + r * y - oy) * s) for x, y in UNIT_POLYGONS[obj.shape]]
        draw.polygon(pts, fill=255)
    return big.resize(patch, Image.Resampling.BOX)


def _texture(obj: ShapeObject, patch: tuple[int, int], phase: int) -> Image.Image:
    """Fill pattern of ``obj`` over the patch: the object colour plus a light tint of it."""
    w, h = patch
    color = np.array(COLORS[obj.color], np.float32)
    light = color * 0.35 + 255.0 * 0.65
    if obj.texture == "solid":
        return Image.new("RGB", patch, tuple(int(c) for c in color))
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(6, round(obj.r * 0.42))
    if obj.texture == "striped":
        light_px = ((xx + yy + phase) // max(3, period // 2)) % 2 == 1
    elif obj.texture == "dotted":
        dx = (xx + phase) % period - period / 2.0
        dy = (yy + phase) % period - period / 2.0
        light_px = dx * dx + dy * dy < (period * 0.27) ** 2
    else:  # checkered
        light_px = ((xx + phase) // period + (yy + phase) // period) % 2 == 1
    out = np.where(light_px[..., None], light, color)
    return Image.fromarray(out.astype(np.uint8), "RGB")


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw the scene: textured background, each object (dark outline + pattern fill), then grain."""
    w, h = scene.width, scene.height
    # Background: a coarse 5x7 grid (tint + random blotches + a soft linear lighting ramp) upsampled
    # bicubically by PIL, which is as smooth as computing it per pixel and far cheaper.
    gy, gx = np.meshgrid(np.linspace(-1, 1, 5, dtype=np.float32), np.linspace(-1, 1, 7, dtype=np.float32), indexing="ij")
    angle = float(rng.uniform(0, 2 * math.pi))
    ramp = (np.cos(angle) * gx + np.sin(angle) * gy) * 7.0
    shade = rng.normal(0.0, 8.0, size=(5, 7, 1)) + rng.normal(0.0, 2.5, size=(5, 7, 3))  # mostly luminance
    coarse = np.array(BACKGROUNDS[scene.background], np.float32) + shade + ramp[..., None]
    image = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.bbox
        ox, oy = max(0, math.floor(x1) - 2), max(0, math.floor(y1) - 2)
        patch = (min(w, math.ceil(x2) + 2) - ox, min(h, math.ceil(y2) + 2) - oy)
        outline = max(1.5, obj.r * 0.06)
        dark = tuple(int(c * 0.55) for c in COLORS[obj.color])
        image.paste(dark, (ox, oy, ox + patch[0], oy + patch[1]), _mask(obj, (ox, oy), patch, 1.0))
        inner = _mask(obj, (ox, oy), patch, max(0.5, (obj.r - outline) / obj.r))
        image.paste(_texture(obj, patch, int(rng.integers(0, 16))), (ox, oy), inner)
    # fine luminance grain over everything, -3..+3 (kept mild so JPEGs stay small)
    grain = Image.fromarray(rng.integers(0, 7, size=(h, w), dtype=np.uint8), "L")
    return ImageChops.add(image, Image.merge("RGB", (grain, grain, grain)), scale=1.0, offset=-3)


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes with fixed settings and no metadata (same image -> same bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling="4:2:0")
    return buf.getvalue()
