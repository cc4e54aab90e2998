"""Arithmetic word problems with chain-of-thought answers, in the seed notes' ``prompt,output`` CSV form.

The seed notes answer "how should a chain-of-thought SFT dataset look?" with records whose output spells out
every step and ends with the answer (``…10除以5等于2…答案：2。``). This module writes such records, in Chinese
and English, for column addition of two numbers of ``digits`` digits (three by default), worked digit by digit
with carries:

    prompt: 小明有347个苹果，又买了285个，现在一共有多少个苹果？
    output: 列竖式计算347+285。个位：7+5+0=12，写2进1。十位：4+8+1=13，写3进1。百位：3+2+1=06，写6进0。
            所以347+285=632。答案：632。

and the same problems with the answer alone (``答案：632。``) for the control run.

The held-out set is built to measure generalization, not recall: its names and objects never occur in
training, so no held-out question text is a training question; ``unseen_fraction`` of its problems also use
an operand pair (in either order) that no training problem uses; the rest reuse a training pair in a new story.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Lang = Literal["zh", "en"]

# (name pool, object pool) per language. Training draws from the first part of each pool, the held-out set from
# the rest, so a held-out story never names a person or an object that training has seen. Most held-out Chinese
# names and objects use characters training never does (<unk> to the character tokenizer); held-out words
# recombined from training characters (李老师, 故事卡) were measured to be harder, not easier (README).
ZH_NAMES = (
    "小明", "小红", "小刚", "小丽", "小华", "小军", "小芳", "小强", "小美", "小龙", "小雪", "小杰",
    "王老师", "李阿姨", "张叔叔", "刘爷爷",
    "小宇", "小梅", "陈奶奶", "赵老师",
)  # fmt: skip
ZH_OBJECTS = (
    ("苹果", "个"), ("铅笔", "支"), ("故事书", "本"), ("邮票", "张"), ("橘子", "个"), ("糖果", "颗"),
    ("贝壳", "个"), ("气球", "个"), ("彩笔", "支"), ("卡片", "张"), ("鸡蛋", "个"), ("纽扣", "颗"),
    ("饼干", "块"), ("硬币", "枚"), ("积木", "块"), ("树叶", "片"),
)  # fmt: skip
EN_NAMES = (
    "Lily", "Tom", "Mary", "Jack", "Emma", "Lucas", "Sophia", "Noah", "Olivia", "Liam", "Ava", "Mia",
    "Ethan", "Grace", "Henry", "Chloe",
    "Oscar", "Priya", "Diego", "Hannah",
)  # fmt: skip
EN_OBJECTS = (
    "apples", "pencils", "books", "stamps", "oranges", "candies", "shells", "balloons", "crayons", "cards",
    "eggs", "buttons",
    "cookies", "coins", "blocks", "leaves",
)  # fmt: skip
TRAIN_NAMES = 16
"""Names 0..15 of each language's pool are for training, the rest for the held-out set."""
TRAIN_OBJECTS = 12
"""Objects 0..11 of each language's pool are for training, the rest for the held-out set."""

ZH_STORIES = (
    "{name}有{a}{unit}{obj}，又买了{b}{unit}，现在一共有多少{unit}{obj}？",
    "{name}第一天收集了{a}{unit}{obj}，第二天收集了{b}{unit}，两天一共收集了多少{unit}{obj}？",
    "盒子里有{a}{unit}{obj}，{name}又放进去{b}{unit}，盒子里现在有多少{unit}{obj}？",
)
EN_STORIES = (
    "{name} has {a} {obj} and buys {b} more. How many {obj} now?",
    "{name} found {a} {obj} on Monday and {b} on Tuesday. How many {obj} in all?",
    "A box holds {a} {obj}. {name} adds {b} more. How many {obj} are in the box?",
)
ZH_PLACES = ("个位", "十位", "百位", "千位")
EN_PLACES = ("Ones", "Tens", "Hundreds", "Thousands")

ANSWER = re.compile(r"(?:答案：|Answer: )(\d+)[。.]$")
"""The final answer every output ends with."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    prompt: str
    output: str
    """The chain of thought, ending in ``答案：N。`` / ``Answer: N.``."""
    answer_only: str
    """The control run's output: ``答案：N。`` / ``Answer: N.``."""
    lang: Lang
    a: int
    b: int
    unseen_operands: bool = False
    """Held-out only: neither (a, b) nor (b, a) is the operand pair of any training problem."""


def column_steps(a: int, b: int, lang: Lang) -> str:
    """The digit-by-digit working of a + b, ones column first: each column's two digits and the carry it
    received (0 included), their sum as two digits, the digit written and the carry passed on
    (``个位：7+5+0=12，写2进1。``).

    Writing the column sum first is what makes the digits learnable: the sum's tens digit is the carry (a
    threshold, learned early) and, with it written, its ones digit is the sum minus ten or the sum itself; the
    digit written and the carry are then copies. Asked for the written digit directly (``7+5+0，写2``), a
    0.9M-parameter model learns the carry but stays near 30% on the digit for hundreds of steps (README).
    The sum always has two digits (``06``) so every step has the same length.
    """
    places = ZH_PLACES if lang == "zh" else EN_PLACES
    steps, carry = [], 0
    for column, (x, y) in enumerate(zip(reversed(str(a)), reversed(str(b)), strict=True)):
        total = int(x) + int(y) + carry
        terms = f"{x}+{y}+{carry}={total:02d}"
        digit, carry = total % 10, total // 10
        if lang == "zh":
            steps.append(f"{places[column]}：{terms}，写{digit}进{carry}。")
        else:
            steps.append(f"{places[column]}: {terms}, write {digit} carry {carry}.")
    if carry:
        last = places[len(str(a))]
        steps.append(f"{last}：写{carry}。" if lang == "zh" else f"{last}: write {carry}.")
    return ("" if lang == "zh" else " ").join(steps)


def solve(a: int, b: int, lang: Lang) -> str:
    """The chain-of-thought output for a + b."""
    s = a + b
    if lang == "zh":
        return f"列竖式计算{a}+{b}。{column_steps(a, b, lang)}所以{a}+{b}={s}。答案：{s}。"
    return f"Add {a}+{b} by columns. {column_steps(a, b, lang)} So {a}+{b}={s}. Answer: {s}."


def final_answer(output: str) -> int | None:
    match = ANSWER.search(output)
    return int(match.group(1)) if match else None


def make_problem(rng: random.Random, a: int, b: int, *, held_out: bool, unseen: bool = False) -> Problem:
    """One story around a + b in a random language, with a held-out or a training name and object."""
    lang: Lang = rng.choice(("zh", "en"))
    pool = ZH_NAMES if lang == "zh" else EN_NAMES
    name = rng.choice(pool[TRAIN_NAMES:] if held_out else pool[:TRAIN_NAMES])
    if lang == "zh":
        obj, unit = rng.choice(ZH_OBJECTS[TRAIN_OBJECTS:] if held_out else ZH_OBJECTS[:TRAIN_OBJECTS])
        prompt = rng.choice(ZH_STORIES).format(name=name, a=a, b=b, obj=obj, unit=unit)
        answer_only = f"答案：{a + b}。"
    else:
        obj = rng.choice(EN_OBJECTS[TRAIN_OBJECTS:] if held_out else EN_OBJECTS[:TRAIN_OBJECTS])
        prompt = rng.choice(EN_STORIES).format(name=name, a=a, b=b, obj=obj)
        answer_only = f"Answer: {a + b}."
    return Problem(
        prompt=prompt, output=solve(a, b, lang), answer_only=answer_only, lang=lang, a=a, b=b, unseen_operands=unseen
    )


def generate_problems(
    *, train_size: int, heldout_size: int, unseen_fraction: float = 0.5, digits: int = 3, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) adding two ``digits``-digit numbers; the same arguments give the
    same problems.

    ``round(heldout_size * unseen_fraction)`` held-out problems use an operand pair that no training problem
    uses in either order; the others reuse a training problem's pair. Training pairs are distinct, so every
    training question is asked once.
    """
    if not 0.0 <= unseen_fraction <= 1.0:
        raise ValueError(f"unseen_fraction={unseen_fraction}: must be in [0, 1]")
    if not 1 <= digits <= len(ZH_PLACES) - 1:
        raise ValueError(f"digits={digits}: must be in 1..{len(ZH_PLACES) - 1}")
    unseen_count = round(heldout_size * unseen_fraction)
    if heldout_size - unseen_count > train_size:
        raise ValueError(f"heldout_size={heldout_size} needs more seen pairs than train_size={train_size} has")
    low, high = 10 ** (digits - 1), 10**digits - 1
    # Unordered pairs, as training uses them, with at least as many left over as the held-out set needs.
    if train_size + unseen_count > (high - low + 1) ** 2 // 2:
        raise ValueError(f"train_size + unseen held-out problems exceed the {digits}-digit operand pairs")
    rng = random.Random(seed)

    def _pair() -> tuple[int, int]:
        return rng.randint(low, high), rng.randint(low, high)

    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < train_size:
        a, b = _pair()
        if (b, a) not in pairs:
            pairs[(a, b)] = None
    train = [make_problem(rng, a, b, held_out=False) for a, b in pairs]
    seen = set(pairs) | {(b, a) for a, b in pairs}
    unseen_pairs: dict[tuple[int, int], None] = {}
    while len(unseen_pairs) < unseen_count:
        a, b = _pair()
        if (a, b) not in seen and (b, a) not in unseen_pairs:
            unseen_pairs[(a, b)] = None
    heldout = [make_problem(rng, a, b, held_out=True, unseen=True) for a, b in unseen_pairs]
    reused = rng.sample(list(pairs), heldout_size - unseen_count)
    heldout += [make_problem(rng, a, b, held_out=True) for a, b in reused]
    rng.shuffle(heldout)
    return train, heldout


def write_csv(path: Path, problems: Iterable[Problem], *, answer_only: bool = False) -> Path:
    """The seed notes' CSV: a ``prompt,output`` header, one problem per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "output"])
        for p in problems:
            writer.writerow([p.prompt, p.answer_only if answer_only else p.output])
    return path


def corpus_text(problems: Sequence[Problem]) -> Iterable[str]:
    """Every text a model of these problems reads or writes: what the tokenizer is trained on."""
    for p in problems:
        yield p.prompt
        yield p.output
        yield p.answer_only
