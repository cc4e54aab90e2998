"""Our own classes for Baichuan-13B/Baichuan2-13B (ALiBi) and ChatGLM-6B v1 against the vendors' reference outputs.

The original-format fixture checkpoints (tests/fixtures/real/seed_models/, README there) go through the real
converter (``trainer.convert``) and are loaded back with plain ``AutoModelForCausalLM.from_pretrained``
(``trust_remote_code`` off). Each class must reproduce the vendor's fp32 logits (atol 1e-5), losses and greedy
tokens, with and without the KV cache, under eager and sdpa attention. Controls show the tests can fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import trainer.models  # noqa: F401  registers our model types
from trainer.convert.checkpoint import convert_checkpoint
from trainer.models import baichuan_alibi, glm_v1
from trainer.models.baichuan_alibi import alibi_slopes

SEED_MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "seed_models"
FAMILIES = ("baichuan_13b", "baichuan2_13b", "chatglm")
ATOL = 1e-5
"""The fixture pack's recommended fp32 tolerance (its sensitivity probes move logits by >= 0.06)."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one intra-op thread is much faster on the shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    dirs = {}
    for family in FAMILIES:
        record = convert_checkpoint(SEED_MODELS / family / "checkpoint", out / family, with_tokenizer=False)
        assert record["source_family"] == {"chatglm": "chatglm_v1"}.get(family, family)
        dirs[family] = out / family
    return dirs


def reference(family: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(SEED_MODELS / family / "reference.safetensors"))
    return tensors, json.loads((SEED_MODELS / family / "reference.json").read_text(encoding="utf-8"))


def load(path: Path, attn: str = "eager") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def batch_inputs(family: str, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # ChatGLM-6B's fixture batch is unpadded (the model derives positions and mask from input_ids).
    if family == "chatglm":
        return {"input_ids": ref["batch.input_ids"]}
    return {"input_ids": ref["batch.input_ids"], "attention_mask": ref["batch.attention_mask"]}


def max_logit_diff(model: Any, family: str, ref: dict[str, torch.Tensor]) -> float:
    """Largest |logit - reference| over the single row and the real tokens of the batch."""
    with torch.no_grad():
        single = model(input_ids=ref["single.input_ids"], use_cache=False).logits
        batch = model(**batch_inputs(family, ref), use_cache=False).logits
    real = batch_inputs(family, ref).get("attention_mask", torch.ones(batch.shape[:2])).bool()
    return max(
        (single - ref["single.logits"]).abs().max().item(), (batch - ref["batch.logits"])[real].abs().max().item()
    )


def greedy(model: Any, meta: dict[str, Any], prompt: torch.Tensor, *, use_cache: bool) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(**{**meta["generate"]["generation_config"], "use_cache": use_cache})
    model.generation_config = config  # no vendor sampling defaults merged in
    with torch.no_grad():
        return model.generate(input_ids=prompt, generation_config=config)[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reproduces_vendor_logits_loss_and_greedy(converted: dict[str, Path], family: str, attn: str) -> None:
    ref, meta = reference(family)
    model = load(converted[family], attn)
    assert type(model).__name__ == {"chatglm": "ChatGLMv1ForCausalLM"}.get(family, "BaichuanAlibiForCausalLM")
    assert max_logit_diff(model, family, ref) <= ATOL
    with torch.no_grad():
        single = model(input_ids=ref["single.input_ids"], labels=ref["single.input_ids"]).loss.item()
        labels = torch.tensor(meta["loss"]["batch"]["labels"])
        batch = model(**batch_inputs(family, ref), labels=labels).loss.item()
    assert single == pytest.approx(meta["loss"]["single"]["value"], abs=ATOL)
    assert batch == pytest.approx(meta["loss"]["batch"]["value"], abs=ATOL)
    expected = meta["generate"]["new_token_ids"]
    assert greedy(model, meta, ref["generate.prompt_ids"], use_cache=True) == expected
    assert greedy(model, meta, ref["generate.prompt_ids"], use_cache=False) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_steps_equal_full_forward(converted: dict[str, Path], family: str) -> None:
    """Prefill 12 tokens, then 8 single-token steps through the cache: every step's logits equal the full
    forward's at that position (for ChatGLM, positions come from prepare_inputs_for_generation as in generate)."""
    ref, _ = reference(family)
    model = load(converted[family], "sdpa")
    ids = ref["single.input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        inputs = model.prepare_inputs_for_generation(ids[:, :12], cache=None, use_cache=True)
        out = model(**inputs)
        steps = [out.logits[:, -1]]
        for t in range(12, ids.shape[1] - 1):
            inputs = model.prepare_inputs_for_generation(
                ids[:, : t + 1], cache=out.cache, next_sequence_length=1, use_cache=True
            )
            out = model(**inputs)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 11:-1], rtol=0, atol=ATOL)


def test_alibi_slopes_formula() -> None:
    assert alibi_slopes(5).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5]
    assert alibi_slopes(8).tolist() == [2.0 ** -(k + 1) for k in range(8)]
    forty = alibi_slopes(40).tolist()
    assert forty[:32] == pytest.approx([2 ** (-0.25 * (k + 1)) for k in range(32)])
    assert forty[32:] == pytest.approx([2 ** -(0.125 + 0.25 * k) for k in range(8)])


@pytest.mark.parametrize("family", ["baichuan_13b", "baichuan2_13b"])
def test_control_wrong_alibi_slopes_fail_the_tolerance(
    converted: dict[str, Path], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The power-of-two formula applied to 5 heads (a plausible bug) must move logits far beyond ATOL."""
    ref, _ = reference(family)
    model = load(converted[family])

    def naive(n: int) -> torch.Tensor:
        return torch.tensor([2.0 ** (-8.0 * (k + 1) / n) for k in range(n)])

    monkeypatch.setattr(baichuan_alibi, "alibi_slopes", naive)
    assert max_logit_diff(model, family, ref) > 100 * ATOL


def test_control_causal_mask_instead_of_prefix_fails_the_tolerance(
    converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, _ = reference("chatglm")
    model = load(converted["chatglm"])
    layout = glm_v1.glm_layout

    def causal(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        positions, allowed = layout(*args, **kwargs)
        n = allowed.shape[-1]
        return positions, allowed & torch.ones(n, n, dtype=torch.bool).tril()

    monkeypatch.setattr(glm_v1, "glm_layout", causal)
    assert max_logit_diff(model, "chatglm", ref) > 100 * ATOL


def test_control_norm_head_matters(converted: dict[str, Path]) -> None:
    """Baichuan2's NormHead runs in the forward: rows scaled by 3 give the same logits; without it they do not."""
    ref, _ = reference("baichuan2_13b")
    model = load(converted["baichuan2_13b"])
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    assert max_logit_diff(model, "baichuan2_13b", ref) <= ATOL
    model.config.norm_head = False
    plain = baichuan_alibi.BaichuanAlibiForCausalLM(model.config).eval()
    plain.load_state_dict(model.state_dict())
    assert type(plain.lm_head) is torch.nn.Linear
    assert max_logit_diff(plain, "baichuan2_13b", ref) > 100 * ATOL


# ----------------------------------------------------------------------------------------------------------
# Packed rows and padding (what the trainer passes: 1-D position_ids restarting per sample, no attention mask)

GMASK, MASK, SOP = 1001, 1000, 1004  # the ChatGLM fixture's special ids


def samples(family: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    plain = [torch.randint(5, 1000, (1, n), generator=g) for n in (7, 9, 5)]
    if family != "chatglm":
        return plain
    # GLM samples: context [gMASK]/[MASK] <sop> answer, each with its own prefix and block positions
    return [
        torch.cat([plain[0][:, :3], torch.tensor([[GMASK, SOP]]), plain[0][:, 3:]], 1),
        torch.cat(
            [plain[1][:, :2], torch.tensor([[MASK]]), plain[1][:, 2:5], torch.tensor([[SOP]]), plain[1][:, 5:]], 1
        ),
        plain[2],  # no <sop>: all context (bidirectional)
    ]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["baichuan2_13b", "chatglm"])
def test_packed_row_gives_each_sample_its_own_logits(converted: dict[str, Path], family: str, attn: str) -> None:
    model = load(converted[family], attn)
    parts = samples(family)
    packed = torch.cat(parts, 1)
    position_ids = torch.cat([torch.arange(p.shape[1]) for p in parts]).unsqueeze(0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(input_ids=p, use_cache=False).logits for p in parts], 1)
    torch.testing.assert_close(together, alone, rtol=0, atol=ATOL)
    with torch.no_grad():  # control: the same row without position_ids is one sequence, and differs
        leaked = model(input_ids=packed, use_cache=False).logits
    assert (leaked - alone).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("family", ["baichuan_13b", "chatglm"])
def test_padded_rows_equal_unpadded(converted: dict[str, Path], family: str) -> None:
    """Left padding (generation) and right padding (training batches) leave real-token logits unchanged."""
    model = load(converted[family], "sdpa")
    row = samples(family)[1]
    n = row.shape[1]
    pad = torch.full((1, 3), 3 if family == "chatglm" else 0)
    ones, zeros = torch.ones(1, n, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        alone = model(input_ids=row, use_cache=False).logits
        left = model(input_ids=torch.cat([pad, row], 1), attention_mask=torch.cat([zeros, ones], 1), use_cache=False)
        right = model(input_ids=torch.cat([row, pad], 1), attention_mask=torch.cat([ones, zeros], 1), use_cache=False)
    torch.testing.assert_close(left.logits[:, 3:], alone, rtol=0, atol=ATOL)
    torch.testing.assert_close(right.logits[:, :n], alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["baichuan2_13b", "chatglm"])
def test_left_padded_batch_generates_like_each_row_alone(converted: dict[str, Path], family: str) -> None:
    from transformers import GenerationConfig

    model = load(converted[family], "sdpa")
    short, long = samples(family)[0][:, :5], samples(family)[1][:, :7]  # ChatGLM: both end with <sop>
    pad, eos = (3, 1005) if family == "chatglm" else (0, 2)
    ids = torch.cat([torch.cat([torch.full((1, 2), pad), short], 1), long])
    mask = torch.tensor([[0, 0] + [1] * 5, [1] * 7])
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    model.generation_config = config
    with torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, 7:]
        alone = [model.generate(input_ids=r, generation_config=config)[0, r.shape[1] :] for r in (short, long)]
    assert together.tolist() == [a.tolist() for a in alone]


def test_glm_generate_refuses_a_prompt_without_sop(converted: dict[str, Path]) -> None:
    model = load(converted["chatglm"])
    with pytest.raises(ValueError, match="<sop>"):
        model.generate(input_ids=torch.tensor([[10, 11, GMASK]]), max_new_tokens=2, do_sample=False)


# ----------------------------------------------------------------------------------------------------------
# Training paths: random init, gradient checkpointing, LoRA


@pytest.mark.parametrize("family", ["baichuan2_13b", "chatglm"])
def test_random_init_gradient_checkpointing_and_lora(converted: dict[str, Path], family: str) -> None:
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.families import lora_target_modules, resolve_family

    config = AutoConfig.from_pretrained(converted[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The vendor's random init leaves RMSNorm weights uninitialised (NaN loss); ours sets every norm scale to 1.
    scales = [p for n, p in model.named_parameters() if "norm" in n and n.endswith("weight")]
    assert scales and all(torch.equal(p, torch.ones_like(p)) for p in scales)
    ids = samples(family)[1]
    model.train()

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    assert torch.isfinite(torch.tensor(plain_loss))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert ckpt_loss == plain_loss
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    family_entry = resolve_family("auto", config.model_type)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_modules("auto", family_entry))
    )
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert wrapped == set(family_entry.lora_targets)
    loss = lora(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)


def test_cli_chatglm_v1_needs_weights_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sft_stack.cli.convert import main

    src = SEED_MODELS / "chatglm" / "checkpoint"
    assert main([str(src), str(tmp_path / "a")]) == 2
    assert "--weights-only" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([str(src), str(tmp_path / "b"), "--weights-only", "--check"]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "chatglm_v1" and "auto_map" not in config
    assert json.loads((tmp_path / "b" / "conversion.json").read_text())["chat_template"] == "chatglm"


@pytest.mark.parametrize("family", ["baichuan2_13b", "chatglm"])
def test_qlora_trains_on_nf4_weights(converted: dict[str, Path], family: str) -> None:
    """QLoRA as trainer.model loads it (NF4, bf16 compute, kbit preparation, checkpointing) on the CPU backend."""
    import peft
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from trainer.families import FAMILIES as REGISTRY
    from trainer.model import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        converted[family], dtype=torch.bfloat16, quantization_config=quantization_config(), device_map={"": "cpu"}
    )
    head = model.get_output_embeddings()
    assert not isinstance(head, Linear4bit) and (type(head).__name__ == "NormHead") == (family == "baichuan2_13b")
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    family_entry = REGISTRY[model.config.model_type]
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(family_entry.lora_targets))
    )
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 2 * len(family_entry.lora_targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = samples(family)[0]
    curve = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append(loss.item())
    assert curve[-1] < curve[0], curve


def test_baichuan2_13b_with_its_real_tokenizer_checks_the_turn_tokens(tmp_path: Path) -> None:
    """With the real Baichuan2 vocabulary, the template's <reserved_106>/<reserved_107> must be the
    user/assistant ids of the vendor's generation_config.json (195/196); Baichuan-13B's pair is refused."""
    import shutil

    from trainer.convert import ConvertError

    src = tmp_path / "src"
    shutil.copytree(SEED_MODELS / "baichuan2_13b" / "checkpoint", src)
    shutil.copy(SEED_MODELS / "baichuan2_13b" / "tokenizer" / "tokenizer.model", src)
    raw = json.loads((src / "config.json").read_text())
    raw["vocab_size"] = 125696  # the real vocabulary; the weights are not converted below
    (src / "config.json").write_text(json.dumps(raw))
    from trainer.convert.baichuan_13b import BAICHUAN2_13B, check_turn_tokens

    tokenizer = BAICHUAN2_13B.build_tokenizer(src, raw, "baichuan2")  # checks the turn tokens too
    assert tokenizer.convert_tokens_to_ids(["<reserved_106>", "<reserved_107>"]) == [195, 196]
    assert tokenizer("你好", add_special_tokens=False)["input_ids"] == [16829]
    with pytest.raises(ConvertError, match="user_token_id is 195"):
        check_turn_tokens(tokenizer, src, "baichuan")
