"""The source families the converter knows, and detection of which one a config.json is.

A new family is one module in this package and one line in ``SOURCES`` (see the package docstring).
"""

from __future__ import annotations

from pathlib import Path

from trainer.convert import ConvertError, RawConfig, SourceFamily, baichuan, baichuan_13b, chatglm2, chatglm_v1, moss

SOURCES: tuple[SourceFamily, ...] = (
    chatglm2.SOURCE,
    baichuan.BAICHUAN_7B,
    baichuan.BAICHUAN2_7B,
    moss.SOURCE,
    baichuan_13b.BAICHUAN_13B,
    baichuan_13b.BAICHUAN2_13B,
    chatglm_v1.SOURCE,
)

ORIGINAL_MODEL_TYPES = ("chatglm", "baichuan", "moss")
"""model_type values of original (remote-code) checkpoints: a directory holding one must be converted first."""


def detect_source(raw: RawConfig, where: Path) -> SourceFamily:
    """The one family whose original layout ``raw`` is; ConvertError naming config.json otherwise."""
    matches = [source for source in SOURCES if source.is_source(raw)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConvertError(f"{where}: ambiguous, matches {', '.join(s.name for s in matches)}; this is a converter bug")
    described = f"model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}"
    raise ConvertError(
        f"{where}: {described} is no layout this converter knows; known: {', '.join(s.name for s in SOURCES)}"
    )
