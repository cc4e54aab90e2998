"""Training data: packed rows are isolated (same loss as unpacked), the order resumes exactly, bad data is refused.

Data: the first 56 real BELLE records through the real `prepare` (tiny BPE tokenizer, rows of up to 256 tokens;
those with over-long prompts are rejected; about 15% go to val), once unpacked and once packed (fewer rows,
position_ids restarting per sample).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.schema import DataError, load_manifest
from tests.helpers.data import TINY_LLAMA, make_prepared_dir
from trainer.data import Batch, DataCursor, TrainData, check_data, collate, open_split, val_batches
from trainer.loss import loss_sum

ROOT = Path(__file__).resolve().parents[2]
BELLE = ROOT / "tests" / "fixtures" / "real" / "belle" / "Belle_open_source_1k.json"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("data")
    source = tmp / "belle56.jsonl"
    source.write_text("\n".join(BELLE.read_text(encoding="utf-8").splitlines()[:56]) + "\n", encoding="utf-8")
    kw = {
        "max_seq_len": 256,
        "source": source,
        "val_fraction": 0.15,
        "max_bad_fraction": 0.5,
        "max_dropped_fraction": 0.5,
    }
    return {
        "unpacked": make_prepared_dir(tmp / "unpacked", pack=False, **kw),
        "packed": make_prepared_dir(tmp / "packed", pack=True, **kw),
    }


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_LLAMA)


def tiny_model(attn: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_LLAMA)
    # Larger weights than the default 0.02 make attention matter: at 0.02 a random model predicts nearly
    # uniformly whatever it attends to, so even cross-sample attention barely changes the loss.
    config.initializer_range = 0.3
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def rows_of(data_dir: Path) -> list[tuple[list[int], list[int], list[int]]]:
    split = open_split(data_dir, "train", load_manifest(data_dir))
    assert split is not None
    return list(zip(split["input_ids"], split["labels"], split["position_ids"], strict=True))


def mean_loss(model: torch.nn.Module, batches: list[Batch]) -> tuple[float, int]:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch.model_inputs("cpu"), use_cache=False).logits
            total += loss_sum(logits, batch.labels).item()
            tokens += batch.loss_tokens
    return total / tokens, tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_loss(prepared: dict[str, Path], tokenizer, attn: str) -> None:  # type: ignore[no-untyped-def]
    assert load_manifest(prepared["packed"]).packed
    unpacked_rows, packed_rows = rows_of(prepared["unpacked"]), rows_of(prepared["packed"])
    samples = load_manifest(prepared["unpacked"]).splits["train"].samples
    assert len(packed_rows) < len(unpacked_rows) == samples
    assert sum(1 for _, _, pos in packed_rows for p in pos if p == 0) == samples  # the same samples
    model = tiny_model(attn)
    pad = tokenizer.pad_token_id

    def batches(rows: list, packed: bool, isolate: bool = True) -> list[Batch]:
        return [collate(rows[i : i + 4], pad_id=pad, packed=packed, isolate=isolate) for i in range(0, len(rows), 4)]

    unpacked, n_unpacked = mean_loss(model, batches(unpacked_rows, packed=False))
    packed, n_packed = mean_loss(model, batches(packed_rows, packed=True))
    assert n_packed == n_unpacked
    # Same tokens, same targets; only the kernels' summation order differs (fp32; measured ~1e-9 relative).
    assert packed == pytest.approx(unpacked, rel=1e-6)

    # Families that cannot isolate: packed rows are split back into samples, same loss again.
    fallback, _ = mean_loss(model, batches(packed_rows, packed=True, isolate=False))
    assert fallback == pytest.approx(unpacked, rel=1e-6)

    # Control: the same packed rows with a plain all-ones mask let samples attend to each other.
    leaky = []
    for b in batches(packed_rows, packed=True):
        mask = (b.input_ids != pad).long() if b.attention_mask is None else b.attention_mask
        leaky.append(Batch(**{**b.__dict__, "attention_mask": mask}))
    cross_attending, _ = mean_loss(model, leaky)
    assert abs(cross_attending - unpacked) > 1e-3  # measured ~9e-3 with sdpa: 1000x the tolerance above


def make_train_data(rows, rank: int, world: int, accum: int) -> TrainData:  # type: ignore[no-untyped-def]
    return TrainData(
        rows,
        packed=False,
        isolate=True,
        pad_id=0,
        seed=7,
        micro_batch_size=2,
        grad_accum_steps=accum,
        rank=rank,
        world_size=world,
        source="test",
    )


def ids_of(batch: Batch) -> list[tuple[int, ...]]:
    return [tuple(row[row != 0].tolist()) for row in batch.input_ids]


def test_order_is_deterministic_sliced_by_rank_and_resumable(prepared: dict[str, Path]) -> None:
    split = open_split(prepared["unpacked"], "train", load_manifest(prepared["unpacked"]))
    one = make_train_data(split, rank=0, world=1, accum=4)
    two = [make_train_data(split, rank=r, world=2, accum=2) for r in range(2)]
    n = len(split)
    assert 40 <= n < 48  # 5 steps of 8 rows per epoch, tail dropped (prepare's val split decides n)
    assert one.steps_per_epoch == 5

    cursor, seen_epoch0 = DataCursor(), []
    cursors = [cursor]
    for _ in range(12):  # 2 epochs + 2 steps
        batches, next_cursor = one.next_step(cursor)
        assert len(batches) == 4
        by_rank = [two[r].next_step(cursor)[0] for r in range(2)]
        assert next_cursor == two[0].next_step(cursor)[1]
        # the same 8 rows per step, dealt to ranks: micro-batch j goes to rank j % 2
        assert [ids_of(b) for b in batches] == [ids_of(by_rank[j % 2][j // 2]) for j in range(4)]
        if next_cursor.epoch == 0:
            seen_epoch0 += [r for b in batches for r in ids_of(b)]
        cursor = next_cursor
        cursors.append(cursor)
        lengths = [len(r) for b in batches for r in ids_of(b)]
        assert lengths == sorted(lengths, reverse=True)  # longest first within a step
    assert cursors[5] == DataCursor(epoch=0, position=40)
    assert cursors[6] == DataCursor(epoch=1, position=8)  # the n - 40 row tail of epoch 0 is dropped
    assert len(seen_epoch0) == len(set(seen_epoch0)) == 40  # no row twice within an epoch

    # Resuming from a cursor is a pure function of it: a fresh TrainData gives the same next batches.
    fresh = make_train_data(split, rank=0, world=1, accum=4)
    assert [ids_of(b) for b in fresh.next_step(cursors[7])[0]] == [ids_of(b) for b in one.next_step(cursors[7])[0]]
    epoch1 = [r for c in cursors[5:10] for b in one.next_step(c)[0] for r in ids_of(b)]
    assert epoch1 != seen_epoch0  # reshuffled per epoch


def test_val_batches_cover_every_row_once_in_lock_step(prepared: dict[str, Path]) -> None:
    split = open_split(prepared["unpacked"], "val", load_manifest(prepared["unpacked"]))
    assert split is not None and 4 < len(split) <= 12
    per_rank = [
        val_batches(
            split, packed=False, isolate=True, pad_id=0, micro_batch_size=2, rank=r, world_size=2, max_batches=0
        )
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == -(-len(split) // 4)  # ZeRO-3 needs equal forward counts
    assert sum(b.input_ids.shape[0] for batches in per_rank for b in batches if b.loss_tokens) == len(split)
    assert sum(b.loss_tokens for batches in per_rank for b in batches) == sum(
        int((np.array(lab[1:]) != -100).sum()) for lab in split["labels"]
    )


def test_tokenizer_mismatch_is_refused_naming_the_manifest(tmp_path: Path, prepared: dict[str, Path]) -> None:
    from transformers import LlamaTokenizerFast

    other = LlamaTokenizerFast.from_pretrained(ROOT / "tests/fixtures/tokenizers/llama2_sentencepiece")
    with pytest.raises(DataError, match=r"manifest\.json: tokenizer fingerprint .* re-run prepare"):
        check_data(prepared["unpacked"], other, "models/llama2", verify_shards=False)


def test_modified_shard_is_refused_naming_the_file(tmp_path: Path, prepared: dict[str, Path], tokenizer) -> None:  # type: ignore[no-untyped-def]
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared["unpacked"], copy)
    check_data(copy, tokenizer, str(TINY_LLAMA), verify_shards=True)  # intact: accepted
    shard = next((copy / "train").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(DataError, match=f"{shard.name}: sha256"):
        check_data(copy, tokenizer, str(TINY_LLAMA), verify_shards=True)
