"""sft_stack.cli.evaluate: loss/perplexity on a prepared split vs a direct torch computation, generation metrics
vs hand-computed values, MLflow logging, and the CLI's one-line refusals."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_chat import PAIRS, TEMPLATE, TINY_LLAMA, memorized_model, one_thread, random_model, save_model_dir, tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
from data_pipeline.schema import IGNORE_INDEX, MANIFEST_FILE, load_split
from sft_stack.cli.evaluate import main
from tracking.records import log_evaluation
from trainer.inference import resolve_run_template
from trainer.loss import evaluate_loss

REPO = Path(__file__).resolve().parents[2]
ALPACA = REPO / "tests" / "fixtures" / "real" / "alpaca" / "alpaca_en_demo.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return tokenizer()


def prepared(out: Path, *, pack: bool) -> Path:
    """24 alpaca records through the real data pipeline: about half land in val (hash of the content)."""
    prepare(
        PrepareOptions(
            sources=(SourceSpec(path=str(ALPACA), samples=24),),
            tokenizer=str(TINY_LLAMA),
            out=str(out),
            template=TEMPLATE,
            max_seq_len=256,
            pack=pack,
            val_fraction=0.5,
            max_bad_fraction=1.0,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"packed": prepared(root / "packed", pack=True), "unpacked": prepared(root / "unpacked", pack=False)}


@pytest.fixture(scope="module")
def memorized_dir(tok: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_dir(memorized_model(tok), tok, tmp_path_factory.mktemp("memorized"), template_name=TEMPLATE)


def direct_loss(model: torch.nn.Module, data_dir: Path) -> tuple[float, int]:
    """Each sample of the val split alone through the model, cross-entropy summed over its trained labels."""
    total, count = 0.0, 0
    for row in load_split(data_dir, "val"):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in itertools.pairwise(starts):
            ids = torch.tensor([row["input_ids"][a:b]])
            labels = torch.tensor(row["labels"][a:b])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[1:] != IGNORE_INDEX).sum())
    return total / count, count


def test_loss_matches_a_direct_computation_packed_and_unpacked(data_dirs: dict[str, Path]) -> None:
    model = random_model(seed=3)
    expected_loss, expected_tokens = direct_loss(model, data_dirs["unpacked"])
    assert expected_tokens > 100
    for name, data_dir in data_dirs.items():
        manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
        rows = load_split(data_dir, "val")
        result = evaluate_loss(model, rows, packed=manifest["packed"], pad_id=0, batch_size=2)
        assert result.loss_tokens == expected_tokens, name
        assert result.loss == pytest.approx(expected_loss, rel=1e-5), name
        assert result.perplexity == pytest.approx(math.exp(expected_loss), rel=1e-5), name
        assert result.rows == len(rows)
    # Random init over a 2,000-token vocabulary: the loss sits near ln(2000) = 7.6.
    assert 7.0 < expected_loss < 8.2


def test_cli_loss_and_generation_metrics(
    data_dirs: dict[str, Path], memorized_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in PAIRS), encoding="utf-8")
    out = tmp_path / "eval.json"
    argv = ["--model", str(memorized_dir), "--data", str(data_dirs["packed"]), "--prompts-file", str(prompts),
            "--max-new-tokens", "30", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    model = LlamaForCausalLM.from_pretrained(memorized_dir)
    expected_loss, expected_tokens = direct_loss(model, data_dirs["packed"])
    assert results["loss"]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert results["loss"]["loss_tokens"] == expected_tokens and results["loss"]["split"] == "val"
    # The memorized model answers both prompts verbatim and stops: every metric is perfect.
    generation = results["generation"]
    assert generation["count"] == 2 and generation["exact_match"] == 1.0 and generation["stopped_fraction"] == 1.0
    assert generation["bleu"] == pytest.approx(100.0) and generation["rouge_l"] == pytest.approx(1.0)
    assert results["template"] == TEMPLATE and results["decoding"]["preset"] == "greedy"
    rows = [json.loads(line) for line in Path(results["generations_file"]).read_text(encoding="utf-8").splitlines()]
    assert [(r["output"], r["exact_match"]) for r in rows] == [(r, True) for _, r in PAIRS]


def test_cli_scores_a_hand_checked_predictions_file(tmp_path: Path) -> None:
    """The pairs and the arithmetic are in tests/unit/test_answers.py (HAND_PAIRS)."""
    pairs = [
        ("She has 7 apples.\nAnswer: 7", "3 + 4 = 7\n#### 7"),
        ("答案：42", "答案是42。"),
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("猫坐在垫子上", "猫坐在椅子上"),
    ]
    predictions = tmp_path / "gen.jsonl"
    predictions.write_text(
        "".join(json.dumps({"prompt": "q", "output": o, "reference": r}, ensure_ascii=False) + "\n" for o, r in pairs),
        encoding="utf-8",
    )
    out = tmp_path / "eval.json"
    assert main(["--predictions", str(predictions), "--out", str(out)]) == 0
    generation = json.loads(out.read_text(encoding="utf-8"))["generation"]
    assert generation["count"] == 4
    assert generation["exact_match"] == 0.75
    assert generation["bleu"] == pytest.approx(34.52955735, abs=1e-6)
    assert generation["rouge_l"] == pytest.approx((2 / 5 + 6 / 7 + 1 + 5 / 6) / 4, abs=1e-9)
    flags = [json.loads(line)["exact_match"] for line in (tmp_path / "eval.generations.jsonl").read_text().splitlines()]
    assert flags == [True, True, True, False]


def test_results_are_logged_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a new experiment's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = {
        "loss": {"loss": 1.5, "perplexity": math.exp(1.5)},
        "generation": {"count": 2, "exact_match": 0.5, "bleu": 12.5, "rouge_l": 0.25},
    }
    rows = [{"prompt": "a", "output": "b", "reference": "c", "exact_match": False}]
    run_id = log_evaluation(results, rows, tracking_uri=uri, run_id=None, experiment="eval-test")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.metrics == {
        "eval/loss": 1.5,
        "eval/perplexity": pytest.approx(math.exp(1.5)),
        "eval/exact_match": 0.5,
        "eval/bleu": 12.5,
        "eval/rouge_l": 0.25,
    }
    assert sorted(a.path for a in client.list_artifacts(run_id, "eval")) == ["eval/generations.json",
                                                                            "eval/results.json"]  # fmt: skip
    # A second call with run_id adds to the same run (e.g. evaluating into the training run).
    assert log_evaluation({"generation": {"exact_match": 1.0}}, None, tracking_uri=uri, run_id=run_id,
                         experiment="eval-test") == run_id  # fmt: skip
    assert client.get_run(run_id).data.metrics["eval/exact_match"] == 1.0


def test_metric_prefix_keeps_two_evaluations_of_one_run_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    before.write_text(json.dumps({"output": "Answer: 3.", "reference": "答案：4。"}) + "\n")
    after.write_text(json.dumps({"output": "Answer: 4.", "reference": "答案：4。"}) + "\n")
    assert main(["--predictions", str(before), "--out", str(tmp_path / "b.json"), "--tracking-uri", uri,
                 "--experiment", "prefix-test", "--metric-prefix", "before"]) == 0  # fmt: skip
    run_id = (
        MlflowClient(tracking_uri=uri)
        .search_runs([MlflowClient(tracking_uri=uri).get_experiment_by_name("prefix-test").experiment_id])[0]
        .info.run_id
    )
    assert main(["--predictions", str(after), "--out", str(tmp_path / "a.json"), "--tracking-uri", uri,
                 "--run-id", run_id]) == 0  # fmt: skip
    client = MlflowClient(tracking_uri=uri)
    metrics = client.get_run(run_id).data.metrics
    assert (metrics["before/exact_match"], metrics["eval/exact_match"]) == (0.0, 1.0)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"before", "eval"}


def test_template_comes_from_the_manifest_when_the_export_has_none(
    data_dirs: dict[str, Path], tok: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "sft_export.json").write_text(json.dumps({"template": None, "method": "full"}))
    from_data = resolve_run_template(tok, model_dir=final, data_dir=data_dirs["packed"])
    assert (from_data.template.name, from_data.source) == (TEMPLATE, str(data_dirs["packed"] / MANIFEST_FILE))
    # No --data: the run's resolved config (OUT/run_config.yaml, next to OUT/final) names the data.
    (tmp_path / "run" / "run_config.yaml").write_text(f"data:\n  path: {data_dirs['unpacked']}\n")
    from_run = resolve_run_template(tok, model_dir=final)
    assert (from_run.template.name, from_run.source) == (TEMPLATE, str(data_dirs["unpacked"] / MANIFEST_FILE))


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_refusals_are_one_line(
    data_dirs: dict[str, Path], memorized_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(["--model", str(memorized_dir)], capsys)
    assert code == 2 and err == [
        "sft: error: nothing to evaluate: pass --data DIR, --prompts-file F, --predictions F and/or --tasks T"
    ]
    code, err = run_main(["--data", str(data_dirs["packed"])], capsys)
    assert code == 2 and err == ["sft: error: --data, --prompts-file and --tasks need --model"]
    other = tmp_path / "other_tokenizer"
    shutil.copytree(data_dirs["packed"], other)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    manifest["tokenizer_fingerprint"] = "0" * 64
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    code, err = run_main(["--model", str(memorized_dir), "--data", str(other), "--device", "cpu"], capsys)
    assert code == 2 and len(err) == 1 and "prepared with another tokenizer" in err[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"output": "x"}\n')
    code, err = run_main(["--predictions", str(bad)], capsys)
    assert code == 2 and err == [f"sft: error: {bad}:1: expected an object with string 'output' and 'reference'"]


def test_logging_into_a_run_of_another_store_after_a_new_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evaluations in one process: a new run in one store, then a given run of another experiment elsewhere.
    The fluent API keeps the first call's active experiment; the second must still land in its run."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exports it; teardown removes it

    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    log_evaluation({"generation": {"exact_match": 1.0}}, None, tracking_uri=first, run_id=None, experiment="eval")
    client = mlflow.MlflowClient(second)
    for name in ("x", "y"):  # experiment ids in the second store differ from the first's active one
        client.create_experiment(name)
    run = client.create_run(client.create_experiment("train"))
    client.set_terminated(run.info.run_id)
    results = {"generation": {"exact_match": 0.5}}
    logged = log_evaluation(
        results, None, tracking_uri=second, run_id=run.info.run_id, experiment="eval", prefix="after"
    )
    assert logged == run.info.run_id
    assert client.get_run(logged).data.metrics == {"after/exact_match": 0.5}
