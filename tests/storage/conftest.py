"""Storage tests run without real fsyncs: they cost I/O time and change nothing a test can
observe. ``fsynced`` records what would have been synced, for the test that checks it."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def fsynced(monkeypatch) -> list[str]:
    calls: list[str] = []

    def fake_fsync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fake_fsync)
    return calls


# The remote-cache tests' servers and environments (tests/storage/servers.py).
from servers import moto_endpoint, remote_env, s3, served, www  # noqa: E402, F401
