"""Our own classes (Baichuan2-13B with ALiBi + NormHead, ChatGLM-6B v1) trained by the real `deepspeed` launcher.

One launch of tests/distributed/scenarios.py on 2 gloo ranks runs, for each class: full-parameter ZeRO-3 (built
partitioned inside zero.Init, random init), then LoRA ZeRO-2 on top of that run's export (loaded from disk by
``from_pretrained``), on packed rows of the arithmetic conversations rendered by the family's template
(baichuan2, chatglm). The tests read what the runs wrote: the loss falls, the exports reload with plain
transformers (our classes registered by ``import trainer.models``) and PEFT, and ``trainer.generation`` on
training prompts (a left-padded batch) stops at the template's end of turn.

The tiny models use the committed tiny BPE tokenizer (vocab 2000; ChatGLM's <sop>/<eop> added), so their
vocabulary is 2048 rather than the fixture checkpoints' 1024; tests/unit/test_own_models.py checks the
classes against the vendors' reference outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_training import ROOT, launch, losses
from tests.helpers.data import make_prepared_dir

pytestmark = pytest.mark.slow

TINY_LLAMA = ROOT / "tests" / "fixtures" / "tiny_llama"
STEPS = {"full": 16, "lora": 8}
CASES = {
    "baichuan_alibi": "baichuan2",
    "chatglm_v1": "chatglm",
}
"""Our model type -> the chat template its data is rendered with."""
PROMPTS = [{"prompt": "What is 7 + 13?"}, {"prompt": "0 加 0 等于多少？"}, {"prompt": "What is 14 + 26?"}]
"""Prompts of the training conversations (arithmetic_conversations i = 1, 0, 2)."""


def val_loss(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float([row["val_loss"] for row in rows if "val_loss" in row][-1])


def model_dir(root: Path, model_type: str) -> Path:
    """Tokenizer + config.json of a tiny model of our class (weights come from model.random_init)."""
    from transformers import AutoTokenizer

    from trainer.models import BaichuanAlibiConfig, ChatGLMv1Config

    out = root / model_type
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    if model_type == "chatglm_v1":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<sop>", "<eop>"]})
        ids = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>", "<eop>"])
        config = ChatGLMv1Config(
            vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, mask_token_id=2047, gmask_token_id=ids[0], bos_token_id=ids[1],
            eos_token_id=ids[2], pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    else:
        config = BaichuanAlibiConfig(
            vocab_size=2048, hidden_size=80, intermediate_size=214, num_hidden_layers=2, num_attention_heads=5,
            max_position_embeddings=512, norm_head=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("own")
    zero3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    (tmp / "zero3_partition_all.json").write_text(json.dumps(zero3))
    plan = []
    for model_type, template in CASES.items():
        path = model_dir(tmp / "models", model_type)
        data = make_prepared_dir(tmp / f"data_{model_type}", tokenizer_dir=path, template=template, pack=True)
        full = tmp / "runs" / f"{model_type}_full"
        common = [f"data.path={data}", "train.micro_batch_size=2", "train.grad_accum_steps=1"]
        common += ["train.save_every_steps=0", "eval.every_steps=0", "tracking.enabled=false"]
        plan.append(
            {
                "out": str(full),
                "overrides": [
                    *common,
                    f"model.path={path}",
                    "model.method=full",
                    f"train.max_steps={STEPS['full']}",
                    "train.lr=0.01",
                    f"deepspeed.config={tmp / 'zero3_partition_all.json'}",
                ],
            }
        )
        plan.append(
            {
                "out": str(tmp / "runs" / f"{model_type}_lora"),
                "overrides": [
                    *common, f"model.path={full / 'final'}", "model.random_init=false", "model.method=lora",
                    f"train.max_steps={STEPS['lora']}", "train.lr=0.02", f"deepspeed.config={ROOT / 'ds_configs' / 'zero2.json'}",
                    "lora.r=8", "lora.dropout=0.0",
                ],
            }
        )  # fmt: skip
    launch(2, plan, tmp)
    return tmp / "runs"


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("model_type", list(CASES))
def test_trains_exports_and_stops_at_end_of_turn(runs: Path, model_type: str, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import trainer.models  # noqa: F401  registers our classes with the Auto classes
    from sft_stack.chat.templates import resolve_template
    from trainer.generation import decoding_for, generate_rows
    from trainer.inference import load_for_inference

    out = runs / f"{model_type}_{method}"
    curve = losses(out)
    steps = STEPS[method]
    assert sorted(curve) == list(range(1, steps + 1))
    if method == "full":  # from a random init
        assert curve[steps] < curve[1] - 2.0, curve
    else:  # from the full run's export: the end-of-run validation loss (same split) improves on the base's
        assert val_loss(out) < val_loss(runs / f"{model_type}_full")

    final = out / "final"
    info = json.loads((final / "sft_export.json").read_text())
    assert info["template"] == CASES[model_type] and info["method"] == method
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        assert model.config.model_type == model_type and "auto_map" not in json.loads(
            (final / "config.json").read_text()
        )
        loaded = load_for_inference(final, dtype="fp32")
    else:
        assert info["base_model_path"] == str(runs / f"{model_type}_full" / "final")
        base = AutoModelForCausalLM.from_pretrained(info["base_model_path"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, final)
        assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())
        loaded = load_for_inference(final, dtype="fp32")
    assert type(loaded.model).__name__.startswith(("BaichuanAlibi", "ChatGLMv1", "PeftModel"))

    template = resolve_template(info["template"], loaded.tokenizer)
    results = generate_rows(
        loaded.model,
        loaded.tokenizer,
        template,
        PROMPTS,
        decoding_for("greedy", max_new_tokens=24),
        seed=0,
        batch_size=3,
    )
    # Left-padded batch of 3; every answer ends with the template's end of turn, not at max_new_tokens.
    assert [r["finish_reason"] for r in results] == ["stop"] * len(PROMPTS), results
