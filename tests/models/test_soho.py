"""SOHO: visual dictionary, neck blocks, every head, optimizer groups, and the official-checkpoint converter.

Tiny configs only (ResNet-18 on 128x192 images -> a 2x3 grid, 2 BERT layers of width 64, a 32-entry
dictionary, a 100-word vocabulary); no network, no tokenizer.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mmf_plugins.common.sample import Sample, collate
from mmf_plugins.models.base_model import build_model
from mmf_plugins.models.soho import modeling_soho  # noqa: F401  (registers "soho")
from mmf_plugins.models.soho.convert_soho import convert, make_official_state_dict
from mmf_plugins.models.soho.modeling_soho import (
    SohoModel,
    grid_valid_mask,
    sample_mvm_mask,
    sine_position_encoding,
)
from mmf_plugins.models.soho.visual_dictionary import VisualDictionary
from mmf_plugins.zoo.conversion import load_state_dict_with_report

VOCAB, HIDDEN, LAYERS, HEADS, FFN, MAXPOS, DICT = 100, 64, 2, 4, 128, 32, 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and avoids OpenMP spin-waits when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(head: str = "pretraining", **extra) -> dict:
    cfg = {
        "training_head_type": head,
        "backbone": {"arch": "resnet18", "frozen_stages": -1},
        "visual_embedding": {"num_embeddings": DICT, "mvm_mask_prob": 1.0},
        "bert": {"num_hidden_layers": LAYERS, "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                 "intermediate_size": FFN, "max_position_embeddings": MAXPOS, "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0},
        "num_answers": 10,
        "vqa_head_dropout": 0.0,
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def make_batch(head: str, batch_size: int = 4, seed: int = 0, small: bool = False, sizes=None):
    """Hand-built samples with images of two sizes (so collate pads and adds image_mask): 128x192 and
    96x160 (a 2x3 grid), or 64x96 and 64x80 with ``small`` (a 1x1 grid, for the fast training loops)."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or ([(64, 96), (64, 80)] if small else [(128, 192), (96, 160)])
    samples = []
    for i in range(batch_size):
        h, w = sizes[i % len(sizes)]
        ids = torch.randint(5, VOCAB, (10,), generator=g)
        ids[0], ids[-1] = 1, 2  # [CLS] ... [SEP]
        s = Sample(image=torch.randn(3, h, w, generator=g), input_ids=ids, input_mask=torch.ones(10, dtype=torch.long),
                   segment_ids=torch.zeros(10, dtype=torch.long))
        if head == "pretraining":
            lm = torch.full((10,), -1)
            lm[2 + i % 3] = int(ids[2 + i % 3])
            s.lm_label_ids, s.is_correct = lm, i % 2
        elif head == "vqa":
            t = torch.zeros(10)
            t[i % 10] = 1.0
            t[(i + 3) % 10] = 0.3
            s.targets = t
        elif head == "retrieval":
            s.is_correct = i % 2
        elif head == "nlvr2":
            s.image_1 = torch.randn(3, *((64, 96) if small else (128, 160)), generator=g)
            s.targets = i % 2
        elif head == "snli_ve":
            s.targets = i % 3
        samples.append(s)
    batch = collate(samples, dataset_name="toy", dataset_type="train")
    if head == "nlvr2":  # collate masks only 'image'; image_1 all the same size here
        batch.image_1_mask = torch.ones(batch.image_1.shape[0], *batch.image_1.shape[-2:], dtype=torch.bool)
    return batch


# ------------------------------------------------------------------------------------- visual dictionary
def test_vd_assignment_equals_brute_force():
    torch.manual_seed(0)
    vd = VisualDictionary(32, 16)
    x = torch.randn(300, 16) * 1.5
    brute = torch.cdist(x.double(), vd.embed.double()).argmin(1)
    assert torch.equal(vd.assign(x), brute)
    assert torch.allclose(vd.distances(x), torch.cdist(x, vd.embed) ** 2, atol=1e-3)


def test_vd_ema_update_matches_hand_computation_and_straight_through():
    vd = VisualDictionary(3, 2, decay=0.4, eps=1e-5)
    vd.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    vd.cluster_size.copy_(torch.tensor([2.0, 1.0, 0.0]))
    vd.embed_avg.copy_(torch.tensor([[2.0, 2.0], [10.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    vd.train()
    q, ids = vd(x)
    assert ids.tolist() == [0, 1, 0, 0]
    # by hand: n = [3, 1, 0], sums = [[1, 1], [9, 1], [0, 0]]
    cs = [0.4 * 2 + 0.6 * 3, 0.4 * 1 + 0.6 * 1, 0.0]  # 2.6, 1.0, 0
    avg = [[0.4 * 2 + 0.6 * 1] * 2, [0.4 * 10 + 0.6 * 9, 0.4 * 0 + 0.6 * 1], [0.0, 0.0]]
    total = sum(cs)
    smoothed = [(c + 1e-5) / (total + 3 * 1e-5) * total for c in cs]
    expected = torch.tensor([[a / s for a in row] for row, s in zip(avg, smoothed)])
    assert torch.allclose(vd.cluster_size, torch.tensor(cs))
    assert torch.allclose(vd.embed_avg, torch.tensor(avg))
    assert torch.allclose(vd.embed, expected, atol=1e-6)
    assert vd.cluster_sum.tolist() == [3.0, 1.0, 0.0]
    # output = the (updated) entry; gradient = identity (straight-through)
    assert torch.allclose(q, expected[[0, 1, 0, 0]], atol=1e-6)
    (q * torch.arange(8.0).view(4, 2)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).view(4, 2))


def test_vd_paper_rule_eval_mode_and_empty_steps():
    vd = VisualDictionary(3, 2, decay=0.25, update_rule="paper")
    vd.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    x = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 1.0]])
    vd.train()
    vd(x)
    # entry 0 <- 0.25*0 + 0.75*mean([1,1],[3,1]); entry 1 <- 0.25*[10,0] + 0.75*[9,1]; entry 2 unused
    assert torch.allclose(vd.embed, torch.tensor([[1.5, 0.75], [9.25, 0.75], [0.0, 10.0]]))
    before = vd.embed.clone()
    vd(x, valid=torch.zeros(3, dtype=torch.bool))  # nothing valid: codebook untouched, no NaN
    assert torch.equal(vd.embed, before)
    vd.eval()
    vd(x * 3)
    assert torch.equal(vd.embed, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked child: stay out of the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)  # different initial codebooks: rank 0's must win
        vd = VisualDictionary(8, 4, decay=0.4).train()
        torch.manual_seed(100)
        rank0_init = torch.randn(8, 4)
        data = torch.randn(world_size, 30, 4, generator=torch.Generator().manual_seed(7)) * 2
        valid = torch.arange(30) % 5 != 0
        _, ids = vd(data[rank], valid=valid)
        torch.save({"ids": ids, "rank0_init": rank0_init, **{k: v.clone() for k, v in vd.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vd_distributed_reduction_equals_global_computation(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers need nothing the parent has not imported (spawn would re-import this module)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ref = VisualDictionary(8, 4, decay=0.4).train()
    ref.embed.copy_(r0["rank0_init"])
    data = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(7)) * 2
    valid = (torch.arange(30) % 5 != 0).repeat(2)
    _, ref_ids = ref(data.reshape(60, 4), valid=valid)
    for r in (r0, r1):
        for key in ("embed", "cluster_size", "cluster_sum", "embed_avg"):
            assert torch.allclose(r[key], getattr(ref, key), atol=1e-5), key
    assert torch.equal(torch.cat([r0["ids"], r1["ids"]]), ref_ids)
    assert float(r0["cluster_sum"].sum()) == 48.0  # 2 ranks x 24 valid positions


# ------------------------------------------------------------------------------------- neck blocks
def test_mvm_mask_statistics():
    torch.manual_seed(0)
    b, h, w = 4000, 3, 4
    ids = torch.randint(0, 3, (b, h, w))
    valid = torch.rand(b, h, w) > 0.2
    masked = sample_mvm_mask(ids, valid, 0.25, "shared")
    assert not (masked & ~valid).any()
    per_sample = masked.flatten(1)
    hit = per_sample.any(1)
    # every masked position of a sample carries the same id, and all valid positions with that id are masked
    for i in torch.nonzero(hit).flatten()[:200].tolist():
        chosen = ids[i][masked[i]].unique()
        assert chosen.numel() == 1
        assert torch.equal(masked[i], (ids[i] == chosen) & valid[i])
    # a sample is masked with probability 0.25 x P(shared location valid) = 0.25 x 0.8
    assert abs(hit.float().mean().item() - 0.2) < 0.03
    # paper variant with probability 1: every sample with a valid position gets masked
    masked = sample_mvm_mask(ids, valid, 1.0, "per_sample")
    assert torch.equal(masked.flatten(1).any(1), valid.flatten(1).any(1))


def test_grid_valid_mask_release_quirk_and_exact():
    image_mask = torch.zeros(3, 96, 160, dtype=torch.bool)
    image_mask[0] = True
    image_mask[1, :70, :100] = True
    image_mask[2, :96, :40] = True
    # the release: a square of side = padded height, ones over [:img_h, :img_w], nearest-resized
    square = torch.zeros(3, 1, 96, 96)
    for i, (ih, iw) in enumerate([(96, 160), (70, 100), (96, 40)]):
        square[i, 0, :ih, :iw] = 1
    for hw in [(2, 3), (5, 7), (1, 1)]:
        expected = F.interpolate(square, size=hw)[:, 0].bool()
        assert torch.equal(grid_valid_mask(image_mask, hw, "release"), expected)
        exact = F.interpolate(image_mask[:, None].float(), size=hw)[:, 0].bool()
        assert torch.equal(grid_valid_mask(image_mask, hw, "exact"), exact)


def test_sine_position_encoding_matches_formula():
    valid = torch.tensor([[[True, True, False], [True, True, False]]])
    dim = 8
    pos = sine_position_encoding(valid, dim)
    half = dim // 2
    for i in range(2):
        for j in range(3):
            y = (i + 1) / (2 + 1e-6) * 2 * math.pi if j < 2 else 0.0  # column 2 is padding: cumsum 0
            x = (min(j + 1, 2) / (2 + 1e-6)) * 2 * math.pi
            for c in range(half):
                t = 10000 ** (2 * (c // 2) / half)
                f = math.sin if c % 2 == 0 else math.cos
                assert pos[0, c, i, j].item() == pytest.approx(f(y / t), abs=1e-5)
                assert pos[0, half + c, i, j].item() == pytest.approx(f(x / t), abs=1e-5)


# ------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("head", ["pretraining", "vqa", "retrieval", "nlvr2", "snli_ve"])
def test_head_forward_backward_and_loss_falls(head):
    torch.manual_seed(0)
    extra = {"visual_embedding": {"mvm_mask_prob": 0.0}} if head == "pretraining" else {}
    # the whole trunk frozen (frozen_stages=4) keeps the loop fast; backbone gradients are tested below
    model = build_model("soho", tiny_config(head, backbone={"frozen_stages": 4}, **extra))
    model.train()
    batch = make_batch(head, small=True)
    out = model(batch)
    expected = {"pretraining": {"mlm", "mvm", "itm"}, "vqa": {"logit_bce"}, "retrieval": {"itm"},
                "nlvr2": {"cross_entropy"}, "snli_ve": {"cross_entropy"}}[head]
    assert {k.split("/")[-1] for k in out["losses"]} == expected
    assert all(k.startswith("train/toy/") for k in out["losses"])
    assert all(torch.isfinite(v) for v in out["losses"].values())
    rows = {"pretraining": (4, 2), "vqa": (4, 10), "retrieval": (4,), "nlvr2": (4, 2), "snli_ve": (4, 3)}[head]
    assert tuple(out["scores"].shape) == rows
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(14):
        out = model(batch)
        loss = sum(out["losses"].values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_pretraining_gradients_mvm_and_edge_cases():
    torch.manual_seed(0)
    model = build_model("soho", tiny_config("pretraining"))  # mvm_mask_prob 1: every pair masked
    model.train()
    batch = make_batch("pretraining")
    batch.is_correct = torch.zeros_like(batch.is_correct)  # all-negative ITM batch
    out = model(batch)
    labels, ids, valid = out["mvm_labels"], out["vd_ids"], out["visual_mask"].bool()
    assert (labels >= 0).any()
    assert torch.equal(labels[labels >= 0], ids[labels >= 0]) and not (labels >= 0)[~valid].any()
    sum(out["losses"].values()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0  # straight-through reaches the stem
    assert model.neck.mask_emb.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in out["losses"].values())
    # nothing masked -> MVM loss exactly 0 (not NaN) and still differentiable; tiny images are padded
    model.neck.mvm_mask_prob = 0.0
    batch.image = batch.image[..., :20, :30]
    batch.image_mask = batch.image_mask[..., :20, :30]
    out = model(batch)
    mvm = next(v for k, v in out["losses"].items() if k.endswith("/mvm"))
    assert mvm.item() == 0.0 and out["grid_hw"] == (1, 1)
    sum(out["losses"].values()).backward()


def test_negatives_skip_mlm_when_paper_setting():
    torch.manual_seed(0)
    batch = make_batch("pretraining")
    batch.is_correct = torch.zeros_like(batch.is_correct)
    model = build_model("soho", tiny_config("pretraining", mlm_on_negatives=False))
    out = model(batch)
    assert next(v for k, v in out["losses"].items() if k.endswith("/mlm")).item() == 0.0


def test_grouped_captions_equal_repeated_images():
    torch.manual_seed(0)
    model = build_model("soho", tiny_config("retrieval")).eval()
    batch = make_batch("retrieval", batch_size=2)
    k = 3
    grouped = dict(batch)
    for f in ("input_ids", "input_mask", "segment_ids"):
        grouped[f] = torch.stack([batch[f], batch[f].flip(1), batch[f]], dim=1)  # (B, K, T)
    grouped["is_correct"] = batch.is_correct[:, None].expand(2, k)
    flat = dict(batch)
    flat["image"] = batch.image.repeat_interleave(k, 0)
    flat["image_mask"] = batch.image_mask.repeat_interleave(k, 0)
    for f in ("input_ids", "input_mask", "segment_ids", "is_correct"):
        flat[f] = grouped[f].flatten(0, 1)
    with torch.no_grad():
        a, b = model(grouped), model(flat)
    assert a["scores"].shape == (6,)
    assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_eval_shares_one_backbone_pass_per_image_id():
    torch.manual_seed(0)
    model = build_model("soho", tiny_config("vqa")).eval()
    batch = make_batch("vqa", batch_size=2)
    rows = torch.tensor([0, 0, 1, 0])  # four questions about two images
    repeated = dict(batch)
    for f in ("image", "image_mask", "input_ids", "input_mask", "segment_ids", "targets"):
        repeated[f] = batch[f][rows]
    seen = []
    hook = model.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        plain = model(repeated)["scores"]
        shared = model({**repeated, "image_id": torch.tensor([7, 7, 9, 7])})["scores"]
        clash = model({**repeated, "image_id": torch.tensor([7, 7, 7, 7])})["scores"]  # ids lie: pixels differ
    hook.remove()
    assert seen == [4, 2, 4]
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clash, plain, rtol=1e-5, atol=1e-5)
    model.train()
    model({**repeated, "image_id": torch.tensor([7, 7, 9, 7])})
    assert seen[-1] == 4  # training (BN batch statistics, random augmentation) never shares


def test_optimizer_groups_and_backbone_freeze():
    model = build_model("soho", tiny_config("vqa", backbone={"frozen_stages": 1}, freeze_backbone_epochs=2))
    groups = model.get_optimizer_parameters({"optimizer": {"params": {"lr": 2e-4}}})
    by_name = {g["name"]: g for g in groups}
    bb, rest = by_name["backbone"], by_name["default"]
    assert (bb["optimizer"], bb["lr"], bb["weight_decay"], bb["momentum"]) == ("sgd", pytest.approx(2e-2), 1e-4, 0.9)
    assert (rest["optimizer"], rest["lr"], rest["weight_decay"], rest["eps"]) == ("adamw", 2e-4, 0.01, 1e-6)
    stem_and_layer1 = (model.backbone.conv1, model.backbone.bn1, model.backbone.layer1)
    frozen_stage = {id(p) for m in stem_and_layer1 for p in m.parameters()}
    bb_ids = {id(p) for p in bb["params"]}
    assert not bb_ids & frozen_stage and {id(p) for p in model.backbone.layer4.parameters()} <= bb_ids
    everything = {id(p) for p in model.parameters()}
    assert bb_ids | {id(p) for p in rest["params"]} == everything - frozen_stage
    assert not bb_ids & {id(p) for p in rest["params"]}
    # first epochs: backbone frozen -> no gradient, BN statistics untouched
    model.train()
    running = model.backbone.layer4[0].bn1.running_mean.clone()
    out = model(make_batch("vqa"))
    sum(out["losses"].values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert torch.equal(model.backbone.layer4[0].bn1.running_mean, running)
    model.on_train_epoch_start(2)
    assert model.backbone.layer4[0].conv1.weight.requires_grad and not model.backbone.conv1.weight.requires_grad
    assert model.backbone.layer4[0].bn1.training and not model.backbone.bn1.training


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="trainig_head_type"):
        SohoModel({"trainig_head_type": "vqa"})
    with pytest.raises(ValueError, match="captioning"):
        SohoModel({"training_head_type": "captioning"})
    model = build_model("soho", tiny_config("vqa"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model({"image": torch.randn(3, 64, 64), "input_ids": torch.ones(1, 4, dtype=torch.long)})


# ------------------------------------------------------------------------------------- converter
def _official_reference(sd: dict, image, image_mask, input_ids, input_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's eval forward written directly on the official tensors (no MVM: mask_prob 0)."""
    g = lambda k: sd[k]
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=False)
    net.eval()
    with torch.no_grad():
        x = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(image))))))))

        def conv_bn(t, p):
            t = F.conv2d(t, g(f"{p}.conv.weight"))
            return F.batch_norm(t, g(f"{p}.bn.running_mean"), g(f"{p}.bn.running_var"), g(f"{p}.bn.weight"),
                                g(f"{p}.bn.bias"), False, 0.0, 1e-5)

        xq = conv_bn(F.max_pool2d(x, 2, stride=2), "neck.conv")
        b, c, h, w = xq.shape
        flat = xq.permute(0, 2, 3, 1).reshape(-1, c)
        emb = g("neck.vq.embed")
        dist = (flat ** 2).sum(1, keepdim=True) + (emb ** 2).sum(1) - 2 * flat @ emb.t()
        q = emb[dist.argmin(1)] @ g("neck.pos_line.weight").t() + g("neck.pos_line.bias")
        q = q.view(b, w * h, c).permute(0, 2, 1).reshape(b, c, h, w)
        gate = F.softmax(conv_bn(torch.cat([q, xq], 1), "neck.gate_fc"), dim=1)
        v = q * gate[:, 0:1] + xq * gate[:, 1:2]
        side = image.shape[-2]  # get_vis_mask: max pad_shape[0] for BOTH sides
        square = torch.zeros(b, 1, side, side)
        for i in range(b):
            ih, iw = int(image_mask[i].any(1).sum()), int(image_mask[i].any(0).sum())
            square[i, 0, :ih, :iw] = 1
        vmask = F.interpolate(square, size=(h, w)).bool()[:, 0]
        ye, xe = vmask.cumsum(1, dtype=torch.float32), vmask.cumsum(2, dtype=torch.float32)
        ye, xe = ye / (ye[:, -1:, :] + 1e-6) * 2 * math.pi, xe / (xe[:, :, -1:] + 1e-6) * 2 * math.pi
        dt = torch.arange(c // 2, dtype=torch.float32)
        dt = 10000 ** (2 * (dt // 2) / (c // 2))
        px, py = xe[..., None] / dt, ye[..., None] / dt
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        v = v + torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
        tokens = F.layer_norm(v.permute(0, 2, 3, 1), (c,), g("neck.ln.weight"), g("neck.ln.bias"), 1e-5).reshape(b, h * w, c)
        p = "language.bert"
        t = input_ids.shape[1]
        text = (g(f"{p}.embeddings.word_embeddings.weight")[input_ids] + g(f"{p}.embeddings.position_embeddings.weight")[:t]
                + g(f"{p}.embeddings.token_type_embeddings.weight")[0])
        text = F.layer_norm(text, (c,), g(f"{p}.embeddings.LayerNorm.weight"), g(f"{p}.embeddings.LayerNorm.bias"), 1e-12)
        hs = torch.cat([text, tokens], 1)
        additive = (1.0 - torch.cat([input_mask.float(), vmask.reshape(b, -1).float()], 1))[:, None, None, :] * -10000.0
        lin = lambda t_, k: t_ @ g(f"{k}.weight").t() + g(f"{k}.bias")
        for i in range(LAYERS):
            lp = f"{p}.encoder.layer.{i}"
            split = lambda t_: t_.view(b, -1, HEADS, c // HEADS).transpose(1, 2)
            qh, kh, vh = (split(lin(hs, f"{lp}.attention.self.{n}")) for n in ("query", "key", "value"))
            att = F.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(c // HEADS) + additive, dim=-1)
            ctx = (att @ vh).transpose(1, 2).reshape(b, -1, c)
            hs = F.layer_norm(lin(ctx, f"{lp}.attention.output.dense") + hs, (c,),
                              g(f"{lp}.attention.output.LayerNorm.weight"), g(f"{lp}.attention.output.LayerNorm.bias"), 1e-12)
            ff = lin(F.gelu(lin(hs, f"{lp}.intermediate.dense")), f"{lp}.output.dense")
            hs = F.layer_norm(ff + hs, (c,), g(f"{lp}.output.LayerNorm.weight"), g(f"{lp}.output.LayerNorm.bias"), 1e-12)
        return hs, hs[:, 0] @ g("head.match_class.weight").t()


def test_converter_maps_every_key_and_reproduces_official_forward():
    ckpt = make_official_state_dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, vocab_size=VOCAB,
                                    max_position_embeddings=MAXPOS, num_embeddings=DICT, seed=3)
    official = {k[7:]: v for k, v in ckpt["state_dict"].items()}
    model = build_model("soho", tiny_config("pretraining", visual_embedding={"mvm_mask_prob": 0.0},
                                            backbone={"frozen_stages": 1}))
    state, report = convert(ckpt, model=model)
    assert report.ok and not report.unused and not report.missing, report.summary()
    assert len(report.mapped) == len(official)
    load_state_dict_with_report(model, state, strict=True)
    # the meta-device target (no model given) agrees
    _, report2 = convert(ckpt, num_attention_heads=HEADS)
    assert not report2.unused and not report2.missing and report2.ok

    model.eval()
    batch = make_batch("pretraining", batch_size=2, seed=5, sizes=[(128, 192), (60, 100)])
    batch.pop("lm_label_ids"), batch.pop("is_correct")
    with torch.no_grad():
        out = model(batch)
        encoded = model.encode(batch.image, batch.image_mask, batch.input_ids, batch.input_mask, batch.segment_ids)
    hidden, itm = _official_reference(official, batch.image, batch.image_mask, batch.input_ids, batch.input_mask)
    assert not out["visual_mask"].bool().all()  # the padded image has masked grid cells
    assert torch.allclose(encoded["hidden"], hidden, atol=1e-4), (encoded["hidden"] - hidden).abs().max()
    assert torch.allclose(out["scores"], itm, atol=1e-4)


def test_converter_for_vqa_drops_dictionary_parts():
    ckpt = make_official_state_dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN, vocab_size=VOCAB,
                                    max_position_embeddings=MAXPOS, num_embeddings=DICT, mmcv_format=False)
    model = build_model("soho", tiny_config("vqa"))
    state, report = convert(ckpt, training_head_type="vqa", model=model)
    assert set(report.missing) == {"head.vqa.0.weight", "head.vqa.0.bias", "head.vqa.3.weight", "head.vqa.3.bias"}
    assert all(k.startswith(("neck.vq", "neck.gate_fc", "neck.pos_line", "neck.mask_emb",
                             "head.match_class")) for k in report.unused)
    assert len(report.unused) == 14
    loaded = load_state_dict_with_report(model, state)
    assert sorted(loaded.missing) == sorted(report.missing)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       ckpt["module.language.bert.embeddings.word_embeddings.weight"])
