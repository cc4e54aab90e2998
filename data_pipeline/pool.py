"""Running a plan's blocks: in this process (two threads) or a process pool, reusing every block a previous run
finished and verified, with a progress bar. A block's work itself (``prepare.process_block``) is handed in, so
this module knows nothing of tokenizing or shards."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_pipeline.blocks import BlockResult, completed_block
from data_pipeline.plan import Plan
from data_pipeline.wire import Sample, Wire, from_wire, to_wire

if TYPE_CHECKING:
    from sft_stack.chat.templates import ChatTemplate


@dataclass(frozen=True, kw_only=True)
class WorkerState:
    """What processing a block needs; built once per process."""

    plan: Plan
    templates: dict[str, ChatTemplate]
    out: Path


ProcessBlock = Callable[[WorkerState, int, list[Sample]], BlockResult]
"""(state, block index, the block's samples) -> the block's result, its files written."""

_STATE: WorkerState | None = None
_PROCESS: ProcessBlock | None = None


def _init_worker(state: WorkerState, process: ProcessBlock) -> None:
    global _STATE, _PROCESS
    # One tokenizer thread per worker process: workers are the unit of parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE, _PROCESS = state, process


def _process_in_worker(job: tuple[int, list[Wire]]) -> BlockResult:
    assert _STATE is not None and _PROCESS is not None, "worker not initialized"
    return _PROCESS(_STATE, job[0], from_wire(job[1]))


@contextlib.contextmanager
def env(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` inside the block, restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@dataclass
class Progress:
    """Records and tokens done, shown as a tqdm bar on stderr."""

    enabled: bool
    records: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    bar: Any = None

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(unit="rec", unit_scale=True, file=sys.stderr, disable=not self.enabled, desc="prepare")

    def update(self, result: BlockResult) -> None:
        self.records += result.read
        self.tokens += result.tokens
        self.bar.update(result.read)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _executor(
    state: WorkerState, process: ProcessBlock, workers: int
) -> tuple[concurrent.futures.Executor, Callable[[int, list[Sample]], concurrent.futures.Future[BlockResult]]]:
    """The executor for ``workers`` and how to submit a block to it."""
    if workers == 1:
        # One process, two threads: the Rust tokenizer releases the GIL while it encodes, so one block's
        # tokenization overlaps the other block's Python work (template assembly, packing, writing) and the
        # reading of the next block. Each block writes only its own files, so threads share nothing else.
        # On a single core the threads would only take turns (and thrash the cache): then one thread.
        _init_worker(state, process)
        threads = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        threaded = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="prepare-block")
        return threaded, lambda index, block: threaded.submit(process, state, index, block)
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(state, process)
    )
    return pool, lambda index, block: pool.submit(_process_in_worker, (index, to_wire(block)))


def run_blocks(
    state: WorkerState,
    process: ProcessBlock,
    blocks: Iterable[tuple[int, list[Sample]]],
    *,
    workers: int,
    progress: Progress,
) -> list[BlockResult]:
    """Process ``blocks`` (index, samples), reusing verified ones; return their results."""
    results: list[BlockResult] = []
    executor, submit = _executor(state, process, workers)
    pending: deque[concurrent.futures.Future[BlockResult]] = deque()
    with executor:
        try:
            for index, block in blocks:
                done = completed_block(state.out, index, state.plan.fingerprint)
                if done is not None:
                    progress.update(done)
                    results.append(done)
                    continue
                # At most two blocks per worker in flight: bounded memory, workers never idle.
                while len(pending) >= 2 * workers:
                    results.append(pending.popleft().result())
                    progress.update(results[-1])
                pending.append(submit(index, block))
            while pending:
                results.append(pending.popleft().result())
                progress.update(results[-1])
        except BaseException:
            # One block failed (a full disk, a Ctrl-C): start no other, and let the running ones end before the
            # caller cleans up, so no worker writes a temporary file after that.
            executor.shutdown(wait=True, cancel_futures=True)
            raise
    return results
