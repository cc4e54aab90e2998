"""The prepare plan: every input checked and hashed before any work, and the fingerprint of what decides the bytes.

The plan carries the frozen :class:`PrepareOptions`; its JSON form (``OUT/.blocks/plan.json``) and its fingerprint
are computed from the options' ``dataclasses.asdict`` form, less the options that change no output byte, so the
same options always give the same fingerprint (resumed blocks and byte-identical output depend on it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sft_stack.common.tokenizer
from data_pipeline.formats import COLUMN_FIELDS, FORMATS, detect_format
from data_pipeline.options import PrepareOptions, SourceSpec
from data_pipeline.schema import SourceInfo, sha256_file, tokenizer_fingerprint
from sft_stack.chat.conversation import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sft_stack.chat.templates import ChatTemplate

EXECUTION_OPTIONS = ("out", "workers", "progress", "num_tasks", "task_index")
"""Options that change nothing in the output; they are not part of the manifest or the plan fingerprint."""
LIMIT_OPTIONS = ("max_bad_fraction", "max_dropped_fraction")
"""Options that only decide pass/fail: in the manifest, not in the plan fingerprint (changing them keeps the
blocks)."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything resolved before any work; what decides the output bytes is hashed into `fingerprint`."""

    sources: tuple[SourceInfo, ...]
    """Sources with size, sha256 and resolved format; records is 0 here (counted per block)."""
    templates: tuple[str, ...]
    """Resolved template name per source."""
    template: str
    """Resolved name of PrepareOptions.template."""
    tokenizer_path: str
    tokenizer_fingerprint: str
    options: PrepareOptions
    """The run's options. Its EXECUTION_OPTIONS are not part of the plan: a plan read back from plan.json has
    the defaults there, and ``out`` names the directory it was read from."""
    fingerprint: str = ""

    def manifest_options(self) -> dict[str, Any]:
        """The manifest's options: every PrepareOptions field except EXECUTION_OPTIONS."""
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k not in EXECUTION_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """The plan.json form (the form of the dict-based plan it replaced, field for field)."""
        return {
            "sources": [dataclasses.asdict(s) for s in self.sources],
            "specs": [dataclasses.asdict(s) for s in self.options.sources],
            "templates": list(self.templates),
            "template": self.template,
            "tokenizer_path": self.tokenizer_path,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "options": self.manifest_options(),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], out: Path) -> Plan:
        """The plan of plan.json in ``out``."""
        specs = tuple(SourceSpec(**{**s, "columns": tuple(s.get("columns", ()))}) for s in raw["specs"])
        options = {k: v for k, v in raw["options"].items() if k != "sources"}
        return cls(
            sources=tuple(SourceInfo(**s) for s in raw["sources"]),
            templates=tuple(raw["templates"]),
            template=raw["template"],
            tokenizer_path=raw["tokenizer_path"],
            tokenizer_fingerprint=raw["tokenizer_fingerprint"],
            options=PrepareOptions(sources=specs, out=str(out), **options),
            fingerprint=raw["fingerprint"],
        )

    def hashed(self) -> str:
        """The fingerprint: sha256 of the plan.json form without the limits, the fingerprint and the specs (they
        are inside the options)."""
        body = self.to_dict()
        # The limits only decide pass/fail, not the shards: changing them must not invalidate finished blocks.
        body["options"] = {k: v for k, v in body["options"].items() if k not in LIMIT_OPTIONS}
        body.pop("specs")
        body["fingerprint"] = ""
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The ``--tokenizer`` directory's tokenizer (common.tokenizer, the one loader); InputError (one line) when it
    does not load."""
    try:
        return sft_stack.common.tokenizer.load_tokenizer(path)
    except sft_stack.common.tokenizer.TokenizerError as exc:
        raise InputError(f"--tokenizer {exc}") from exc


def make_plan(options: PrepareOptions, tokenizer: PreTrainedTokenizerBase) -> tuple[Plan, dict[str, ChatTemplate]]:
    """Check every input (files, formats, templates) and hash the sources; InputError on the first problem.

    Returns the plan and its templates by resolved name."""
    formats = [_source_format(spec) for spec in options.sources]
    default_template, templates, resolved = _resolve_templates(options, tokenizer)
    sources = tuple(
        SourceInfo(path=spec.path, **_digest(Path(spec.path)), format=fmt, records=0)
        for spec, fmt in zip(options.sources, formats, strict=True)
    )
    plan = Plan(
        sources=sources,
        templates=templates,
        template=default_template,
        tokenizer_path=options.tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        options=options,
    )
    templates_by_name = {name: resolved[name] for name in sorted(set(templates))}
    return dataclasses.replace(plan, fingerprint=plan.hashed()), templates_by_name


def _source_format(spec: SourceSpec) -> str:
    """The source's format, detected or checked; InputError for a missing file or columns a format cannot use."""
    path = Path(spec.path)
    if not path.exists():
        raise InputError(f"--source {spec.path}: no such file or directory; check the path")
    if spec.format == "auto":
        fmt = detect_format(path, spec.column_map())
    elif spec.format in FORMATS:
        fmt = spec.format
    else:
        raise InputError(f"--format {spec.format!r} for {spec.path}: unknown; choose one of {', '.join(FORMATS)}")
    if spec.columns and (fmt not in COLUMN_FIELDS or path.suffix.lower() == ".txt"):
        raise InputError(f"source {spec.path}: columns apply to JSON records; a {fmt} file has none")
    return fmt


def _resolve_templates(
    options: PrepareOptions, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, tuple[str, ...], dict[str, ChatTemplate]]:
    """(the default template's name, each source's template name, the templates by requested and resolved name)."""
    from sft_stack.chat.templates import resolve_template

    resolved: dict[str, ChatTemplate] = {}
    names: list[str] = []
    for requested in (options.template, *(spec.template or options.template for spec in options.sources)):
        template = resolve_template(requested, tokenizer) if requested not in resolved else resolved[requested]
        resolved[requested] = resolved[template.name] = template
        names.append(template.name)
    return names[0], tuple(names[1:]), resolved


def _digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a source file; of a directory source (MOSS), over its files' names and hashes."""
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n" for p in files)
    return {"size": sum(p.stat().st_size for p in files), "sha256": hashlib.sha256(listing.encode()).hexdigest()}
