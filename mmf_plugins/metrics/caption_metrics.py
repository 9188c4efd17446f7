"""Caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L, METEOR) through pycocoevalcap, with or without Java.

Follows tylin/coco-caption as packaged by salaniz/pycocoevalcap 1.2: captions are tokenized by the
Stanford PTBTokenizer (CoreNLP 3.4.1 jar, ``-preserveLines -lowerCase``), punctuation tokens in
coco-caption's list are dropped, then the scorers ``Bleu(4)`` (closest reference length),
``Cider`` (this is CIDEr-D: clipped counts, length penalty sigma 6, IDF from the evaluated
references, so a single image always scores 0), ``Rouge`` (ROUGE-L, beta 1.2) and ``Meteor``
(meteor-1.5.jar) score them. Scores are on coco-caption's scale (CIDEr 1.2, not 120).

Java: when ``java`` is on PATH the jars are used, for exact parity with published numbers. Without
it, a regex tokenizer reproducing the PTB tokenizer + coco-caption punctuation removal on ordinary
captions is used (a warning says so; rare constructions can tokenize differently), and METEOR is
skipped with a warning, never a crash. SPICE is not computed (its jar downloads CoreNLP models at
first use; run pycocoevalcap's ``Spice`` yourself where that is possible).

Deliberate differences from pycocoevalcap: the tokenizer's temp file lives in a private temp dir
(pycocoevalcap writes it next to the jar in site-packages, failing on read-only installs) and Java
reads/writes UTF-8 whatever the locale; every character Java reads as a line break is blanked
(pycocoevalcap blanks only "\\n", so a caption holding "\\r" or U+2028 silently shifts all later
captions onto other images); references and candidates are tokenized in one JVM call
(pycocoevalcap's ``COCOEvalCap`` starts two); bad input raises ``ValueError`` instead of ``assert``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

# coco-caption's PUNCTUATIONS. NOTE(parity): "-LRB-" etc. are upper-case but the tokenizer runs with
# -lowerCase, so "-lrb-" tokens are kept by coco-caption; so are they here.
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"})  # fmt: skip
METRICS = ("bleu", "cider", "rouge_l", "meteor")
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_warned: set[str] = set()


def java_available() -> bool:
    return shutil.which("java") is not None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _pycocoevalcap_file(*parts: str) -> str:
    spec = importlib.util.find_spec("pycocoevalcap." + parts[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pycocoevalcap is not installed; pip install pycocoevalcap==1.2")
    path = os.path.join(next(iter(spec.submodule_search_locations)), *parts[1:])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the pycocoevalcap install; reinstall pycocoevalcap==1.2")
    return path


# ---------------------------------------------------------------------------------------- tokenizers
def _java_ptb_tokenize(sentences: Sequence[str]) -> list[list[str]]:
    """Stanford PTBTokenizer, one output line per input line, as pycocoevalcap runs it."""
    jar = _pycocoevalcap_file("tokenizer", "stanford-corenlp-3.4.1.jar")
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(sentences))
        cmd = [shutil.which("java") or "java", "-Dfile.encoding=UTF-8", "-cp", jar, _PTB_CLASS,
               "-preserveLines", "-lowerCase", "-encoding", "utf-8", path]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Java PTBTokenizer failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    # Trailing empty inputs may produce no output line at all.
    if len(lines) < len(sentences) and not any(s.strip() for s in sentences[len(lines) :]):
        lines += [""] * (len(sentences) - len(lines))
    if len(lines) != len(sentences):  # a caption held a line break: captions would shift onto other images
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return [line.rstrip().split(" ") for line in lines]


# Characters the Java tokenizer treats as line breaks (pycocoevalcap only replaces "\n").
_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\n\x0b\x0c\u2028\u2029", " "))
_UNICODE_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                                "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... "})  # fmt: skip
_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b")
_TOKEN = re.compile(
    r"""(?:[^\W\d_]\.){2,}                    # abbreviations: u.s. p.m. e.g.
      | (?:mr|mrs|ms|dr|jr|sr|st|vs)\.(?=\s|$) # titles keep their period
      | \w+(?=n't\b) | n't\b                  # do n't, ca n't, wo n't
      | \by'(?=all\b)                         # y' all
      | '(?:s|re|ve|ll|d|m)\b                 # clitics: 's 're 've 'll 'd 'm
      | \d+(?:[.,:/]\d+)+                     # 3.50 1,000 5:30 3/4
      | [#@]?\w+(?:[-/]\w+)*                  # words, t-shirt, and/or, #tag
      | \.\.\.|--|``|''                       # multi-character punctuation
      | \S                                    # any other single character
    """,
    re.VERBOSE,
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}


def _regex_ptb_tokenize(sentence: str) -> list[str]:
    """Java-free stand-in for PTBTokenizer(-lowerCase) on one caption (before punctuation removal)."""
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), sentence.lower().translate(_UNICODE_PUNCT))
    return [_BRACKETS.get(tok, tok) for tok in _TOKEN.findall(text)]


def tokenize_captions(
    captions: Mapping[Hashable, Sequence[str]], use_java: bool | None = None
) -> dict[Hashable, list[str]]:
    """coco-caption tokenization: ``{id: [caption, ...]} -> {id: [lower-cased tokens joined by " "]}``
    with punctuation tokens removed. ``use_java``: None = Java when available, False = regex tokenizer."""
    java = _resolve_java(use_java)
    flat = [c.translate(_LINE_BREAKS) for caps in captions.values() for c in caps]
    token_lists = _java_ptb_tokenize(flat) if java else [_regex_ptb_tokenize(c) for c in flat]
    out: dict[Hashable, list[str]] = {}
    it = iter(token_lists)
    for key, caps in captions.items():
        out[key] = [" ".join(t for t in next(it) if t and t not in PTB_PUNCTUATION) for _ in caps]
    return out


def _resolve_java(use_java: bool | None) -> bool:
    if use_java is None:
        if java_available():
            return True
        _warn_once(
            "tokenizer",
            "java not found: captions are tokenized by a regex PTB-like tokenizer; scores can differ "
            "slightly from coco-caption's on unusual text (install a JRE for exact parity)",
        )
        return False
    if use_java and not java_available():
        raise RuntimeError("use_java=True but no 'java' executable is on PATH; install a JRE (e.g. openjdk-17-jre)")
    return bool(use_java)


# ------------------------------------------------------------------------------------------ scorers
def _meteor(gts: Mapping, res: Mapping) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(dict(gts), dict(res))
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def _check_caption_inputs(gts: Mapping, res: Mapping) -> None:
    if not isinstance(gts, Mapping) or not isinstance(res, Mapping):
        raise TypeError(
            f"gts and res must be dicts {{image_id: [caption, ...]}}, got {type(gts).__name__}, {type(res).__name__}"
        )
    if set(gts) != set(res):
        missing, extra = set(gts) - set(res), set(res) - set(gts)
        raise ValueError(
            f"gts and res must have the same image ids: {len(missing)} ids have references but no "
            f"candidate (e.g. {sorted(map(str, missing))[:5]}), {len(extra)} have a candidate but no "
            f"references (e.g. {sorted(map(str, extra))[:5]})"
        )
    if not gts:
        raise ValueError("no captions to score: gts and res are empty")
    for key, caps in res.items():
        if isinstance(caps, str) or len(caps) != 1 or not isinstance(caps[0], str):
            raise ValueError(f"res[{key!r}] must be a list holding exactly one caption string, got {caps!r}")
    for key, refs in gts.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"gts[{key!r}] must be a non-empty list of reference strings, got {refs!r}")


def score_captions(
    gts: Mapping[Hashable, Sequence[str]],
    res: Mapping[Hashable, Sequence[str]],
    metrics: Iterable[str] | None = None,
    use_java: bool | None = None,
) -> dict[str, float]:
    """Corpus scores of candidate captions against references.

    Args:
        gts: ``{image_id: [reference caption, ...]}`` (raw text; tokenized here).
        res: ``{image_id: [candidate caption]}`` (exactly one per image, same ids as ``gts``).
        metrics: subset of ``("bleu", "cider", "rouge_l", "meteor")``; None = all (METEOR only with Java).
        use_java: None = PTB tokenizer jar and METEOR when ``java`` is on PATH; False = regex tokenizer,
            no METEOR; True = require Java.

    Returns:
        ``{"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "meteor"}`` for the requested
        metrics (``meteor`` only when Java runs), coco-caption scale.
    """
    wanted = list(METRICS) if metrics is None else list(metrics)
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {list(METRICS)}")
    _check_caption_inputs(gts, res)
    java = _resolve_java(use_java)
    if "meteor" in wanted and not java:
        if not (use_java is False and metrics is None):  # silent only when the caller opted out of Java
            _warn_once("meteor", "METEOR needs Java (meteor-1.5.jar) and is skipped: no 'java' on PATH")
        wanted.remove("meteor")

    # One tokenizer run for references and candidates: keys tagged to keep them apart.
    tokenized = tokenize_captions(
        {**{("gts", k): v for k, v in gts.items()}, **{("res", k): v for k, v in res.items()}}, java
    )
    gts_tok = {k: tokenized[("gts", k)] for k in gts}
    res_tok = {k: tokenized[("res", k)] for k in gts}

    out: dict[str, float] = {}
    if "bleu" in wanted:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
        out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "cider" in wanted:
        from pycocoevalcap.cider.cider import Cider

        out["cider"] = float(Cider().compute_score(gts_tok, res_tok)[0])
    if "rouge_l" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    if "meteor" in wanted:
        out["meteor"] = _meteor(gts_tok, res_tok)
    return out
