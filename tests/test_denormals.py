"""Subnormal flushing must reach torch's OpenMP workers, not only the thread that asked for it."""

import pytest
import torch

from hpqdeploy import denormals
from hpqdeploy.denormals import flush_subnormals, flushed_share, set_flush, subnormals_flushed


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    set_flush(False)  # every thread back to torch's default
    torch.ones(1 << 18).mul_(2)  # a parallel op: the workers exist from here on
    yield
    set_flush(False)
    torch.set_num_threads(before)


def test_main_thread_alone_leaves_workers_computing_subnormals(two_threads):
    assert flushed_share() == 0.0
    torch.set_flush_denormal(True)  # what torch offers: the calling thread only
    assert 0.0 < flushed_share() < 1.0


def test_set_flush_reaches_every_thread_and_undoes(two_threads):
    assert set_flush(True)
    assert flushed_share() == 1.0
    assert set_flush(False)
    assert flushed_share() == 0.0


def test_warns_when_the_workers_cannot_be_reached(two_threads, monkeypatch):
    monkeypatch.setattr(denormals, "_openmp_team_runner", lambda: None)
    with pytest.warns(UserWarning, match="OMP_NUM_THREADS=1"):
        flush_subnormals()


def test_single_thread_needs_no_team(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(denormals, "_openmp_team_runner", lambda: None)
        assert set_flush(True) and flushed_share() == 1.0
    finally:
        set_flush(False)
        torch.set_num_threads(before)


def test_subnormals_flushed_restores_what_was_there(two_threads):
    with subnormals_flushed():
        assert flushed_share() == 1.0
    assert flushed_share() == 0.0
    set_flush(True)
    with subnormals_flushed():
        pass
    assert flushed_share() == 1.0  # a caller that flushed keeps flushing


def test_subnormals_flushed_restores_after_an_error(two_threads):
    with pytest.raises(RuntimeError), subnormals_flushed():
        raise RuntimeError("boom")
    assert flushed_share() == 0.0
