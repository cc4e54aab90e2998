"""ZeRO-3 builds the model partitioned and export gathers it whole; LoRA under ZeRO-3 saves a real adapter;
QLoRA trains data-parallel under ZeRO-2. Two gloo ranks through the real `deepspeed` launcher; the exports
are reloaded here with plain transformers/PEFT and compared with the trained engines' logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_stack.common.ports import free_port

SCRIPT = Path(__file__).with_name("zero3_export_script.py")
REPO = Path(__file__).resolve().parents[2]
BATCH = torch.randint(3, 2000, (2, 12), generator=torch.Generator().manual_seed(0))  # as in the script


def max_diff(model: torch.nn.Module, expected: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(input_ids=BATCH).logits.float() - expected).abs().max().item()


@pytest.mark.slow
def test_two_rank_zero3_partition_export_and_qlora(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.model import quantization_config

    port = free_port()  # not the default port: another launcher may hold it
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port)]
    proc = subprocess.run(
        [*launcher, str(SCRIPT), str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for result in ranks:
        full = result["full_zero3"]
        assert full["visible"] == 0  # every parameter is partitioned (persistence threshold 0)
        assert full["held"] == full["whole"] // 2  # tiny_llama's parameters all split evenly over 2 ranks
        assert all(r[-1] < r[0] for r in (full["losses"], result["lora_zero3"]["losses"]))
        assert result["qlora_zero2"]["losses"][-1] < result["qlora_zero2"]["losses"][0]

    full_out = tmp_path / "full"
    reloaded = AutoModelForCausalLM.from_pretrained(full_out / "final", dtype=torch.float32)
    assert max_diff(reloaded, torch.load(full_out / "expected_logits.pt")) < 1e-5

    lora_out = tmp_path / "lora"
    assert (lora_out / "final" / "adapter_model.safetensors").stat().st_size > 1000
    base = AutoModelForCausalLM.from_pretrained(lora_out / "random_init_base", dtype=torch.float32)
    expected = torch.load(lora_out / "expected_logits.pt")
    untrained = max_diff(base, expected)
    assert max_diff(PeftModel.from_pretrained(base, lora_out / "final"), expected) < 1e-5 < untrained

    qlora_out = tmp_path / "qlora"
    base = AutoModelForCausalLM.from_pretrained(
        qlora_out / "random_init_base", quantization_config=quantization_config(), dtype=torch.bfloat16
    )
    # bf16 adapter in the engine, fp32 after PEFT's reload: within 2 bf16 ulps (see tests/integration/test_export.py)
    assert (
        max_diff(PeftModel.from_pretrained(base, qlora_out / "final"), torch.load(qlora_out / "expected_logits.pt"))
        < 0.02
    )
