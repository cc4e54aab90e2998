"""Config fuzzing: unknown keys, wrong types and contradictory values in the run YAML, the dotted overrides and
the prepare YAML each end in one line that names the key (ConfigError / InputError), never another exception.

Hypothesis, derandomized (the same examples on every run), a few hundred examples in all.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.cli import _CONFIG_KEYS, _parser, options_from_args
from sft_stack.chat.conversation import InputError
from trainer.config import ConfigError, RunConfig, _section_types, load_config

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
RUN_KEYS = [(section, field) for section, cls in _section_types().items() for field in cls.__dataclass_fields__] + [
    ("train", "max_step"),
    ("model", "lr"),
    ("optim", "lr"),
    ("data", ""),
]
"""Every valid section.key, plus misspelled, misplaced and unknown ones."""
FUZZ = settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "0", "1", "false", "true", "yes", "auto", "full", "lora", "bf16", "fp32", "stop", "skip"]),
    st.text(max_size=12),
    st.lists(st.integers(0, 5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def one_line_naming(message: str, *names: str) -> None:
    assert "\n" not in message, message
    assert any(name in message for name in names), (names, message)


def write(tmp: str, body: Any) -> Path:
    path = Path(tmp) / "run.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return path


@FUZZ
@given(key=st.sampled_from(RUN_KEYS), value=values)
def test_run_yaml_one_wrong_value(key: tuple[str, str], value: Any) -> None:
    section, name = key
    body = {s: dict(v) for s, v in BASE.items()}
    body.setdefault(section, {})[name] = value
    with tempfile.TemporaryDirectory() as tmp:
        try:
            assert isinstance(load_config(write(tmp, body)), RunConfig)
        except ConfigError as exc:
            one_line_naming(str(exc), f"{section}.{name}", f"section(s) {section}")


@FUZZ
@given(section=st.sampled_from([*BASE, "optim"]), value=st.one_of(values, st.text(max_size=5)))
def test_run_yaml_section_that_is_not_a_mapping(section: str, value: Any) -> None:
    body = {**BASE, section: value}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            load_config(write(tmp, body))
        except ConfigError as exc:
            one_line_naming(str(exc), section)


@FUZZ
@given(key=st.sampled_from(RUN_KEYS), text=st.one_of(st.text(max_size=16), values.map(lambda v: yaml.safe_dump(v))))
def test_override_one_wrong_value(key: tuple[str, str], text: str) -> None:
    section, name = key
    dotted = f"{section}.{name}"
    try:
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"{dotted}={text}"])
    except ConfigError as exc:
        one_line_naming(str(exc), dotted, f"override {dotted}", f"{dotted}={text}"[:20])


@FUZZ
@given(text=st.text(max_size=60))
def test_override_garbage(text: str) -> None:
    try:
        load_config(ROOT / "configs" / "tiny_cpu.yaml", [text])
    except ConfigError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["train.stop_at_step=40"], "train.stop_at_step"),
        (["train.warmup_steps=30"], "train.warmup_steps"),
        (["train.on_nonfinite=skip", "train.grad_clip=0", "model.dtype=fp32"], "train.grad_clip"),
        (["model.method=qlora", "model.dtype=fp16"], "model.dtype"),
        (["train.lr=.nan"], "train.lr"),
        (["train.collective_timeout_s=0"], "train.collective_timeout_s"),
        (["train.adam_beta2=1.5"], "train.adam_beta2"),
        (["lora.dropout=1.0"], "lora.dropout"),
        (["train.max_steps=[1, 2]"], "train.max_steps"),
        (["train.lr=[oops"], "train.lr"),
        (["train.export=no way"], "train.export"),
    ],
)
def test_contradictions_and_wrong_types_name_the_key(overrides: list[str], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides)
    one_line_naming(str(caught.value), names)


PREPARE_BASE = {
    "sources": [str(ROOT / "tests/fixtures/real/alpaca/alpaca_en_demo.json")],
    "tokenizer": str(ROOT / "tests/fixtures/tiny_llama"),
    "out": "unused_out",
}


def prepare_options(tmp: str, body: dict[str, Any]) -> Any:
    path = Path(tmp) / "prep.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return options_from_args(_parser().parse_args(["prepare", "--config", str(path)]))


@FUZZ
@given(key=st.sampled_from([*_CONFIG_KEYS, "max_seq_length", "packing"]), value=values)
def test_prepare_yaml_one_wrong_value(key: str, value: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prepare_options(tmp, {**PREPARE_BASE, key: value})
        except InputError as exc:
            one_line_naming(str(exc), key)


@FUZZ
@given(key=st.sampled_from(["path", "format", "template", "samples", "weight", "wieght"]), value=values)
def test_prepare_yaml_source_wrong_value(key: str, value: Any) -> None:
    source = {"path": PREPARE_BASE["sources"][0], key: value}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prepare_options(tmp, {**PREPARE_BASE, "sources": [source]})
        except InputError as exc:
            one_line_naming(str(exc), key, "samples or weight")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_seq_len", "512", "max_seq_len='512' must be an integer"),
        ("pack", "false", "pack='false' must be true or false"),
        ("val_fraction", "0.1", "val_fraction='0.1' must be a number"),
        ("overlong", "cut", "overlong='cut' must be one of truncate, drop"),
    ],
)
def test_prepare_yaml_quoted_values_are_refused_not_coerced(key: str, value: str, message: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(InputError, match=message):
        prepare_options(tmp, {**PREPARE_BASE, key: value})
