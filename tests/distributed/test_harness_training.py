"""eval.harness_tasks on 2 gloo ranks under the real `deepspeed` launcher: rank 0 runs the fixture task after
each checkpoint and logs harness/tiny_mc/acc at that step; the losses are those of the same run without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.distributed.test_training import BELLE, launch, losses
from tests.helpers.data import make_prepared_dir
from tracking.naming import store_uri

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "fixtures" / "harness"


def test_harness_metric_at_each_save_and_losses_unchanged(tmp_path: Path) -> None:
    source = tmp_path / "belle40.jsonl"
    source.write_text("\n".join(BELLE.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    data = make_prepared_dir(
        tmp_path / "data",
        max_seq_len=256,
        source=source,
        val_fraction=0.1,
        max_bad_fraction=0.5,
        max_dropped_fraction=0.5,
    )
    common = [
        f"data.path={data}",
        "train.max_steps=4",
        "train.save_every_steps=2",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=1",
        "train.warmup_steps=1",
        "train.export=false",
        "eval.every_steps=0",
        "tracking.system_metrics=false",
        f"tracking.uri={store_uri(tmp_path / 'runs' / 'mlruns')}",
    ]
    harness = ["eval.harness_tasks=[tiny_mc]", "eval.harness_limit=4", f"eval.harness_include_path={TASKS}"]
    plain, with_harness = tmp_path / "runs" / "plain", tmp_path / "runs" / "harness"
    launch(
        2,
        [{"out": str(plain), "overrides": common}, {"out": str(with_harness), "overrides": common + harness}],
        tmp_path,
    )

    assert losses(with_harness) == losses(plain)
    assert len(losses(plain)) == 4
    client = MlflowClient(store_uri(tmp_path / "runs" / "mlruns"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_name = {r.info.run_name: r for r in runs}
    ours = [r for r in runs if "harness/tiny_mc/acc" in r.data.metrics]
    assert len(ours) == 1, sorted(by_name)
    history = client.get_metric_history(ours[0].info.run_id, "harness/tiny_mc/acc")
    assert sorted(m.step for m in history) == [2, 4]
    assert all(0.0 <= m.value <= 1.0 for m in history)
