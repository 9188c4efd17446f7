"""VinVL / OSCAR+: input formation, heads, decoding, conversion (tiny BERT, CPU, no network)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining, BertModel

from mmf_plugins.common.sample import SampleList
from mmf_plugins.models.base_model import build_model
from mmf_plugins.models.vinvl import convert_vinvl as C
from mmf_plugins.models.vinvl import pretraining_data as PD
from mmf_plugins.models.vinvl.modeling_vinvl import (
    BertCaptioningLoss,
    VinVLModel,
    box_features,
    caption_position_ids,
    seq2seq_attention_mask,
)
from mmf_plugins.modules.beam_search import beam_search, greedy_search
from mmf_plugins.zoo.conversion import load_state_dict_with_report

V, H, D = 100, 32, 2054
TINY = {
    "vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 96, "bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 3, "pad_token_id": 0,
}


def tiny(head: str = "vqa", **kw) -> VinVLModel:
    torch.manual_seed(0)
    cfg = {**TINY, "training_head_type": head, "num_labels": 2 if head in ("retrieval", "nlvr2") else 10, **kw}
    return build_model("vinvl", cfg)


def make_batch(B=3, T=12, R=6, seed=0, **extra) -> SampleList:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(B, T, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[:, 6:] = 1
    mask[0, 9:], seg[0, 9:], ids[0, 9:] = 0, 0, 0
    fields = {
        "input_ids": ids, "input_mask": mask, "segment_ids": seg, "image_feature_0": torch.randn(B, R, D, generator=g),
        "image_info_0": SampleList({"max_features": torch.tensor([R, R - 2, 3][:B])}),
        "dataset_name": "vqa2", "dataset_type": "train",
    }
    fields.update(extra)
    return SampleList(fields)


# ----------------------------------------------------------------------------- input formation
def test_attention_mask_is_text_mask_then_region_mask_from_max_features():
    m = tiny()
    b = make_batch(B=2, T=5, R=4)
    b["input_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    b["image_info_0"] = SampleList({"max_features": torch.tensor([2, 4])})
    inp = m.inputs(b)
    assert inp.attention_mask().tolist() == [[1, 1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]]


def test_regions_truncated_to_max_img_seq_length():
    m = tiny(max_img_seq_length=3)
    b = make_batch(R=6)
    inp = m.inputs(b)
    assert inp.img_feats.shape[1] == 3 and torch.equal(inp.img_feats, b.image_feature_0[:, :3])
    assert inp.region_mask.tolist() == [[True] * 3, [True] * 3, [True] * 3]


def test_2048_features_get_oscar_box_dims_appended():
    m = tiny()
    b = make_batch(B=1, R=2)
    feats = torch.randn(1, 2, 2048)
    bbox = torch.tensor([[[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 640.0, 480.0]]])
    b["image_feature_0"] = feats
    b["image_info_0"] = SampleList({"bbox": bbox, "image_width": torch.tensor([640]), "image_height": torch.tensor([480])})
    got = m.inputs(b).img_feats
    expect_box = torch.tensor([[10 / 640, 20 / 480, 110 / 640, 220 / 480, 100 / 640, 200 / 480], [0, 0, 1, 1, 1, 1]])
    assert got.shape == (1, 2, 2054)
    assert torch.allclose(got[0, :, :2048], feats[0]) and torch.allclose(got[0, :, 2048:], expect_box)
    assert torch.allclose(box_features(bbox, torch.tensor([640]), torch.tensor([480]))[0], expect_box)


def test_2048_features_without_boxes_is_a_clear_error():
    m = tiny()
    b = make_batch(B=1, R=2)
    b["image_feature_0"] = torch.randn(1, 2, 2048)
    with pytest.raises(ValueError, match=r"2048 dims.*img_feature_dim=2054.*bbox"):
        m(b)
    b["image_feature_0"] = torch.randn(1, 2, 1024)
    with pytest.raises(ValueError, match="1024 dims"):
        m(b)


def test_padding_does_not_change_real_outputs():
    """Release layout [CLS] q [SEP] tags [SEP] + regions: extra text/region padding leaves the pooled output alone."""
    m = tiny().eval()
    ids = torch.tensor([[1, 11, 12, 2, 21, 22, 2]])
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    feats = torch.randn(1, 3, D)
    short = SampleList({"input_ids": ids, "input_mask": torch.ones_like(ids), "segment_ids": seg, "image_feature_0": feats})
    pad_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    padded = SampleList({
        "input_ids": pad_ids, "input_mask": (pad_ids != 0).long(), "segment_ids": torch.cat([seg, torch.zeros(1, 5, dtype=torch.long)], 1),
        "image_feature_0": torch.cat([feats, torch.randn(1, 4, D)], 1), "image_info_0": SampleList({"max_features": torch.tensor([3])}),
    })
    assert torch.allclose(m(short)["scores"], m(padded)["scores"], atol=1e-5)
    swapped = SampleList({**short, "segment_ids": torch.zeros_like(seg)})
    assert not torch.allclose(m(short)["scores"], m(swapped)["scores"], atol=1e-5)  # segment ids are used


def test_all_padding_columns_are_trimmed_and_scores_equal_the_untrimmed_encoder():
    m = tiny().eval()
    b = make_batch(B=3, T=12, R=6)
    b["input_mask"][:, 8:] = 0  # every row: text columns 8.. are padding; regions: 6, 4, 3 -> all 6 used
    b["image_info_0"] = SampleList({"max_features": torch.tensor([4, 2, 3])})  # region columns 4, 5 unused
    full = m.inputs(b)
    cut = full.trimmed()
    assert cut.input_ids.shape == (3, 8) and cut.img_feats.shape[1] == 4
    with torch.no_grad():
        _, pooled = m.bert(full.input_ids, full.segment_ids, full.attention_mask(), full.img_feats)
        assert torch.allclose(m(b)["scores"], m.classifier(pooled), atol=1e-5)
    # a mask with a hole keeps every column up to the last valid one
    holed = make_batch(B=2, T=6, R=2)
    holed["input_mask"] = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0]])
    assert m.inputs(holed).trimmed().input_ids.shape[1] == 5


def test_encoder_equals_direct_hf_computation():
    """img_embedding + image LN + concat after text embeddings + BERT encoder (eager, -10000 mask) + pooler."""
    m = tiny().eval()
    b = make_batch()
    inp = m.inputs(b)
    seq, pooled = m.bert(inp.input_ids, inp.segment_ids, inp.attention_mask(), inp.img_feats)
    hf = BertModel(BertConfig(**{k: TINY[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size", "max_position_embeddings")},
                              attn_implementation="eager")).eval()
    hf.load_state_dict({k[5:]: v for k, v in m.state_dict().items() if k.startswith("bert.") and k.split(".")[1] in
                        ("embeddings", "encoder", "pooler")})
    text = hf.embeddings(input_ids=inp.input_ids, token_type_ids=inp.segment_ids)
    img = F.layer_norm(inp.img_feats @ m.bert.img_embedding.weight.T + m.bert.img_embedding.bias, (H,),
                       m.bert.LayerNorm.weight, m.bert.LayerNorm.bias, 1e-12)
    ext = (1.0 - inp.attention_mask()[:, None, None, :].float()) * -10000.0
    ref = hf.encoder(torch.cat([text, img], 1), attention_mask=ext).last_hidden_state
    assert torch.allclose(seq, ref, atol=1e-5)
    assert torch.allclose(pooled, hf.pooler(ref), atol=1e-5)


def test_position_ids_cover_text_only():
    m = tiny().eval()
    b = make_batch(B=1, T=5, R=3)
    inp = m.inputs(b)
    seq1, _ = m.bert(inp.input_ids, inp.segment_ids, inp.attention_mask(), inp.img_feats)
    seq2, _ = m.bert(inp.input_ids, inp.segment_ids, inp.attention_mask(), inp.img_feats, position_ids=torch.arange(5)[None])
    assert torch.allclose(seq1, seq2)


# ------------------------------------------------------------------------- captioning mask
def _release_caption_mask(seq_a_len, max_a, seq_len, max_seq, img_len, max_img):
    """run_captioning.py CaptionTensorizer block rules, written out."""
    n = max_seq + max_img
    m = torch.zeros(n, n, dtype=torch.long)
    c0, c1, l0, l1, r0, r1 = 0, seq_a_len, max_a, seq_len, max_seq, max_seq + img_len
    m[c0:c1, c0:c1] = torch.tril(torch.ones(seq_a_len, seq_a_len, dtype=torch.long))
    m[l0:l1, l0:l1] = 1
    m[r0:r1, r0:r1] = 1
    m[c0:c1, l0:l1] = 1
    m[c0:c1, r0:r1] = 1
    m[l0:l1, r0:r1] = 1
    m[r0:r1, l0:l1] = 1
    return m


def test_seq2seq_mask_equals_release_rules():
    max_a, max_seq, max_img = 6, 10, 4
    seq_a_len, seq_len, img_len = 4, 9, 3  # [CLS] w w [SEP] pad pad | t t [SEP] pad | 3 regions + 1 pad
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1, 1, 0]]).bool()
    seg = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 0]])
    region = torch.tensor([[1, 1, 1, 0]]).bool()
    got = seq2seq_attention_mask(text_mask & (seg == 0), text_mask & (seg == 1), region)[0]
    assert torch.equal(got, _release_caption_mask(seq_a_len, max_a, seq_len, max_seq, img_len, max_img))
    # tag positions: release layout (caption padded to max_a) gives plain arange
    assert caption_position_ids(text_mask & (seg == 1), max_a).tolist() == [list(range(10))]
    # an unpadded caption still puts the tags at max_a + rank
    tags = torch.tensor([[0, 0, 0, 0, 1, 1, 1]]).bool()
    assert caption_position_ids(tags, 6).tolist() == [[0, 1, 2, 3, 6, 7, 8]]


# ------------------------------------------------------------------------------ data side
def test_contrastive_label_frequencies():
    g = torch.Generator().manual_seed(0)
    labels = PD.draw_contrastive_labels(200_000, generator=g)
    freq = torch.bincount(labels, minlength=3).float() / labels.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25]), atol=0.006)
    no_b = PD.draw_contrastive_labels(100_000, has_text_b=False, generator=g)
    freq = torch.bincount(no_b, minlength=3).float() / no_b.numel()
    assert freq[1] == 0 and abs(freq[0] - 0.5) < 0.01 and abs(freq[2] - 0.5) < 0.01
    vanilla = PD.draw_contrastive_labels(100_000, texta_false_prob=0.0, num_contrast_classes=2, generator=g)
    assert set(vanilla.unique().tolist()) == {0, 1}
    assert PD.num_contrast_classes_for(0.25) == 3 and PD.num_contrast_classes_for(0.0) == 2


def test_pollute_replaces_the_right_text():
    ex = {"image_id": "a", "text_a": "a cat", "text_b": "cat sofa"}
    captions = PD.sample_other([("b", "a dog"), ("a", "same image")], random.Random(1))
    tags = PD.sample_other([("c", "dog grass")], random.Random(1))
    out, label = PD.pollute(ex, 1, num_contrast_classes=3, random_text_a=captions, random_text_b=tags)
    assert label == 1 and out["text_b"] == "dog grass" and out["text_a"] == "a cat"
    out, label = PD.pollute(ex, 2, num_contrast_classes=3, random_text_a=captions, random_text_b=tags)
    assert label == 2 and out["text_a"] == "a dog" and out["text_b"] == "cat sofa"
    same = PD.sample_other([("a", "x")])
    out, label = PD.pollute(ex, 2, num_contrast_classes=3, random_text_a=same, random_text_b=tags)
    assert label == 0  # every draw came from the same image
    assert not PD.keep_text_b_mlm_labels(1, mask_loss_for_unmatched=False) and PD.keep_text_b_mlm_labels(1)


def test_caption_masking_counts_and_labels():
    assert [PD.num_caption_masks(n) for n in (3, 10, 20, 30, 40)] == [1, 2, 3, 3, 3]  # round(1.5)=2, round(4.5)=4->3
    ids = torch.tensor([1, 11, 12, 13, 14, 15, 16, 17, 18, 2, 0, 0])
    rng = random.Random(0)
    for _ in range(50):
        masked, labels = PD.mask_caption_tokens(ids, 10, mask_token_id=3, vocab_size=V, rng=rng)
        pos = (labels != -1).nonzero().flatten()
        assert len(pos) == 2 and pos.min() >= 1 and pos.max() <= 9
        assert torch.equal(labels[pos], ids[pos]) and torch.equal(masked[labels == -1], ids[labels == -1])


# ------------------------------------------------------------------------------ caption loss
def test_caption_loss_closed_form_equals_kl_and_drops_worst():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(7, V, generator=g), torch.randint(0, V, (7,), generator=g)
    loss = BertCaptioningLoss(0.1, 0.0, 0)
    one_hot = torch.zeros(7, V).scatter(1, target[:, None], 1.0)
    smoothed = one_hot * 0.9 + (1 - one_hot) * 0.1 / (V - 1)
    ref = F.kl_div(F.log_softmax(logits, 1), smoothed, reduction="none").sum(1)
    assert torch.allclose(loss.per_token(logits, target), ref, atol=1e-5)
    worst = BertCaptioningLoss(0.1, 0.2, drop_worst_after=1)
    worst.train()
    assert torch.isclose(worst(logits, target), ref.mean(), atol=1e-5)  # call 1: not yet
    assert torch.isclose(worst(logits, target), ref.sort().values[:5].mean(), atol=1e-5)  # int(7 * 0.8) = 5 kept


# ------------------------------------------------------------------------------ beam search
def _markov_step(seed, vocab=6, eos=2, eos_boost=0.0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, 8, vocab, generator=g) * 2
    table[:, :, eos] += eos_boost

    def step(tokens):
        t = tokens.size(1)
        logits = table[tokens[:, -1], t % 8] + 0.1 * tokens.sum(1, keepdim=True).float().sin()
        return F.log_softmax(logits, -1)

    return step


def _reference_beam(step, B, K, L, bos, eos, pad, lp=1.0, n_keep=1):
    """Oscar's _generate_beam_search + BeamHypotheses, as plain Python loops."""
    tokens = torch.full((B * K, 1), bos)
    scores = torch.zeros(B, K)
    scores[:, 1:] = -1e9
    scores = scores.view(-1)
    hyps = [[] for _ in range(B)]
    done = [False] * B
    cur = 1
    while cur < L:
        lpb = step(tokens)
        Vv = lpb.size(-1)
        cand = (lpb + scores[:, None]).view(B, K * Vv)
        ns, nw = cand.topk(2 * K, dim=1)
        nxt = []
        for b in range(B):
            full = len(hyps[b]) >= n_keep
            if full and min(s for s, _ in hyps[b]) >= ns[b].max().item() / (L - 1) ** lp:
                done[b] = True
            if done[b]:
                nxt += [(0.0, pad, b * K)] * K
                continue
            beam = []
            for idx, sc in zip(nw[b].tolist(), ns[b].tolist()):
                bid, w = idx // Vv, idx % Vv
                if w == eos or cur + 1 == L:
                    h = tokens[b * K + bid, :cur].tolist()
                    s = sc / len(h) ** lp
                    if len(hyps[b]) < n_keep or s > min(x for x, _ in hyps[b]):
                        hyps[b].append((s, h))
                        if len(hyps[b]) > n_keep:
                            hyps[b].remove(min(hyps[b], key=lambda x: x[0]))
                else:
                    beam.append((sc, w, b * K + bid))
                if len(beam) == K:
                    break
            nxt += beam if beam else [(0.0, pad, b * K)] * K
        if cur + 1 == L:
            break
        scores = torch.tensor([x[0] for x in nxt])
        idx = torch.tensor([x[2] for x in nxt])
        tokens = torch.cat([tokens[idx], torch.tensor([x[1] for x in nxt])[:, None]], 1)
        cur += 1
        if all(done):
            break
    best = [max(h, key=lambda x: x[0]) for h in hyps]
    return [h + [eos] for _, h in best], [s for s, _ in best]


@pytest.mark.parametrize("seed,eos_boost,K", [(0, 0.0, 3), (1, 1.5, 3), (2, 3.0, 2), (3, 1.0, 4)])
def test_beam_search_matches_reference_loop(seed, eos_boost, K):
    B, L = 4, 7
    step = _markov_step(seed, eos_boost=eos_boost)
    tokens, scores = beam_search(step, B, num_beams=K, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=L)
    ref_tokens, ref_scores = _reference_beam(step, B, K, L, 1, 2, 0)
    for b in range(B):
        seq = tokens[b, 0].tolist()
        assert seq[: len(ref_tokens[b])] == ref_tokens[b] and all(t == 0 for t in seq[len(ref_tokens[b]):])
        assert math.isclose(scores[b, 0].item(), ref_scores[b], rel_tol=1e-5, abs_tol=1e-5)


def test_wide_beam_is_exhaustive():
    """With enough beams nothing is pruned: the result is the best-scoring sequence over all of them."""
    vocab, L, eos = 4, 5, 2
    step = _markov_step(7, vocab=vocab, eos_boost=0.5)
    _tokens, scores = beam_search(step, 1, num_beams=60, bos_token_id=1, eos_token_id=eos, pad_token_id=0, max_length=L)
    best = -float("inf")
    for n in range(1, L):  # n generated words, the last one eos (or cut at max length)
        for words in itertools.product(range(vocab), repeat=n):
            if eos in words[:-1]:
                continue
            seq = torch.tensor([[1, *words]])
            total = sum(step(seq[:, : i + 1])[0, seq[0, i + 1]].item() for i in range(n))
            if words[-1] == eos:
                best = max(best, total / n)
            elif n == L - 1:
                best = max(best, total / (L - 1))
    assert math.isclose(scores[0, 0].item(), best, rel_tol=1e-5)


def test_greedy_is_argmax_and_beam_one_equals_greedy_without_early_eos():
    step = _markov_step(5)
    tokens, scores = greedy_search(step, 3, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=8)
    seq = torch.full((3, 1), 1)
    alive = torch.ones(3, dtype=torch.bool)
    total, count = torch.zeros(3), torch.zeros(3)
    for _ in range(7):
        lp = step(seq)
        w = lp.argmax(-1)
        total += torch.where(alive, lp.gather(1, w[:, None])[:, 0], torch.zeros(3))
        count += alive.float()
        w = torch.where(alive, w, torch.zeros_like(w))
        seq = torch.cat([seq, w[:, None]], 1)
        alive &= w != 2
    seq[:, -1] = torch.where(alive, torch.full((3,), 2), seq[:, -1])
    assert torch.equal(tokens[:, 0], seq) and torch.allclose(scores[:, 0], total / count)
    # no eos ever wins: one beam follows the argmax path exactly
    no_eos = _markov_step(5, eos_boost=-1e4)
    g_tok, g_sc = greedy_search(no_eos, 3, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=8)
    b_tok, b_sc = beam_search(no_eos, 3, num_beams=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=8)
    assert torch.equal(g_tok, b_tok)
    assert torch.allclose(b_sc, g_sc, atol=1e-5)  # beam: sum / len(hyp) = 7; greedy: mean over 7 tokens


# ------------------------------------------------------------------------------ caption decoding
def _caption_model():
    m = tiny("captioning", initializer_range=0.6, max_caption_length=8, max_gen_length=7, hidden_dropout_prob=0.0)
    return m.eval()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_uncached(num_beams):
    m = _caption_model()
    b = make_batch(B=3, T=12, R=5, seed=3)
    cached = m.generate(b, num_beams=num_beams, use_cache=True)
    full = m.generate(b, num_beams=num_beams, use_cache=False)
    assert torch.equal(cached["caption_ids"], full["caption_ids"])
    assert torch.allclose(cached["caption_scores"], full["caption_scores"], atol=1e-5)
    assert cached["caption_ids"].shape == (3, 6)
    assert len({tuple(c) for c in cached["caption_ids"].tolist()}) > 1  # captions depend on the image


def test_decoding_step_matches_training_forward():
    """The decode step's [MASK] logits equal the training forward on [CLS] w1 [MASK] + tags + regions."""
    m = _caption_model()
    b = make_batch(B=2, T=12, R=5, seed=4)
    out = m.generate(b, num_beams=1, use_cache=True, max_length=4)  # [CLS] w1 w2 ([SEP] replaces w3)
    w1 = out["caption_ids"][:, 0]
    assert (w1 != 2).all()
    tags = b.input_ids[:, 6:12]
    ids = torch.cat([torch.tensor([[1], [1]]), w1[:, None], torch.full((2, 1), 3), torch.zeros(2, 5, dtype=torch.long), tags], 1)
    seg = torch.cat([torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
    tag_valid = b.input_mask[:, 6:12]
    mask[:, 8:] = tag_valid
    labels = torch.full((2, 14), -1)
    labels[:, 2] = 5
    train = SampleList({**b, "input_ids": ids, "segment_ids": seg, "input_mask": mask, "lm_label_ids": labels})
    m.config.generate_in_eval = False
    logits = m(train)["scores"]
    assert torch.equal(logits.argmax(-1), out["caption_ids"][:, 1])


# ------------------------------------------------------------------------------ heads train
@pytest.mark.parametrize("head", ["vqa", "retrieval", "nlvr2", "pretraining", "captioning"])
def test_head_trains_on_fixed_batch(head):
    kw = {"classifier": "mlp", "loss_type": "xe"} if head == "nlvr2" else {}
    if head == "captioning":
        kw.update(max_caption_length=8, freeze_embedding=False)
    m = tiny(head, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    b = make_batch(targets=(torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) > 0.7).float())
    if head == "retrieval":
        b["is_correct"] = torch.tensor([1, 0, 1])
    if head == "nlvr2":
        b["targets"] = torch.tensor([1, 0, 1])
        b["image_feature_1"] = torch.randn(3, 4, D)
        b["image_info_1"] = SampleList({"max_features": torch.tensor([4, 2, 3])})
    if head in ("pretraining", "captioning"):
        labels = torch.full((3, 12), -1)
        labels[:, 2], labels[1, 4] = 7, 9
        b["lm_label_ids"] = labels
        b["contrastive_labels"] = torch.tensor([0, 1, 2])
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        out = m(b)
        loss = sum(out["losses"].values())
        assert torch.isfinite(loss) and all(k.startswith("train/vqa2/") for k in out["losses"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9 and min(losses[-3:]) < min(losses[:3]), losses
    if head == "retrieval":
        assert out["scores"].shape == (3,) and torch.allclose(out["scores"], out["logits"].softmax(-1)[:, 1])
    if head == "nlvr2":
        assert m.classifier[2].__class__.__name__ == "LayerNorm" and m.classifier[0].in_features == 2 * H


def test_nlvr2_pair_order_and_vqa_bce_scale():
    m = tiny("nlvr2", classifier="linear", loss_type="xe").eval()
    b = make_batch(image_feature_1=torch.randn(3, 6, D), image_info_1=SampleList({"max_features": torch.tensor([6, 6, 6])}))
    pooled = []
    for i in (0, 1):
        inp = m.inputs(b, i)
        pooled.append(m.bert(inp.input_ids, inp.segment_ids, inp.attention_mask(), inp.img_feats)[1])
    expect = m.classifier(torch.cat(pooled, 1))
    assert torch.allclose(m(b)["scores"], expect, atol=1e-5)
    logits, targets = torch.randn(4, 10), torch.rand(4, 10)
    from mmf_plugins.models.vinvl.modeling_vinvl import classification_loss

    assert torch.isclose(classification_loss(logits, targets, "bce"), F.binary_cross_entropy_with_logits(logits, targets) * 10)


# ------------------------------------------------------------------------------ conversion
def official_state_dict(head: str, img_ln: bool = True, old_names: bool = False) -> dict:
    """Keys and shapes of microsoft/Oscar checkpoints (reference §1.1), shrunk to the tiny config."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    ln = ("gamma", "beta") if old_names else ("weight", "bias")
    sd = {
        "bert.embeddings.word_embeddings.weight": r(V, H), "bert.embeddings.position_embeddings.weight": r(96, H),
        "bert.embeddings.token_type_embeddings.weight": r(2, H),
        f"bert.embeddings.LayerNorm.{ln[0]}": 1 + r(H), f"bert.embeddings.LayerNorm.{ln[1]}": r(H),
        "bert.pooler.dense.weight": r(H, H), "bert.pooler.dense.bias": r(H),
        "bert.img_embedding.weight": r(H, D), "bert.img_embedding.bias": r(H),
    }
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[p + f"attention.self.{n}.weight"], sd[p + f"attention.self.{n}.bias"] = r(H, H), r(H)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = r(H, H), r(H)
        sd[p + f"attention.output.LayerNorm.{ln[0]}"], sd[p + f"attention.output.LayerNorm.{ln[1]}"] = 1 + r(H), r(H)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(64, H), r(64)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(H, 64), r(H)
        sd[p + f"output.LayerNorm.{ln[0]}"], sd[p + f"output.LayerNorm.{ln[1]}"] = 1 + r(H), r(H)
    if img_ln:
        sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"] = 1 + r(H), r(H)
    if head == "vqa":
        sd["classifier.weight"], sd["classifier.bias"] = r(10, H), r(10)
    elif head == "nlvr2":
        last = 3 if img_ln else 2  # the LayerNorm variant shifts the last Linear to .3
        sd.update({"classifier.0.weight": r(3 * H, 2 * H), "classifier.0.bias": r(3 * H),
                   f"classifier.{last}.weight": r(2, 3 * H), f"classifier.{last}.bias": r(2)})
        if img_ln:
            sd["classifier.2.weight"], sd["classifier.2.bias"] = 1 + r(3 * H), r(3 * H)
    elif head in ("pretraining", "captioning"):
        sd.update({"cls.predictions.transform.dense.weight": r(H, H), "cls.predictions.transform.dense.bias": r(H),
                   f"cls.predictions.transform.LayerNorm.{ln[0]}": 1 + r(H), f"cls.predictions.transform.LayerNorm.{ln[1]}": r(H),
                   "cls.predictions.bias": r(V), "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"]})
        if head == "pretraining":
            sd["cls.seq_relationship.weight"], sd["cls.seq_relationship.bias"] = r(3, H), r(3)
    return sd


OSCAR_JSON = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 96, "type_vocab_size": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.3,
              "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12, "initializer_range": 0.02,
              "img_feature_dim": 2054, "img_feature_type": "faster_r-cnn", "use_img_layernorm": 1, "img_layer_norm_eps": 1e-12,
              "num_labels": 10, "loss_type": "bce", "classifier": "linear", "cls_hidden_scale": 3, "output_attentions": False}


@pytest.mark.parametrize("head,img_ln,old", [("vqa", True, True), ("vqa", False, False), ("nlvr2", True, False),
                                             ("nlvr2", False, False), ("pretraining", True, True), ("captioning", True, False)])
def test_official_layout_converts_without_missing_or_unused_keys(head, img_ln, old):
    sd = official_state_dict(head, img_ln, old)
    converted, report = C.convert_vinvl(sd)
    assert not report.unused and len(report.mapped) == len(sd)
    cfg = C.config_from_oscar_json({**OSCAR_JSON, "use_img_layernorm": int(img_ln)}, converted)
    assert cfg["use_img_layernorm"] is img_ln and cfg["training_head_type"] == head
    model = build_model("vinvl", cfg)
    assert (model.bert.LayerNorm is not None) is img_ln
    load = load_state_dict_with_report(model, converted, strict=True)
    assert not load.missing and not load.unused and not load.mismatched


def test_converted_model_reproduces_direct_computation():
    sd = official_state_dict("vqa", img_ln=True, old_names=True)
    converted, _ = C.convert_vinvl(sd)
    model = build_model("vinvl", C.config_from_oscar_json(OSCAR_JSON, converted)).eval()
    load_state_dict_with_report(model, converted, strict=True)
    b = make_batch()
    ids, seg = b.input_ids, b.segment_ids
    feats, mask = b.image_feature_0, torch.cat([b.input_mask, (torch.arange(6)[None] < b.image_info_0.max_features[:, None]).long()], 1)
    hf = BertModel(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=96, attn_implementation="eager")).eval()
    hf_sd = {C.rename_oscar_key(k)[5:]: v for k, v in sd.items()
             if k.startswith(("bert.embeddings", "bert.encoder", "bert.pooler"))}
    hf.load_state_dict(hf_sd)
    img = F.layer_norm(feats @ sd["bert.img_embedding.weight"].T + sd["bert.img_embedding.bias"], (H,),
                       sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"], 1e-12)
    x = torch.cat([hf.embeddings(input_ids=ids, token_type_ids=seg), img], 1)
    seq = hf.encoder(x, attention_mask=(1.0 - mask[:, None, None, :].float()) * -10000.0).last_hidden_state
    expect = hf.pooler(seq) @ sd["classifier.weight"].T + sd["classifier.bias"]
    assert torch.allclose(model(b)["scores"], expect, atol=1e-5)


def test_converter_reads_a_save_pretrained_dir_and_never_unpickles_training_args(tmp_path):
    sd = official_state_dict("pretraining")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(__import__("json").dumps({**OSCAR_JSON, "num_contrast_classes": 3}))
    (tmp_path / "training_args.bin").write_bytes(b"not a pickle at all")  # reading it would raise
    assert C.convert_vinvl.accepts_directory is True
    _converted, report = C.convert_vinvl(tmp_path)
    assert any("training_args.bin ignored" in n for n in report.notes)
    cfg = C.convert_vinvl.model_config_from(tmp_path)
    assert cfg["training_head_type"] == "pretraining" and cfg["num_contrast_classes"] == 3 and cfg["hidden_dropout_prob"] == 0.3
    model = build_model("vinvl", cfg)
    _, rep = C.convert_vinvl(tmp_path, model=model)
    assert not rep.missing and not rep.unused and not rep.mismatched
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_decoder_bias_and_missing_tied_decoder_are_folded():
    sd = official_state_dict("captioning")
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()
    del sd["cls.predictions.decoder.weight"]
    converted, report = C.convert_vinvl({"module." + k: v for k, v in sd.items()})
    assert torch.equal(converted["cls.predictions.decoder.weight"], sd["bert.embeddings.word_embeddings.weight"])
    assert "module.cls.predictions.decoder.bias" in report.unused and any("duplicate" in n for n in report.notes)
    del sd["cls.predictions.bias"]
    converted, _ = C.convert_vinvl(sd)
    assert torch.equal(converted["cls.predictions.bias"], sd["cls.predictions.decoder.bias"])


def test_mmf_layout_converts():
    src = official_state_dict("vqa", img_ln=True)
    mmf = {}
    for k, v in src.items():
        if k.startswith("bert.img_embedding."):
            mmf["vinvl.bert.img_embedding.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("bert.LayerNorm."):
            mmf["vinvl.bert.img_embedding.1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("bert.pooler."):
            mmf["vinvl.classifier.pooler." + k[len("bert.pooler."):]] = v
        elif k.startswith("classifier."):
            mmf["vinvl.classifier.classifier.0." + k.rsplit(".", 1)[1]] = v
        else:
            mmf["vinvl." + k] = v
    mmf["vinvl.bert.embeddings.position_ids"] = torch.arange(96)[None]
    converted, report = C.convert_vinvl({"model": mmf, "config": {}})
    assert report.unused == ["vinvl.bert.embeddings.position_ids"]
    assert {k: torch.equal(v, src[k]) for k, v in converted.items()} == {k: True for k in src}
    model = build_model("vinvl", C.config_from_state_dict(converted))
    rep = load_state_dict_with_report(model, converted, strict=True)
    assert not rep.missing and model.config.classifier == "linear" and model.config.num_labels == 10
    # MMF MLP head with a hidden layer -> mmf_mlp
    mlp = {k: v for k, v in mmf.items() if not k.startswith("vinvl.classifier.classifier.")}
    mlp.update({"vinvl.classifier.classifier.1.dense.weight": torch.randn(2 * H, H), "vinvl.classifier.classifier.1.dense.bias": torch.zeros(2 * H),
                "vinvl.classifier.classifier.1.LayerNorm.weight": torch.ones(2 * H), "vinvl.classifier.classifier.1.LayerNorm.bias": torch.zeros(2 * H),
                "vinvl.classifier.classifier.2.weight": torch.randn(7, 2 * H), "vinvl.classifier.classifier.2.bias": torch.zeros(7)})
    converted, _ = C.convert_vinvl(mlp)
    cfg = C.config_from_state_dict(converted)
    assert cfg["classifier"] == "mmf_mlp" and cfg["cls_num_layers"] == 1 and cfg["num_labels"] == 7
    model = build_model("vinvl", cfg)
    assert not load_state_dict_with_report(model, converted, strict=True).missing


def test_unrecognised_checkpoint_and_bad_config_are_errors():
    with pytest.raises(Exception, match="not a VinVL/OSCAR checkpoint"):
        C.convert_vinvl({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Known keys"):
        VinVLModel({"not_a_key": 1})
    with pytest.raises(ValueError, match="training_head_type"):
        VinVLModel({"training_head_type": "vqaa"})
    with pytest.raises(ValueError, match="dis_code"):
        C.config_from_oscar_json({**OSCAR_JSON, "img_feature_type": "dis_code"})


def test_bert_model_name_loads_a_local_hf_dir(tmp_path):
    torch.manual_seed(3)
    hf = BertForPreTraining(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=96))
    hf.save_pretrained(tmp_path)
    m = build_model("vinvl", {"bert_model_name": str(tmp_path), "training_head_type": "pretraining"})
    assert m.bert_config.hidden_size == H
    assert torch.equal(m.bert.encoder.layer[1].output.dense.weight, hf.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(m.cls.predictions.transform.dense.weight, hf.cls.predictions.transform.dense.weight)
    with pytest.raises(FileNotFoundError, match="local Hugging Face BERT directory"):
        build_model("vinvl", {"bert_model_name": str(tmp_path / "nope")})


def test_registry_alias_and_config_path():
    from mmf_plugins.common.registry import registry

    assert registry.get_model_class("vinvl") is VinVLModel and registry.get_model_class("oscar") is VinVLModel
    from omegaconf import OmegaConf

    from mmf_plugins.common.config import REPO_ROOT

    cfg = OmegaConf.load(REPO_ROOT / VinVLModel.config_path())
    built = VinVLModel(cfg.model_config.vinvl)
    assert built.config.num_labels == 3129 and OmegaConf.to_container(cfg, resolve=True)["model_config"]["oscar"]["num_labels"] == 3129


def test_mmf_pretraining_layout_converts_and_ties_the_decoder():
    src = official_state_dict("pretraining", img_ln=False)
    mmf = {}
    for k, v in src.items():
        if k.startswith("bert.img_embedding."):
            mmf["vinvl.bert.img_embedding.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("bert.pooler."):
            mmf["vinvl.contrast_head.contrast_head.pooler." + k[len("bert.pooler."):]] = v
        elif k.startswith("cls.seq_relationship."):
            mmf["vinvl.contrast_head.contrast_head.classifier.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("cls.predictions."):
            mmf["vinvl.mlm_head." + k] = v
        else:
            mmf["vinvl." + k] = v
    mmf["vinvl.mlm_head.cls.predictions.decoder.weight"] = torch.randn(V, H)  # MMF never ties it
    mmf["vinvl.mlm_head.cls.predictions.decoder.bias"] = src["cls.predictions.bias"]
    converted, report = C.convert_vinvl(mmf)
    assert set(report.unused) == {"vinvl.mlm_head.cls.predictions.decoder.weight", "vinvl.mlm_head.cls.predictions.decoder.bias"}
    cfg = C.config_from_state_dict(converted)
    assert cfg["training_head_type"] == "pretraining" and cfg["num_contrast_classes"] == 3 and cfg["use_img_layernorm"] is False
    model = build_model("vinvl", cfg)
    rep = load_state_dict_with_report(model, converted, strict=True)
    assert not rep.missing and not rep.unused
    assert torch.equal(model.cls.predictions.decoder.weight, src["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.bert.pooler.dense.weight, src["bert.pooler.dense.weight"])
