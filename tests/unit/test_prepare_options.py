"""Prepare's options through the shared strict loader: YAML, KEY=VALUE overrides and generated flags; the shipped
prepare configs; the typed per-block result and its on-disk form."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import pytest

from data_pipeline.blocks import BLOCKS_DIR, BlockResult, SplitOutput, block_file, completed_block
from data_pipeline.cli import _parser, options_from_args
from data_pipeline.options import PrepareOptions, SourceSpec
from data_pipeline.schema import ShardInfo
from sft_stack.chat.conversation import InputError
from sft_stack.common.strict_config import field_docs

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests/fixtures/real/alpaca/alpaca_en_demo.json"
BASE = f"sources: [{ALPACA}]\ntokenizer: tok\nout: o\n"


def options(tmp_path: Path, yaml_text: str, *args: str) -> PrepareOptions:
    config = tmp_path / "prep.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    return options_from_args(_parser().parse_args(["prepare", "--config", str(config), *args]))


def one_line_error(tmp_path: Path, yaml_text: str, *args: str) -> str:
    with pytest.raises(InputError) as caught:
        options(tmp_path, yaml_text, *args)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("extra", "args", "needles"),
    [
        ("max_len: 5\n", (), ("unknown key(s) max_len", "valid keys: sources, tokenizer, out", "max_seq_len")),
        ("", ("packing=true",), ("unknown key(s) packing", "pack")),
        ("block_size: 1.5\n", (), ("prep.yaml: block_size=1.5 must be an integer",)),
        ("", ("workers=two",), ("workers='two' must be an integer",)),
        ("last_turn_only: 1\n", (), ("last_turn_only=1 must be true or false",)),
        ("", ("overlong=cut",), ("overlong='cut' must be one of truncate, drop",)),
        ("", ("seed=[1, 2]",), ("seed=[1, 2] must be an integer",)),
        ("", ("val_fraction=[oops",), ("prepare: override val_fraction='[oops': not a YAML value",)),
        ("", ("max_seq_len",), ("prepare: override 'max_seq_len': expected key=value",)),
        ("", ("task_index=3",), ("task_index=3 must be in 0..num_tasks-1",)),
    ],
)
def test_unknown_keys_and_wrong_types_fail_in_one_line_naming_the_key(
    tmp_path: Path, extra: str, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    message = one_line_error(tmp_path, BASE + extra, *args)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("{path: a.jsonl, wieght: 2}", "unknown key sources.wieght; valid keys of sources: path, format"),
        ("{path: a.jsonl, samples: '10'}", "sources.samples='10' must be an integer"),
        ("{format: alpaca}", "missing required key(s) sources.path"),
        ("{path: a.jsonl, samples: 3, weight: 2.0}", "source a.jsonl: give samples or weight, not both"),
        ("7", "each source is a path or a mapping with path:"),
    ],
)
def test_source_entries_are_checked_like_options(tmp_path: Path, source: str, needle: str) -> None:
    assert needle in one_line_error(tmp_path, f"sources: [{source}]\ntokenizer: tok\nout: o\n")


def test_precedence_yaml_then_overrides_then_flags(tmp_path: Path) -> None:
    yaml_text = (
        f"sources: [{{path: {ALPACA}, samples: 9}}]\ntokenizer: tok\nout: o\npack: true\nmax_seq_len: 256\nseed: 3\n"
    )
    got = options(tmp_path, yaml_text, "max_seq_len=1024", "seed=5", "--seed", "7", "--no-pack", "--source", "b.json")
    assert (got.max_seq_len, got.seed, got.pack) == (1024, 7, False)
    assert got.sources == (SourceSpec(path=str(ALPACA), samples=9), SourceSpec(path="b.json"))
    assert options(tmp_path, BASE, "--format", "alpaca").sources == (SourceSpec(path=str(ALPACA), format="alpaca"),)


def test_every_option_has_its_flag_typed_and_documented() -> None:
    """The flags are generated from PrepareOptions: each field (but sources) is a flag of its type and default."""
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    prepare = commands.choices["prepare"]
    actions = {a.dest: a for a in prepare._actions}
    hints = typing.get_type_hints(PrepareOptions)
    docs = field_docs(PrepareOptions)
    for spec in dataclasses.fields(PrepareOptions):
        assert docs.get(spec.name), f"PrepareOptions.{spec.name} has no docstring"
        if spec.name == "sources":
            continue
        action = actions[spec.name]
        assert action.option_strings[0] == "--" + spec.name.replace("_", "-")
        assert action.default is None  # only flags given override the YAML
        if hints[spec.name] in (int, float, str):
            assert action.type is hints[spec.name]
        if spec.default is not dataclasses.MISSING:
            assert f"(default {spec.default})" in (action.help or "")
    flags = {flag for a in prepare._actions for flag in a.option_strings}
    assert {"--no-progress", "--pack", "--no-pack", "--last-turn-only", "--config", "--source", "--format"} <= flags
    assert _parser().parse_args(["prepare", "--no-progress"]).progress is False


def test_shipped_prepare_configs_validate() -> None:
    shipped = sorted((ROOT / "configs" / "data").glob("*.yaml"))
    assert [p.name for p in shipped] == ["belle_moss.yaml", "tiny_alpaca.yaml"]
    for path in shipped:
        assert path.read_text(encoding="utf-8").startswith("# python -m data_pipeline prepare --config configs/data/")
        got = options_from_args(_parser().parse_args(["prepare", "--config", str(path)]))
        assert got.tokenizer and got.out and got.sources
    belle = options_from_args(_parser().parse_args(["prepare", "--config", str(shipped[0])]))
    assert (belle.max_seq_len, belle.pack, belle.workers, belle.template) == (2048, True, 8, "llama2")
    assert belle.sources[0] == SourceSpec(path="data/raw/Belle_open_source_0.5M.json", format="alpaca", samples=200000)
    assert belle.sources[1].weight == 0.5 and belle.sources[2].format == "auto"


def _result() -> BlockResult:
    shard = ShardInfo(file="data-00003.arrow", rows=4, sha256="ab" * 32)
    return BlockResult(
        block=3,
        plan="f" * 64,
        read=10,
        written=9,
        rejected_by_reason={"malformed_json": 1},
        unanswered_turns_dropped=2,
        source_records=(6, 4),
        histogram={"<=64": 5, "<=128": 4},
        splits={
            "train": SplitOutput(shard=shard, samples=9, sequences=9, tokens=700, loss_tokens=300, slots=1024),
            "val": SplitOutput(shard=None, samples=0, sequences=0, tokens=0, loss_tokens=0, slots=0),
        },
    )


def test_block_result_round_trips_through_its_json_record() -> None:
    result = _result()
    body = json.loads(json.dumps(result.to_dict()))
    assert body["splits"]["train"]["shard"] == {"file": "data-00003.arrow", "rows": 4, "sha256": "ab" * 32}
    assert body["splits"]["val"]["shard"] is None and body["source_records"] == [6, 4]
    assert BlockResult.from_dict(body) == result
    assert result.tokens == 700
    del body["unanswered_turns_dropped"]  # a record written before the count existed is still read
    assert BlockResult.from_dict(body).unanswered_turns_dropped == 0


def test_a_torn_or_foreign_completion_record_is_redone_not_trusted(tmp_path: Path) -> None:
    plan = "f" * 64  # the fingerprint of the plan the block must belong to
    (tmp_path / BLOCKS_DIR).mkdir()
    block_file(tmp_path, 3, ".rejects.jsonl").write_text("")
    record = _result().to_dict()
    for body in ("{not json", json.dumps({"plan": "f" * 64, "block": 3}), json.dumps({**record, "plan": "e" * 64})):
        block_file(tmp_path, 3).write_text(body)
        assert completed_block(tmp_path, 3, plan) is None
    block_file(tmp_path, 3).write_text(json.dumps(record))
    assert completed_block(tmp_path, 3, plan) is None  # its train shard is not on disk
    (tmp_path / "train").mkdir()
    shard = tmp_path / "train" / "data-00003.arrow"
    shard.write_bytes(b"rows")
    verified = {**record, "splits": {**record["splits"], "train": {**record["splits"]["train"]}}}
    verified["splits"]["train"]["shard"] = {
        "file": shard.name,
        "rows": 4,
        "sha256": hashlib.sha256(b"rows").hexdigest(),
    }
    block_file(tmp_path, 3).write_text(json.dumps(verified))
    assert completed_block(tmp_path, 3, plan) == BlockResult.from_dict(verified)


def test_config_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(InputError, match=f"^--config {missing}: config file not found$"):
        options_from_args(_parser().parse_args(["prepare", "--config", str(missing)]))
    assert one_line_error(tmp_path, "sources: [a\n").startswith(f"--config {tmp_path / 'prep.yaml'}: invalid YAML (")
    assert "the top level must be a mapping of option: value" in one_line_error(tmp_path, "- a\n- b\n")
