"""GridBackbone: torchvision parity, freezing, norm modes, checkpointing, local pretrained weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mmf_plugins.modules.grid_backbones import GridBackbone, SyncBatchNorm2d


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and avoids OpenMP spin-waits when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchvision_c5(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _randomise_bn(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_matches_torchvision_and_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    _randomise_bn(ref)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)  # includes fc.*, which is ignored
    x = torch.randn(2, 3, 70, 101)
    ref.eval()
    expected = _torchvision_c5(ref, x)
    for mode in ("train", "frozen", "sync"):
        bb = GridBackbone(arch="resnet18", pretrained=str(path), norm_mode=mode).eval()
        assert bb.out_channels == 512 and bb.stride == 32
        out = bb(x)
        assert out.shape == (2, 512, 3, 4)  # ceil(70/32), ceil(101/32)
        # frozen BN folds (x - mean) / sqrt(var + eps) * w + b into x * scale + shift: fp32 rounding only
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4, msg=mode)
    frozen = GridBackbone(arch="resnet18", norm_mode="frozen")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert sum(isinstance(m, SyncBatchNorm2d) for m in GridBackbone(arch="resnet18", norm_mode="sync").modules()) == 20


def test_bad_weights_and_options_raise():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        GridBackbone(arch="resnet18", pretrained="/nonexistent/nope.pth")
    with pytest.raises(ValueError, match="local files"):
        GridBackbone(arch="resnet18", pretrained="https://download.pytorch.org/models/resnet18.pth")
    with pytest.raises(ValueError, match="resnet18"):
        GridBackbone(arch="resnet19")
    with pytest.raises(ValueError, match="norm_mode"):
        GridBackbone(arch="resnet18", norm_mode="group")
    with pytest.raises(ValueError, match="checkpoint_stages"):
        GridBackbone(arch="resnet18", checkpoint_stages=["layer5"])


def test_wrong_architecture_file_is_rejected(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="unexpected"):
        GridBackbone(arch="resnet18", pretrained=str(path))


def test_frozen_stages_stay_frozen_under_train():
    bb = GridBackbone(arch="resnet18", frozen_stages=2)
    bb.train()
    assert not bb.conv1.weight.requires_grad and not bb.layer2[0].conv1.weight.requires_grad
    assert bb.layer3[0].conv1.weight.requires_grad
    assert not bb.bn1.training and not bb.layer2[1].bn2.training and bb.layer3[0].bn1.training
    running = bb.layer1[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(bb.layer1[0].bn1.running_mean, running)
    assert bb.conv1.weight.grad is None and bb.layer3[0].conv1.weight.grad is not None
    names = {id(p) for p in bb.trainable_parameters()}
    assert id(bb.layer3[0].conv1.weight) in names and id(bb.layer2[0].conv1.weight) not in names
    # a temporary full freeze and its release
    bb.set_trainable(False)  # requires_grad untouched (DDP), but no graph and BN statistics frozen
    assert bb.layer4[0].conv1.weight.requires_grad and not bb.layer4[0].bn1.training
    running = bb.layer4[0].bn1.running_mean.clone()
    assert not bb(torch.randn(2, 3, 64, 64)).requires_grad
    assert torch.equal(bb.layer4[0].bn1.running_mean, running)
    bb.set_trainable(True)
    assert bb.layer4[0].conv1.weight.requires_grad and bb.layer4[0].bn1.training and not bb.conv1.weight.requires_grad


def test_checkpointing_and_channels_last_keep_values_and_gradients():
    torch.manual_seed(0)
    plain = GridBackbone(arch="resnet18", norm_mode="frozen")
    ckpt = GridBackbone(arch="resnet18", norm_mode="frozen", checkpoint_stages=True, channels_last=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    a, b = plain.train()(x), ckpt.train()(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # channels_last reorders the fp32 sums
    a.square().mean().backward()
    b.square().mean().backward()
    torch.testing.assert_close(plain.layer2[0].conv1.weight.grad, ckpt.layer2[0].conv1.weight.grad, rtol=1e-4, atol=1e-5)


def test_bottleneck_and_resnext_widths():
    with torch.device("meta"):
        assert GridBackbone(arch="resnet50").out_channels == 2048
        assert GridBackbone(arch="resnext50_32x4d").out_channels == 2048
        assert GridBackbone(arch="resnet50", num_stages=3).out_channels == 1024
