"""`make run` (scripts/run-local) refuses ports that another process holds, before it starts
anything: it needs neither Azurite nor the virtual environment to say so."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.azurite import REPO_ROOT, free_port
from tests.support.service import clean_environment

RUN_LOCAL = REPO_ROOT / "scripts" / "run-local"


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process (here: this one) listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def run_local(**env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [str(RUN_LOCAL)], env={**clean_environment(), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        # Should it start Azurite and the service after all, they must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_an_azurite_port_taken_by_another_process_is_refused(taken_port: int) -> None:
    done = run_local(AZURITE_PORT=str(taken_port), APP_PORT=str(free_port()))
    assert done.returncode == 1
    assert done.stderr == (
        f"run-local: port {taken_port} is taken by another process; give Azurite a free one "
        "with AZURITE_PORT=<port>.\n"
    )


def test_a_service_port_taken_by_another_process_is_refused(taken_port: int) -> None:
    done = run_local(AZURITE_PORT=str(free_port()), APP_PORT=str(taken_port))
    assert done.returncode == 1
    assert done.stderr == (
        f"run-local: port {taken_port} on 127.0.0.1 is taken by another process; give the "
        "service a free one with APP_PORT=<port>.\n"
    )


def test_one_port_for_azurite_and_the_service_is_refused() -> None:
    port = str(free_port())
    done = run_local(AZURITE_PORT=port, APP_PORT=port)
    assert done.returncode == 1
    assert done.stderr == f"run-local: AZURITE_PORT and APP_PORT are both {port}; give each a port of its own.\n"
