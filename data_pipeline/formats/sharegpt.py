"""ShareGPT: a list of {from, value} messages (or OpenAI's {role, content}), an optional system and tools; calls as
LLaMA-Factory's function_call entries or ChatGLM3's tool entries.

    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}], "tools": "[...]"}
"""

from __future__ import annotations

from typing import Any

from data_pipeline.formats.checks import conversation, known_role
from data_pipeline.formats.records import (
    CorpusFormat,
    Turn,
    dump,
    object_items,
    system_turn,
    text_field,
)
from data_pipeline.formats.tool_calls import sharegpt_calls, tool_call, tools_field
from sft_stack.chat.conversation import Conversation, Message, Role

# ShareGPT dumps name the speakers many ways; these are the ones that mean a plain chat role.
_SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    # Tool results: LLaMA-Factory's/glaive's "observation", ChatGLM3's "observation" and OpenAI-style "tool".
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation(_turns(record), source, index, tools_field(record))


def _turns(record: dict[str, Any]) -> list[Turn]:
    turns: list[Turn] = list(system_turn(record, "system"))
    for number, message, where in object_items(record, "conversations"):
        # Some ShareGPT exports (ChatGLM3's among them) use OpenAI's role/content keys inside "conversations".
        role_key, text_key = ("role", "content") if "from" not in message and "role" in message else ("from", "value")
        name = text_field(message, role_key, where).lower()
        if name == "function_call":
            # LLaMA-Factory: the value is the JSON of one call {"name", "arguments"} or of a list of parallel calls.
            calls = sharegpt_calls(text_field(message, text_key, where), where)
            previous = turns[-1] if turns else None
            if isinstance(previous, Message) and previous.tool_calls:
                turns[-1] = Message(role="assistant", content=previous.content, tool_calls=previous.tool_calls + calls)
            else:
                turns.append(Message(role="assistant", content="", tool_calls=calls))
            continue
        if name == "tool" and "parameters" in message:
            # ChatGLM3's tool record: one call and its observation in one entry.
            call = tool_call({"name": message.get("name"), "arguments": message["parameters"]}, where)
            turns.append(Message(role="assistant", content="", tool_calls=(call,)))
            observation = message.get("observation")
            text = observation if isinstance(observation, str) else dump(observation)
            turns.append(Message(role="tool", content=text, name=call.name))
            continue
        speaker = known_role(name, _SHAREGPT_ROLES, where)
        text = text_field(message, text_key, where)
        if speaker == "system" and not turns and number == 0 and not text.strip():
            continue
        turns.append((speaker, text))
    return turns


FORMAT = CorpusFormat(
    name="sharegpt",
    fields=("conversations", "system", "tools"),
    convert=convert,
    detect=lambda keys, item_keys: "conversations" in keys,
    detect_rank=2,
)
