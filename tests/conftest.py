"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (small models; the machine is shared), restored after."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def datasyncs(monkeypatch):
    """Counts the journal's data syncs (``kernel.journal``'s ``fdatasync``), which still happen."""
    import kernel.journal as journal_mod

    calls: list[int] = []
    real = journal_mod._datasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(journal_mod, "_datasync", counting)
    return calls
