"""Fault injection for the fault tests: another process holding SQLite's write lock, a private PostgreSQL cluster
that can be stopped and frozen (SIGSTOP), a small file system that fills up, and timing of requests while a fault
lasts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import requests

from tests.support.ports import free_port

_LOCK_HOLDER = """
import select, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN IMMEDIATE")
print("LOCKED", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))  # until told to release, or the time is up
connection.execute("COMMIT")
print("RELEASED", flush=True)
"""


@dataclass
class LockHolder:
    process: subprocess.Popen[str]
    locked_at: float
    released_at: float | None = None

    def release(self) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write("release\n")
        self.process.stdin.flush()
        return self.wait_released()

    def wait_released(self, timeout: float = 60) -> float:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "RELEASED", line
        self.process.wait(timeout=timeout)
        self.released_at = time.monotonic()
        return self.released_at


def hold_sqlite_write_lock(path: str, seconds: float) -> LockHolder:
    """Another process takes SQLite's write lock (BEGIN IMMEDIATE) on `path` and keeps it for `seconds`."""
    process = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, path, str(seconds)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "LOCKED", line
    return LockHolder(process, time.monotonic())


@contextmanager
def sqlite_locked(path: str, seconds: float = 30) -> Iterator[LockHolder]:
    holder = hold_sqlite_write_lock(path, seconds)
    try:
        yield holder
    finally:
        if holder.released_at is None:
            holder.release()


def sqlite_path(dsn: str) -> str:
    return dsn.removeprefix("sqlite:///")


@dataclass
class Probe:
    """Requests to one URL, one after another, until stopped: when each started and ended, and its status."""

    url: str
    interval: float = 0.1
    results: list[tuple[float, float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Probe:
        def run() -> None:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = requests.get(self.url, timeout=30).status_code
                except requests.RequestException:
                    status = 0
                self.results.append((started, time.monotonic(), status))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        return self.results

    def answered_between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [result for result in self.results if start <= result[1] <= end]


# -- a private PostgreSQL cluster ------------------------------------------------------------------


def _postgres_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    raise RuntimeError(f"{name} not found: install Debian's postgresql package (scripts/install-test-deps)")


@dataclass
class PostgresCluster:
    """A PostgreSQL server of its own (initdb in a temp folder), on its own loopback port."""

    folder: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        command = [_postgres_binary("pg_ctl"), "-D", str(self.folder / "data"), "-w", "-t", "60", *args]
        subprocess.run(command, check=True, capture_output=True, **_as_postgres())

    def start(self) -> None:
        self._ctl(
            "-l",
            str(self.folder / "server.log"),
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop")

    def pids(self) -> list[int]:
        """The postmaster and every backend it forked."""
        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        pids = [postmaster]
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(status.parent.name))
        return pids

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        pids = self.pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def _as_postgres() -> dict:
    """initdb and the server refuse to run as root: run them as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid}
    raise RuntimeError("running as root and no unprivileged user for PostgreSQL")


def start_postgres_cluster(folder: Path) -> PostgresCluster:
    folder.mkdir(parents=True, exist_ok=True)
    owner = _as_postgres()
    if owner:
        os.chown(folder, owner["user"], owner["group"])
    subprocess.run(
        [_postgres_binary("initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
        **owner,
    )
    cluster = PostgresCluster(folder, free_port())
    cluster.start()
    cluster.wait_ready()
    return cluster


# -- a downstream that misbehaves on cue -----------------------------------------------------------


class ScriptedDownstream:
    """A raw HTTP/1.1 downstream on loopback whose path says how it misbehaves:

    - `/mcp/once`: answers the first request of each connection (keep-alive), then reads the next one and closes
      the connection without answering: what a server closing an idle keep-alive connection does to a request that
      crossed the close.
    - `/mcp/sse-die?events=N`: an event stream that sends N events, then the connection ends (a crash).
    - `/mcp/sse-stall?events=N`: sends N events, then nothing, keeping the connection open.
    `seen` lists (connection number, method, path) of every request read.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[tuple[int, str, str]] = []
        self._connections = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self._connections += 1
            threading.Thread(target=self._serve, args=(connection, self._connections), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        reader = connection.makefile("rb")
        answered = 0
        with connection, reader:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                method, target, _ = request_line.decode().split(" ", 2)
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                reader.read(length)
                self.seen.append((number, method, target))
                path, _, query = target.partition("?")
                events = int(query.partition("events=")[2] or 2) if "events=" in query else 2
                if path == "/mcp/once":
                    if answered:
                        return  # read, and closed without an answer
                    body = b'{"ok": true}'
                    connection.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\n\r\n"
                        + body
                    )
                    answered += 1
                    continue
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for index in range(events):
                    data = f"data: event {index}\n\n".encode()
                    connection.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    time.sleep(0.1)
                if path == "/mcp/sse-stall":
                    self._stop.wait(60)
                return  # sse-die: the connection ends mid-stream, without the final chunk


# -- a full disk -----------------------------------------------------------------------------------


@contextmanager
def small_filesystem(size: str, prefix: str = "oauthproxy-full-disk-") -> Iterator[Path]:
    """A tmpfs of `size` (`4m`) mounted on a fresh folder, unmounted and removed afterwards whatever happens.

    Needs root (CI and these machines run the tests as root): a refused mount fails the test, it is never skipped,
    so a full disk stays tested.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        assert mounted.returncode == 0, f"cannot mount a tmpfs for the full-disk test (root needed): {mounted.stderr}"
        try:
            yield folder
        finally:
            # lazy: a connection the proxy still has open must not keep the mount (and the test machine) busy
            subprocess.run(["umount", "--lazy", str(folder)], check=True, capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Write a file in `folder` until its file system has no byte left, then give back `leave` bytes; returns the
    file (delete it to free the space)."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as output:
        try:
            for _ in range(1 << 20):  # bounded: 64 GiB
                output.write(chunk)
        except OSError:
            pass
        for size in (4096, 512, 1):  # the last partial blocks
            try:
                for _ in range(16):
                    output.write(b"\0" * size)
            except OSError:
                continue
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
