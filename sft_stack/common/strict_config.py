"""Strict loading of frozen dataclass configs: YAML mappings and ``key=value`` overrides in, typed sections out.

The one home for what the run config (trainer/config.py) and prepare's options (data_pipeline/options.py) share:

- ``coerce``: check a value against a field annotation (Literal, bool, int, float, str, Path, ``tuple[X, ...]``,
  ``X | None``, a nested dataclass), converting only lossless cases (int -> float, list -> tuple, str -> Path);
- ``build_dataclass``: build a frozen dataclass from a mapping, refusing unknown keys (listing the valid ones),
  wrong types and missing required keys, each in one line that names the key;
- ``apply_overrides``: dotted ``section.key=value`` (or flat ``key=value``) strings, the value parsed as YAML;
- ``read_yaml`` (with ``Loader``: YAML 1.2's float rule, so ``lr: 3e-5`` is a number) and ``Origins`` (the file
  line or the override each key came from, for error messages);
- ``field_docs`` (the docstring under each field, for command-line help).

The errors carry the key, value and expectation as attributes, so a caller with its own established phrasing
(prepare's ``key=value must be ...``) words them itself without re-checking anything. Nothing here imports the
project's packages.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration the user must fix; the message names the key and what to do.

    ``key``: the dotted key at fault when one is (``train.lr``), so a caller can say where its value came from."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class WrongTypeError(ConfigError):
    """A value of the wrong type or outside a Literal's choices; ``expected`` reads "an integer", "one of a, b"."""

    def __init__(self, key: str, value: Any, expected: str, *, is_choice: bool = False) -> None:
        self.value, self.expected = value, expected
        detail = f"must be {expected}" if is_choice else f"expected {expected}"
        shown = str(value) if isinstance(value, FloatText) else repr(value)  # 1e5, as it was written
        super().__init__(f"{key}={shown}: {detail}", key=key)


class UnknownKeyError(ConfigError):
    """Keys the dataclass does not have; the message lists the valid ones."""

    def __init__(self, section: str | None, unknown: Sequence[str], valid: Sequence[str]) -> None:
        self.section, self.unknown, self.valid = section, tuple(unknown), tuple(valid)
        if section is None:
            message = f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        else:
            message = f"unknown key {section}.{unknown[0]}; valid keys of {section}: {', '.join(valid)}"
        super().__init__(message, key=dotted(section, unknown[0]))


def dotted(section: str | None, key: str) -> str:
    """``section.key``, or ``key`` at the top level."""
    return key if section is None else f"{section}.{key}"


# -- YAML: PyYAML's safe loader with YAML 1.2's float rule --

YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
"""YAML 1.2 core schema's float. PyYAML implements YAML 1.1, whose float needs a dot and a signed exponent
(``3.0e-5``), so ``3e-5``, ``1E-2`` and ``1e5`` load as strings; the learning rates people write look like that."""


class FloatText(str):
    """A plain (unquoted) YAML scalar that YAML 1.2 reads as a number but YAML 1.1 as a string (``3e-5``).

    Kept as its text, so a field of type str (a name, a path) gets exactly what was written; ``coerce`` turns it
    into the number for a float field. A quoted ``"3e-5"`` is a plain string and stays refused there."""


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus YAML 1.2's float rule, for the scalars YAML 1.1 leaves as strings (FloatText).

    Its resolver is tried after PyYAML's own (bool, int, 1.1 float, timestamp, ...), so ``5`` is still an int."""


_FLOAT_TEXT_TAG = "tag:sft-stack,2026:float-text"
Loader.add_implicit_resolver(_FLOAT_TEXT_TAG, YAML12_FLOAT, list("-+.0123456789"))


def _construct_float_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> FloatText:
    return FloatText(loader.construct_scalar(node))


Loader.add_constructor(_FLOAT_TEXT_TAG, _construct_float_text)


def load_yaml_text(text: str) -> Any:
    """YAML text parsed with ``Loader`` (safe, YAML 1.2 floats)."""
    return yaml.load(text, Loader=Loader)  # Loader is a SafeLoader: no arbitrary objects


def _coerce_union(value: Any, annotation: Any, key: str) -> Any:
    options = get_args(annotation)
    if value is None and type(None) in options:
        return None
    first: ConfigError | None = None
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(value, option, key)
        except ConfigError as exc:
            first = first or exc
    raise first if first is not None else ConfigError(f"{key}: cannot be null")


def _coerce_tuple(value: Any, annotation: Any, key: str) -> tuple[Any, ...]:
    if isinstance(value, str):  # a comma list, as a dotted override naturally gives it
        value = [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise WrongTypeError(key, value, "a list")
    (item_type, _ellipsis) = get_args(annotation)
    return tuple(coerce(v, item_type, key) for v in value)


_SCALARS: dict[Any, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    # A YAML number where a string is meant (a name, a directory) is kept as its text: lossless.
    str: ("a string", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)),
    Path: ("a path", lambda v: isinstance(v, (str, Path))),
}
"""Scalar annotation -> (what the error says is expected, the check). A quoted "5" or "false" is refused, never
coerced, so ``pack: "false"`` cannot silently mean true."""


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting only lossless cases (int->float, list->tuple)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, annotation, key)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise WrongTypeError(key, value, f"one of {', '.join(map(str, choices))}", is_choice=True)
        return value
    if origin is tuple:
        return _coerce_tuple(value, annotation, key)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, Mapping):
            raise WrongTypeError(key, value, "a mapping of key: value")
        return build_dataclass(annotation, value, key)
    if annotation not in _SCALARS:
        raise ConfigError(f"{key}: unsupported field type {annotation!r}")
    if annotation is float and isinstance(value, FloatText):
        return float(value)
    expected, is_ok = _SCALARS[annotation]
    if not is_ok(value):
        raise WrongTypeError(key, value, expected)
    return annotation(value)


def build_dataclass(cls: type[T], raw: Mapping[str, Any], section: str | None = None) -> T:
    """Build ``cls`` from a mapping, failing on unknown keys, wrong types and missing required keys.

    ``section`` prefixes the keys in messages (``train.lr``); None for a top-level, flat config."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    valid = [f.name for f in fields]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            raise UnknownKeyError(section, [k for k in raw if k not in valid], valid)
        kwargs[key] = coerce(value, hints[key], dotted(section, key))
    missing = [
        dotted(section, f.name)
        for f in fields
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def parse_override(item: str, form: str = "section.key=value") -> tuple[str, Any]:
    """``key=value`` -> (key, the value parsed as YAML; empty text is None)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected {form}")
    key, _, text = item.partition("=")
    try:
        value = load_yaml_text(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key.strip()}={text!r}: not a YAML value ({str(exc).splitlines()[0]})") from None
    return key.strip(), value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str], sections: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a mapping of sections, strictly (the keys are checked at build)."""
    merged = {name: dict(body) if isinstance(body, dict) else body for name, body in raw.items()}
    for item in overrides:
        key_path, value = parse_override(item)
        section, _, key = key_path.partition(".")
        if section not in sections or not key:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid: {', '.join(sections)}")
        if not isinstance(merged.get(section, {}), dict):
            raise ConfigError(f"section {section}: expected a mapping of key: value, got {merged[section]!r}")
        merged.setdefault(section, {})[key] = value
    return merged


def apply_flat_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a flat mapping (the keys are checked when the dataclass is built)."""
    merged = dict(raw)
    for item in overrides:
        key, value = parse_override(item, form="key=value")
        merged[key] = value
    return merged


def read_yaml(path: Path) -> Any:
    """The parsed YAML file (None when empty); ConfigError in one line when it is missing or not YAML."""
    return read_yaml_with_lines(path)[0]


def read_yaml_with_lines(path: Path) -> tuple[Any, dict[str, int]]:
    """(the parsed YAML file, the 1-based line of every mapping key by dotted path: ``train.lr`` -> 17).

    Keys inside lists are not indexed (an error there names the list's own key). ConfigError in one line when the
    file is missing or not YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loader = Loader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines: dict[str, int] = {}
    _index_lines(node, None, lines)
    return data, lines


def _index_lines(node: yaml.Node | None, prefix: str | None, lines: dict[str, int]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key = dotted(prefix, key_node.value)
            lines.setdefault(key, key_node.start_mark.line + 1)
            _index_lines(value_node, key, lines)


_LEADING_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)[=: ]")


@dataclasses.dataclass(frozen=True)
class Origins:
    """Where each key's value came from: a line of the YAML file, or an override typed on the command line.

    ``describe(exc)`` is the prefix of an error message: ``run.yaml:17`` for a value written in the file,
    ``override train.lr=abc`` for one given as an override (the last one of that key wins, as in the config),
    the file alone for an error about a default or about several keys."""

    file: Path | None = None
    lines: Mapping[str, int] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """dotted key -> the override as typed (``train.lr=abc``)."""

    @classmethod
    def of(cls, file: Path | None, lines: Mapping[str, int], overrides: Iterable[str]) -> Origins:
        # repr for text that would break the one-line message (a newline typed inside quotes)
        typed = {item.partition("=")[0].strip(): item if item.isprintable() else repr(item) for item in overrides}
        return cls(file=file, lines=lines, overrides=typed)

    def where(self, key: str | None) -> str | None:
        """``file:line`` or ``override k=v`` for ``key`` (or, failing that, its section); the file, or None."""
        if key is not None:
            for candidate in (key, key.rpartition(".")[0]):
                if candidate in self.overrides:
                    return f"override {self.overrides[candidate]}"
                if candidate in self.lines:
                    return f"{self.file}:{self.lines[candidate]}"
        return None if self.file is None else str(self.file)

    def describe(self, exc: ConfigError) -> str:
        """The error's message prefixed by where its key's value came from."""
        message = str(exc)
        if message.startswith("override "):  # it already quotes the override
            return message
        key = exc.key
        if key is None:  # a cross-field check: its message starts with the key it is about
            match = _LEADING_KEY.match(message)
            key = match.group(1) if match else None
        where = self.where(key)
        return message if where is None else f"{where}: {message}"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def to_plain(value: Any) -> Any:
    """A dataclass (or nested dicts/tuples) as plain dicts and lists, for YAML/JSON dumps."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
