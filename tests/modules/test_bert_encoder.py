"""BertFusionEncoder: SDPA masks equal the official additive -10000 mask, local loading, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel

from mmf_plugins.modules.bert_encoder import BertFusionEncoder, build_bert_config

TINY = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 40}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and avoids OpenMP spin-waits when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_layers(encoder: BertFusionEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The 2019-2020 BERT stack written out: softmax(QK^T/sqrt(d) + (1 - m) * -10000)."""
    b, n, h = x.shape
    heads = encoder.config.num_attention_heads
    additive = (1.0 - mask.float())[:, None, None, :] * -10000.0
    for layer in encoder.encoder.layer:
        att = layer.attention
        split = lambda t: t.view(b, n, heads, h // heads).transpose(1, 2)
        q, k, v = split(att.self.query(x)), split(att.self.key(x)), split(att.self.value(x))
        probs = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // heads) + additive, dim=-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, n, h)
        x = att.output.LayerNorm(att.output.dense(ctx) + x)
        x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
    return x


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_mask_equals_additive_minus_10000(impl):
    torch.manual_seed(0)
    enc = BertFusionEncoder(build_bert_config(attn_implementation=impl, **TINY)).eval()
    x = torch.randn(3, 9, 32)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1, 0, 1, 1, 0, 0, 1, 0, 0]])
    with torch.no_grad():
        out = enc(x, mask)
        ref = _reference_layers(enc, x, mask)
        all_valid = enc(x[:1], None)
        assert torch.allclose(all_valid, ref[:1], atol=1e-5)
        three_d = enc(x, mask[:, None, :].expand(3, 9, 9))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(three_d, ref, atol=1e-5)


def test_text_embeddings_and_hidden_states():
    torch.manual_seed(0)
    enc = BertFusionEncoder(build_bert_config(**TINY)).eval()
    ids = torch.randint(0, 50, (2, 6))
    emb = enc.embed_text(ids, torch.ones_like(ids))
    e = enc.embeddings
    manual = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings.weight[:6] + e.token_type_embeddings.weight[1])
    assert torch.allclose(emb, manual, atol=1e-6)
    last, states = enc(emb, torch.ones(2, 6), output_hidden_states=True)
    assert len(states) == 3 and torch.equal(states[-1], last)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        enc.embed_text(torch.zeros(1, 41, dtype=torch.long))


def test_local_directory_loads_first_layers_and_checks_architecture(tmp_path):
    torch.manual_seed(0)
    full = BertModel(build_bert_config(**{**TINY, "num_hidden_layers": 3}), add_pooling_layer=True)
    full.save_pretrained(tmp_path)
    enc = BertFusionEncoder.from_options(bert_model_name=str(tmp_path), num_hidden_layers=2)
    assert len(enc.encoder.layer) == 2 and enc.config._attn_implementation == "sdpa"
    assert torch.equal(enc.encoder.layer[1].output.dense.weight, full.encoder.layer[1].output.dense.weight)
    assert torch.equal(enc.word_embeddings.weight, full.embeddings.word_embeddings.weight)
    assert "pooler" not in " ".join(enc.state_dict())
    with pytest.raises(ValueError, match="hidden_size=64"):
        build_bert_config(str(tmp_path), hidden_size=64)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_bert_config(str(tmp_path / "missing_dir"))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = build_bert_config(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    a = BertFusionEncoder(cfg).train()
    b = BertFusionEncoder(cfg, gradient_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    a(x, mask).sum().backward()
    b(x, mask).sum().backward()
    ga, gb = a.encoder.layer[0].attention.self.query.weight.grad, b.encoder.layer[0].attention.self.query.weight.grad
    assert ga.abs().sum() > 0 and torch.allclose(ga, gb, atol=1e-5)
