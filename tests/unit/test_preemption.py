"""trainer.preemption: a stop signal becomes is_preemption_requested() == True on every rank, once, whatever the repeats."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.slurm_cluster import free_port
from trainer import preemption


@pytest.fixture
def installed() -> Iterator[None]:
    preemption.install()
    try:
        yield
    finally:
        preemption.uninstall()


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_requests_a_stop_and_repeats_are_harmless(signum: int) -> None:
    assert not preemption.is_preemption_requested()
    assert not preemption.is_stopping()
    os.kill(os.getpid(), signum)
    os.kill(os.getpid(), signum)  # scancel --full can deliver the signal twice
    assert preemption.is_preemption_requested()
    assert preemption.is_preemption_requested()  # stays stopped
    assert preemption.is_stopping()


def test_uninstall_restores_the_previous_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    preemption.install()
    assert signal.getsignal(signal.SIGUSR1) is not before
    preemption.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not preemption.is_preemption_requested()


def _rank(rank: int, port: int, results: dict[int, list[bool]]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    preemption.install()
    seen = [preemption.is_preemption_requested()]
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
    seen.append(preemption.is_preemption_requested())
    results[rank] = seen
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_signalled_rank_stops_every_rank_at_the_same_step() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=2)
        assert dict(results) == {0: [False, True], 1: [False, True]}
