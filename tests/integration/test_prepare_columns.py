"""Column mapping (issue 21 item 6): a GSM8K-style ``question``/``answer`` JSONL prepared with ``--columns`` (or
``columns:`` in the prepare YAML) trains the answer only, and the tiny model learns from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline.cli import main
from data_pipeline.schema import IGNORE_INDEX, load_manifest
from sft_stack.common.errors import USER_ERROR
from tests.helpers.data import TINY_LLAMA, prepare_argv, write_jsonl
from trainer.data import collate, open_split
from trainer.loss import loss_sum

QUESTIONS = [
    {
        "question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?",
        "answer": f"{i} + {i + 3} = {2 * i + 3}.\n#### {2 * i + 3}",
    }
    for i in range(40)
]
UNANSWERED = 7
"""The record whose ``answer`` column is missing: a reject, not a crash."""


def gsm_records() -> list[dict[str, str]]:
    records = [dict(r) for r in QUESTIONS]
    del records[UNANSWERED]["answer"]
    return records


def prepare_args(source: Path, out: Path, *extra: str) -> list[str]:
    return prepare_argv(
        source, out, "--template", "llama2", "--val-fraction", "0", "--max-bad-fraction", "0.1", "--no-track", *extra
    )


def train_rows(out: Path) -> list[tuple[list[int], list[int], list[int]]]:
    split = open_split(out, "train", load_manifest(out))
    assert split is not None
    return list(zip(split["input_ids"], split["labels"], split["position_ids"], strict=True))


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("columns")
    source = write_jsonl(tmp / "gsm8k.jsonl", gsm_records())
    out = tmp / "out"
    assert main(prepare_args(source, out, "--columns", "instruction=question,output=answer")) == 0
    return out


def test_question_answer_file_trains_the_answer_only(mapped: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    manifest = load_manifest(mapped)
    assert manifest.sources[0].format == "alpaca"
    assert (manifest.counts["samples_read"], manifest.counts["samples_written"]) == (40, 39)
    rows = train_rows(mapped)
    answers = sorted(r["answer"] for i, r in enumerate(QUESTIONS) if i != UNANSWERED)
    trained, prompts = [], []
    for input_ids, labels, _ in rows:
        kept = [t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
        masked = [t for t, label in zip(input_ids, labels, strict=True) if label == IGNORE_INDEX]
        trained.append(tokenizer.decode(kept))
        prompts.append(tokenizer.decode(masked))
    # llama2's template trains " answer </s>": the answer with its leading space and the end of turn, nothing else.
    assert sorted(text.removesuffix(" </s>").strip() for text in trained) == answers
    assert all(text.endswith("</s>") for text in trained)
    assert all("Tom has" in text and "####" not in text for text in prompts)


def test_a_record_without_the_mapped_column_is_a_reject(mapped: Path) -> None:
    rejects = [json.loads(line) for line in (mapped / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["index"], r["reason"]) for r in rejects] == [(UNANSWERED, "missing_field")]
    assert rejects[0]["detail"].startswith("no 'answer' column (mapped to output)")


def test_yaml_columns_give_the_same_shards(mapped: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm_records())
    config = tmp_path / "prep.yaml"
    config.write_text(
        yaml.safe_dump(
            {"sources": [{"path": str(source), "columns": {"instruction": "question", "output": "answer"}}]}
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = ["prepare", "--config", str(config), *prepare_args(source, out)[3:]]
    assert main(args) == 0
    shards = [s.sha256 for s in load_manifest(out).splits["train"].shards]
    assert shards == [s.sha256 for s in load_manifest(mapped).splits["train"].shards]


def test_a_short_training_learns_the_answers(mapped: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA), dtype=torch.float32)
    batch = collate(train_rows(mapped), pad_id=0, packed=False, isolate=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        logits = model(**batch.model_inputs("cpu"), use_cache=False).logits
        loss = loss_sum(logits, batch.labels) / batch.loss_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # Only answer tokens are targets; their mean loss starts near ln(2000 tokens) = 7.6 and 12 full-batch steps
    # bring it to 4.33 (measured, seed 0): under 5 leaves room for float differences between machines.
    assert losses[0] == pytest.approx(7.57, abs=0.05)
    assert losses[-1] < 5.0


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ("prompt=question", "columns: 'prompt' is no field the formats read; map one of instruction, input"),
        ("instruction", "columns: 'instruction' is not field=column"),
    ],
)
def test_a_mapping_to_no_known_field_is_one_line(
    tmp_path: Path, columns: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm_records())
    assert main(prepare_args(source, tmp_path / "out", "--columns", columns)) == USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unmapped_question_answer_file_suggests_the_mapping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm_records())
    assert main(prepare_args(source, tmp_path / "out")) == USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keys: answer, question" in err and "--columns instruction=question" in err


@pytest.mark.slow
def test_two_worker_processes_read_the_mapped_columns_too(mapped: Path, tmp_path: Path) -> None:
    """A JSON line crosses the process pool unparsed, with its source's mapping: two workers write the same shards."""
    source = write_jsonl(tmp_path / "gsm8k.jsonl", gsm_records())
    out = tmp_path / "out"
    args = prepare_args(source, out, "--columns", "instruction=question,output=answer", "--workers", "2")
    assert main([*args, "--block-size", "8"]) == 0
    assert load_manifest(out).counts["samples_written"] == 39
    assert train_rows(out) == train_rows(mapped)
