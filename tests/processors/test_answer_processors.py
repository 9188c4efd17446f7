"""vqa_answer: vocabulary loading, official normalization, soft scores vs the official accuracy."""

import json
import random
import time

import pytest
import torch

import mmf_plugins.processors.answer_processors  # noqa: F401  (registers the processors under test)
from mmf_plugins.metrics.vqa_eval import vqa_score
from mmf_plugins.processors.base_processor import build_processor

VOCAB = ["<unk>", "yes", "no", "2", "dog", "red", "t shirt", "0"]


@pytest.fixture
def vocab_dir(tmp_path):
    (tmp_path / "answers_vqa.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return tmp_path


def _proc(vocab_dir, **params):
    return build_processor({"type": "vqa_answer", "params": {"vocab_file": "answers_vqa.txt", **params}},
                           data_dir=str(vocab_dir))


def test_soft_scores_exact(vocab_dir):
    proc = _proc(vocab_dir)
    answers = ["yes"] * 4 + ["no"] * 3 + ["2"] * 2 + ["red"]
    out = proc({"answers": answers})
    expected = torch.zeros(len(VOCAB))
    expected[[1, 2, 3, 5]] = torch.tensor([1.0, 0.9, 0.6, 0.3])
    assert torch.equal(out["targets"], expected)
    assert out["answers"] == answers
    assert out["answers_indices"].tolist() == [1] * 4 + [2] * 3 + [3] * 2 + [5]
    assert out["targets"].dtype == torch.float32 and out["answers_indices"].dtype == torch.long


def test_targets_equal_official_accuracy(vocab_dir):
    proc = _proc(vocab_dir)
    rng = random.Random(0)
    pool = VOCAB[1:] + ["zebra"]
    for _ in range(50):
        n = rng.choice([10, 10, 3, 5])
        answers = [rng.choice(pool) for _ in range(n)]
        targets = proc({"answers": answers})["targets"]
        for index, answer in enumerate(VOCAB[1:], start=1):
            assert targets[index].item() == pytest.approx(vqa_score(answer, answers), abs=1e-6), (answer, answers)


def test_normalization_and_lookup(vocab_dir):
    proc = _proc(vocab_dir)
    assert proc.word2idx("Two") == 3
    assert proc.word2idx("a dog") == 4
    assert proc.word2idx("Yes") == 1
    assert proc.word2idx("T-shirt") == 6
    assert proc.word2idx("none") == 7
    assert proc.word2idx("zebra") == 0  # unk
    assert proc.idx2word(4) == "dog"
    assert len(proc) == proc.get_true_vocab_size() == len(VOCAB)
    out = proc({"answers": ["Two"] * 3 + ["two"] + ["the dog"] * 6})
    assert out["targets"][3].item() == pytest.approx(1.0)
    assert out["targets"][4].item() == pytest.approx(1.0)
    raw = _proc(vocab_dir, normalize=False)
    assert raw.word2idx("Two") == 0


def test_out_of_vocab_counted_and_unk_never_scored(vocab_dir):
    proc = _proc(vocab_dir)
    out = proc({"answers": ["zebra"] * 10})
    assert torch.equal(out["targets"], torch.zeros(len(VOCAB)))
    assert out["answers_indices"].tolist() == [0] * 10
    assert proc.num_out_of_vocab == 1
    partial = proc({"answers": ["zebra"] * 9 + ["yes"]})
    assert partial["targets"][1].item() == pytest.approx(0.3) and proc.num_out_of_vocab == 1
    unk = proc({"answers": ["<unk>"] * 10})
    assert unk["targets"].sum().item() == 0 and proc.num_out_of_vocab == 2
    # dict answers (VQA annotation form) and padding of answers_indices
    short = proc({"answers": [{"answer": "yes"}, {"answer": "no"}, {"answer": "yes"}]})
    assert short["answers_indices"].tolist() == [1, 2, 1] + [0] * 7


def test_vocab_formats(tmp_path):
    (tmp_path / "dict.json").write_text(json.dumps({"no": 1, "yes": 0}))
    proc = build_processor({"type": "vqa_answer", "params": {"vocab_file": str(tmp_path / "dict.json")}})
    assert proc.idx2word(0) == "yes" and proc.unk_index is None
    assert proc({"answers": ["zebra"] * 10})["answers_indices"].tolist() == [-1] * 10
    with pytest.raises(KeyError, match="zebra"):
        proc.word2idx("zebra")
    (tmp_path / "list.json").write_text(json.dumps(["<unk>", "yes"]))
    assert build_processor({"type": "vqa_answer", "params": {"vocab_file": str(tmp_path / "list.json")}}).word2idx("yes") == 1
    (tmp_path / "a.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        build_processor({"type": "vqa_answer", "params": {"vocab_file": str(tmp_path / "a.pkl")}})
    (tmp_path / "dup.txt").write_text("yes\nno\nyes\n")
    with pytest.raises(ValueError, match="twice"):
        build_processor({"type": "vqa_answer", "params": {"vocab_file": str(tmp_path / "dup.txt")}})
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_processor({"type": "vqa_answer", "params": {"vocab_file": "missing.txt"}}, data_dir=str(tmp_path))


def test_full_size_vocab_loads_fast(tmp_path):
    answers = ["<unk>"] + [f"answer {i}" for i in range(3128)]
    (tmp_path / "big.txt").write_text("\n".join(answers) + "\n")
    start = time.perf_counter()
    proc = build_processor({"type": "vqa_answer", "params": {"vocab_file": str(tmp_path / "big.txt")}})
    out = proc({"answers": ["answer 3127"] * 10})
    elapsed = time.perf_counter() - start
    assert len(proc) == 3129 and out["targets"].shape == (3129,) and out["targets"][3128].item() == 1.0
    assert elapsed < 1.0, f"3129-answer vocab took {elapsed:.2f}s"
