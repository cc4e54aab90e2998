"""sft_stack/common/strict_config.py on its own: coercion per annotation, strict building, overrides, field docstrings; and
common/ imports none of the project's packages."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from sft_stack.common.strict_config import (
    ConfigError,
    FloatText,
    Origins,
    UnknownKeyError,
    WrongTypeError,
    apply_flat_overrides,
    apply_overrides,
    build_dataclass,
    coerce,
    field_docs,
    load_yaml_text,
    parse_override,
    read_yaml_with_lines,
    to_plain,
)

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class Inner:
    name: str
    """A name."""
    weight: float | None = None
    """Optional weight."""


@dataclass(frozen=True, kw_only=True)
class Outer:
    where: Path
    """A directory."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    items: tuple[Inner, ...] = ()
    """Nested sections."""
    ids: tuple[int, ...] = field(default_factory=tuple)
    """Integers."""


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (3, float, 3.0),
        (7, str, "7"),
        ("x/y", Path, Path("x/y")),
        ([1, 2], tuple[int, ...], (1, 2)),
        ("a,b", tuple[str, ...], ("a", "b")),
        (None, int | None, None),
        (2, int | None, 2),
    ],
)
def test_lossless_conversions(value: object, annotation: object, expected: object) -> None:
    assert coerce(value, annotation, "k") == expected


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        ("5", int, "k='5': expected an integer"),
        (True, int, "k=True: expected an integer"),
        ("false", bool, "k='false': expected true or false"),
        (False, float, "k=False: expected a number"),
        ("c", Literal["a", "b"], "k='c': must be one of a, b"),
        (5, tuple[int, ...], "k=5: expected a list"),
        ("x", int | None, "k='x': expected an integer"),
        (3, Path, "k=3: expected a path"),
    ],
)
def test_wrong_types_name_the_key(value: object, annotation: object, message: str) -> None:
    with pytest.raises(WrongTypeError) as caught:
        coerce(value, annotation, "k")
    assert str(caught.value) == message and caught.value.key == "k"


def test_nested_dataclasses_build_strictly() -> None:
    built = build_dataclass(Outer, {"where": "d", "items": [{"name": "n", "weight": 2}], "ids": [1, 2]}, "root")
    assert built == Outer(where=Path("d"), items=(Inner(name="n", weight=2.0),), ids=(1, 2))
    assert to_plain(built) == {"where": Path("d"), "mode": "a", "items": [{"name": "n", "weight": 2.0}], "ids": [1, 2]}
    with pytest.raises(UnknownKeyError, match=r"^unknown key root\.item; valid keys of root: where, mode, items, ids$"):
        build_dataclass(Outer, {"where": "d", "item": []}, "root")
    with pytest.raises(UnknownKeyError, match=r"^unknown key\(s\) x, y; valid keys: where, mode, items, ids$"):
        build_dataclass(Outer, {"x": 1, "where": "d", "y": 2})
    with pytest.raises(UnknownKeyError, match=r"unknown key root\.items\.nme; valid keys of root\.items: name"):
        build_dataclass(Outer, {"where": "d", "items": [{"nme": "n"}]}, "root")
    with pytest.raises(WrongTypeError, match=r"root\.items='n': expected a mapping of key: value"):
        build_dataclass(Outer, {"where": "d", "items": ["n"]}, "root")
    with pytest.raises(ConfigError, match=r"missing required key\(s\) root\.where"):
        build_dataclass(Outer, {}, "root")


def test_overrides_parse_values_as_yaml_and_check_sections() -> None:
    merged = apply_overrides({"a": {"x": 1}}, ["a.y=[1, 2]", "a.x=", "b.z=yes"], ["a", "b"])
    assert merged == {"a": {"x": None, "y": [1, 2]}, "b": {"z": True}}
    with pytest.raises(ConfigError, match=r"override 'c\.x=1': unknown section 'c'; valid: a, b"):
        apply_overrides({}, ["c.x=1"], ["a", "b"])
    with pytest.raises(ConfigError, match=r"override 'a\.x': expected section\.key=value"):
        apply_overrides({}, ["a.x"], ["a"])
    assert apply_flat_overrides({"k": 1}, ["k=2", "s=a: b"]) == {"k": 2, "s": {"a": "b"}}
    with pytest.raises(ConfigError, match=r"override k='\[1': not a YAML value"):
        apply_flat_overrides({}, ["k=[1"])


def test_field_docs_reads_the_docstring_under_each_field() -> None:
    assert field_docs(Outer) == {
        "where": "A directory.",
        "mode": "Which mode.",
        "items": "Nested sections.",
        "ids": "Integers.",
    }


def test_common_imports_none_of_the_project_packages() -> None:
    project = {"launcher", "trainer", "data_pipeline", "demo", "tracking", "tools", "tests", "benchmarks"}
    paths = sorted((ROOT / "sft_stack" / "common").glob("*.py"))
    assert paths
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & project, (path.name, names)


@pytest.mark.parametrize(
    ("text", "number"),
    [("1e-5", 1e-5), ("3e-4", 3e-4), ("1E-2", 1e-2), ("1e5", 1e5), ("+2e-3", 2e-3), ("-1E+2", -100.0)],
)
def test_yaml_12_floats_are_numbers_for_float_fields_and_text_for_str_fields(text: str, number: float) -> None:
    loaded = load_yaml_text(f"lr: {text}")["lr"]
    assert isinstance(loaded, FloatText) and loaded == text  # PyYAML's YAML 1.1 rule alone gives the string
    assert coerce(loaded, float, "lr") == number and type(coerce(loaded, float, "lr")) is float
    assert coerce(loaded, float | None, "lr") == number
    assert coerce(loaded, str, "name") == text and type(coerce(loaded, str, "name")) is str  # the text, not 1e-05
    assert parse_override(f"train.lr={text}") == ("train.lr", text)
    assert coerce(parse_override(f"train.lr={text}")[1], float, "train.lr") == number


def test_yaml_11_scalars_keep_their_types() -> None:
    assert load_yaml_text("[5, 3.0e-5, 1.5, .5, 0x10, true, abc, '1e-5', 1e]") == [
        5,
        3e-5,
        1.5,
        0.5,
        16,
        True,
        "abc",
        "1e-5",
        "1e",
    ]
    with pytest.raises(WrongTypeError, match=r"^lr='1e-5': expected a number$"):
        coerce(load_yaml_text("'1e-5'"), float, "lr")  # quoted: a string, refused like "5" for an integer
    with pytest.raises(WrongTypeError, match=r"^steps=1e3: expected an integer$"):
        coerce(load_yaml_text("1e3"), int, "steps")


def test_origins_name_the_file_line_or_the_override(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("# header\ntrain:\n  max_steps: 10\n  lr: abc\nmodel:\n  path: m\n")
    data, lines = read_yaml_with_lines(path)
    assert data == {"train": {"max_steps": 10, "lr": "abc"}, "model": {"path": "m"}}
    assert lines == {"train": 2, "train.max_steps": 3, "train.lr": 4, "model": 5, "model.path": 6}
    origins = Origins.of(path, lines, ["train.lr=1e-x", "model.path=n\nm"])
    assert origins.where("train.max_steps") == f"{path}:3"
    assert origins.where("train.lr") == "override train.lr=1e-x"  # the override wins over the file
    assert origins.where("model.path") == "override 'model.path=n\\nm'"  # one line, whatever was typed
    assert origins.where("train.seed") == f"{path}:2"  # not written: its section
    assert origins.where("eval.every_steps") == str(path)
    assert origins.describe(WrongTypeError("train.max_steps", "x", "an integer")) == (
        f"{path}:3: train.max_steps='x': expected an integer"
    )
    assert (
        origins.describe(ConfigError("train.max_steps=10: must be > 11"))
        == f"{path}:3: train.max_steps=10: must be > 11"
    )
