"""The one-home helpers: trainer.dist (ZeRO stage, device name), trainer.run_dir (the output folder's layout),
trainer.data.pad_id_for (the pad fallback shared by the loop and evaluate), common.tokenizer (the loader) and
data_pipeline.schema.sha256_file (the file digest of shards and checkpoints)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from data_pipeline.schema import sha256_file
from sft_stack.common.tokenizer import TokenizerError, load_tokenizer
from trainer import checkpoint
from trainer.data import pad_id_for
from trainer.dist import device_name, is_rank0, rank, zero_stage
from trainer.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
SENTENCEPIECE = ROOT / "tests" / "fixtures" / "tokenizers" / "llama2_sentencepiece"


def test_zero_stage_is_zero_without_a_section_and_refuses_a_bad_one() -> None:
    assert zero_stage({}) == 0  # the single-process export builds its model with ds_config={}
    assert zero_stage({"zero_optimization": {"stage": 3}}) == 3
    assert zero_stage({"zero_optimization": {}}) == 0
    for bad in (4, "2", True, None):
        with pytest.raises(ValueError, match=r"zero_optimization\.stage must be 0, 1, 2 or 3"):
            zero_stage({"zero_optimization": {"stage": bad}})


def test_rank_helpers_outside_a_process_group() -> None:
    assert rank() == 0 and is_rank0()
    if not torch.cuda.is_available():
        assert device_name() == "cpu"


def test_run_dir_names_the_paths_the_modules_use(tmp_path: Path) -> None:
    out = RunDir.of(tmp_path / "run")
    assert out.run_config == tmp_path / "run" / "run_config.yaml"
    assert out.latest == tmp_path / "run" / "checkpoints" / "latest_complete"
    assert checkpoint.checkpoints_dir(out.root) == out.checkpoints
    assert out.checkpoint(checkpoint.tag_for(10)) == tmp_path / "run" / "checkpoints" / "step_00000010"
    # An export at the end of training sits in OUT/final: its run folder is OUT, whatever the path's spelling.
    assert RunDir.of_export(out.final).run_config == (tmp_path / "run").resolve() / "run_config.yaml"
    assert RunDir.of_export(Path(str(out.final) + "/")).root == (tmp_path / "run").resolve()


def test_pad_falls_back_to_eos() -> None:
    tokenizer = load_tokenizer(TINY)
    assert tokenizer.eos_token_id is not None
    if tokenizer.pad_token_id is not None:
        assert pad_id_for(tokenizer) == tokenizer.pad_token_id
    tokenizer.pad_token = None
    assert pad_id_for(tokenizer) == tokenizer.eos_token_id


def test_tokenizer_loader_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not a directory") as missing:
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer files") as empty:
        load_tokenizer(tmp_path / "empty")
    assert "\n" not in str(missing.value) + str(empty.value)


def test_tokenizer_loader_converts_a_bare_sentencepiece_model() -> None:
    tokenizer = load_tokenizer(SENTENCEPIECE)
    assert tokenizer.is_fast
    assert tokenizer.decode(tokenizer("hello world", add_special_tokens=False)["input_ids"]) == "hello world"


def test_one_file_digest_for_shards_and_checkpoints(tmp_path: Path) -> None:
    assert checkpoint.sha256_file is sha256_file
    body = bytes(range(256)) * 20_000  # 5 MB: several read chunks
    (tmp_path / "blob").write_bytes(body)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(body).hexdigest()
