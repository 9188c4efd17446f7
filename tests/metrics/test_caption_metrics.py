"""Caption metrics: hand-checked BLEU, parity with pycocoevalcap's scorers, the Java-free fallback,
and (where Java is installed) the PTB tokenizer jar and METEOR."""

import logging
import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from mmf_plugins.metrics import caption_metrics
from mmf_plugins.metrics.caption_metrics import (
    java_available,
    score_captions,
    tokenize_captions,
)

needs_java = pytest.mark.skipif(not java_available(), reason="java is not installed")

# already lower-case, no punctuation: tokenization is the identity, so the scorers can be fed directly
GTS = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse", "a man on a horse near the sea"],
    2: ["two dogs play in the grass", "dogs playing with a ball in a park"],
    3: ["a red bus on a city street", "a double decker bus parked by the road", "a bus driving down the street"],
    4: ["a plate of food with rice and beans", "a dish of rice beans and salad"],
}
RES = {
    1: ["a man riding a horse"],
    2: ["a dog playing in a park"],
    3: ["a red bus on the street"],
    4: ["a pizza on a table"],
}


def test_bleu_by_hand():
    gts = {0: ["the cat sat on the mat"]}
    out = score_captions(gts, {0: ["the cat sat on a mat"]}, metrics=["bleu"], use_java=False)
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> no brevity penalty
    assert out["bleu1"] == pytest.approx(5 / 6, rel=1e-6)
    assert out["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), rel=1e-6)
    assert out["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3), rel=1e-6)
    assert out["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4), rel=1e-6)
    short = score_captions(gts, {0: ["The cat."]}, metrics=["bleu"], use_java=False)
    assert short["bleu1"] == pytest.approx(math.exp(1 - 6 / 2), rel=1e-6)  # brevity penalty e^(1 - r/c)
    assert short["bleu2"] == pytest.approx(math.exp(1 - 6 / 2), rel=1e-6)


def test_matches_pycocoevalcap_scorers():
    out = score_captions(GTS, RES, use_java=False)
    bleu, _ = Bleu(4).compute_score(GTS, RES, verbose=0)
    assert [out[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, rel=1e-12)
    assert out["cider"] == pytest.approx(Cider().compute_score(GTS, RES)[0], rel=1e-12)
    assert out["rouge_l"] == pytest.approx(Rouge().compute_score(GTS, RES)[0], rel=1e-12)
    assert "meteor" not in out
    assert 0 < out["cider"] < 10 and 0 < out["bleu4"] < out["bleu1"] < 1


def test_cider_of_a_single_image_is_zero():
    # IDF comes from the evaluated references: with one image every n-gram has df = 1 -> log(1) = 0
    assert score_captions({1: GTS[1]}, {1: RES[1]}, metrics=["cider"], use_java=False)["cider"] == 0.0


def test_regex_tokenizer_strips_punctuation_like_coco_caption():
    out = tokenize_captions({7: ["A man's T-shirt (red), isn't it?", "Two dogs... playing!"]}, use_java=False)
    assert out == {7: ["a man 's t-shirt -lrb- red -rrb- is n't it", "two dogs playing"]}


def test_without_java_falls_back_and_skips_meteor(monkeypatch, caplog):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(caption_metrics, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="mmf_plugins.metrics.caption_metrics"):
        out = score_captions(GTS, RES)
    assert set(out) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
    assert out == score_captions(GTS, RES, use_java=False)
    assert "regex PTB-like tokenizer" in caplog.text and "METEOR needs Java" in caplog.text
    with pytest.raises(RuntimeError, match="install a JRE"):
        score_captions(GTS, RES, use_java=True)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="same image ids"):
        score_captions(GTS, {1: ["x"]}, use_java=False)
    with pytest.raises(ValueError, match="exactly one caption"):
        score_captions({1: ["a"]}, {1: ["a", "b"]}, use_java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({1: []}, {1: ["a"]}, use_java=False)
    with pytest.raises(ValueError, match="unknown caption metrics"):
        score_captions(GTS, RES, metrics=["spice"], use_java=False)


PTB_CASES = [
    "A man riding a horse.",
    "The dog's ball isn't red, it's \"blue\"!",
    "Two people (a man and a woman) sit on a bench; they're talking...",
    "A t-shirt costs $3.50 at 5:30 p.m. in the U.S.",
    "Mr. Smith's cat - on the mat -- sleeping? Yes!",
    "a [red] {box} & a 50% discount @home #tag",
    "I'm sure you'll see we've done it, didn't they'd?",
    "cannot gonna wanna 1,000 3/4 e-mail",
    "A MAN ON A BIKE   WITH   spaces",
    "Kids can't wait to open their presents...",
    "A café in Paris \u2014 tr\u00e8s chic \u201cquoted\u201d \u2018here\u2019",
    "It costs $1,299.99! Dr. Who's show, y'all",
    "",
    "a dog\u2028runs\rfast",  # Java reads these as line breaks: must not shift later captions
    "page\x0cbreak\x0bhere",
    "last caption",
]


@needs_java
def test_regex_tokenizer_matches_the_java_ptb_tokenizer():
    captions = {i: [c] for i, c in enumerate(PTB_CASES)}
    java = tokenize_captions(captions, use_java=True)
    assert tokenize_captions(captions, use_java=False) == java
    assert java[len(PTB_CASES) - 3] == ["a dog runs fast"] and java[len(PTB_CASES) - 1] == ["last caption"]


@needs_java
def test_java_path_with_meteor_matches_pycocoevalcap(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_module

    scorer = meteor_module.Meteor()  # one JVM (loading METEOR's paraphrase table takes seconds)
    expected = scorer.compute_score(GTS, RES)[0]
    monkeypatch.setattr(meteor_module, "Meteor", lambda: scorer)
    out = score_captions(GTS, RES, use_java=True)  # PTB jar, then METEOR on the same scorer
    assert set(out) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "meteor"}
    assert out["cider"] == pytest.approx(Cider().compute_score(GTS, RES)[0], rel=1e-12)
    assert out["meteor"] == pytest.approx(expected, rel=1e-9) and 0 < out["meteor"] < 1
    assert scorer.meteor_p.poll() is not None  # score_captions shut the METEOR process down
