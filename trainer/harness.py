"""Standard benchmarks through lm-evaluation-harness, on a model we loaded ourselves.

The harness owns the tasks (its YAML format, its metrics, its few-shot sampling); this module hands it an
already-loaded model and tokenizer (``trainer.inference.load_for_inference``: PEFT adapters and our own model
classes included) through its Hugging Face class ``HFLM``, and does what the harness does not:

- **Offline only.** ``HF_DATASETS_OFFLINE=1`` is set before a task loads its data; a task whose data is not
  on disk (nor in ``$HF_DATASETS_CACHE``) is refused in one line naming the task, instead of a network error.
- **Local task YAMLs are portable.** A ``dataset_kwargs.data_files`` path that is relative is read relative to
  the task's YAML file (plain ``lm_eval`` reads it from the working directory).
- **One line per bad input**: an unknown task name (with the closest names), missing data.
- **Chat**: ``apply_chat_template`` renders the harness's chat turns with the template the run trained with
  (``chat_template_lm``), not the tokenizer's Jinja template, which a base tokenizer may not have.
- **Flat numbers**: ``flat_metrics`` turns the harness's ``{"acc,none": 0.5}`` into ``{"tiny_mc/acc": 0.5}``
  and ``task_hashes`` condenses the per-sample hashes the way the harness's own tracker does.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_stack.chat.conversation import Message
from trainer.generation import GenerateError

if TYPE_CHECKING:
    from sft_stack.chat.templates import ChatTemplate

log = logging.getLogger(__name__)


class HarnessError(GenerateError):
    """A task that cannot run: unknown name, data missing offline, a bad task YAML."""


@dataclass(frozen=True, kw_only=True)
class HarnessOptions:
    tasks: tuple[str, ...]
    """Task, group or tag names as lm-evaluation-harness spells them (``mmlu``, ``ceval-valid``), or paths to
    task YAML files."""
    include_path: str | None = None
    """A folder of the user's own task YAMLs, searched after the harness's own tasks."""
    limit: int | None = None
    """Score only the first ``limit`` documents of each task (None: all)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None keeps each task's own setting (tasks that fix 0 keep 0)."""
    batch_size: int = 1
    """Requests per forward pass."""
    apply_chat_template: bool = False
    """Render prompts as chat turns with the run's chat template (instruction-tuned models)."""
    seed: int = 1234
    """The harness's few-shot sampling and torch seed."""


@dataclass(frozen=True, kw_only=True)
class HarnessResult:
    results: dict[str, Any]
    """The harness's results dict, without the per-sample outputs (JSON-serializable)."""
    samples: dict[str, list[dict[str, Any]]]
    """Per task: every scored document with the prompt, the model's responses and its metrics."""
    metrics: dict[str, float]
    """``{"<task>/<metric>": value}``, see ``flat_metrics``."""
    params: dict[str, str]
    """The harness version, few-shot settings and task hashes, as MLflow params."""


def harness_version() -> str:
    return importlib.metadata.version("lm_eval")


def metric_key(task: str, key: str) -> str | None:
    """``"<task>/<metric>"`` for a harness result key ``"<metric>,<filter>"``; None for non-metric keys.

    The filter ``none`` (no post-processing) is dropped; another filter is appended (``exact_match_strict-match``
    for gsm8k's strict filter), so two filters of one metric stay apart.
    """
    if "," not in key:
        return None
    metric, _, filter_name = key.partition(",")
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}_{filter_name}"


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every numeric metric of every task and group (stderrs included; "N/A" ones skipped)."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            name = metric_key(task, key)
            if name is not None and isinstance(value, int | float) and not isinstance(value, bool):
                flat[name] = float(value)
    return flat


def task_hashes(samples: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """sha256 over each task's per-sample document, prompt and target hashes (the harness tracker's recipe):
    two runs with equal hashes scored the same prompts against the same targets."""
    return {
        task: hashlib.sha256(
            "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows).encode()
        ).hexdigest()
        for task, rows in samples.items()
    }


def resolve_data_files(config: dict[str, Any], yaml_dir: Path) -> dict[str, Any]:
    """``config`` with relative ``dataset_kwargs.data_files`` paths made relative to the task's YAML folder."""
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or kwargs.get("data_files") is None:
        return config
    files = kwargs["data_files"]

    def resolve(path: Any) -> Any:
        if isinstance(path, str) and "://" not in path and not Path(path).is_absolute():
            return str(yaml_dir / path)
        return path

    match files:
        case str():
            files = resolve(files)
        case list():
            files = [resolve(p) for p in files]
        case dict():
            files = {
                split: [resolve(p) for p in v] if isinstance(v, list) else resolve(v) for split, v in files.items()
            }
    return {**config, "dataset_kwargs": {**kwargs, "data_files": files}}


def go_offline() -> None:
    """No network for the rest of this process: datasets and huggingface_hub read these variables once, at
    import, so their already-imported constants are set too (a training rank imported them long ago)."""
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


@functools.cache
def task_manager(include_path: str | None) -> Any:
    """The harness's task index (its ~200 task folders, then ``include_path``): built once per process, it
    takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def load_tasks(names: tuple[str, ...], include_path: str | None) -> list[Any]:
    """The harness's Task objects for ``names``, data loaded (offline), or one HarnessError line."""
    go_offline()
    from lm_eval.tasks._yaml_loader import load_yaml

    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"task folder {include_path}: no such directory (--include-path, eval.harness_include_path)")
    manager = task_manager(include_path)
    loaded: list[Any] = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarnessError(
                f"unknown task {name!r}{hint}; `lm_eval ls tasks` lists the harness's tasks, and --include-path DIR "
                "(eval.harness_include_path in a run config) adds a folder of your own task YAMLs"
            )
        yaml_path = Path(name) if entry is None else entry.yaml_path
        spec: str | dict[str, Any] = name
        if yaml_path is not None and entry is not None and entry.kind.name == "TASK":
            spec = resolve_data_files(load_yaml(yaml_path, resolve_func=True), Path(yaml_path).parent)
        try:
            built = manager.load([spec])
        except (FileNotFoundError, ConnectionError) as exc:  # datasets' "not on the Hub/on disk" errors are these
            raise HarnessError(
                f"task {name!r}: its data does not load offline ({first_line(exc)}); download it on a machine "
                "with a network into $HF_DATASETS_CACHE (docs/generation.md) or point the task YAML at local files"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HarnessError(f"task {name!r} does not load ({first_line(exc)}); check {yaml_path or name}") from None
        loaded.extend(built["tasks"].values())
    return loaded


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    options: HarnessOptions,
    *,
    template: ChatTemplate | None = None,
    tasks: list[Any] | None = None,
) -> HarnessResult:
    """Run ``options.tasks`` on ``model`` with the harness; ``template`` renders chat prompts when
    ``options.apply_chat_template`` is set. ``tasks``: already loaded by ``load_tasks`` (checked before a large
    model loads); a task object serves one evaluation."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if tasks is None:
        tasks = load_tasks(options.tasks, options.include_path)
    if options.apply_chat_template:
        lm = chat_template_lm()(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
        lm.run_template = template
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    output = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        log_samples=True,
        apply_chat_template=options.apply_chat_template,
        bootstrap_iters=0,  # stderrs by bootstrap take minutes per task; the harness then reports "N/A"
        random_seed=options.seed,
        numpy_random_seed=options.seed,
        torch_random_seed=options.seed,
        fewshot_random_seed=options.seed,
    )
    if output is None:  # only on a non-zero rank of a distributed harness run, which we never start
        raise HarnessError("the harness returned no results")
    samples = output.pop("samples")
    output.pop("pretty_env_info", None)  # a page of `collect_env` text; versions are recorded as params
    hashes = task_hashes(samples)
    output["task_hashes"] = hashes
    params = {
        "harness.version": harness_version(),
        "harness.tasks": ",".join(options.tasks),
        "harness.num_fewshot": str(options.num_fewshot),
        "harness.limit": str(options.limit),
        "harness.apply_chat_template": str(options.apply_chat_template),
        **{f"harness.n_shot.{task}": str(n) for task, n in output.get("n-shot", {}).items()},
        **{f"harness.task_hash.{task}": value for task, value in hashes.items()},
    }
    return HarnessResult(results=output, samples=samples, metrics=flat_metrics(output["results"]), params=params)


def evaluate_at_save(model: Any, tokenizer: Any, options: HarnessOptions) -> HarnessResult:
    """``evaluate_tasks`` inside a training rank: eval mode and back, and every RNG the harness seeds (python,
    numpy, torch) restored, so the run's losses are the same with and without it."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    model.eval()
    try:
        return evaluate_tasks(model, tokenizer, options)
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@functools.cache
def chat_template_lm() -> type:
    """HFLM rendering chat prompts with the run's template; built on first use (importing this module does not
    import the harness)."""
    from lm_eval.models.huggingface import HFLM

    class ChatTemplateLM(HFLM):  # type: ignore[misc]
        """HFLM whose chat prompts are rendered by the run's own chat template (sft_stack.chat.templates)."""

        run_template: ChatTemplate | None = None

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            if self.run_template is None:
                return str(super().apply_chat_template(chat_history, add_generation_prompt))
            turns = list(chat_history)
            prefill = ""
            if not add_generation_prompt and turns and turns[-1]["role"] == "assistant":
                prefill = turns.pop()["content"]  # the harness continues a partial answer (gen_prefix)
            messages = [Message(role=t["role"], content=t["content"]) for t in turns]  # type: ignore[arg-type]
            ids = self.run_template.encode_prompt(messages)
            return str(self.tokenizer.decode(ids, skip_special_tokens=False)) + prefill

    return ChatTemplateLM
