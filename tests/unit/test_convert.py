"""trainer.convert on the seed-model fixtures: the native model reproduces the vendor's reference outputs.

Fixtures: tests/fixtures/real/seed_models/<family>/ (tiny checkpoints in the vendors' on-disk formats, logits,
losses and greedy tokens computed by the vendors' own code; README there).
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import ConfigError
from trainer.convert import ConvertError, weights
from trainer.convert.cli import convert_checkpoint
from trainer.families import check_not_original, resolve_family

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "seed_models"
FAMILIES = {
    # fixture dir: (native class, trainer family)
    "chatglm2": ("GlmForCausalLM", "glm"),
    "chatglm3": ("GlmForCausalLM", "glm"),
    "baichuan_7b": ("LlamaForCausalLM", "llama"),
    "baichuan2_7b": ("LlamaForCausalLM", "llama"),
    "moss": ("CodeGenForCausalLM", "codegen"),
}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    return {
        family: (convert_checkpoint(SEED / family / "checkpoint", out / family, with_tokenizer=False), out / family)[1]
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_model_reproduces_the_vendor_outputs(converted: dict[str, Path], family: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(converted[family], dtype=torch.float32).eval()
    assert type(model).__name__ == FAMILIES[family][0]
    ref = load_file(str(SEED / family / "reference.safetensors"))
    meta = json.loads((SEED / family / "reference.json").read_text(encoding="utf-8"))
    with torch.no_grad():
        single = model(input_ids=ref["single.input_ids"]).logits
        torch.testing.assert_close(single, ref["single.logits"], rtol=0, atol=1e-5)
        batch_inputs = {"input_ids": ref["batch.input_ids"], "attention_mask": ref["batch.attention_mask"]}
        if "batch.position_ids" in ref:
            batch_inputs["position_ids"] = ref["batch.position_ids"]
        real = ref["batch.attention_mask"].bool()  # pad-row logits are implementation-defined
        batch = model(**batch_inputs).logits
        torch.testing.assert_close(batch[real], ref["batch.logits"][real], rtol=0, atol=1e-5)
        loss = model(input_ids=ref["single.input_ids"], labels=ref["single.input_ids"]).loss
        assert loss.item() == pytest.approx(meta["loss"]["single"]["value"], abs=1e-5)
        batch_labels = torch.tensor(meta["loss"]["batch"]["labels"])
        batch_loss = model(**batch_inputs, labels=batch_labels).loss
        assert batch_loss.item() == pytest.approx(meta["loss"]["batch"]["value"], abs=1e-5)
        config = GenerationConfig(**meta["generate"]["generation_config"])
        model.generation_config = config
        generated = model.generate(input_ids=ref["generate.prompt_ids"], generation_config=config)
    assert generated[0, ref["generate.prompt_ids"].shape[1] :].tolist() == meta["generate"]["new_token_ids"]
    record = json.loads((converted[family] / "conversion.json").read_text(encoding="utf-8"))
    assert record["native_family"] == FAMILIES[family][1]
    assert resolve_family("auto", model.config.model_type).name == FAMILIES[family][1]


def test_lora_targets_exist_and_all_linear_skips_the_glm_head(converted: dict[str, Path]) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    for family in ("chatglm3", "moss"):
        model = AutoModelForCausalLM.from_pretrained(converted[family], dtype=torch.float32)
        targets = list(resolve_family("auto", model.config.model_type).lora_targets)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
        names = {name.rsplit(".", 1)[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A")}
        assert names == set(targets)
    model = AutoModelForCausalLM.from_pretrained(converted["chatglm3"], dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert not hasattr(wrapped.base_model.model.lm_head, "lora_A")


def test_conversion_holds_about_one_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a shard is read, no tensor of the shard before it is still alive (measured with weak references)."""
    alive: list[weakref.ref[torch.Tensor]] = []
    shard_bytes: list[int] = []
    held_at_read: list[int] = []
    read = weights.read_shard

    def tracking_read(path: Path) -> dict[str, torch.Tensor]:
        gc.collect()
        held_at_read.append(sum(t.numel() * t.element_size() for ref in alive if (t := ref()) is not None))
        tensors = read(path)
        alive.extend(weakref.ref(t) for t in tensors.values())
        shard_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return tensors

    monkeypatch.setattr(weights, "read_shard", tracking_read)
    for family in ("chatglm2", "moss"):  # the two sharded fixtures
        alive.clear(), shard_bytes.clear(), held_at_read.clear()
        convert_checkpoint(SEED / family / "checkpoint", tmp_path / family, with_tokenizer=False)
        assert len(shard_bytes) == 2 and min(shard_bytes) > 100_000
        assert held_at_read == [0, 0], family  # shard 1 is released before shard 2 is read
    # The converter refuses a DST that exists (and never writes into it).
    with pytest.raises(ConvertError, match="already exists"):
        convert_checkpoint(SEED / "moss" / "checkpoint", tmp_path / "moss", with_tokenizer=False)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.convert", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def _copy_checkpoint(family: str, dst: Path, tokenizer: bool = False) -> Path:
    shutil.copytree(SEED / family / "checkpoint", dst)
    if tokenizer:
        for file in (SEED / family / "tokenizer").iterdir():
            shutil.copy(file, dst / file.name)
    return dst


def _with_vocab(src: Path, rows: int) -> None:
    """Pad a ChatGLM checkpoint's vocabulary to ``rows`` (the tiny model has 1024; the real tokenizer 64798)."""
    raw: dict[str, Any] = json.loads((src / "config.json").read_text(encoding="utf-8"))
    old = raw["padded_vocab_size"]
    raw["padded_vocab_size"] = rows
    (src / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        tensors = torch.load(shard, weights_only=True)
        for key in ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"):
            if key in tensors:
                extra = torch.randn(rows - old, tensors[key].shape[1], generator=generator) * 0.02
                tensors[key] = torch.cat([tensors[key], extra])
        torch.save(tensors, shard)


@pytest.mark.slow
def test_cli_converts_with_the_real_tokenizer_and_checks(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    src = _copy_checkpoint("chatglm3", tmp_path / "chatglm3-6b", tokenizer=True)
    # The real vocabulary does not fit the tiny model's 1024 rows: refused before any weight is converted.
    refused = _run_cli(str(src), str(tmp_path / "out"))
    assert refused.returncode == 2 and "64798 ids" in refused.stderr and "1024 rows" in refused.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    _with_vocab(src, 65024)
    done = _run_cli(str(src), str(tmp_path / "out"), "--check")
    assert done.returncode == 0, done.stderr
    assert "GlmForCausalLM" in done.stdout and "check: forward pass finite" in done.stdout
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|user|>") == 64795
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_format"] == "chatglm3"
    # Generation stops at the end of an assistant turn: <|user|>, <|observation|>, eos.
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [64795, 64797, 2]
    assert json.loads((out / "conversion.json").read_text())["source_family"] == "chatglm2"
    assert not list(out.glob("*.py")) and (out / "model.safetensors.index.json").is_file()


def test_bad_sources_fail_in_one_line(tmp_path: Path) -> None:
    cases: list[tuple[Path, str]] = []
    # A truncated shard.
    truncated = _copy_checkpoint("moss", tmp_path / "truncated")
    shard = truncated / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cases.append((truncated, "pytorch_model-00002-of-00002.bin: cannot be read"))
    # A missing shard.
    missing = _copy_checkpoint("chatglm2", tmp_path / "missing")
    (missing / "pytorch_model-00001-of-00002.bin").unlink()
    cases.append((missing, "shard pytorch_model-00001-of-00002.bin is missing"))
    # No tokenizer.model.
    cases.append((_copy_checkpoint("baichuan2_7b", tmp_path / "no-tokenizer"), "no tokenizer.model"))
    # A shape config.json does not imply.
    wrong = _copy_checkpoint("baichuan_7b", tmp_path / "wrong-shape", tokenizer=False)
    raw = json.loads((wrong / "config.json").read_text())
    raw["intermediate_size"] = 100
    (wrong / "config.json").write_text(json.dumps(raw))
    cases.append((wrong, "config.json implies"))
    # An unknown layout.
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "rwkv", "architectures": ["RwkvForCausalLM"]}))
    cases.append((unknown, "no layout this converter knows"))
    for src, message in cases:
        if src.name in ("wrong-shape", "truncated", "missing"):
            # In-process without a vocabulary (the tiny checkpoints have none; the CLI checks the tokenizer first).
            with pytest.raises(ConvertError, match=message) as caught:
                convert_checkpoint(src, tmp_path / f"out-{src.name}", with_tokenizer=False)
            assert "\n" not in str(caught.value)
            assert not (tmp_path / f"out-{src.name}").exists()
            continue
        result = _run_cli(str(src), str(tmp_path / f"out-{src.name}"))
        assert result.returncode == 2, (src.name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (src.name, result.stderr)
        assert not (tmp_path / f"out-{src.name}").exists()


def test_original_checkpoint_refused_at_start_up() -> None:
    for family in ("chatglm2", "baichuan2_7b", "moss"):
        raw = json.loads((SEED / family / "checkpoint" / "config.json").read_text())
        with pytest.raises(ConfigError, match=r"python -m trainer\.convert /models/x /models/x-native") as caught:
            check_not_original("/models/x", raw["model_type"])
        assert "\n" not in str(caught.value)
    check_not_original("/models/x", "glm")  # converted: accepted


def test_baichuan2_norm_head_trains_through_the_normalization(converted: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.export import fold_norm_heads
    from trainer.model import use_norm_head
    from trainer.models.norm_head import NormHead

    assert json.loads((converted["baichuan2_7b"] / "config.json").read_text())["norm_head"] is True
    model = AutoModelForCausalLM.from_pretrained(converted["baichuan2_7b"], dtype=torch.float32)
    ids = torch.arange(5, 25).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    use_norm_head(model)
    assert isinstance(model.lm_head, NormHead)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # the original normalizes every row in the forward: scale drops out
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    model(input_ids=ids, labels=ids).loss.backward()
    grad, weight = model.lm_head.weight.grad, model.lm_head.weight.detach()
    assert grad is not None and grad.abs().max() > 0
    # Through the normalization the gradient of each row is orthogonal to the row.
    assert (grad * weight).sum(-1).abs().max() < 1e-6
    state = {"lm_head.weight": weight.clone()}
    fold_norm_heads(model, state)
    torch.testing.assert_close(state["lm_head.weight"].norm(dim=-1), torch.ones(weight.shape[0]))


def test_prepare_refuses_a_vendor_tokenizer(tmp_path: Path) -> None:
    from data_pipeline.prepare import load_tokenizer
    from sft_stack.chat.conversation import InputError

    for family in ("baichuan2_7b", "chatglm3"):
        with pytest.raises(InputError, match=r"python -m trainer\.convert") as caught:
            load_tokenizer(str(SEED / family / "tokenizer"))
        assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_training_an_original_checkpoint_exits_with_the_converter_command(tmp_path: Path) -> None:
    import os

    from tests.helpers.data import make_prepared_dir

    data = make_prepared_dir(tmp_path / "data")
    original = SEED / "chatglm2" / "checkpoint"
    result = subprocess.run(
        [sys.executable, "launcher/run.py", "--config", "configs/tiny_cpu.yaml", f"model.path={original}",
         "model.random_init=false", f"data.path={data}", f"train.output_dir={tmp_path / 'out'}",
         "tracking.enabled=false"],
        cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "MASTER_PORT": "29731"},
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "trainer.convert" in line]
    assert f"python -m trainer.convert {original} {original}-native" in line
