"""A new chat format is one module and one registry line: a throwaway format, written to a temporary directory and
imported, works through the registry (resolve by name, exact ids, labels on the assistant turns only) and through
the real ``prepare`` on a few records, without any other file of the project being edited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
from data_pipeline.schema import IGNORE_INDEX
from sft_stack.chat.conversation import Conversation, InputError, Message
from sft_stack.chat.registry import RENDERERS, TEMPLATE_NAMES, template_names
from sft_stack.chat.templates import ChatTemplate, Encoded, resolve_template
from tests.helpers.data import write_jsonl
from tests.helpers.modules import imported_module

TINY_BPE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers" / "tiny_bpe"
X = IGNORE_INDEX

THROWAWAY_MODULE = '''
"""A chat format defined outside sft_stack/chat: ``ROLE: text`` lines, the answer after ``A:``, eos after it."""

from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.registry import register
from sft_stack.chat.renderer import Layout, Renderer
from sft_stack.chat.vocab import Vocab


class Throwaway(Renderer):
    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.answer = v.literal("A:")

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        out.add(self.bos)
        for i, m in enumerate(messages):
            if m.role == "assistant":
                out.add(" " + m.content, trained[i])
                out.add(self.eos, trained[i])
            else:
                out.add(f"{m.role.upper()}: {m.content}\\n")
                if m.role == "user":
                    out.add(self.answer)
        return out


register("throwaway", Throwaway)
'''


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The throwaway module imported from a temporary directory; the registry restored afterwards."""
    saved = dict(RENDERERS)
    with imported_module(tmp_path / "formats", "throwaway_chat_format", THROWAWAY_MODULE, monkeypatch):
        yield "throwaway"
    RENDERERS.clear()
    RENDERERS.update(saved)


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(TINY_BPE))


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


TWO_ROUNDS = Conversation(
    messages=(
        Message(role="system", content="Be brief."),
        Message(role="user", content="What is 2 + 2?"),
        Message(role="assistant", content="4"),
        Message(role="user", content="And 3 + 3?"),
        Message(role="assistant", content="6"),
    ),
    source="t",
    index=0,
)


def test_the_registry_resolves_it_and_labels_only_the_assistant_turns(
    throwaway: str, tiny: PreTrainedTokenizerBase
) -> None:
    assert throwaway in template_names()
    assert throwaway not in TEMPLATE_NAMES  # the project's own names stay as they were
    template = resolve_template(throwaway, tiny)
    assert isinstance(template, ChatTemplate)
    assert template.name == "throwaway"
    assert template.stop_token_ids == (tiny.eos_token_id,)

    (encoded,) = template.encode_batch([TWO_ROUNDS])
    assert isinstance(encoded, Encoded)
    bos, eos, answer_marker = tiny.bos_token_id, tiny.eos_token_id, ids(tiny, "A:")
    system, user1, user2 = (
        ids(tiny, "SYSTEM: Be brief.\n"),
        ids(tiny, "USER: What is 2 + 2?\n"),
        ids(tiny, "USER: And 3 + 3?\n"),
    )
    four, six = ids(tiny, " 4"), ids(tiny, " 6")
    prompt1, prompt2 = [bos, *system, *user1, *answer_marker], [*user2, *answer_marker]
    assert encoded.input_ids == [*prompt1, *four, eos, *prompt2, *six, eos]
    assert encoded.labels == [*[X] * len(prompt1), *four, eos, *[X] * len(prompt2), *six, eos]
    trained = [t for t in encoded.labels if t != X]
    assert tiny.decode(trained) == " 4</s> 6</s>"

    (last_only,) = template.encode_batch([TWO_ROUNDS], last_turn_only=True)
    assert isinstance(last_only, Encoded)
    assert tiny.decode([t for t in last_only.labels if t != X]) == " 6</s>"
    # A generation prompt is the training encoding up to the answer.
    assert template.encode_prompt(TWO_ROUNDS.messages[:2]) == prompt1


def test_an_unregistered_name_is_still_refused_by_name(throwaway: str, tiny: PreTrainedTokenizerBase) -> None:
    with pytest.raises(InputError, match=r"unknown template 'throwaway2'; valid: auto, default, .*, throwaway$"):
        resolve_template("throwaway2", tiny)


def test_prepare_writes_shards_in_the_new_format(throwaway: str, tiny: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    records = [
        {"messages": [{"role": "user", "content": f"What is {a} + {a}?"}, {"role": "assistant", "content": str(2 * a)}]}
        for a in range(6)
    ]
    source = write_jsonl(tmp_path / "data.jsonl", records)
    options = PrepareOptions(
        sources=(SourceSpec(path=str(source)),),
        tokenizer=str(TINY_BPE),
        out=str(tmp_path / "out"),
        template=throwaway,
        val_fraction=0.0,
        progress=False,
    )
    manifest = prepare(options)
    assert manifest.template == "throwaway"
    assert manifest.counts["samples_written"] == 6 and manifest.counts["samples_rejected"] == 0

    rows = list(datasets.load_from_disk(str(tmp_path / "out" / "train")))
    written = sorted((row["input_ids"], row["labels"]) for row in rows)
    template = resolve_template(throwaway, tiny)
    convs = [
        Conversation(messages=tuple(Message(**m) for m in r["messages"]), source=str(source), index=n)
        for n, r in enumerate(records)
    ]
    expected = sorted((e.input_ids, e.labels) for e in template.encode_batch(convs) if isinstance(e, Encoded))
    assert written == expected
    answers = sorted(tiny.decode([t for t in labels if t != X]) for _, labels in written)
    assert answers == sorted(f" {2 * a}</s>" for a in range(6))
