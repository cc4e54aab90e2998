"""Model loading rules: family registry, packing isolation claims, param groups, refusals (one line each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import ConfigError, DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from trainer.export import adapter_problem, export_model
from trainer.families import FAMILIES, GENERIC, lora_target_modules, resolve_family
from trainer.model import check_remote_code, load_model, param_groups, read_hf_config, validate_method

TINY_LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_llama"


def run_config(tmp_path: Path, model_path: Path = TINY_LLAMA, **model: Any) -> RunConfig:
    return RunConfig(
        model=ModelConfig(path=str(model_path), random_init=True, dtype="fp32", **model),
        data=DataConfig(path=str(tmp_path / "data")),
        train=TrainConfig(output_dir=str(tmp_path / "out"), max_steps=2, seed=1),
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
    )


def test_family_registry_targets_and_lookup() -> None:
    assert lora_target_modules("auto", resolve_family("auto", "llama")) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    assert resolve_family("auto", "qwen2").name == "qwen2"
    assert resolve_family("auto", "gpt_bigcode").name == "starcoder"
    assert lora_target_modules("auto", resolve_family("auto", "glm")) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj",
    ]  # fmt: skip
    assert lora_target_modules("auto", resolve_family("auto", "codegen")) == ["qkv_proj", "out_proj", "fc_in", "fc_out"]
    assert lora_target_modules("auto", FAMILIES["gpt2"]) == ["c_attn", "c_proj", "c_fc"]
    assert lora_target_modules("all-linear", GENERIC) == "all-linear"
    assert lora_target_modules(" q_proj, v_proj ", GENERIC) == ["q_proj", "v_proj"]
    assert resolve_family("mistral", "llama").name == "mistral"  # an explicit family wins over model_type
    assert resolve_family("auto", "falcon") is GENERIC
    with pytest.raises(ConfigError, match=r"lora\.target_modules=all-linear"):
        lora_target_modules("auto", GENERIC)
    with pytest.raises(ConfigError, match=r"model\.family=.gpt5."):
        resolve_family("gpt5", "llama")


SMALL = {
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100},
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100},
    "qwen3": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100},
    "mistral": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 100},
    "baichuan_alibi": {"hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 5,
                       "vocab_size": 100},
    "chatglm_v1": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "vocab_size": 100, "mask_token_id": 96, "gmask_token_id": 97, "bos_token_id": 98,
                   "eos_token_id": 99, "pad_token_id": 0},
    "glm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100, "pad_token_id": 0, "eos_token_id": 2},
    "codegen": {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "vocab_size": 100, "bos_token_id": 0,
                "eos_token_id": 0},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0},
    "gpt_bigcode": {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100, "bos_token_id": 0,
                    "eos_token_id": 0},
}  # fmt: skip
ISOLATING = [(f.name, t) for f in FAMILIES.values() if f.supports_packed_positions for t in f.model_types]


def test_every_isolating_family_has_a_check() -> None:
    assert {t for _, t in ISOLATING} == set(SMALL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("family", "model_type"), ISOLATING)
def test_packed_rows_are_isolated_by_position_ids(family: str, model_type: str, attn: str) -> None:
    """The registry's claim: a packed row (position_ids restart, no attention mask, no KV cache) gives each
    sample the logits it has alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL[model_type])
    config.use_cache = False  # as load_model sets it for training
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    first, second = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 7))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=position_ids).logits
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_load_model_full_and_lora(tmp_path: Path) -> None:
    full = load_model(run_config(tmp_path), {})
    assert full.family == "llama" and full.supports_packed_positions
    assert full.model.config.use_cache is False
    assert full.trainable_params == full.total_params == sum(p.numel() for p in full.model.parameters())
    assert full.hf_deepspeed_config is None

    again = load_model(run_config(tmp_path), {})  # train.seed fixes the random init
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), again.model.parameters(), strict=True))

    lora = load_model(run_config(tmp_path, method="lora", gradient_checkpointing=True), {})
    trainable = {name for name, p in lora.model.named_parameters() if p.requires_grad}
    # 2 layers x 7 target modules x (lora_A, lora_B)
    assert len(trainable) == 28 and all("lora_" in name for name in trainable)
    assert lora.model.base_model.model.is_gradient_checkpointing
    assert (Path(lora.base_model_path) / "model.safetensors").is_file()


def test_param_groups_exclude_norms_and_biases(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        n for n in names.values() if n.endswith("bias") or ".ln_" in n
    )
    assert {names[id(p)] for p in decay["params"]} >= {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"}

    llama = load_model(run_config(tmp_path), {}).model
    _, llama_no_decay = param_groups(llama, 0.1)
    assert len(llama_no_decay["params"]) == 2 * 2 + 1  # two RMSNorms per layer + the final norm

    lora = load_model(run_config(tmp_path, method="lora"), {}).model
    (only,) = param_groups(lora, 0.1)  # frozen base: only adapters, all matrices
    assert len(only["params"]) == 28


def test_method_combinations_refused_in_one_line(tmp_path: Path) -> None:
    qlora = RunConfig(
        model=ModelConfig(path="/models/x", method="qlora"),
        data=DataConfig(path="d"),
        train=TrainConfig(output_dir="o", max_steps=1),
    )
    cases: list[tuple[RunConfig, dict[str, Any], str]] = [
        (qlora, {"zero_optimization": {"stage": 3}}, "model.method=qlora with ZeRO-3"),
        (qlora, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        (run_config(tmp_path, attn_implementation="flash_attention_2"), {}, "flash_attention_2"),
    ]
    for cfg, ds_config, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            validate_method(cfg, ds_config)
        assert "\n" not in str(caught.value)
    validate_method(qlora, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})


def test_remote_code_needs_the_allow_list(tmp_path: Path) -> None:
    model_dir = tmp_path / "moss-moon"
    model_dir.mkdir()
    raw = {"model_type": "qwen", "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}}
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code_paths") as caught:
        load_model(run_config(tmp_path, model_path=model_dir), {})
    assert "\n" not in str(caught.value)
    # The allow-list compares resolved paths.
    allowed = run_config(tmp_path, model_path=model_dir, trust_remote_code_paths=(str(tmp_path / "." / "moss-moon"),))
    assert check_remote_code(allowed, read_hf_config(model_dir)) is True
    # A model type transformers knows loads its native class without remote code, even with an auto_map.
    native = tmp_path / "llama-with-auto-map"
    shutil.copytree(TINY_LLAMA, native)
    raw = json.loads((native / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}
    (native / "config.json").write_text(json.dumps(raw))
    assert type(load_model(run_config(tmp_path, model_path=native), {}).model).__name__ == "LlamaForCausalLM"


def test_untrained_adapter_is_refused(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, method="lora")
    loaded = load_model(cfg, {})
    with pytest.raises(RuntimeError, match="every lora_B matrix is all zeros"):
        export_model(loaded.model, loaded, cfg, tmp_path / "final")
    assert not (tmp_path / "final").exists()
    assert adapter_problem({}) == "no adapter tensors were collected"
    problem = adapter_problem({"x.lora_A.weight": torch.ones(2, 2), "x.lora_B.weight": torch.empty(0)})
    assert problem is not None and "size 0" in problem
    assert adapter_problem({"x.lora_A.weight": torch.ones(2, 2), "x.lora_B.weight": torch.ones(2, 2)}) is None
