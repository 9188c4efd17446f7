"""VL-BERT: embedding construction, geometry, region masking, truncation, every head, the converter of the
released checkpoints, the VCR / RefCOCO+ datasets and the refcoco metric.

Tiny configs (hidden 32, 2 layers, 16-d RoI features, 4 geometry frequencies), CPU, no network; the
datasets read a 12-image generated ``shapes`` corpus.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining

from mmf_plugins.common.sample import SampleList
from mmf_plugins.metrics.refcoco import RefCOCOAccuracy
from mmf_plugins.models.base_model import build_model
from mmf_plugins.models.vl_bert import modeling_vl_bert as M
from mmf_plugins.models.vl_bert.convert_vl_bert import (
    config_from_state_dict,
    convert_vl_bert,
    rename_vl_bert_key,
)
from mmf_plugins.processors.bbox_processors import geometry_embedding
from mmf_plugins.zoo.conversion import CheckpointError, load_state_dict_with_report

V, H, D, G, C = 60, 32, 16, 4, 7  # vocab, hidden, RoI feature dim, geometry frequencies, MVRC classes
TINY = {
    "vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 40, "visual_feature_dim": D, "geometry_dim": G, "visual_region_classes": C,
    "num_labels": 10, "classifier_pretrained": False,
}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "visual_dropout": 0.0,
              "classifier_dropout": 0.0}
E2E = {"visual_feature_mode": "e2e", "backbone": "resnet18", "res5_dilation": 1, "stride_in_1x1": False}
CLS, SEP, MASK = 1, 2, 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(head: str = "vqa", seed: int = 0, **kw) -> M.VLBertModel:
    torch.manual_seed(seed)
    return build_model("vl_bert", {**TINY, "training_head_type": head, **kw})


def make_batch(B=3, T=10, R=5, seed=0, counts=(5, 3, 0), has_image_box=None, **extra) -> SampleList:
    """Text ``[CLS] w.. [SEP] [MASK] [SEP]`` (segment 1 from the [MASK]), R padded regions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0] = CLS
    lengths = [T, T - 2, T - 1][:B] + [T] * max(0, B - 3)
    mask = torch.zeros(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, n - 3], ids[b, n - 2], ids[b, n - 1] = SEP, MASK, SEP
        ids[b, n:] = 0
        mask[b, :n] = 1
        seg[b, n - 2 : n] = 1
    xy = torch.rand(B, R, 2, generator=g) * 60
    wh = torch.rand(B, R, 2, generator=g) * 30 + 4
    info = {"bbox": torch.cat([xy, xy + wh], -1), "max_features": torch.tensor(list(counts)[:B]),
            "image_width": torch.full((B,), 100), "image_height": torch.full((B,), 80),
            "cls_prob": torch.softmax(torch.randn(B, R, C, generator=g), -1)}
    if has_image_box is not None:
        info["has_image_box"] = torch.full((B,), has_image_box)
    fields = {"input_ids": ids, "input_mask": mask, "segment_ids": seg,
              "image_feature_0": torch.randn(B, R, D, generator=g), "image_info_0": SampleList(info),
              "dataset_name": "toy", "dataset_type": "train"}
    fields.update(extra)
    return SampleList(fields)


def capture_embed(model):
    """Record the arguments and result of ``model.vlbert.embed``."""
    seen = {}
    original = model.vlbert.embed

    def wrapped(text, text_visual, obj_visual, obj_linguistic, obj_mask):
        seen.update(text=text, text_visual=text_visual, obj_visual=obj_visual, obj_linguistic=obj_linguistic,
                    obj_mask=obj_mask)
        out = original(text, text_visual, obj_visual, obj_linguistic, obj_mask)
        seen["embeddings"], seen["packed"] = out
        return out

    model.vlbert.embed = wrapped
    return seen


# ----------------------------------------------------------------------------------- embedding rules
def test_pack_sequence_layout_positions_types_and_end():
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    obj_mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    text_emb = torch.arange(8.0).view(2, 4, 1)  # values = flat index
    obj_emb = 100 + torch.arange(6.0).view(2, 3, 1)
    types = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    p = M.pack_sequence(text_emb, types, text_mask, obj_emb, obj_mask, torch.tensor([-1.0]))
    # N = max(3 + 2, 2 + 0) + 1; row 0: 3 words, 2 objects, [END]; row 1: 2 words, [END], padding
    assert p.embeddings[..., 0].tolist() == [[0, 1, 2, 100, 102, -1], [4, 5, -1, 0, 0, 0]]
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 3, 4]
    assert p.position_ids[1, :3].tolist() == [0, 1, 3]  # [END] is L + 1 even without objects
    assert p.token_type_ids[0].tolist() == [0, 0, 1, 2, 2, 2]
    assert p.token_type_ids[1, :3].tolist() == [0, 1, 2]
    assert p.attention_mask.tolist() == [[True] * 6, [True, True, True, False, False, False]]
    assert p.end_slots[0].tolist() == [False] * 5 + [True]


def test_embeddings_equal_the_release_rules_computed_by_hand():
    model = tiny("vqa", **NO_DROPOUT).eval()
    with torch.no_grad():  # non-trivial visual LayerNorms (the release starts them at 0)
        for ln in (model.vlbert.visual_ln_text, model.vlbert.visual_ln_object):
            ln.weight.normal_()
            ln.bias.normal_()
    batch = make_batch(counts=(5, 3, 0))
    tags = torch.zeros_like(batch.input_ids)
    tags[0, 1], tags[0, 2], tags[1, 1] = 2, 5, 3  # words pointing at regions (0 = whole image)
    batch["text_tags"] = tags
    seen = capture_embed(model)
    with torch.no_grad():
        model(batch)
        regions = model._region_inputs(batch)
        reps = model.object_reps(regions)
    emb, vl = model.vlbert.embeddings, model.vlbert
    out = seen["embeddings"]
    for b in range(3):
        words = batch.input_mask[b].nonzero().flatten().tolist()
        objects = regions.mask[b].nonzero().flatten().tolist()
        L = len(words)
        expected = []
        for i, t in enumerate(words):
            x = emb.word_embeddings.weight[batch.input_ids[b, t]] + vl.visual_ln_text(reps[b, tags[b, t]])
            expected.append(x + emb.position_embeddings.weight[i] + emb.token_type_embeddings.weight[batch.segment_ids[b, t]])
        for i in objects:
            x = model.object_linguistic_embeddings.weight[0] + vl.visual_ln_object(reps[b, i])
            expected.append(x + emb.position_embeddings.weight[L] + emb.token_type_embeddings.weight[2])
        expected.append(vl.end_embedding.weight[0] + emb.position_embeddings.weight[L + 1] + emb.token_type_embeddings.weight[2])
        expected = emb.LayerNorm(torch.stack(expected))
        n = len(expected)
        torch.testing.assert_close(out[b, :n], expected, rtol=1e-5, atol=1e-5)
        assert seen["packed"].attention_mask[b].sum() == n
    # the whole-image box was added as region 0: 5 + 1 regions for row 0, 1 for the empty row 2
    assert regions.mask.sum(1).tolist() == [6, 4, 1]


def test_geometry_embedding_equals_direct_computation():
    box, W, Hh = (10.0, 20.0, 50.0, 80.0), 200.0, 100.0
    got = geometry_embedding(torch.tensor([box]), W, Hh, dim=256)[0]
    position = [(box[0] + box[2]) / 2 / W * 100, (box[1] + box[3]) / 2 / Hh * 100, (box[2] - box[0]) / W * 100,
                (box[3] - box[1]) / Hh * 100]
    expected = []
    for p in position:
        expected += [math.sin(p / 1000 ** (k / 256)) for k in range(256)]
        expected += [math.cos(p / 1000 ** (k / 256)) for k in range(256)]
    assert got.shape == (2048,)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # the object representation = ReLU(Linear([geometry ‖ RoI feature]))
    model = tiny("vqa", **NO_DROPOUT).eval()
    batch = make_batch(counts=(5, 3, 0), has_image_box=True)
    regions = model._region_inputs(batch)
    reps = model.object_reps(regions)
    lin = model.image_feature_extractor.obj_downsample[1]
    geo = geometry_embedding(regions.boxes[0, 2:3], 100.0, 80.0, dim=G)
    torch.testing.assert_close(reps[0, 2], F.relu(lin(torch.cat([geo[0], regions.features[0, 2]]))))
    assert reps[1, 3:].abs().sum() == 0  # padding regions


def test_image_box_prepended_with_mean_feature_or_the_given_one():
    model = tiny("vqa").eval()
    batch = make_batch(counts=(5, 3, 0))
    r = model._region_inputs(batch)
    feats = batch.image_feature_0
    assert r.has_image_box and r.boxes.shape[1] == 6
    torch.testing.assert_close(r.boxes[:, 0], torch.tensor([[0.0, 0.0, 99.0, 79.0]] * 3))
    torch.testing.assert_close(r.features[0, 0], feats[0, :5].mean(0))
    torch.testing.assert_close(r.features[1, 0], feats[1, :3].mean(0))
    assert r.features[2, 0].abs().sum() == 0  # no regions: zero feature, the image box alone
    given = torch.randn(3, D)
    batch["image_info_0"]["image_box_feature"] = given
    torch.testing.assert_close(model._region_inputs(batch).features[:, 0], given)
    # a batch that already has the image box (bbox processor, format vl_bert) is taken as is
    r2 = model._region_inputs(make_batch(counts=(5, 3, 1), has_image_box=True))
    assert r2.boxes.shape[1] == 5 and r2.mask.sum(1).tolist() == [5, 3, 1]


# --------------------------------------------------------------------------------- truncation
def _release_truncation(t: int, r: int, budget: int) -> tuple[int, int]:
    t0, r0 = t, r
    if t + r > budget:
        while t + r > budget and t > 0 and r > 0:
            if r > t:
                r -= 1
            else:
                t -= 1
        t, r = max(t, min(t0, 2)), max(r, min(r0, 1))  # the release pads a 1-token text to 2 by repeating it; we keep 1
    return t, r


def test_truncation_lengths_equal_the_release_loop():
    rng = random.Random(0)
    cases = [(rng.randint(0, 40), rng.randint(0, 40), rng.randint(3, 60)) for _ in range(400)]
    cases += [(5, 5, 6), (5, 5, 7), (2, 6, 3), (30, 0, 10), (1, 8, 4)]
    for budget in sorted({c[2] for c in cases}):  # vectorised over the batch, one budget per call
        rows = [c for c in cases if c[2] == budget]
        t, r = M.truncation_lengths(torch.tensor([c[0] for c in rows]), torch.tensor([c[1] for c in rows]), budget)
        for (ti, ri, _), tk, rk in zip(rows, t.tolist(), r.tolist()):
            assert (tk, rk) == _release_truncation(ti, ri, budget), (ti, ri, budget)


def test_overflowing_text_is_cut_like_the_release_and_equals_pre_cut_input():
    model = tiny("vqa", **NO_DROPOUT, max_seq_length=9).eval()
    plain = tiny("vqa", **NO_DROPOUT).eval()
    plain.load_state_dict(model.state_dict())
    batch = make_batch(B=1, T=10, R=5, counts=(5,), has_image_box=True)  # 10 tokens + 5 regions > 9
    # release loop: tokens 10 -> 5 (one at a time while not fewer than the regions), tie -> 4; regions stay 5
    assert [int(x) for x in M.truncation_lengths(torch.tensor([10]), torch.tensor([5]), 9)] == [4, 5]
    keep = [0, 1, 2, 9]  # the first 3 tokens and the last ([SEP])
    cut = SampleList({**batch, **{k: batch[k][:, keep] for k in ("input_ids", "input_mask", "segment_ids")}})
    seen_a, seen_b = capture_embed(model), capture_embed(plain)
    torch.testing.assert_close(model(batch)["scores"], plain(cut)["scores"])
    torch.testing.assert_close(seen_a["embeddings"], seen_b["embeddings"])
    assert int(seen_a["packed"].attention_mask.sum()) == 4 + 5 + 1
    # a budget that also cuts regions: (4, 8) in 9 -> regions 8 -> 5, text kept
    t, r = M.truncate_masks(torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool), 9)
    assert t.sum() == 4 and r[0].tolist() == [True] * 5 + [False] * 3


def test_too_many_text_positions_is_a_clear_error():
    model = tiny("vqa")
    batch = make_batch(B=1, T=39, counts=(2,))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(batch)


# ------------------------------------------------------------------------------------- MVRC
def test_region_masks_frequencies_image_box_and_padding():
    mask = torch.zeros(400, 50, dtype=torch.bool)
    mask[:, :40] = True
    g = torch.Generator().manual_seed(0)
    chosen, replaced = M.draw_region_masks(mask, True, 0.15, 0.9, generator=g)
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()
    assert bool((replaced <= chosen).all())
    rate = chosen[:, 1:40].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert abs(replaced.sum().item() / chosen.sum().item() - 0.9) < 0.02


def test_mvrc_replacement_labels_and_image_box_recomputed(monkeypatch):
    model = tiny("pretraining", **NO_DROPOUT).eval()
    batch = make_batch(counts=(5, 4, 2), has_image_box=True)
    chosen = torch.zeros(3, 5, dtype=torch.bool)
    chosen[0, 1], chosen[0, 3], chosen[1, 2] = True, True, True
    replaced = chosen.clone()
    replaced[0, 3] = False  # chosen but kept (the 10%)
    monkeypatch.setattr(M, "draw_region_masks", lambda *a, **k: (chosen, replaced))
    with torch.no_grad():
        model.object_mask_visual_embedding.weight.normal_()
    seen = capture_embed(model)
    out = model(batch)
    # labels: the detector's distribution of the chosen regions; loss = soft cross-entropy, mean over them
    target = batch.image_info_0.cls_prob[chosen]
    expected = -(target * F.log_softmax(out["mvrc_scores"], -1)).sum(-1).mean()
    torch.testing.assert_close(out["losses"]["train/toy/mvrc"], expected)
    assert out["mvrc_mask"].tolist() == chosen.tolist()
    # replaced regions get the mask word embedding; the others the shared object embedding
    ling = seen["obj_linguistic"]
    torch.testing.assert_close(ling[0, 1], model.object_mask_word_embedding.weight[0])
    torch.testing.assert_close(ling[0, 3], model.object_linguistic_embeddings.weight[0])
    # replaced features = object_mask_visual_embedding; image box = mean of the visible real regions
    regions = model._region_inputs(batch)
    feats = regions.features.clone()
    feats[0, 0] = batch.image_feature_0[0, [2, 3, 4]].mean(0)
    feats[1, 0] = batch.image_feature_0[1, [1, 3]].mean(0)
    feats[2, 0] = batch.image_feature_0[2, [1]].mean(0)
    feats[replaced] = model.object_mask_visual_embedding.weight[0]
    regions.features = feats
    torch.testing.assert_close(seen["obj_visual"], model.image_feature_extractor(regions), rtol=1e-5, atol=1e-5)


def test_e2e_masked_pixels_are_zeroed_inside_the_boxes():
    images = torch.randn(2, 3, 20, 30)
    boxes = torch.tensor([[2.5, 3.2, 10.9, 7.0], [0.0, 0.0, 4.0, 4.0], [25.0, 15.0, 40.0, 40.0]])
    index = torch.tensor([0, 0, 1])
    got = M.zero_box_pixels(images, boxes, index)
    expected = images.clone()
    for (x1, y1, x2, y2), b in zip(boxes.tolist(), index.tolist()):
        expected[b, :, int(y1):int(y2) + 1, int(x1):int(x2) + 1] = 0
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------- heads
def _train_steps(model, batch, steps=10, lr=5e-3, reseed=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        if reseed is not None:
            torch.manual_seed(reseed)
        out = model(batch)
        loss = sum(out["losses"].values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    return losses


def test_vqa_head_trains_reads_the_mask_slot_and_scales_bce():
    model = tiny("vqa", **NO_DROPOUT, mask_token_id=MASK)
    targets = torch.zeros(3, 10)
    targets[0, 1], targets[1, 4], targets[1, 5], targets[2, 7] = 1.0, 0.3, 0.9, 0.6
    batch = make_batch(targets=targets)
    out = model(batch)
    expected = F.binary_cross_entropy_with_logits(out["scores"], batch.targets) * 10
    torch.testing.assert_close(out["losses"]["train/toy/logit_bce"], expected)
    losses = _train_steps(model, batch)
    assert losses[-1] < 0.8 * losses[0]
    bad = make_batch()
    bad["input_ids"][:, -2] = 7  # not [MASK] in the answer slot of row 0
    with pytest.raises(ValueError, match="mask_token_id"):
        model(bad)


def test_multiple_choice_head_trains_and_checks_candidates():
    model = tiny("multiple_choice", **NO_DROPOUT, num_choices=4)
    assert model.vlbert.pooler is not None
    base = make_batch(B=2, counts=(5, 3))
    ids = torch.stack([base.input_ids] * 4, 1)
    ids[:, 1:, 2] = torch.tensor([11, 12, 13])  # candidates differ in one word
    batch = SampleList({**base, "input_ids": ids, "input_mask": torch.stack([base.input_mask] * 4, 1),
                        "segment_ids": torch.stack([base.segment_ids] * 4, 1),
                        "text_tags": torch.zeros_like(ids), "targets": torch.tensor([2, 0])})
    out = model(batch)
    assert out["scores"].shape == (2, 4)
    onehot = F.one_hot(batch.targets, 4).float()
    torch.testing.assert_close(out["losses"]["train/toy/logit_bce"], F.binary_cross_entropy_with_logits(out["scores"], onehot))
    losses = _train_steps(model, batch)
    assert losses[-1] < 0.8 * losses[0]
    five = SampleList({**batch, **{k: torch.cat([batch[k], batch[k][:, :1]], 1)
                                   for k in ("input_ids", "input_mask", "segment_ids", "text_tags")}})
    with pytest.raises(ValueError, match="num_choices"):
        model(five)
    ce = tiny("multiple_choice", **NO_DROPOUT, choice_loss="ce")
    out = ce(batch)
    torch.testing.assert_close(out["losses"]["train/toy/cross_entropy"], F.cross_entropy(out["scores"], batch.targets))


def test_refcoco_head_trains_and_masks_padding():
    model = tiny("refcoco", **NO_DROPOUT)
    batch = make_batch(counts=(5, 3, 2), has_image_box=True)
    targets = torch.zeros(3, 5)
    targets[0, 2], targets[1, 1], targets[2, 1] = 1, 1, 1
    batch["region_targets"] = targets
    out = model(batch)
    assert out["scores"][1, 3:].eq(M.PAD_LOGIT).all() and out["boxes"].shape == (3, 5, 4)
    losses = _train_steps(model, batch)
    assert losses[-1] < 0.8 * losses[0]
    metric = RefCOCOAccuracy()
    metric.update(batch, model(batch))
    assert metric.compute()["refcoco_accuracy"] == 1.0


def test_pretraining_heads_train_on_image_and_text_only_batches():
    model = tiny("pretraining", **NO_DROPOUT, mvrc_mask_probability=0.5)
    ids_labels = make_batch(counts=(5, 4, 3), has_image_box=True)
    labels = torch.full_like(ids_labels.input_ids, -1)
    labels[:, 2:5] = ids_labels.input_ids[:, 2:5]
    ids_labels["lm_label_ids"] = labels
    losses = _train_steps(model, ids_labels, reseed=3)
    assert losses[-1] < 0.8 * losses[0]
    torch.manual_seed(3)
    out = model(ids_labels)
    assert set(out["losses"]) == {"train/toy/mlm", "train/toy/mvrc"} and out["losses"]["train/toy/mvrc"] > 0
    # text-only (text_corpus): no visual fields, aux visual embedding, loss mlm_aux
    text = SampleList({k: ids_labels[k] for k in ("input_ids", "input_mask", "segment_ids", "lm_label_ids")})
    text.update(text_only=torch.ones(3, dtype=torch.bool), dataset_name="text_corpus", dataset_type="train")
    seen = capture_embed(model)
    losses = _train_steps(model, text)
    assert losses[-1] < 0.8 * losses[0]
    assert seen["obj_mask"].shape == (3, 0)
    torch.testing.assert_close(seen["text_visual"][1, 4], model.aux_text_visual_embedding.weight[0])
    assert set(model(text)["losses"]) == {"train/text_corpus/mlm_aux"}
    # no masked token: zero loss (the release's NaN), graph kept
    text["lm_label_ids"] = torch.full_like(labels, -1)
    loss = model(text)["losses"]["train/text_corpus/mlm_aux"]
    assert loss.item() == 0 and loss.requires_grad


def test_e2e_regions_from_pixels_train():
    model = tiny("refcoco", **NO_DROPOUT, **E2E)
    batch = make_batch(B=2, counts=(4, 2), has_image_box=True)
    batch["image"] = torch.randn(2, 3, 48, 60)
    batch["image_info_0"]["scale"] = torch.tensor([[0.6, 0.6], [0.5, 0.5]])
    batch["region_targets"] = (torch.arange(5)[None] == torch.tensor([[1], [2]])).float()
    del batch["image_feature_0"]
    losses = _train_steps(model, batch, steps=4)
    assert losses[-1] < losses[0]
    # the RoI features are those of the boxes scaled onto the network input
    regions = model._region_inputs(batch)
    got = model.image_feature_extractor.roi_pool(regions, None)
    direct = model.image_feature_extractor.roi_features(batch.image, [regions.boxes[0, :4] * 0.6, regions.boxes[1, :2] * 0.5])
    torch.testing.assert_close(got, torch.cat(direct))


def test_release_resnet_layout_stride_in_1x1_and_dilated_res5():
    net = M.build_roi_features(M.vl_bert_config({"backbone": "resnet50"}))
    l2 = net.trunk.layer2[0]
    assert l2.conv1.stride == (2, 2) and l2.conv2.stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in net.box_head.head.layer4)
    assert not any(p.requires_grad for p in net.trunk.layer1.parameters())
    assert all(p.requires_grad for p in net.trunk.layer2.parameters())


# ------------------------------------------------------------------------------------ bad input
def test_no_regions_only_image_box_and_bad_fields():
    model = tiny("vqa").eval()
    none = make_batch(counts=(0, 0, 0))
    assert torch.isfinite(model(none)["scores"]).all()
    no_box = tiny("vqa", add_image_box=False).eval()
    seen = capture_embed(no_box)
    assert torch.isfinite(no_box(make_batch(counts=(0, 0, 0)))["scores"]).all()
    assert seen["packed"].object_slots.sum() == 0  # text + [END] only
    only = make_batch(counts=(1, 1, 1), has_image_box=True)
    assert torch.isfinite(model(only)["scores"]).all()
    pre = tiny("pretraining", mvrc_mask_probability=1.0)
    out = pre(SampleList({**only, "lm_label_ids": torch.where(only.input_mask.bool(), only.input_ids, -1)}))
    assert out["mvrc_mask"].sum() == 0 and out["losses"]["train/toy/mvrc"].item() == 0  # image box never masked
    with pytest.raises(KeyError, match="image_feature_0"):
        model(SampleList({k: v for k, v in make_batch().items() if k != "image_feature_0"}))
    wrong = make_batch()
    wrong["image_feature_0"] = torch.randn(3, 5, D + 6)
    with pytest.raises(ValueError, match="vl_bert"):
        model(wrong)
    tags = make_batch()
    tags["text_tags"] = torch.full_like(tags.input_ids, 9)
    with pytest.raises(ValueError, match="text_tags"):
        model(tags)
    with pytest.raises(KeyError, match="cls_prob"):
        b = make_batch()
        del b["image_info_0"]["cls_prob"]
        tiny("pretraining")(b)
    with pytest.raises(ValueError, match="Known keys"):
        tiny("vqa", visual_featrue_mode="e2e")


def test_padding_does_not_change_outputs():
    model = tiny("vqa", **NO_DROPOUT).eval()
    batch = make_batch(counts=(5, 3, 2))
    full = model(batch)["scores"]
    single = SampleList({k: (v[1:2] if torch.is_tensor(v) else v) for k, v in batch.items() if k != "image_info_0"})
    single["image_info_0"] = SampleList({k: v[1:2] for k, v in batch.image_info_0.items()})
    torch.testing.assert_close(model(single)["scores"][0], full[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- BERT init
def test_bert_model_name_loads_text_weights_and_mlm_transform(tmp_path):
    hf_cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=40)
    torch.manual_seed(1)
    hf = BertForPreTraining(hf_cfg)
    hf.save_pretrained(tmp_path / "bert")
    model = tiny("vqa", bert_model_name=str(tmp_path / "bert"))
    emb = model.vlbert.embeddings
    torch.testing.assert_close(emb.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(emb.token_type_embeddings.weight[:2], hf.bert.embeddings.token_type_embeddings.weight)
    assert emb.token_type_embeddings.weight.shape[0] == 3
    torch.testing.assert_close(model.vlbert.encoder.layer[1].output.dense.weight, hf.bert.encoder.layer[1].output.dense.weight)
    torch.testing.assert_close(model.final_mlp[0].dense.weight, hf.cls.predictions.transform.dense.weight)
    pre = tiny("pretraining", bert_model_name=str(tmp_path / "bert"))
    torch.testing.assert_close(pre.mlm_head.transform.LayerNorm.weight, hf.cls.predictions.transform.LayerNorm.weight)
    assert pre.mlm_head.decoder.weight is pre.vlbert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="vocab_size"):
        tiny("vqa", bert_model_name=str(tmp_path / "bert"), vocab_size=V + 1)


def test_answer_classifier_from_word_embeddings_and_after_a_load():
    model = tiny("vqa")
    answers = [[5, 6], [7], []] + [[8 + k] for k in range(7)]
    before = model.final_mlp[2].weight[2].clone()
    model.init_answer_classifier(answers)
    word = model.vlbert.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.final_mlp[2].weight[0], word[[5, 6]].mean(0))
    torch.testing.assert_close(model.final_mlp[2].weight[2], before)  # no tokens: row kept
    model._answer_tokens = answers
    model.register_load_state_dict_post_hook(M._reinit_answers_after_load)
    new_word = torch.randn(V, H)
    load_state_dict_with_report(model, {"vlbert.embeddings.word_embeddings.weight": new_word})
    torch.testing.assert_close(model.final_mlp[2].weight[1], new_word[7])


# ------------------------------------------------------------------------------------- converter
def to_release_layout(sd: dict, e2e: bool = False) -> dict:
    """Our state dict written with the release's key names (reference §3.1, §3.3-3.5), DDP-wrapped."""
    renames = [
        ("vlbert.embeddings.word_embeddings.", "vlbert.word_embeddings."),
        ("vlbert.embeddings.position_embeddings.", "vlbert.position_embeddings."),
        ("vlbert.embeddings.token_type_embeddings.", "vlbert.token_type_embeddings."),
        ("vlbert.embeddings.LayerNorm.", "vlbert.embedding_LayerNorm."),
        ("mlm_head.", "vlbert.mlm_head.predictions."),
        ("mvrc_head.", "vlbert.mvrc_head."),
        ("image_feature_extractor.roi_features.trunk.stem.", "image_feature_extractor.backbone."),
        ("image_feature_extractor.roi_features.trunk.", "image_feature_extractor.backbone."),
        ("image_feature_extractor.roi_features.box_head.head.layer4.", "image_feature_extractor.roi_head_feature_extractor."),
    ]
    out = {}
    for k, v in sd.items():
        for ours, theirs in renames:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        out["module." + k] = v.clone()
        if k.startswith("image_feature_extractor.roi_head_feature_extractor."):
            out["module." + k.replace("roi_head_feature_extractor.", "head.0.")] = v.clone()
        if k.endswith("running_var"):
            out["module." + k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return out


@pytest.mark.parametrize("mode", ["prec", "e2e"])
def test_release_checkpoint_converts_with_nothing_missing_or_unused(mode):
    extra = {"visual_feature_mode": "e2e", "backbone": "resnet50", "roi_output_size": 7} if mode == "e2e" else {}
    source = tiny("pretraining", seed=1, **NO_DROPOUT, **extra).eval()
    official = to_release_layout(source.state_dict(), e2e=mode == "e2e")
    keys = {k[len("module."):] for k in official}
    for name, shape in (("vlbert.word_embeddings.weight", (V, H)), ("vlbert.token_type_embeddings.weight", (3, H)),
                        ("vlbert.end_embedding.weight", (1, H)), ("vlbert.embedding_LayerNorm.weight", (H,)),
                        ("vlbert.visual_ln_text.weight", (H,)), ("vlbert.visual_ln_object.bias", (H,)),
                        ("vlbert.encoder.layer.1.attention.self.query.weight", (H, H)),
                        ("vlbert.mlm_head.predictions.transform.dense.weight", (H, H)),
                        ("vlbert.mlm_head.predictions.decoder.weight", (V, H)), ("vlbert.mlm_head.predictions.bias", (V,)),
                        ("vlbert.mvrc_head.transform.dense.weight", (H, H)), ("vlbert.mvrc_head.region_cls_pred.weight", (C, H)),
                        ("object_linguistic_embeddings.weight", (1, H)), ("object_mask_word_embedding.weight", (1, H)),
                        ("aux_text_visual_embedding.weight", (1, H))):
        assert tuple(official["module." + name].shape) == shape, name
    if mode == "prec":
        assert tuple(official["module.object_mask_visual_embedding.weight"].shape) == (1, D)
        assert tuple(official["module.image_feature_extractor.obj_downsample.1.weight"].shape) == (H, 8 * G + D)
    else:  # e2e: MASK_RAW_PIXELS, so no visual mask embedding; ResNet trunk + the res5 module saved twice
        assert "object_mask_visual_embedding.weight" not in keys
        assert "image_feature_extractor.backbone.layer3.5.conv2.weight" in keys
        assert "image_feature_extractor.head.0.2.bn3.running_mean" in keys
        assert tuple(official["module.image_feature_extractor.obj_downsample.1.weight"].shape) == (H, 8 * G + 2048)
    converted, report = convert_vl_bert({"state_dict": official, "optimizer": {"state": {}, "param_groups": []}})
    target = tiny("pretraining", seed=2, **NO_DROPOUT, **extra).eval()
    loading = load_state_dict_with_report(target, converted)
    assert loading.missing == [] and loading.unused == [] and not report.mismatched
    unused = set(report.unused)
    assert all(k.endswith("num_batches_tracked") or ".head.0." in k for k in unused)
    assert len(report.mapped) + len(unused) == len(official)
    batch = make_batch(counts=(5, 3, 2), has_image_box=True)
    batch["lm_label_ids"] = torch.where(batch.input_mask.bool(), batch.input_ids, -1)
    if mode == "e2e":
        batch["image"] = torch.randn(3, 3, 64, 64)
        batch["image_info_0"]["scale"] = torch.full((3, 2), 0.6)
    torch.manual_seed(5)
    a = source(batch)
    torch.manual_seed(5)
    b = target(batch)
    torch.testing.assert_close(a["scores"], b["scores"])
    torch.testing.assert_close(a["mvrc_scores"], b["mvrc_scores"])
    cfg = config_from_state_dict(converted)
    assert cfg["visual_feature_mode"] == mode and cfg["training_head_type"] == "pretraining"
    assert cfg["hidden_size"] == H and cfg["num_hidden_layers"] == 2 and cfg["type_vocab_size"] == 3
    if mode == "e2e":
        assert cfg["backbone"] == "resnet50"


def test_task_prefix_changes_start_the_fine_tuning_heads():
    source = tiny("pretraining", seed=1)
    official = to_release_layout(source.state_dict())
    vqa_sd, report = convert_vl_bert(official, task="vqa")
    vqa = tiny("vqa", seed=3)
    loading = load_state_dict_with_report(vqa, vqa_sd)
    assert loading.unused == [] and sorted(loading.missing) == ["final_mlp.2.bias", "final_mlp.2.weight"]
    torch.testing.assert_close(vqa.final_mlp[0].dense.weight, source.mlm_head.transform.dense.weight)
    assert "module.vlbert.mlm_head.predictions.bias" in report.unused
    ref_sd, _ = convert_vl_bert(official, prefix_changes=["module.vlbert.mvrc_head.transform->final_mlp.0"], task="refcoco")
    ref = tiny("refcoco", seed=3)
    loading = load_state_dict_with_report(ref, ref_sd)
    torch.testing.assert_close(ref.final_mlp[0].dense.weight, source.mvrc_head.transform.dense.weight)
    assert sorted(loading.missing) == ["final_mlp.2.bias", "final_mlp.2.weight"] and loading.unused == []
    # VCR's TimeDistributed wrapper (vlbert._module.*) and a model= report
    vcr = tiny("multiple_choice", seed=3)
    wrapped = {k.replace("module.vlbert.", "module.vlbert._module."): v for k, v in official.items()}
    _sd, rep = convert_vl_bert(wrapped, task="multiple_choice", model=vcr)
    assert sorted(rep.missing) == ["final_mlp.1.bias", "final_mlp.1.weight", "vlbert.pooler.dense.bias",
                                   "vlbert.pooler.dense.weight"]
    with pytest.raises(ValueError, match="old.prefix->new.prefix"):
        convert_vl_bert(official, prefix_changes=["vlbert.mlm_head"])
    # our own keys pass through the release renames unchanged (resuming our checkpoints)
    assert all(rename_vl_bert_key(k) == k for k in {**tiny("pretraining").state_dict(), **vcr.state_dict()})


def test_release_files_load_safely_and_foreign_dicts_are_refused(tmp_path):
    from mmf_plugins.zoo.loading import convert_checkpoint

    official = to_release_layout(tiny("vqa", seed=1).state_dict())
    path = tmp_path / "vl-bert-base-prec.model"
    torch.save({"state_dict": official, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
    sd, _report = convert_checkpoint("vl_bert", path)
    assert "vlbert.embeddings.word_embeddings.weight" in sd and "final_mlp.2.weight" in sd

    torch.save({"state_dict": official, "validation_monitor": ValidationMonitor()}, tmp_path / "monitor.model")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        convert_checkpoint("vl_bert", tmp_path / "monitor.model")
    with pytest.raises(CheckpointError, match="not a VL-BERT checkpoint"):
        convert_vl_bert({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)})


class ValidationMonitor:
    """A custom object pickled next to the weights, as the release's trainer may save one."""

    best = 0.7


# ---------------------------------------------------------------------------------------- metric
def test_refcoco_accuracy_from_boxes_or_targets():
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, M.PAD_LOGIT]])
    boxes = torch.tensor([[[0, 0, 9, 9], [10, 10, 20, 20], [0, 0, 5, 5]], [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 1, 1]]]).float()
    gt = torch.tensor([[11.0, 11.0, 20.0, 20.0], [40.0, 40.0, 60.0, 60.0]])  # IoU 0.81 (hit), 0 (miss)
    metric = RefCOCOAccuracy()
    metric.update({"gt_bbox": gt}, {"scores": scores, "boxes": boxes})
    assert metric.compute() == {"refcoco_accuracy": 0.5}
    metric.reset()
    metric.update({"region_targets": torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])}, {"scores": scores})
    assert metric.compute() == {"refcoco_accuracy": 0.5}


# --------------------------------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from mmf_plugins.datasets.builders.shapes.generator import generate_shapes

    root = tmp_path_factory.mktemp("vlbert_data")
    generate_shapes(root / "shapes", seed=0, num_images=12, progress=False)
    return root


def _dataset(name: str, root, **params):
    from omegaconf import OmegaConf

    import mmf_plugins
    from mmf_plugins.common.registry import registry

    mmf_plugins.setup_imports()
    cfg = OmegaConf.load(f"{M.__file__.rsplit('/mmf_plugins/', 1)[0]}/configs/datasets/{name}/defaults.yaml").dataset_config[name]
    cfg.data_dir = str(root)
    cfg.processors.image_processor.params.update(min_size=48, max_size=80, horizontal_flip=0.0)
    for key, value in params.items():
        OmegaConf.update(cfg, key, value)
    builder = registry.get_builder_class(name)(name)
    builder.build(cfg)
    return builder.load(cfg, "train")


def test_vcr_dataset_tags_words_with_their_boxes_and_trains(shapes_root):
    ds = _dataset("vcr", shapes_root, **{"processors.text_processor.params.max_seq_length": 14})
    tok = ds.text_processor.tokenizer
    for idx in range(len(ds)):
        item, sample = ds.items[idx], ds[idx]
        assert sample.input_ids.shape == (4, 14) and sample.targets == item["answer_label"]
        info = sample.image_info_0
        assert info["has_image_box"] and info["bbox"].shape[0] == len(item["objects"]) + 1
        for c in range(4):
            n = int(sample.input_mask[c].sum())
            ids, tags, seg = sample.input_ids[c, :n], sample.text_tags[c, :n], sample.segment_ids[c, :n]
            assert ids[0] == ds.cls_id and ids[n - 1] == ds.sep_id and (ids == ds.sep_id).sum() == 2
            q_end = int((ids == ds.sep_id).nonzero()[0])
            assert seg[: q_end + 1].eq(0).all() and seg[q_end + 1 :].eq(1).all()
            for k in tags.unique().tolist():
                if k:  # tagged pieces spell the object's name
                    words = tok.convert_ids_to_tokens(ids[tags == k].tolist())
                    assert " ".join(words).replace(" ##", "").split()[0] == item["objects"][k - 1]
            assert n <= 14
    batch = ds.collate_fn([ds[i] for i in range(3)])
    model = tiny("multiple_choice", vocab_size=len(tok), **E2E, **NO_DROPOUT)
    losses = _train_steps(model, batch, steps=3)
    assert losses[-1] < losses[0]


def test_refcoco_dataset_targets_are_iou_with_the_referred_box(shapes_root):
    from torchvision.ops import box_iou

    ds = _dataset("refcoco", shapes_root)
    for idx in range(len(ds)):
        ref, sample = ds.refs[idx], ds[idx]
        boxes = sample.image_info_0["bbox"]
        W, Hh = sample.image_info_0["image_width"], sample.image_info_0["image_height"]
        assert boxes[0].tolist() == [0.0, 0.0, W - 1.0, Hh - 1.0] and boxes.shape[0] == len(ref["proposals"]) + 1
        x, y, w, h = ref["bbox"]
        gt = torch.tensor([[x, y, min(x + w, W - 1), min(y + h, Hh - 1)]])
        torch.testing.assert_close(sample.gt_bbox, gt[0])
        torch.testing.assert_close(sample.region_targets, (box_iou(boxes, gt)[:, 0] >= 0.5).float())
        assert sample.region_targets[1:].sum() >= 1  # the referred object is among the proposals
    batch = ds.collate_fn([ds[i] for i in range(4)])
    model = tiny("refcoco", vocab_size=len(ds.text_processor.tokenizer), **E2E, **NO_DROPOUT)
    out = model(batch)
    assert out["scores"].shape == batch.region_targets.shape
    metric = RefCOCOAccuracy()
    metric.update(batch, out)
    assert 0.0 <= metric.compute()["refcoco_accuracy"] <= 1.0
    assert ds.format_for_prediction(batch, out)[0]["ref_id"] == ds.refs[0]["ref_id"]


def test_vqa_head_takes_answer_word_pieces_from_the_run_registry(shapes_root):
    from omegaconf import OmegaConf

    from mmf_plugins.common.registry import registry
    from mmf_plugins.processors.base_processor import build_processor

    answers = build_processor({"type": "vqa_answer", "params": {"vocab_file": "shapes/annotations/answers_vqa.txt"}},
                              data_dir=str(shapes_root))
    text_cfg = OmegaConf.create({"type": "bert_tokenizer", "params": {"tokenizer_config": {"type": "shapes/tokenizer"}}})
    saved = {k: registry.get(k) for k in ("config", "toyvqa_answer_processor", "toyvqa_text_processor_config",
                                          "toyvqa_num_final_outputs")}
    try:
        registry.register("config", OmegaConf.create({"datasets": "toyvqa", "env": {"data_dir": str(shapes_root)}}))
        registry.register("toyvqa_answer_processor", answers)
        registry.register("toyvqa_text_processor_config", text_cfg)
        registry.register("toyvqa_num_final_outputs", len(answers))
        model = tiny("vqa", vocab_size=600, classifier_pretrained=True, num_labels=len(answers))  # as mmf_run sets it
    finally:
        for key, value in saved.items():
            registry.unregister(key) if value is None else registry.register(key, value)
    assert model.final_mlp[2].out_features == len(answers)
    tok = build_processor(text_cfg, data_dir=str(shapes_root)).tokenizer
    k = next(i for i, a in enumerate(answers.answer_list) if len(tok.tokenize(a)) > 1)
    ids = tok.convert_tokens_to_ids(tok.tokenize(answers.answer_list[k]))
    word = model.vlbert.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.final_mlp[2].weight[k], word[ids].mean(0))
