"""Tool calling end to end: prepare glaive-format data (qwen), train on 2 ranks under the real `deepspeed` launcher,
then `python -m sft_stack.cli.generate` on a prompt that offers the tool.

The data is small and regular (one tool, get_weather, asked about 24 cities) so that the tiny model learns the
shape of a Qwen2.5 call within a few dozen steps; what is checked is the prompt rendering (the generation prompt
is, token for token, the training prefix) and that generation writes a call between Qwen2.5's tags and ends on the
template's stop token after it (not the JSON inside: that is the 2-layer model's skill).
The tiny tokenizer gets Qwen2.5's ``<tool_call>``/``</tool_call>`` as added tokens, as Qwen2.5's vocabulary has
them (spelled in BPE pieces, a 2-layer model confuses the two tags' shared ``call>`` ending).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_pipeline.formats import read_records
from data_pipeline.schema import load_manifest
from sft_stack.chat.conversation import Message, tool_schemas
from sft_stack.chat.templates import resolve_template
from tests.distributed.test_training import ROOT, env, launch
from tests.helpers.data import TINY_LLAMA, make_prepared_dir

QWEN_TAGS = ["<tool_call>", "</tool_call>"]

pytestmark = pytest.mark.slow

CITIES = [
    "Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Warsaw", "Oslo", "Dublin", "Athens", "Sofia",
    "北京", "上海", "广州", "深圳", "成都", "杭州", "南京", "武汉", "西安", "重庆", "天津", "苏州",
]  # fmt: skip
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip


def glaive_records() -> list[dict[str, object]]:
    """LLaMA-Factory's glaive format: function_call / observation turns and the tools as a JSON string."""
    records = []
    for n, city in enumerate(CITIES):
        call = {"name": "get_weather", "arguments": {"city": city}}
        records.append(
            {
                "conversations": [
                    {"from": "human", "value": f"Weather in {city}?"},
                    {"from": "function_call", "value": json.dumps(call, ensure_ascii=False)},
                    {"from": "observation", "value": json.dumps({"temperature": 10 + n})},
                    {"from": "gpt", "value": f"It is {10 + n} degrees in {city}."},
                ],
                "tools": json.dumps(TOOLS),
            }
        )
    return records


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tools_ds")
    model = tmp / "tiny_llama_tool_tags"
    shutil.copytree(TINY_LLAMA, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.add_tokens(QWEN_TAGS)  # added, not special: decoded outputs keep them, as with Qwen2.5
    tokenizer.save_pretrained(str(model))
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = len(tokenizer)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    source = tmp / "glaive_weather.json"
    source.write_text(json.dumps(glaive_records(), ensure_ascii=False), encoding="utf-8")
    data = make_prepared_dir(
        tmp / "data", max_seq_len=512, source=source, template="qwen", val_fraction=0.0, tokenizer_dir=model
    )
    out = tmp / "run"
    overrides = [
        f"model.path={model}",
        f"data.path={data}",
        "train.max_steps=60",
        "train.micro_batch_size=3",
        "train.grad_accum_steps=1",  # 3 micro x 2 ranks = 6 rows per step; 60 steps = 15 epochs of 24 rows
        "train.lr=1.0e-2",  # as tests/integration/tiny_chat.py memorizes its pairs: the format is learned whole
        "train.warmup_steps=3",
        "train.save_every_steps=1000",
        "eval.every_steps=1000",
        "tracking.enabled=false",
    ]
    launch(2, [{"out": str(out), "overrides": overrides}], tmp)
    (out / "data_dir").write_text(str(data))
    return out


def test_training_on_tool_calls_and_generating_one(trained: Path, tmp_path: Path) -> None:
    data = Path((trained / "data_dir").read_text())
    manifest = load_manifest(data)
    assert manifest.template == "qwen" and manifest.counts["samples_written"] == len(CITIES)
    losses = [
        json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert losses[-1] < losses[0] / 3, losses

    prompt = {"prompt": "Weather in Rome?", "tools": TOOLS}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(prompt) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "sft_stack.cli.generate", "--model", str(trained / "final"), "--prompts-file", str(prompts),
         "--out", str(tmp_path / "gen.jsonl"), "--preset", "greedy", "--max-new-tokens", "64", "--device", "cpu"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]

    # The prompt: the template's rendering with the tools, equal to the training prefix of the same record.
    tokenizer = AutoTokenizer.from_pretrained(str(trained.parent / "tiny_llama_tool_tags"))
    template = resolve_template("qwen", tokenizer)
    assert [tokenizer.convert_tokens_to_ids(tag) for tag in QWEN_TAGS] == [2000, 2001]
    tools = tool_schemas(TOOLS)
    ids = template.encode_prompt([Message(role="user", content="Weather in Rome?")], tools)
    assert row["prompt_tokens"] == len(ids)
    (record,) = [r for r in read_records(data.parent / "glaive_weather.json", "sharegpt") if r.index == 1]
    (training,) = template.encode_batch([record])  # type: ignore[list-item]
    assert training.input_ids[: len(ids)] == ids  # type: ignore[union-attr]
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nWeather in Rome?<|im_end|>\n<|im_start|>assistant\n")
    assert '"name": "get_weather"' in tokenizer.decode(ids)  # the tool is offered in the system turn

    # The reply: a call in Qwen2.5's format, ended by <|im_end|> (the stop token; the text returned excludes it).
    # What is inside the tags is the tiny model's skill, not checked.
    assert row["finish_reason"] == "stop", row
    assert row["output"].startswith("<tool_call>\n"), row
    assert row["output"].endswith("\n</tool_call>"), row
