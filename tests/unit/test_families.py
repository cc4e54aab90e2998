"""trainer.families: one record per model family, read by LoRA, the planner, sequence parallelism, the converter
and the Auto registration; a new family is one record, shown here with a throwaway one in a temporary module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from sft_stack.chat.registry import TEMPLATE_NAMES
from tests.helpers.modules import imported_module
from trainer import families, sequence_parallel
from trainer.config import ConfigError, RunConfig, load_config
from trainer.convert.registry import detect_source
from trainer.families import FAMILIES, GENERIC, Family, lora_target_modules, resolve_family
from trainer.model import attention_implementation
from trainer.plan import shape_from_config

ROOT = Path(__file__).resolve().parents[2]


def config(*overrides: str) -> RunConfig:
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", ["data.path=unused", "train.output_dir=unused", *overrides])


def test_every_default_template_is_a_template_of_the_data_side() -> None:
    """The data side keeps its own template registry (it may not import trainer): the records must name its entries."""
    for family in [*FAMILIES.values(), GENERIC]:
        assert family.template in TEMPLATE_NAMES, (family.name, family.template)


def test_the_tables_read_from_the_records_are_the_ones_they_replaced() -> None:
    assert families.sequence_parallel_families() == ["llama", "qwen2", "mistral", "glm", "codegen", "gpt2"]
    refused = {f.name for f in FAMILIES.values() if f.no_sequence_parallel_because}
    assert refused == {"baichuan_alibi", "chatglm_v1", "starcoder", "qwen"}
    own = {f.name: f.own_model.__name__ for f in FAMILIES.values() if f.own_model is not None}
    assert own == {"baichuan_alibi": "BaichuanAlibiForCausalLM", "chatglm_v1": "ChatGLMv1ForCausalLM"}
    sources = {source.name: family.name for source, family in families.converter_sources()}
    assert sources == {
        "chatglm2": "glm",
        "baichuan_7b": "llama",
        "baichuan2_7b": "llama",
        "moss": "codegen",
        "baichuan_13b": "baichuan_alibi",
        "baichuan2_13b": "baichuan_alibi",
        "chatglm_v1": "chatglm_v1",
    }
    for model_type in ("baichuan_alibi", "chatglm_v1"):  # registered with the Auto classes, remote code off
        assert model_type in CONFIG_MAPPING
        assert CONFIG_MAPPING[model_type] in AutoModelForCausalLM._model_mapping
    assert attention_implementation("auto", False, "baichuan_alibi") == "sdpa"
    with pytest.raises(ConfigError, match="model_type chatglm_v1 carries its position bias"):
        attention_implementation("flash_attention_2", False, "chatglm_v1")


def test_a_record_cannot_both_run_and_refuse_sequence_parallelism() -> None:
    with pytest.raises(ValueError, match="family x: sequence_parallel=True with a refusal reason"):
        Family(name="x", model_types=(), lora_targets=(), supports_packed_positions=False, needs_remote_code=False,
               template="default", sequence_parallel=True, no_sequence_parallel_because="no")  # fmt: skip


THROWAWAY_MODULE = '''
"""A family defined outside trainer/: one record, with a converter source of its own."""

from trainer.convert import SourceFamily
from trainer.families import Family, register


def _unused(*args: object) -> object:
    raise NotImplementedError("the test never converts weights")


ORIGINAL = SourceFamily(
    name="throwaway_original",
    is_source=lambda raw: raw.get("model_type") == "throwaway_vendor",
    native_config=_unused,
    source_shapes=_unused,
    convert_tensor=_unused,
    build_tokenizer=_unused,
    chat_template=_unused,
    generation_config=_unused,
)

THROWAWAY = register(
    Family(
        name="throwaway",
        model_types=("throwaway_lm",),
        lora_targets=("wqkv", "wo", "w_in", "w_out"),
        supports_packed_positions=True,
        needs_remote_code=False,
        template="plain",
        sequence_parallel=True,
        gated_mlp=False,
        dense_mask="per_head",
        converted_from=(ORIGINAL,),
    )
)
'''


@pytest.fixture
def registry() -> Iterator[None]:
    """The family registry as it was before the test, restored afterwards."""
    saved = dict(FAMILIES)
    yield
    FAMILIES.clear()
    FAMILIES.update(saved)


@pytest.fixture
def throwaway(registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Family]:
    """The throwaway module, imported from a temporary directory."""
    with imported_module(tmp_path, "throwaway_family", THROWAWAY_MODULE, monkeypatch) as module:
        yield module.THROWAWAY


def test_a_new_family_is_one_record(throwaway: Family, tmp_path: Path) -> None:
    # LoRA targets, by model.family and by config.json's model_type
    assert resolve_family("auto", "throwaway_lm") is throwaway
    assert resolve_family("throwaway", "anything") is throwaway
    assert lora_target_modules("auto", throwaway) == ["wqkv", "wo", "w_in", "w_out"]
    # the planner: no gated MLP although config.json has intermediate_size, one dense mask per head
    shape = {"model_type": "throwaway_lm", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 512}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shape))
    planned = shape_from_config(tmp_path)
    assert not planned.gated_mlp and planned.mask_heads == 4
    # 2 x (4 x 64^2 + 2 x 64 x 256) + 2 x 512 x 64: fused QKV and two MLP matrices, untied head
    assert planned.params == 2 * (4 * 64**2 + 2 * 64 * 256) + 2 * 512 * 64
    # the original checkpoint it is converted from: the converter finds it, the planner reads it as the family
    (tmp_path / "config.json").write_text(json.dumps({**shape, "model_type": "throwaway_vendor"}))
    assert shape_from_config(tmp_path).mask_heads == 4
    source, family = detect_source({"model_type": "throwaway_vendor"}, tmp_path / "config.json")
    assert (source.name, family) == ("throwaway_original", throwaway)
    # the sequence-parallel verdict: accepted, and listed among the supported families in another's refusal
    hf_config = {"model_type": "throwaway_lm", "num_attention_heads": 4, "num_key_value_heads": 2}
    sequence_parallel.check(config("train.sequence_parallel_size=2"), 2, hf_config)
    with pytest.raises(ConfigError) as caught:
        sequence_parallel.check(config("train.sequence_parallel_size=2", "model.family=starcoder"), 2, hf_config)
    assert "(supported: llama, qwen2, mistral, glm, codegen, gpt2, throwaway)" in str(caught.value)


def test_a_refusing_record_gives_its_reason(registry: None) -> None:
    refused = Family(name="throwaway_refused", model_types=("throwaway_refused_lm",), lora_targets=("wo",),
                     supports_packed_positions=True, needs_remote_code=False, template="default",
                     no_sequence_parallel_because="its attention keeps a learned mask Ulysses cannot split")  # fmt: skip
    families.register(refused)
    with pytest.raises(ConfigError) as caught:
        hf_config = {"model_type": "throwaway_refused_lm", "num_attention_heads": 4}
        sequence_parallel.check(config("train.sequence_parallel_size=2"), 2, hf_config)
    text = str(caught.value)
    assert "model family 'throwaway_refused'" in text
    assert "Ulysses attention: its attention keeps a learned mask Ulysses cannot split (supported:" in text


def test_register_refuses_a_name_or_model_type_already_taken(throwaway: Family) -> None:
    with pytest.raises(ValueError, match="family throwaway: name"):
        families.register(throwaway)
    clash = Family(name="other", model_types=("llama",), lora_targets=(), supports_packed_positions=False,
                   needs_remote_code=False, template="default")  # fmt: skip
    with pytest.raises(ValueError, match=r"family other: name or model_type \['llama'\] already registered"):
        families.register(clash)
