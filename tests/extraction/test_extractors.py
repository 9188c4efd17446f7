"""grid and given_boxes extractors: features equal direct computations, boxes in original pixels, weights."""

import pytest
import torch

from mmf_plugins.common.registry import registry
from mmf_plugins.extraction.extractors import (
    GivenBoxesExtractor,
    GridFeatureExtractor,
    prepare_batch,
)
from mmf_plugins.zoo.conversion import CheckpointError


def _image(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_grid_features_and_cell_boxes():
    torch.manual_seed(0)
    ex = GridFeatureExtractor(backbone="resnet18", device="cpu", min_size=64, max_size=128)
    images = [_image(70, 100), _image(96, 64, 1)]
    recs = ex(images)
    batch, sizes = prepare_batch(images, min_size=64, max_size=128, normalization="imagenet", device=torch.device("cpu"), size_divisible=32)
    fmap = ex.net(batch)
    assert sizes == [(64, 91), (96, 64)]
    for i, (rec, (oh, ow)) in enumerate(zip(recs, sizes)):
        gh, gw = -(-oh // 32), -(-ow // 32)
        assert rec["num_boxes"] == gh * gw and rec["features"].shape == (gh * gw, 512)
        assert torch.allclose(rec["features"], fmap[i, :, :gh, :gw].flatten(1).t(), atol=1e-5)
        h, w = images[i].shape[1:]
        b = rec["bbox"]
        # cells tile the original image row by row
        assert torch.allclose(b[0], torch.tensor([0.0, 0.0, 32 * w / ow, 32 * h / oh]))
        assert torch.allclose(b[-1, 2:], torch.tensor([float(w), float(h)]))
        assert torch.allclose(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum(), torch.tensor(float(h * w)))
        assert (rec["image_height"], rec["image_width"]) == (h, w)
    assert registry.get_extractor_class("grid") is GridFeatureExtractor
    with pytest.raises(ValueError, match="takes no boxes"):
        ex(images, [torch.zeros(0, 4), torch.zeros(0, 4)])


def test_given_boxes_equal_crop_of_c4():
    torch.manual_seed(0)
    ex = GivenBoxesExtractor(backbone="resnet18", res5_dilation=1, aligned=True, add_image_box=True,
                             device="cpu", min_size=256, max_size=1000)
    img = _image(256, 320)  # short side = min_size: no resize, so boxes are in network pixels
    box = torch.tensor([[16.0, 32.0, 16.0 + 14 * 16, 32.0 + 14 * 16]])  # C4 cells x 1..14, y 2..15
    rec = ex([img], [box])[0]
    assert rec["num_boxes"] == 2
    assert torch.equal(rec["bbox"][0], torch.tensor([0.0, 0.0, 319.0, 255.0]))  # whole image first (VL-BERT)
    assert torch.equal(rec["bbox"][1], box[0])
    batch, _ = prepare_batch([img], min_size=256, max_size=1000, normalization="imagenet", device=torch.device("cpu"), size_divisible=16)
    c4 = ex.net.trunk(batch)
    direct = ex.net.box_head.head(c4[:, :, 2:16, 1:15]).mean(dim=(2, 3))[0]
    assert torch.allclose(rec["features"][1], direct, atol=1e-4)
    # the image box equals passing it explicitly; without add_image_box, boxes are required
    alone = GivenBoxesExtractor.__new__(GivenBoxesExtractor)
    alone.__dict__.update(ex.__dict__, add_image_box=False, boxes="required")
    again = alone([img], [rec["bbox"][:1]])[0]
    assert torch.allclose(again["features"][0], rec["features"][0], atol=1e-5)
    with pytest.raises(ValueError, match="needs boxes"):
        alone([img])


def test_given_boxes_scale_with_resize():
    torch.manual_seed(0)
    ex = GivenBoxesExtractor(backbone="resnet18", res5_dilation=1, device="cpu", min_size=64, max_size=200)
    base = _image(8, 12, 3)[None].float()  # smooth content, so resampling barely changes it
    small = torch.nn.functional.interpolate(base, size=(64, 96), mode="bilinear")[0].round().to(torch.uint8)
    big = torch.nn.functional.interpolate(base, size=(128, 192), mode="bilinear")[0].round().to(torch.uint8)
    box = torch.tensor([[10.0, 8.0, 60.0, 50.0]])
    a = ex([small], [box])[0]
    b = ex([big], [box * 2])[0]  # same content at twice the size: resized back to 64 px, same box
    assert torch.equal(b["bbox"], box * 2)
    assert torch.allclose(a["features"], b["features"], rtol=0.05, atol=0.05 * a["features"].abs().max())


def test_backbone_weights_from_torchvision_and_soho_files(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    ex = GridFeatureExtractor(backbone="resnet18", model_file=tmp_path / "r18.pth", device="cpu")
    assert torch.equal(ex.net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(ex.net.bn1.running_var, ref.bn1.running_var)
    # SOHO / mmcv checkpoint: trunk under backbone., wrapped in state_dict, with other heads around it
    soho = {"meta": {"epoch": 40}, "state_dict": {**{f"backbone.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")},
                                                  "neck.ln.weight": torch.ones(768)}}
    torch.save(soho, tmp_path / "soho.pth")
    ex = GivenBoxesExtractor(backbone="resnet18", res5_dilation=1, model_file=tmp_path / "soho.pth", device="cpu")
    assert torch.equal(ex.net.trunk.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
    with pytest.raises(CheckpointError, match="--backbone"):
        GridFeatureExtractor(backbone="resnet50", model_file=tmp_path / "r18.pth", device="cpu")
    with pytest.raises(ValueError, match="BasicBlocks"):
        GivenBoxesExtractor(backbone="resnet18", res5_dilation=2, device="cpu")


def test_precision_and_device_checks():
    ex = GridFeatureExtractor(backbone="resnet18", device="cpu", precision="bf16", min_size=32, max_size=64)
    rec = ex([_image(40, 50)])[0]
    assert rec["features"].dtype == torch.float32 and torch.isfinite(rec["features"]).all()
    with pytest.raises(ValueError, match="precision"):
        GridFeatureExtractor(backbone="resnet18", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            GridFeatureExtractor(backbone="resnet18", device="cuda")
