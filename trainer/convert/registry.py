"""The source families the converter knows, and detection of which one a config.json is.

A source belongs to the model family it becomes: ``trainer.families.Family.converted_from`` lists it, so a new
source is one module in this package and one entry in its family's record (see the package docstring).
"""

from __future__ import annotations

from pathlib import Path

from trainer.convert import ConvertError, RawConfig, SourceFamily
from trainer.families import Family, converter_sources


def detect_source(raw: RawConfig, where: Path) -> tuple[SourceFamily, Family]:
    """The one source whose original layout ``raw`` is, with the family it converts into; ConvertError naming
    config.json otherwise."""
    known = converter_sources()
    matches = [(source, family) for source, family in known if source.is_source(raw)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConvertError(
            f"{where}: ambiguous, matches {', '.join(s.name for s, _ in matches)}; this is a converter bug"
        )
    described = f"model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}"
    raise ConvertError(
        f"{where}: {described} is no layout this converter knows; known: {', '.join(s.name for s, _ in known)}"
    )
