"""image processor: keep-ratio resize rule, normalization, flips (pixels and text), eval mode."""

import pytest
import torch

from mmf_plugins.processors.base_processor import build_processor
from mmf_plugins.processors.image_processors import keep_ratio_size, swap_left_right


@pytest.mark.parametrize(
    "hw, min_size, max_size, expected",
    [
        ((480, 640), 600, 1000, (600, 800)),   # short side -> 600
        ((2000, 400), 600, 1000, (1000, 200)),  # tall: long side hits max_size
        ((100, 300), 600, 1000, (333, 999)),   # wide: long side hits max_size, int truncation
        ((300, 700), 600, 1000, (429, 1001)),  # round() of the bound, then int(): the original's off-by-one
        ((300, 300), 600, 1000, (600, 600)),
        ((600, 900), 600, 1000, (600, 900)),   # already the right size
        ((375, 500), 600, None, (600, 800)),
    ],
)
def test_keep_ratio_size(hw, min_size, max_size, expected):
    assert keep_ratio_size(*hw, min_size, max_size) == expected


def _image(h, w):
    # distinct values everywhere so a flip is detectable
    x = torch.arange(w).view(1, 1, w).expand(3, h, w)
    y = torch.arange(h).view(1, h, 1).expand(3, h, w)
    return ((x * 7 + y * 3 + torch.arange(3).view(3, 1, 1) * 50) % 256).to(torch.uint8)


def test_resize_and_normalize():
    proc = build_processor({"type": "image", "params": {"min_size": 60, "max_size": 100}})
    image = torch.full((3, 40, 50), 128, dtype=torch.uint8)
    out = proc({"image": image})
    assert out["image"].shape == (3, 60, 75)
    assert out["image_size"] == (40, 50) and out["image_resized_size"] == (60, 75)
    assert out["image_scale"] == pytest.approx(1.5)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (128 / 255 - mean) / std
    assert torch.allclose(out["image"].mean(dim=(1, 2)), expected, atol=1e-5)
    tall = proc({"image": torch.zeros(3, 400, 80, dtype=torch.uint8)})
    assert tall["image"].shape == (3, 100, 20)  # max_size bound
    assert out["flipped"] is False


def test_to_bgr255():
    proc = build_processor({"type": "image", "params": {"min_size": 4, "max_size": None, "to_bgr255": True}})
    image = torch.stack([torch.full((4, 4), v, dtype=torch.uint8) for v in (200, 100, 50)])
    out = proc({"image": image})["image"]
    assert torch.allclose(out[:, 0, 0], torch.tensor([50 - 102.9801, 100 - 115.9465, 200 - 122.7717]), atol=1e-4)


def test_flip_mirrors_pixels_and_swaps_text():
    image = _image(32, 48)
    plain = build_processor({"type": "image", "params": {"min_size": 32, "max_size": None}})
    flip = build_processor({"type": "image", "params": {"min_size": 32, "max_size": None, "horizontal_flip": 1.0}})
    text = "Is the circle left of the square, right? LEFT"
    a = plain({"image": image, "text": text})
    b = flip({"image": image, "text": text})
    assert a["flipped"] is False and b["flipped"] is True
    assert torch.equal(b["image"], a["image"].flip(-1))
    assert b["text"] == "Is the circle right of the square, left? RIGHT"
    assert a["text"] == text
    assert swap_left_right("leftover Left") == "leftover Right"


def test_eval_mode_has_no_random_ops():
    spec = {"type": "image", "params": {"min_size": [20, 24, 28], "max_size": None, "horizontal_flip": 1.0}}
    train = build_processor(spec)
    torch.manual_seed(0)
    sizes = {train({"image": _image(10, 10)})["image"].shape[-1] for _ in range(30)}
    assert sizes == {20, 24, 28}
    for evaluator in (build_processor({**spec, "params": {**spec["params"], "train": False}}),
                      build_processor(spec, dataset_type="val")):
        outs = [evaluator({"image": _image(10, 10), "text": "left"}) for _ in range(5)]
        assert all(o["image"].shape == (3, 28, 28) and not o["flipped"] and o["text"] == "left" for o in outs)


def test_size_divisibility_pads_with_zeros():
    proc = build_processor({"type": "image", "params": {"min_size": 40, "max_size": None, "size_divisibility": 32}})
    out = proc({"image": _image(40, 50)})
    assert out["image"].shape == (3, 64, 64)
    assert out["image_resized_size"] == (40, 50)
    assert out["image"][:, 40:, :].abs().sum() == 0 and out["image"][:, :, 50:].abs().sum() == 0


def test_bad_input():
    proc = build_processor({"type": "image", "params": {}})
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        proc({"image": torch.zeros(4, 4, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="horizontal_flip"):
        build_processor({"type": "image", "params": {"horizontal_flip": 2}})
