"""MOSS (moss-003-sft): a meta instruction and chat.turn_N objects, whose Human/MOSS texts carry MOSS's markers;
published as JSON lines or as a directory of one .json file per conversation. docs/formats.md has the plugin rule.

    {"meta_instruction": "...", "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>\n", "MOSS": "<|MOSS|>: ...<eom>\n"}}}
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.formats.checks import conversation
from data_pipeline.formats.convert import convert_item
from data_pipeline.formats.readers import read_document
from data_pipeline.formats.records import CorpusFormat, Refused, Turn, text_field, type_name
from data_pipeline.formats.tool_calls import moss_commands
from sft_stack.chat.conversation import Conversation, InputError, Message, Record

_PLUGIN_FIELDS = ("Inner Thoughts", "Commands", "Tool Responses")
_START = re.compile(r"\A<\|[^|<>]+\|>: ?")  # <|Human|>: , <|MOSS|>: , <|Results|>:
_END = re.compile(r"<eo[a-z]>\s*\Z")  # <eoh> <eom> <eot> <eoc> <eor>, then the newline after it
_TURN = re.compile(r"\Aturn_(\d+)\Z")


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation(_turns(record), source, index)


def _turns(record: dict[str, Any]) -> list[Turn]:
    system = text_field(record, "meta_instruction")
    turns: list[Turn] = [("system", system)] if system.strip() else []
    chat = record.get("chat")
    if not isinstance(chat, dict):
        reason = "missing_field" if chat is None else "non_string_field"
        raise Refused(reason, f"'chat' is {type_name(chat)}, not an object of turn_N")
    names = []
    for name in chat:
        match = _TURN.match(name)
        if match is None:
            raise Refused("missing_field", f"chat key {name!r} is not turn_N")
        names.append((int(match.group(1)), name))
    for _, name in sorted(names):
        turn = chat[name]
        if not isinstance(turn, dict):
            raise Refused("non_string_field", f"chat.{name} is {type_name(turn)}, not an object")
        where = f"chat.{name}."
        turns.append(("user", _strip_markers(text_field(turn, "Human", where))))
        plugin = {field: _plugin_text(turn, field, where) for field in _PLUGIN_FIELDS}
        if plugin["Commands"]:
            # A plugin turn, as MOSS's fine-tuning trains it: the Inner Thoughts and the Commands are the assistant
            # calling tools, the Tool Responses a tool result (never trained), then the reply.
            if not plugin["Tool Responses"]:
                raise Refused("malformed_tool_call", f"{where}Commands are given but no Tool Responses")
            calls = moss_commands(plugin["Commands"], where)
            turns.append(Message(role="assistant", content=plugin["Inner Thoughts"], tool_calls=calls))
            turns.append(Message(role="tool", content=plugin["Tool Responses"]))
        # A turn with Inner Thoughts but no command keeps only its reply (docs/formats.md, MOSS plugin turns).
        turns.append(("assistant", _strip_markers(text_field(turn, "MOSS", where))))
    return turns


def _plugin_text(turn: dict[str, Any], field: str, where: str) -> str:
    """A plugin field's text without its markers; "" when absent or MOSS's "None" (no plugin used)."""
    value = turn.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Refused("non_string_field", f"{where}{field} is {type_name(value)}, not a string")
    text = _strip_markers(value).strip()
    return "" if text == "None" else text


def _strip_markers(value: str) -> str:
    """``<|Human|>: text<eoh>\\n`` -> ``text``; text without the markers is returned as it is."""
    return _END.sub("", _START.sub("", value, count=1), count=1)


# ---------------------------------------------------------------------------------------------------------------
# A directory of one conversation per .json file


def json_files(directory: Path) -> list[Path]:
    """The .json files under a MOSS directory (its category subfolders too), in sorted relative-path order."""
    found = [p for p in directory.rglob("*.json") if p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def read_directory(directory: Path, max_bytes: int) -> Iterator[Record]:
    files = json_files(directory)
    if not files:
        raise InputError(f"{directory} is a directory without .json files; a moss directory holds one .json per chat")
    items = (
        read_document(file, index=index, max_bytes=max_bytes, where=f"{file.relative_to(directory).as_posix()}: ")
        for index, file in enumerate(files)
    )
    source = str(directory)
    return (convert_item(FORMAT, item, source) for item in items)


FORMAT = CorpusFormat(
    name="moss",
    fields=("meta_instruction", "chat"),
    convert=convert,
    detect=lambda keys, item_keys: {"meta_instruction", "chat"} <= keys,
    detect_rank=0,
    read_directory=read_directory,
)
