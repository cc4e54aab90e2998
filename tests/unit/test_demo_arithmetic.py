"""The demo's problem generator: held-out problems are new questions, the stated share of them use operand pairs
training never saw, and every chain of thought computes its answer."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from sft_stack.demo.arithmetic import EN_NAMES, TRAIN_NAMES, ZH_NAMES, final_answer, generate_problems, solve, write_csv

TRAIN, HELDOUT, UNSEEN = 2000, 300, 0.4


@pytest.fixture(scope="module")
def problems() -> tuple[list, list]:
    return generate_problems(train_size=TRAIN, heldout_size=HELDOUT, unseen_fraction=UNSEEN, seed=3)


def test_held_out_shares_no_question_and_no_name_with_training(problems: tuple[list, list]) -> None:
    train, heldout = problems
    assert len(train) == TRAIN and len(heldout) == HELDOUT
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    held_out_names = ZH_NAMES[TRAIN_NAMES:] + EN_NAMES[TRAIN_NAMES:]
    assert all(any(name in p.prompt for name in held_out_names) for p in heldout)
    assert not any(name in p.prompt for p in train for name in held_out_names)
    assert {p.lang for p in heldout} == {"zh", "en"}


def test_stated_fraction_of_held_out_operand_pairs_is_absent_from_training(problems: tuple[list, list]) -> None:
    train, heldout = problems
    seen = {(p.a, p.b) for p in train} | {(p.b, p.a) for p in train}
    unseen = [p for p in heldout if (p.a, p.b) not in seen]
    assert len(unseen) == round(HELDOUT * UNSEEN) == sum(p.unseen_operands for p in heldout)
    assert all(p.unseen_operands for p in unseen)


def test_every_chain_of_thought_computes_its_stated_answer(problems: tuple[list, list]) -> None:
    train, heldout = problems
    for p in train + heldout:
        assert final_answer(p.output) == p.a + p.b == final_answer(p.answer_only)
        # Re-do the column addition from the written steps: each step adds the operands' digits of its column
        # and the carry the step before passed on, writes that sum as two digits, then writes the sum's last
        # digit and passes on its tens, and the written digits spell the answer.
        steps = re.findall(r"(\d)\+(\d)\+(\d)=(\d\d)[，,] ?(?:写|write )(\d) ?(?:进|carry )(\d)", p.output)
        assert len(steps) == len(str(p.a)) == len(str(p.b)), p.output
        carry, digits = 0, []
        for column, (x, y, carried, written_sum, digit, carry_out) in enumerate(steps):
            assert (int(x), int(y)) == (p.a // 10**column % 10, p.b // 10**column % 10)
            assert int(carried) == carry
            total = int(x) + int(y) + carry
            assert int(written_sum) == total
            assert (int(digit), int(carry_out)) == (total % 10, total // 10)
            digits.append(digit)
            carry = int(carry_out)
        assert int(("1" if carry else "") + "".join(reversed(digits))) == p.a + p.b


def test_worked_example_in_both_languages() -> None:
    assert solve(347, 285, "zh") == (
        "列竖式计算347+285。个位：7+5+0=12，写2进1。十位：4+8+1=13，写3进1。百位：3+2+1=06，写6进0。"
        "所以347+285=632。答案：632。"
    )
    assert solve(964, 494, "en").endswith(
        "Hundreds: 9+4+1=14, write 4 carry 1. Thousands: write 1. So 964+494=1458. Answer: 1458."
    )


def test_same_seed_same_problems_and_csv_round_trip(tmp_path: Path) -> None:
    a = generate_problems(train_size=50, heldout_size=20, seed=7)
    assert a == generate_problems(train_size=50, heldout_size=20, seed=7)
    assert a != generate_problems(train_size=50, heldout_size=20, seed=8)
    path = write_csv(tmp_path / "train.csv", a[0], answer_only=True)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["prompt"], r["output"]) for r in rows] == [(p.prompt, p.answer_only) for p in a[0]]


def test_impossible_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unseen_fraction"):
        generate_problems(train_size=10, heldout_size=5, unseen_fraction=1.5)
    with pytest.raises(ValueError, match="seen pairs"):
        generate_problems(train_size=2, heldout_size=10, unseen_fraction=0.0)
    with pytest.raises(ValueError, match="operand pairs"):
        generate_problems(train_size=4100, heldout_size=10, digits=2)


def test_two_digit_problems() -> None:
    train, heldout = generate_problems(train_size=300, heldout_size=60, digits=2, seed=1)
    assert all(10 <= n <= 99 for p in train + heldout for n in (p.a, p.b))
    assert all(final_answer(p.output) == p.a + p.b for p in train + heldout)
