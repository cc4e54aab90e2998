"""Tiny chat models for the generation and evaluation tests, built from the committed tiny_llama config.

``memorized_model`` trains a random 2-layer Llama for a few dozen steps on two conversations encoded by the
real training path (``ChatTemplate.encode_batch``), so it answers them verbatim and then emits the template's
end-of-turn token, which it only does if the stop token was trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from sft_stack.chat.conversation import Conversation, Message
from sft_stack.chat.templates import ChatTemplate, resolve_template

TINY_LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_llama"
TEMPLATE = "qwen"
"""ChatML: its end of turn (<|im_end|>) differs from eos (</s>), so stopping at the template's token is visible."""
PAIRS = (("What is 2+3?", "Answer: 5"), ("你好", "你好！有什么可以帮你？"))


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run ~10x faster on one intra-op thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def template(tok: PreTrainedTokenizerBase) -> ChatTemplate:
    return resolve_template(TEMPLATE, tok)


def random_model(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    config = LlamaConfig.from_pretrained(TINY_LLAMA, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def memorized_model(tok: PreTrainedTokenizerBase, steps: int = 60) -> LlamaForCausalLM:
    """A tiny model that answers PAIRS' prompts with PAIRS' replies and stops (final loss ~0.04)."""
    model = random_model(seed=0)
    model.train()
    convs = [
        Conversation(
            messages=(Message(role="user", content=p), Message(role="assistant", content=r)), source="t", index=i
        )
        for i, (p, r) in enumerate(PAIRS)
    ]
    encoded = template(tok).encode_batch(convs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        for enc in encoded:
            loss = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_model_dir(model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, out: Path, *, template_name: str) -> Path:
    """An exported full model as trainer/export.py writes it: weights, tokenizer, sft_export.json."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    export = {"template": template_name, "method": "full", "base_model_path": str(TINY_LLAMA), "data_fingerprint": None}
    (out / "sft_export.json").write_text(json.dumps(export), encoding="utf-8")
    return out
