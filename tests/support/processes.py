"""Subprocesses the tests start: a Python server module that prints `READY <port>`, and stopping any process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


def stop_processes(
    processes: Iterable[subprocess.Popen[bytes]], stop_signal: int = signal.SIGTERM, grace: float = 5
) -> None:
    """Signal every process first, then wait: stopping n processes takes one grace period, not n."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(stop_signal)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def stop_process(process: subprocess.Popen[bytes], stop_signal: int = signal.SIGTERM, grace: float = 5) -> None:
    stop_processes([process], stop_signal, grace)


@dataclass
class ModuleServer:
    """A Python server module run as a subprocess on a free loopback port (it prints `READY <port>`)."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


Server = TypeVar("Server", bound=ModuleServer)


def launch_module_server(module: str, log_dir: Path, *extra: str, kind: type[Server] = ModuleServer) -> Server:  # type: ignore[assignment]
    """`python -m module PORT *extra`, once it says it listens; another port when the free one was taken meanwhile."""
    for _attempt in range(3):
        port = free_port()
        log_path = log_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, str(port), *extra],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = kind(port, process, log_path)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            if f"READY {port}" in server.logs():
                return server
            time.sleep(0.05)
        server.stop()
        if "address already in use" not in server.logs():
            break
    raise RuntimeError(f"{module} did not start:\n{server.logs()}")


def wait_until_answers(
    url: str,
    process: subprocess.Popen[Any] | None = None,
    timeout: float = 30,
    status: int | None = 200,
    logs: Callable[[], str] = str,
    request_timeout: float = 2,
    failure: type[Exception] = AssertionError,
) -> requests.Response:
    """GET `url` every 0.1 s until it answers `status` (any status when None) and return that answer.

    Raises `failure` when `process` (the server) exits first, or after `timeout` seconds, with `logs()` in the
    message.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise failure(f"exited with {process.returncode} before {url} answered:\n{logs()}")
        try:
            response = requests.get(url, timeout=request_timeout)
            if status is None or response.status_code == status:
                return response
        except requests.RequestException:  # refused while booting, or a slow first answer
            pass
        time.sleep(0.1)
    raise failure(f"{url} did not answer {status or ''} within {timeout:.0f} s:\n{logs()}")
