"""What the speed work (issue 22) changed must give exactly what the slower code gave: the direct tokenizer class
is the one AutoTokenizer picks, the written-out datasets features are datasets' own, and prepare's start-up no
longer imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Features
from transformers import AutoTokenizer, LlamaTokenizerFast

from data_pipeline.schema import ARROW_SCHEMA, tokenizer_fingerprint
from data_pipeline.shards import DATASETS_FEATURES
from sft_stack.common.tokenizer import _direct_class, load_tokenizer
from tests.helpers.data import REPO, TINY_LLAMA

TINY_BPE = REPO / "tests" / "fixtures" / "tokenizers" / "tiny_bpe"
LLAMA2_SP = REPO / "tests" / "fixtures" / "tokenizers" / "llama2_sentencepiece"


def test_features_are_datasets_own() -> None:
    assert Features.from_arrow_schema(ARROW_SCHEMA).to_dict() == DATASETS_FEATURES


@pytest.fixture(scope="module")
def llama2_fast(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Llama 2 SentencePiece model saved as a fast tokenizer (tokenizer_class LlamaTokenizer, no config.json)."""
    target = tmp_path_factory.mktemp("llama2") / "fast"
    LlamaTokenizerFast.from_pretrained(str(LLAMA2_SP)).save_pretrained(str(target))
    return target


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bpe", "llama2_fast"])
def test_direct_class_loads_what_auto_tokenizer_loads(which: str, llama2_fast: Path) -> None:
    directory = {"tiny_llama": TINY_LLAMA, "tiny_bpe": TINY_BPE, "llama2_fast": llama2_fast}[which]
    assert _direct_class(directory) is not None, "the fixture must take the direct path"
    direct = load_tokenizer(directory)
    auto = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert type(direct) is type(auto)
    assert direct.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert tokenizer_fingerprint(direct) == tokenizer_fingerprint(auto)
    assert direct.special_tokens_map == auto.special_tokens_map
    assert (direct.bos_token_id, direct.eos_token_id, direct.unk_token_id) == (
        auto.bos_token_id,
        auto.eos_token_id,
        auto.unk_token_id,
    )
    assert direct.chat_template == auto.chat_template
    assert direct.init_kwargs.get("chat_format") == auto.init_kwargs.get("chat_format")
    text = "你好 <s> world </s> [INST] 123"
    assert direct(text)["input_ids"] == auto(text)["input_ids"]


def test_other_directories_go_through_auto_tokenizer(tmp_path: Path) -> None:
    """A directory whose class AutoTokenizer must resolve itself (here: a Qwen config) takes no shortcut."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((TINY_BPE / name).read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    assert _direct_class(tmp_path) is None
    assert _direct_class(LLAMA2_SP) is None  # a bare tokenizer.model is converted by LlamaTokenizerFast


def test_prepare_start_up_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from data_pipeline.prepare import PrepareOptions, SourceSpec, load_tokenizer, make_plan\n"
        f"options = PrepareOptions(sources=(SourceSpec(path={str(REPO / 'tests/fixtures/real/belle/Belle_open_source_1k.json')!r}),),"
        f" tokenizer={str(TINY_LLAMA)!r}, out='unused')\n"
        "make_plan(options, load_tokenizer(options.tokenizer))\n"
        "print(sorted(m for m in ('torch', 'datasets', 'pandas') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
