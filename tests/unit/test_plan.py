"""The memory planner's numbers against hand arithmetic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sft_stack.cli.plan import main
from trainer.plan import (
    GIB,
    Hardware,
    ModelShape,
    activation_bytes,
    llama_shape,
    lora_params,
    options,
    qlora_states,
    recommend,
    shape_from_config,
)

LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def test_shape_from_config_counts_llama2_7b(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    shape = shape_from_config(tmp_path)
    # 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 2 x 32000 x 4096 = 6,738,149,376 (Llama-2-7B has 6.74e9; norms aside)
    assert shape.params == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096 == 6_738_149_376
    assert llama_shape(7e9).layers == 32 and llama_shape(7e9).hidden == 4096
    assert llama_shape(13e9).layers == 40 and llama_shape(13e9).hidden == 5120


def test_full_tuning_states_per_gpu() -> None:
    shape = ModelShape(params=1_000_000_000, hidden=2048, layers=16, intermediate=5504, vocab=32000, kv_ratio=1.0)
    hw = Hardware(gpus_per_node=8, gpu_mem_gb=80, nodes=2, cpu_mem_gb=1024)
    by_name = {o.name.split()[1]: o for o in options(shape, hw, seq_len=2048, micro_batch=1, lora_r=16)}
    p, n = 1_000_000_000, 16
    assert by_name["ds_configs/zero1.json"].gpu_bytes == 4 * p + 16 * p // n  # 5.0e9
    assert by_name["ds_configs/zero2.json"].gpu_bytes == 2 * p + 18 * p // n  # 3.125e9
    # ZeRO-3: 18 B/param over 16 GPUs + the largest matrix (embedding 32000 x 2048) gathered in fp32
    assert by_name["ds_configs/zero3.json"].gpu_bytes == 4 * 32000 * 2048 + 18 * p // n
    assert by_name["ds_configs/zero2_offload.json"].gpu_bytes == 2 * p
    assert by_name["ds_configs/zero3_offload.json"].gpu_bytes == 4 * 32000 * 2048
    # Offloaded ZeRO-3 keeps 18 B/param on the CPUs, split over 2 nodes, with DeepSpeed's 1.5 buffer factor.
    assert by_name["ds_configs/zero3_offload.json"].cpu_bytes == int(18 * p / 2 * 1.5)


def test_lora_and_qlora_arithmetic() -> None:
    shape = llama_shape(7e9)  # 32 layers, hidden 4096, MLP 10922
    h, i = 4096, 8 * 4096 // 3
    # r x (in + out) for q, k, v, o (4 x 2h) and gate, up, down (3 x (h + i)), per layer
    assert lora_params(shape, 16) == 32 * 16 * (8 * h + 3 * (h + i))
    adapter = lora_params(shape, 16)
    embeddings = 2 * 32000 * 4096
    expected = (shape.params - embeddings) * 4.126953125 / 8 + 4 * embeddings + 16 * adapter
    assert qlora_states(shape, adapter) == pytest.approx(expected, abs=1)
    # about 4.8 GiB for a 7B model: NF4 fits one 24 GB GPU with room for activations
    assert 4.5 * GIB < qlora_states(shape, adapter) < 5.0 * GIB


def test_activations_and_recommendation() -> None:
    shape = llama_shape(7e9)
    tokens = 4096 * 2
    assert activation_bytes(shape, 4096, 2) == 32 * tokens * 4096 * 2 + 34 * tokens * 4096 + 2 * tokens * 32000 * 4
    one_24gb = Hardware(gpus_per_node=1, gpu_mem_gb=24, nodes=1, cpu_mem_gb=64)
    best = recommend(options(shape, one_24gb, seq_len=4096, micro_batch=4, lora_r=16), one_24gb)
    assert best is not None and best.name.startswith("qlora")
    two_nodes = Hardware(gpus_per_node=8, gpu_mem_gb=80, nodes=2, cpu_mem_gb=1024)
    best = recommend(options(shape, two_nodes, seq_len=4096, micro_batch=1, lora_r=16), two_nodes)
    assert best is not None and best.name == "full ds_configs/zero1.json"
    tiny_gpu = Hardware(gpus_per_node=1, gpu_mem_gb=2, nodes=1, cpu_mem_gb=8)
    assert recommend(options(shape, tiny_gpu, seq_len=4096, micro_batch=1, lora_r=16), tiny_gpu) is None


def test_cli_prints_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--params", "13e9", "--gpus-per-node", "8", "--gpu-mem-gb", "24", "--cpu-mem-gb", "768"]) == 0
    out = capsys.readouterr().out
    assert "verdict: full ds_configs/zero3_offload.json" in out


BAICHUAN2_13B = {  # our converted class (trainer.convert); the real Baichuan2-13B-Chat shape
    "model_type": "baichuan_alibi",
    "hidden_size": 5120,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "vocab_size": 125696,
    "tie_word_embeddings": False,
}
CHATGLM_6B = {  # the original ChatGLM-6B config.json (the planner reads originals too)
    "model_type": "chatglm",
    "position_encoding_2d": True,
    "hidden_size": 4096,
    "inner_hidden_size": 16384,
    "num_layers": 28,
    "num_attention_heads": 32,
    "vocab_size": 130528,
}


def test_own_classes_shapes_and_their_dense_mask(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BAICHUAN2_13B))
    baichuan = shape_from_config(tmp_path)
    # 40 x (4 x 5120^2 + 3 x 5120 x 13696) + 2 x 125696 x 5120 = 13.9e9 (Baichuan2-13B: 13.9B)
    assert baichuan.params == 40 * (4 * 5120**2 + 3 * 5120 * 13696) + 2 * 125696 * 5120
    assert baichuan.gated_mlp and baichuan.mask_heads == 40
    (tmp_path / "config.json").write_text(json.dumps(CHATGLM_6B))
    glm = shape_from_config(tmp_path)
    # 28 x (4 x 4096^2 + 2 x 4096 x 16384) + 2 x 130528 x 4096 = 6.7e9 (ChatGLM-6B: 6.2B + the untied head)
    assert glm.params == 28 * (4 * 4096**2 + 2 * 4096 * 16384) + 2 * 130528 * 4096
    assert not glm.gated_mlp and glm.mask_heads == 1 and glm.intermediate == 16384
    # LoRA on query_key_value (h -> 3h), dense (h -> h), dense_h_to_4h, dense_4h_to_h
    assert lora_params(glm, 8) == 28 * 8 * ((4096 + 3 * 4096) + 2 * 4096 + 2 * (4096 + 16384))
    # the ALiBi mask at seq 4096, micro 1: 40 heads x 4096^2 x 2 B = 1.25 GiB on top of the usual estimate
    plain = dataclasses.replace(baichuan, mask_heads=0)
    assert activation_bytes(baichuan, 4096, 1) - activation_bytes(plain, 4096, 1) == 40 * 4096**2 * 2


def test_tiled_loss_shrinks_the_logits_term_and_changes_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    # Qwen2-7B-like vocabulary at 32k tokens: fp32 logits and their gradient are 2 x 32768 x 152064 x 4 B = 37 GiB.
    shape = llama_shape(7e9, vocab=152064)
    tokens = 32768
    rest = shape.layers * tokens * shape.hidden * 2 + 34 * tokens * shape.hidden
    assert activation_bytes(shape, tokens, 1) == rest + 2 * tokens * 152064 * 4
    assert activation_bytes(shape, tokens, 1, loss_tile_tokens=4096) == rest + 2 * 4096 * 152064 * 4
    assert activation_bytes(shape, 1024, 1, loss_tile_tokens=4096) == activation_bytes(shape, 1024, 1)
    node = Hardware(gpus_per_node=8, gpu_mem_gb=80, nodes=1, cpu_mem_gb=1024)
    plain = recommend(options(shape, node, seq_len=tokens, micro_batch=1, lora_r=16), node)
    tiled = recommend(options(shape, node, seq_len=tokens, micro_batch=1, lora_r=16, loss_tile_tokens=4096), node)
    assert plain is not None and plain.name == "full ds_configs/zero3.json"
    assert tiled is not None and tiled.name == "full ds_configs/zero1.json"  # the fastest option fits again
    args = ["--params", "7e9", "--vocab", "152064", "--seq-len", "32768", "--loss-tile-tokens", "4096"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tiled loss 4096 tokens/tile" in out and "verdict: full ds_configs/zero1.json" in out


def test_sequence_parallel_divides_the_tokens_per_gpu_and_changes_the_verdict(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 256k tokens of a 7B model with the tiled loss on one 8 x 80 GiB node: 98 GiB of activations per GPU alone
    # does not fit anywhere; 4 GPUs per row hold 64k tokens each (28 GiB) and ZeRO-1 fits again.
    shape = llama_shape(7e9, vocab=152064)
    tokens = 262144
    assert activation_bytes(shape, tokens, 1, 4096, 4) == activation_bytes(shape, tokens // 4, 1, 4096)
    node = Hardware(gpus_per_node=8, gpu_mem_gb=80, nodes=1, cpu_mem_gb=1024)
    alone = recommend(options(shape, node, tokens, 1, 16, 4096), node)
    split = recommend(options(shape, node, tokens, 1, 16, 4096, sequence_parallel=4), node)
    assert alone is None
    assert split is not None and split.name == "full ds_configs/zero1.json"
    args = ["--params", "7e9", "--vocab", "152064", "--seq-len", str(tokens), "--loss-tile-tokens", "4096"]
    assert main([*args, "--sequence-parallel-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "sequence parallel 4: 65536 tokens/GPU" in out and "verdict: full ds_configs/zero1.json" in out
    assert main(args) == 0
    assert "raise train.sequence_parallel_size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--sequence-parallel-size", "3"])
    assert "--sequence-parallel-size 3 must divide the 8 GPUs" in capsys.readouterr().err
