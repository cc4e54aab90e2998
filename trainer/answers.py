"""Final-answer extraction and text metrics for generated outputs (pure functions, no model).

Exact match compares the *final answer* of a prediction with that of its reference:

1. Text is NFKC-normalized first, so full-width digits and the full-width colon of "答案：42" read as ASCII.
2. The answer is the rest of the line after the last answer marker: GSM8K's ``#### N``, ``Final answer: N``,
   ``Answer: N``, ``The answer is N``, ``答案：N`` / ``答案: N`` / ``答案是N``, or LaTeX ``\\boxed{N}``.
3. Without a marker the whole text is the answer, except that when the reference's answer is a number the
   prediction's last number is taken (a model that ends "... so she has 7 apples." still matches "#### 7").
4. Answers are compared after ``normalize_answer``: lowercase, whitespace collapsed, surrounding markup and
   trailing punctuation dropped, and a leading number reduced to its canonical value ("1,234.50" -> "1234.5",
   "$7" -> "7", "42个" -> "42").

BLEU is sacrebleu's corpus BLEU (0-100) with its "zh" tokenizer when any text holds CJK characters (it splits
CJK into characters and tokenizes the rest like 13a), else "13a". ROUGE-L is rouge-score's F-measure (0-1),
averaged over pairs, with a tokenizer that keeps every CJK character as one token; rouge-score's default
tokenizer keeps only [a-z0-9] and would score Chinese text as empty.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation, localcontext

# CJK ideographs (base + extension A + compatibility), kana, hangul, and CJK punctuation.
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_RANGES}]")
_ROUGE_TOKEN = re.compile(f"[{_CJK_RANGES}]|[^\\W_{_CJK_RANGES}]+")

# Markers in order of preference; within one marker the last occurrence wins (CoT may quote earlier answers).
# After NFKC, "答案：" is "答案:".
_MARKERS = (
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"final answer\s*(?:is)?\s*[:：]?\s*([^\n]*)", re.IGNORECASE),
    re.compile(r"答案\s*(?:是|为|:)\s*([^\n]*)"),
    re.compile(r"\banswer\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE),
)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_LEADING_NUMBER = re.compile(r"^[$¥€£]?\s*(" + _NUMBER.pattern + r")")
_TRAILING_PUNCT = ".,;:!?。，；：！？、"
_WRAPPERS = "*_`\"'“”‘’「」()（）[]"


def is_cjk(text: str) -> bool:
    """True when ``text`` holds at least one CJK / kana / hangul character."""
    return _CJK.search(text) is not None


def canonical_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-7.0' -> '-7', '.5' -> '0.5'; None when ``text`` is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # normalize() drops trailing zeros; the quantize keeps integers out of exponent form ("1E+2"). Both round to
    # the context's precision: one as wide as the text keeps a model's run-on digit string (past 28 digits) exact.
    with localcontext(Context(prec=max(28, len(text)))):
        normal = value.normalize()
        if normal == normal.to_integral_value():
            normal = normal.quantize(Decimal(1))
    text = format(normal, "f")
    return "0" if text == "-0" else text


def normalize_answer(text: str) -> str:
    """Canonical form of an answer string for exact match (see the module docstring, rule 4)."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = " ".join(text.split())
    text = text.strip(_WRAPPERS + " ").rstrip(_TRAILING_PUNCT + " ").strip(_WRAPPERS + " ")
    leading = _LEADING_NUMBER.match(text)
    if leading:
        number = canonical_number(leading.group(1))
        if number is not None:
            return number
    return text


def extract_marked_answer(text: str) -> str | None:
    """The text after the last answer marker (rule 2), or None when ``text`` has no marker."""
    text = unicodedata.normalize("NFKC", text)
    for marker in _MARKERS:
        found = marker.findall(text)
        if found:
            return str(found[-1]).strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text``, canonicalized; None when there is none."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    return canonical_number(found[-1]) if found else None


def final_answer(text: str, *, numeric: bool = False) -> str:
    """Normalized final answer of ``text``; ``numeric``: fall back to the last number when there is no marker."""
    marked = extract_marked_answer(text)
    if marked is not None:
        return normalize_answer(marked)
    if numeric:
        number = last_number(text)
        if number is not None:
            return number
    return normalize_answer(text)


def is_exact_match(prediction: str, reference: str) -> bool:
    """True when the final answers of ``prediction`` and ``reference`` are equal after normalization."""
    expected = final_answer(reference)
    numeric = canonical_number(expected) is not None
    return final_answer(prediction, numeric=numeric) == expected


class CjkCharTokenizer:
    """rouge-score tokenizer: every CJK character is a token, other text splits into lowercase words."""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0-100, default exp smoothing); tokenizer "zh" when any text is CJK, else "13a"."""
    import sacrebleu

    tokenize = "zh" if any(is_cjk(t) for t in (*predictions, *references)) else "13a"
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (0-1) over pairs, CJK scored per character."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CjkCharTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


@dataclass(frozen=True, kw_only=True)
class GenerationMetrics:
    count: int
    """Pairs scored."""
    exact_match: float
    """Fraction (0-1) of pairs whose final answers match (``is_exact_match``)."""
    bleu: float
    """sacrebleu corpus BLEU, 0-100."""
    rouge_l: float
    """Mean ROUGE-L F-measure, 0-1."""


def score_generations(predictions: list[str], references: list[str]) -> GenerationMetrics:
    """Exact match, BLEU and ROUGE-L of predictions against references (same length, at least one pair)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no prediction/reference pairs to score")
    matches = sum(is_exact_match(p, r) for p, r in zip(predictions, references, strict=True))
    return GenerationMetrics(
        count=len(predictions),
        exact_match=matches / len(predictions),
        bleu=corpus_bleu(predictions, references),
        rouge_l=mean_rouge_l(predictions, references),
    )
