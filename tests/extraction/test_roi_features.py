"""RoI features on a C4 trunk + C5 head against direct crop-and-pool computations."""

import torch
import torch.nn.functional as F
from torch import nn

from mmf_plugins.modules.roi_features import (
    ResNetC4Trunk,
    RoIFeatureExtractor,
    build_torchvision_resnet,
)


def _c4(seed=0, c=5, h=12, w=15):
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_aligned_roi_on_exact_grid_is_a_crop():
    c4 = _c4()
    ex = RoIFeatureExtractor(nn.Sequential(nn.Conv2d(5, 4, 1)), output_size=6, sampling_ratio=1, aligned=True)
    box = torch.tensor([[16.0 * 3, 16.0 * 2, 16.0 * 9, 16.0 * 8]])  # feature cells x 3..8, y 2..7
    pooled = ex.pool(c4, [box])
    assert torch.allclose(pooled[0], c4[0, :, 2:8, 3:9], atol=1e-6)
    # adaptive sampling (ratio 0) on a 2-cell-per-bin grid = 2x2 average pooling of the crop
    ex2 = RoIFeatureExtractor(nn.Sequential(nn.Conv2d(5, 4, 1)), output_size=3, sampling_ratio=0, aligned=True)
    assert torch.allclose(ex2.pool(c4, [box])[0], F.avg_pool2d(c4[:, :, 2:8, 3:9], 2)[0], atol=1e-6)


def test_legacy_unaligned_roi_samples_between_cells():
    # aligned=False (maskrcnn-benchmark / VinVL): no half-pixel shift, so bin centres fall between cells
    c4 = _c4(1)
    ex = RoIFeatureExtractor(nn.Sequential(nn.Conv2d(5, 4, 1)), output_size=4, sampling_ratio=1, aligned=False)
    box = torch.tensor([[16.0 * 2, 16.0 * 3, 16.0 * 6, 16.0 * 7]])
    manual = F.avg_pool2d(c4[:, :, 3:8, 2:7], kernel_size=2, stride=1)  # mean of the 4 neighbours
    assert torch.allclose(ex.pool(c4, [box]), manual, atol=1e-6)


def test_whole_map_box_is_bilinear_upsampling():
    c4 = _c4(2, h=5, w=7)
    ex = RoIFeatureExtractor(nn.Sequential(nn.Conv2d(5, 4, 1)), output_size=10, sampling_ratio=1, aligned=True)
    ex.output_size = (10, 14)
    box = torch.tensor([[0.0, 0.0, 16.0 * 7, 16.0 * 5]])
    up = F.interpolate(c4, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(ex.pool(c4, [box]), up, atol=1e-5)


def test_extractor_runs_head_and_pools_in_box_order():
    torch.manual_seed(0)
    c4 = torch.randn(2, 8, 10, 10)
    head = nn.Sequential(nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU())
    ex = RoIFeatureExtractor(head, output_size=4, sampling_ratio=1, aligned=True, roi_chunk_size=2)
    boxes = [torch.tensor([[0.0, 0, 64, 64], [32, 16, 96, 80]]), torch.tensor([[16.0, 16, 80, 80]])]
    out = ex(c4, boxes)
    crops = torch.stack([c4[0, :, 0:4, 0:4], c4[0, :, 1:5, 2:6], c4[1, :, 1:5, 1:5]])
    assert out.shape == (3, 6)
    assert torch.allclose(out, head(crops).mean(dim=(2, 3)), atol=1e-5)
    assert ex(c4, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 6)


def test_c4_trunk_reuses_torchvision_modules():
    resnet = build_torchvision_resnet("resnet18")
    trunk = ResNetC4Trunk.from_torchvision(resnet).eval()
    x = torch.randn(1, 3, 64, 80)
    expected = resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))))
    assert torch.equal(trunk(x), expected) and trunk(x).shape == (1, 256, 4, 5)
    assert trunk.out_channels == 256 and "stem.conv1.weight" in trunk.state_dict()
