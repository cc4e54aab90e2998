"""A shortened `make demo`: the real prepare, two real 2-rank `deepspeed` runs, cli.evaluate and generate.

Two-digit problems, 1,500 of them, and 1,200 steps of 4 packed rows instead of the demo's three digits and 1,000
steps of 8 rows. Fewer steps do not do: the model first learns the worked form and the copying, and gets
answers right only after that (400 steps of 8 rows left it at loss 0.30 and exact match 0.00; 900 steps of 4
rows reached 0.15). 1,200 steps get a clear share of held-out problems exactly right (0.43 when measured), which the random-init model never does; and every number lands
in the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft_stack.demo.run import DemoOptions, run_demo

pytestmark = pytest.mark.slow

HELDOUT = 60
STEPS = 1200


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoOptions, dict[str, Any]]:
    opts = DemoOptions(
        out=tmp_path_factory.mktemp("demo"),
        seed=0,
        train_size=1500,
        heldout_size=HELDOUT,
        unseen_fraction=0.5,
        digits=2,
        max_steps=STEPS,
        max_seq_len=256,
        samples=2,
        overrides=("tracking.system_metrics=false", "train.micro_batch_size=2"),
    )
    return opts, run_demo(opts)


def test_training_teaches_the_worked_form_measured_on_held_out_problems(
    demo: tuple[DemoOptions, dict[str, Any]],
) -> None:
    opts, summary = demo
    assert summary["accuracy_before"] <= 0.05
    # Exact final answers on held-out problems (new names and objects, half of them new operand pairs): 0.43 after
    # 1,200 steps when measured (26 of 60; 0.40 on the unseen operand pairs), 0.00 for the random-init model and
    # for the answer-only control.
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.25
    assert summary["output_dir"] == str(opts.out)
    evals = opts.out / "eval"
    before = json.loads((evals / "before.json").read_text())["generation"]
    after = json.loads((evals / "after.json").read_text())["generation"]
    assert before["count"] == after["count"] == HELDOUT
    # The random model rambles to max_new_tokens; the trained one writes a worked answer and stops.
    assert after["stopped_fraction"] >= 0.8 > before["stopped_fraction"] + 0.5
    assert after["rouge_l"] >= before["rouge_l"] + 0.4
    rows = [json.loads(line) for line in (evals / "after.generations.jsonl").read_text().splitlines()]
    assert len(rows) == HELDOUT
    # The summary line rounds to 4 decimals.
    assert summary["accuracy_after"] == pytest.approx(sum(r["exact_match"] for r in rows) / HELDOUT, abs=5e-5)
    assert sum(("答案：" in r["output"]) or ("Answer: " in r["output"]) for r in rows) >= 0.8 * HELDOUT


def test_mlflow_run_holds_params_loss_and_every_evaluation(demo: tuple[DemoOptions, dict[str, Any]]) -> None:
    import mlflow

    opts, summary = demo
    state = json.loads((opts.out / "cot" / "mlflow_run.json").read_text())
    assert state["run_id"] == summary["mlflow_run_id"]
    client = mlflow.MlflowClient(state["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    metrics = run.data.metrics
    for prefix, key in [
        ("before", "accuracy_before"),
        ("eval", "accuracy_after"),
        ("eval_unseen_operands", "accuracy_unseen_operands"),
        ("answer_only", "accuracy_answer_only"),
    ]:
        assert metrics[f"{prefix}/exact_match"] == pytest.approx(summary[key], abs=5e-5)
    assert metrics["eval/rouge_l"] > metrics["before/rouge_l"]
    assert run.data.params["train.max_steps"] == str(opts.max_steps)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= opts.max_steps // 10 and losses[-1].value < losses[0].value / 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "demo")}
    assert "sft_stack/demo/side_by_side.json" in artifacts


def test_control_run_and_reuse(demo: tuple[DemoOptions, dict[str, Any]]) -> None:
    opts, summary = demo
    control = json.loads((opts.out / "answer_only" / "final" / "sft_export.json").read_text())
    assert control["template"] == "plain"
    assert 0.0 <= summary["accuracy_answer_only"] <= 1.0
    # A second demo would reuse these: the prepared shards are verified in place, not rewritten.
    before = {p: p.stat().st_mtime_ns for p in (opts.out / "data").rglob("*") if p.is_file()}
    from sft_stack.demo.run import prepare, write_data

    write_data(opts)
    prepare(opts.out / "data" / "train.csv", opts.out / "model", opts.out / "data" / "cot", max_seq_len=256, seed=0)
    after = {p: p.stat().st_mtime_ns for p in (opts.out / "data").rglob("*") if p.is_file()}
    assert after == before
    assert Path(opts.out / "model" / "tokenizer.json").is_file()
