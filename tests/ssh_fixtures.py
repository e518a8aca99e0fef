"""pytest fixtures for real sshd test servers: one pool per session, a fresh HOME per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import SshdPool, SshHome, start_sshd_pool

POOL_SIZE = 8


@pytest.fixture(scope="session")
def sshd_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdPool]:
    """Eight real sshd servers, host1..host8 on 127.0.1.2..127.0.1.9, started once."""
    pool = start_sshd_pool(POOL_SIZE, tmp_path_factory.mktemp("sshd"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def ssh_home(sshd_pool: SshdPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SshHome:
    """A fresh HOME (config, known_hosts with every server, the user key), set as $HOME.

    The ssh-agent is hidden so that only the fixture's key can log in. Tests may edit the
    files; `home.env()` gives a subprocess the same view.
    """
    home = sshd_pool.make_home(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home
