"""trainer/sequence_parallel.py without processes: start-up checks, the shard of a row, the packed-sample mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.schema import IGNORE_INDEX
from trainer import sequence_parallel
from trainer.config import ConfigError, RunConfig, load_config
from trainer.data import collate

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA_CONFIG = json.loads((ROOT / "tests" / "fixtures" / "tiny_llama" / "config.json").read_text())


def config(*overrides: str) -> RunConfig:
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", ["data.path=unused", "train.output_dir=unused", *overrides])


def test_sequence_parallel_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"train\.sequence_parallel_size=0"):
        config("train.sequence_parallel_size=0")


def test_size_one_is_never_refused() -> None:
    sequence_parallel.check(config("model.family=baichuan_alibi"), 3, TINY_LLAMA_CONFIG)


@pytest.mark.parametrize(
    ("overrides", "world", "hf_config", "message"),
    [
        ([], 3, TINY_LLAMA_CONFIG, "train.sequence_parallel_size=2 does not divide the world size 3"),
        (["model.family=chatglm_v1"], 2, TINY_LLAMA_CONFIG, "model family 'chatglm_v1'"),
        (
            ["model.family=starcoder"],
            2,
            TINY_LLAMA_CONFIG,
            f"model family 'starcoder' ({ROOT}/tests/fixtures/tiny_llama/config",
        ),
        (
            ["model.family=starcoder"],
            2,
            TINY_LLAMA_CONFIG,
            "Ulysses attention: transformers' gpt_bigcode class does not pass position_ids",
        ),
        ([], 2, {"model_type": "gpt_bigcode", "n_head": 4}, "model family 'starcoder'"),
        ([], 2, {**TINY_LLAMA_CONFIG, "num_key_value_heads": 1}, "4 attention heads and 1 KV heads"),
        ([], 2, {**TINY_LLAMA_CONFIG, "num_attention_heads": 5, "num_key_value_heads": 5}, "5 attention heads"),
        ([], 2, {"model_type": "gpt2", "n_head": 4, "n_positions": 1023}, "1023 learned positions"),
        (["model.attn_implementation=eager"], 2, TINY_LLAMA_CONFIG, "model.attn_implementation=eager"),
        (["eval.prompts_file=prompts.jsonl"], 2, TINY_LLAMA_CONFIG, "eval.prompts_file"),
    ],
)
def test_check_refuses_in_one_line_naming_the_key(
    overrides: list[str], world: int, hf_config: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        sequence_parallel.check(config("train.sequence_parallel_size=2", *overrides), world, hf_config)
    text = str(caught.value)
    assert message in text and "train.sequence_parallel_size" in text and "\n" not in text, text


def test_check_accepts_a_supported_layout() -> None:
    sequence_parallel.check(config("train.sequence_parallel_size=2"), 4, TINY_LLAMA_CONFIG)


@pytest.mark.parametrize(
    ("hf_config", "counts"),
    [
        ({"model_type": "codegen", "n_head": 4}, (4, 4)),
        ({"model_type": "gpt2", "n_head": 4}, (4, 4)),
        ({"model_type": "gpt_bigcode", "n_head": 4}, (4, 1)),  # multi_query defaults to true
        ({"model_type": "gpt_bigcode", "n_head": 4, "multi_query": False}, (4, 4)),
        (TINY_LLAMA_CONFIG, (4, 2)),
    ],
)
def test_head_counts_read_gpt_style_configs(hf_config: dict[str, object], counts: tuple[int, int]) -> None:
    # GPT-style configs name the heads n_head and carry no num_key_value_heads; reading 0 heads would accept any size.
    assert sequence_parallel.head_counts(hf_config) == counts


@pytest.mark.parametrize("model_type", ["codegen", "gpt2"])
def test_multi_head_families_without_kv_head_count_are_accepted(model_type: str) -> None:
    sequence_parallel.check(config("train.sequence_parallel_size=2"), 2, {"model_type": model_type, "n_head": 4})
    with pytest.raises(ConfigError, match="the model's 6 attention heads and 6 KV heads"):
        sequence_parallel.check(config("train.sequence_parallel_size=4"), 4, {"model_type": model_type, "n_head": 6})


def test_layout_groups_consecutive_ranks() -> None:
    assert [sequence_parallel.layout(r, 4, 2) for r in range(4)] == [
        sequence_parallel.Layout(size=2, rank=0, data_rank=0, data_world=2),
        sequence_parallel.Layout(size=2, rank=1, data_rank=0, data_world=2),
        sequence_parallel.Layout(size=2, rank=0, data_rank=1, data_world=2),
        sequence_parallel.Layout(size=2, rank=1, data_rank=1, data_world=2),
    ]


def test_trailing_padding_positions_count_on() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 0]])
    assert sequence_parallel.continued_positions(positions).tolist() == [
        [0, 1, 2, 0, 1, 2, 3],
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5, 6],
    ]


def packed_batch() -> tuple[object, list[int]]:
    # Two packed rows of different lengths (samples of 3+4 and 5 tokens): 7 wide, padded to 8 for 2 shards.
    rows = [
        ([5, 6, 7, 8, 9, 10, 11], [5, 6, 7, IGNORE_INDEX, 9, 10, 11], [0, 1, 2, 0, 1, 2, 3]),
        ([12, 13, 14, 15, 16], [12, 13, 14, 15, 16], [0, 1, 2, 3, 4]),
    ]
    return collate(rows, pad_id=0, packed=True, isolate=True), [7, 5]


@pytest.mark.parametrize("size", [2, 4])
def test_shards_keep_every_target_once(size: int) -> None:
    batch, _ = packed_batch()
    shards = [
        sequence_parallel.shard_batch(batch, sequence_parallel.layout(r, size, size), pad_id=0, rows=3)
        for r in range(size)
    ]
    targets = torch.cat([s.labels for s in shards], dim=1)
    # Position t's target is label t+1 of the whole row, including across the shard boundary.
    width = batch.labels.shape[1]
    assert targets[:2, : width - 1].tolist() == batch.labels[:, 1:].tolist()
    assert (targets[:2, width - 1 :] == IGNORE_INDEX).all() and (targets[2] == IGNORE_INDEX).all()
    assert sum(s.loss_tokens for s in shards) == batch.loss_tokens
    assert sum(s.tokens for s in shards) == batch.tokens
    assert all(s.labels_shifted and s.attention_mask is None and s.input_ids.shape == (3, 8 // size) for s in shards)
    positions = torch.cat([s.position_ids for s in shards], dim=1)
    assert positions[:2].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_packed_mask_is_block_diagonal_and_causal() -> None:
    mask = sequence_parallel.packed_causal_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert mask.shape == (1, 1, 5, 5) and mask[0, 0].int().tolist() == expected


@pytest.mark.parametrize("size", [2, 4])
def test_shard_losses_add_up_to_the_row_loss(size: int) -> None:
    # Per-position logits stand in for the model: the shards' summed losses (plain and tiled) equal the whole
    # batch's, so the loop's sums over ranks see every target once.
    from trainer.loss import loss_sum
    from trainer.tiled_loss import tiled_loss_sum

    batch, _ = packed_batch()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 32, generator=generator)  # 2 rows + 1 padding row, width 7 padded to 8
    whole = loss_sum(logits[:2, :7], batch.labels)
    plain = tiled = torch.zeros(())
    for rank in range(size):
        shard = sequence_parallel.shard_batch(batch, sequence_parallel.layout(rank, size, size), pad_id=0, rows=3)
        window = logits[:, rank * 8 // size : (rank + 1) * 8 // size]
        plain = plain + loss_sum(window, shard.labels, shifted=True)
        tiled = tiled + tiled_loss_sum(window, torch.nn.Identity(), shard.labels, 3, shifted=True)
    assert plain.item() == pytest.approx(whole.item(), rel=1e-6)
    assert tiled.item() == pytest.approx(whole.item(), rel=1e-6)


def test_gradient_divisor_matches_how_deepspeed_averages() -> None:
    zero2 = {"zero_optimization": {"stage": 2}}
    zero3 = {"zero_optimization": {"stage": 3}}
    assert sequence_parallel.gradient_divisor(zero2, 4, 1) == 4
    assert sequence_parallel.gradient_divisor(zero3, 4, 1) == 4
    assert sequence_parallel.gradient_divisor(zero2, 4, 2) == 2  # ZeRO-1/2 divide by world / SP
    assert sequence_parallel.gradient_divisor(zero3, 4, 2) == 4  # ZeRO-3's reduce-scatter averages over all
    with pytest.raises(ConfigError, match="reduce_scatter=false"):
        sequence_parallel.gradient_divisor({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 4, 2)
