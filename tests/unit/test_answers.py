"""Final-answer extraction and text metrics, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from trainer.answers import (
    CjkCharTokenizer,
    canonical_number,
    corpus_bleu,
    final_answer,
    is_exact_match,
    mean_rouge_l,
    normalize_answer,
    score_generations,
)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K
        ("#### 1,234", "1234"),
        ("Step 1 ... Answer: 18", "18"),
        ("so the answer is $1,234.50.", "1234.5"),
        ("Final answer: Paris.", "paris"),
        ("Final Answer: **B**", "b"),
        ("答案：42", "42"),  # full-width colon
        ("答案: 42个苹果。", "42"),
        ("所以答案是 ４２。", "42"),  # full-width digits
        ("Answer: 3\nwait, let me redo it.\nAnswer: 5", "5"),  # the last marker wins
        ("\\boxed{-0.50}", "-0.5"),
        ("The capital is Paris.", "the capital is paris"),  # no marker: the whole text
    ],
)
def test_final_answer(text: str, answer: str) -> None:
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [("1,000", "1000"), ("7.0", "7"), ("-0", "0"), (".5", "0.5"), ("100", "100"), ("2.50", "2.5"), ("x", None)],
)
def test_canonical_number(raw: str, canonical: str | None) -> None:
    assert canonical_number(raw) == canonical


def test_canonical_number_of_a_run_on_digit_string() -> None:
    # A half-trained model can write hundreds of digits; more than Decimal's default 28-digit context.
    digits = "1234567890" * 40
    assert canonical_number(digits) == digits
    assert final_answer("Answer: " + digits + "0.0") == digits + "0"


def test_normalize_answer_strips_markup_case_space_and_trailing_punctuation() -> None:
    assert normalize_answer("  **New   York**. ") == "new york"
    assert normalize_answer("「是」。") == "是"
    assert normalize_answer("$7") == "7"


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("She has 3 + 4 = 7 apples.\nAnswer: 7", "3 + 4 = 7\n#### 7", True),
        ("so she has 7 apples in total.", "#### 7", True),  # numeric reference: the last number counts
        ("so she has 7 apples, not 8.", "#### 7", False),
        ("Answer: 7.00", "答案：7", True),
        ("Answer: 1,000", "#### 1000", True),
        ("Answer: 70", "#### 7", False),
        ("paris", "Final answer: Paris", True),
        ("The capital is Paris.", "Final answer: Paris", False),  # text answers need the marker
    ],
)
def test_is_exact_match(prediction: str, reference: str, expected: bool) -> None:
    assert is_exact_match(prediction, reference) is expected


def test_rouge_tokenizer_splits_cjk_into_characters() -> None:
    assert CjkCharTokenizer().tokenize("猫坐在 The Mat, 42个") == ["猫", "坐", "在", "the", "mat", "42", "个"]


def test_bleu_english_identical_and_chinese_by_hand() -> None:
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # 猫坐在垫子上 vs 猫坐在椅子上, one token per character: n-gram precisions 5/6, 3/5, 1/4, and 0/3, which
    # sacrebleu's default "exp" smoothing turns into 1/(2*3); same length, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert corpus_bleu(["猫坐在垫子上"], ["猫坐在椅子上"]) == pytest.approx(expected)  # 37.99


def test_rouge_l_by_hand() -> None:
    # LCS 猫坐在子上 = 5 of 6 on both sides: P = R = F = 5/6.
    assert mean_rouge_l(["猫坐在垫子上"], ["猫坐在椅子上"]) == pytest.approx(5 / 6)
    # ["she","has","7","apples"] vs ["3","4","7"]: LCS 1, P = 1/4, R = 1/3, F = 2PR/(P+R) = 2/7.
    assert mean_rouge_l(["She has 7 apples"], ["3 + 4 = 7"]) == pytest.approx(2 / 7)


HAND_PAIRS = [
    ("She has 7 apples.\nAnswer: 7", "3 + 4 = 7\n#### 7"),
    ("答案：42", "答案是42。"),
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("猫坐在垫子上", "猫坐在椅子上"),
]
"""Scored by hand below; tests/integration/test_evaluate.py scores the same pairs through the CLI."""

HAND_EXACT_MATCH = 0.75
"""Pairs 1-3 match (7 = 7 via "Answer:" and "####"; 42 = 42 via "答案："/"答案是"; identical text); pair 4 does not."""

# BLEU, sacrebleu "zh" tokenization (the corpus has CJK), hypothesis / reference tokens:
#   1: She has 7 apples . Answer : 7 (8)  /  3 + 4 = 7 # # # # 7 (10)   n-gram matches 2/8, 0/7, 0/6, 0/5
#   2: 答 案 ： 42 (4)                     /  答 案 是 42 。 (5)           matches 3/4, 1/3, 0/2, 0/1
#   3: the cat sat on the mat (6)         /  identical (6)               matches 6/6, 5/5, 4/4, 3/3
#   4: 猫 坐 在 垫 子 上 (6)                /  猫 坐 在 椅 子 上 (6)          matches 5/6, 3/5, 1/4, 0/3
# Corpus precisions 16/24, 9/20, 5/16, 3/12 (none zero: no smoothing); hyp 24 < ref 27 tokens: BP = e^(1-27/24).
HAND_BLEU = 100 * math.exp(1 - 27 / 24) * (16 / 24 * 9 / 20 * 5 / 16 * 3 / 12) ** 0.25  # 34.5296

# ROUGE-L F per pair, CJK per character, punctuation dropped:
#   1: [she has 7 apples answer 7] vs [3 4 7 7]: LCS 2, P 2/6, R 2/4, F 2/5
#   2: [答 案 42] vs [答 案 是 42]: LCS 3, P 1, R 3/4, F 6/7
#   3: F 1;  4: F 5/6
HAND_ROUGE_L = (2 / 5 + 6 / 7 + 1 + 5 / 6) / 4  # 0.7726


def test_score_generations_matches_the_hand_computation() -> None:
    predictions, references = zip(*HAND_PAIRS, strict=True)
    metrics = score_generations(list(predictions), list(references))
    assert metrics.count == 4
    assert metrics.exact_match == HAND_EXACT_MATCH
    assert metrics.bleu == pytest.approx(HAND_BLEU, abs=1e-6)
    assert metrics.rouge_l == pytest.approx(HAND_ROUGE_L, abs=1e-9)


def test_score_generations_refuses_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_generations(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no prediction"):
        score_generations([], [])
