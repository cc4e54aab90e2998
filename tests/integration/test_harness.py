"""evaluate --tasks: lm-evaluation-harness tasks from tests/fixtures/harness (a 32-question multiple-choice task and
a 24-question generate-until task with exact match, local JSON lines) on the tiny exported model and on a LoRA
adapter, offline; the metrics, params and artifacts in MLflow; a trained-vs-untrained control; one-line refusals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_chat import TEMPLATE, one_thread, random_model, save_model_dir, tokenizer
from transformers import PreTrainedTokenizerBase

from sft_stack.cli.evaluate import main
from trainer.harness import HarnessOptions, chat_template_lm, evaluate_tasks, harness_version

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "harness"
BOTH = "tiny_mc,tiny_add"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return tokenizer()


def answer_texts() -> list[str]:
    """Every question of both fixture tasks followed by its right answer, as the harness prompts them."""
    texts = []
    for line in (TASKS / "tiny_mc.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(f"Question: {row['question']}\nAnswer: {row['choices'][row['label']]}")
    for line in (TASKS / "tiny_add.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}\n")
    return texts


def train_on_answers(model: torch.nn.Module, tok: PreTrainedTokenizerBase, steps: int = 150) -> torch.nn.Module:
    """Plain full-batch causal LM training on ``answer_texts`` (padding masked out of the labels)."""
    model.train()
    batch = tok(answer_texts(), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tok: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_dir(random_model(), tok, tmp_path_factory.mktemp("base"), template_name=TEMPLATE)


@pytest.fixture(scope="module")
def adapter_dir(tok: PreTrainedTokenizerBase, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on every projection of the random base, trained on the answers."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(random_model(), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    model = train_on_answers(model, tok)
    assert isinstance(model, PeftModel)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def new_run(uri: str) -> str:
    client = MlflowClient(uri)
    return str(client.create_run(client.create_experiment("train")).info.run_id)


def test_exported_model_metrics_land_in_mlflow(base_dir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = new_run(uri)
    out = tmp_path / "eval.json"
    argv = ["--model", str(base_dir), "--tasks", BOTH, "--include-path", str(TASKS), "--limit", "6"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), "--tracking-uri", uri, "--run-id", run_id]) == 0

    written = json.loads(out.read_text(encoding="utf-8"))["harness"]["model"]
    assert set(written["metrics"]) == {"tiny_mc/acc", "tiny_add/exact_match_strip"}
    assert written["results"]["n-samples"]["tiny_mc"] == {"original": 32, "effective": 6}
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("harness/")}
    assert logged == {f"harness/{k}": v for k, v in written["metrics"].items()}
    assert run.data.params["harness.version"] == harness_version() == "0.4.13"
    assert run.data.params["harness.n_shot.tiny_mc"] == "0"
    assert len(run.data.params["harness.task_hash.tiny_add"]) == 64
    artifacts = Path(client.download_artifacts(run_id, "harness", str(tmp_path / "artifacts")))
    results = json.loads((artifacts / "results.json").read_text(encoding="utf-8"))
    assert results["results"]["tiny_mc"]["acc,none"] == written["metrics"]["tiny_mc/acc"]
    samples = (artifacts / "samples_tiny_add.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s)["doc"]["question"] for s in samples][:2] == ["What is 6+3?", "What is 7+1?"]
    assert len(samples) == 6


@pytest.mark.slow
def test_lora_adapter_beats_its_base_in_the_compare_table(
    base_dir: Path, adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--model", str(base_dir), "--adapter", str(adapter_dir), "--compare", str(base_dir), "--tasks", "tiny_mc"]
    argv += [
        "--include-path",
        str(TASKS),
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "e.json"),
        "--tracking-uri",
        uri,
    ]
    assert main(argv) == 0

    metrics = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("sft-eval").experiment_id])
    logged = metrics[0].data.metrics
    assert logged["harness/tiny_mc/acc"] >= 0.9  # measured 1.0 (32/32)
    assert logged["harness_base/tiny_mc/acc"] <= 0.5  # the random base: measured 0.375, chance is 0.25
    table = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tiny_mc/acc")]
    base, model, diff = (float(x) for x in table[0].split()[1:])
    assert (base, model) == (logged["harness_base/tiny_mc/acc"], logged["harness/tiny_mc/acc"])
    assert diff == pytest.approx(model - base, abs=1e-4)


@pytest.mark.slow
def test_control_training_on_the_answers_raises_both_scores(tok: PreTrainedTokenizerBase) -> None:
    """A check that can fail: if the harness scored prompts the model never sees (a wrong template, a broken
    target delimiter, the untrained model evaluated twice), the trained model would not score higher."""
    options = HarnessOptions(tasks=("tiny_mc", "tiny_add"), include_path=str(TASKS), batch_size=16)
    untrained = evaluate_tasks(random_model(), tok, options).metrics
    trained = evaluate_tasks(train_on_answers(random_model(), tok), tok, options).metrics
    # Measured: multiple choice 0.375 -> 0.969 (31/32), exact match 0.0 -> 0.25 (6/24).
    assert untrained["tiny_mc/acc"] <= 0.5 < 0.9 <= trained["tiny_mc/acc"]
    assert untrained["tiny_add/exact_match_strip"] == 0.0 < trained["tiny_add/exact_match_strip"]


def test_bad_inputs_one_line_each(base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    missing.mkdir()
    yaml = (TASKS / "tiny_mc.yaml").read_text(encoding="utf-8")
    (missing / "gone.yaml").write_text(yaml.replace("tiny_mc", "tiny_gone"), encoding="utf-8")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((base_dir / name).read_bytes())
    cases = {
        "unknown task 'tiny_mcc' (did you mean tiny_mc": ["--model", str(base_dir), "--tasks", "tiny_mcc"],
        "task 'tiny_gone': its data does not load offline": ["--model", str(base_dir), "--tasks", "tiny_gone"],
        # OfflineModeIsEnabled: datasets refused to try the network (it was imported before the flag was set)
        "task 'mmlu_anatomy': its data does not load offline (Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled))": [
            "--model",
            str(base_dir),
            "--tasks",
            "mmlu_anatomy",
        ],
        "no tokenizer files": ["--model", str(no_tokenizer), "--tasks", "tiny_mc"],
        "--compare BASE runs the --tasks benchmarks": ["--model", str(base_dir), "--compare", str(base_dir)],
    }
    for expected, argv in cases.items():
        include = str(missing) if "tiny_gone" in argv else str(TASKS)
        assert main([*argv, "--include-path", include, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("sft: error:")]
        assert len(lines) == 1 and expected in lines[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_chat_prompts_are_the_training_templates_tokens(tok: PreTrainedTokenizerBase) -> None:
    """--apply-chat-template: what the harness tokenizes is exactly the run template's generation prompt."""
    from tiny_chat import template

    from sft_stack.chat.conversation import Message

    lm = chat_template_lm()(pretrained=random_model(), tokenizer=tok, batch_size=1)
    lm.run_template = template(tok)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    text = lm.apply_chat_template(history)
    expected = template(tok).encode_prompt([Message(role=h["role"], content=h["content"]) for h in history])
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")
    assert lm.tok_encode(text) == expected
    prefilled = lm.apply_chat_template([*history, {"role": "assistant", "content": "The answer"}], False)
    assert prefilled == text + "The answer"
