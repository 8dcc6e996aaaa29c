"""Sample a gunicorn worker with py-spy while it is under load, and say where its CPU time goes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"

#: The first path component of a frame's file (py-spy prints paths relative to sys.path) → the part of the stack it
#: belongs to. Other standard-library frames are charged to whoever called them (socket writes to urllib3, and
#: so on), except the few that are worth seeing on their own.
COMPONENTS = {
    "oauthproxy": "oauthproxy",
    "requests": "requests + urllib3",
    "urllib3": "requests + urllib3",
    "http": "requests + urllib3",
    "email": "requests + urllib3",
    "flask": "flask + werkzeug",
    "werkzeug": "flask + werkzeug",
    "gunicorn": "gunicorn",
    "gevent": "gevent",
    "logging": "logging",
    "prometheus_client": "prometheus_client",
    "sqlalchemy": "sqlalchemy",
    "flask_sqlalchemy": "sqlalchemy",
    "flask_limiter": "flask_limiter",
    "limits": "flask_limiter",
    "bench": "bench floor app",
    "json": "json",
}


def frame_file(frame: str) -> str:
    """`name (path/file.py:12)` → `path/file.py`."""
    inside = frame.rsplit(" (", 1)[-1].rstrip(")")
    return inside.rsplit(":", 1)[0]


def frame_component(frame: str) -> str | None:
    path = frame_file(frame)
    first = path.split("/", 1)[0]
    if first == "oauthproxy":
        return "oauthproxy/" + path.split("/", 1)[1].removesuffix(".py")
    return COMPONENTS.get(first)


@dataclass
class Profile:
    samples: int = 0
    by_component: Counter[str] = field(default_factory=Counter)
    by_self_frame: Counter[str] = field(default_factory=Counter)
    ours_inclusive: Counter[str] = field(default_factory=Counter)  # our functions, callees included

    def share(self, counter: Counter[str], key: str) -> float:
        return counter[key] / self.samples if self.samples else 0.0


def parse_collapsed(text: str) -> Profile:
    """py-spy's raw (collapsed) output: `frame;frame;...;innermost count` per line, outermost first."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        profile.samples += count
        component = next((c for c in map(frame_component, reversed(frames)) if c), "other")
        profile.by_component[component] += count
        innermost = frames[-1]
        name = innermost.rsplit(" (", 1)[0]
        profile.by_self_frame[f"{name} ({frame_file(innermost)})"] += count
        ours = {
            f"{frame.rsplit(' (', 1)[0]} ({frame_file(frame)})"
            for frame in frames
            if frame_file(frame).startswith("oauthproxy/")
        }
        for function in ours:
            profile.ours_inclusive[function] += count
    return profile


def record(pid: int, seconds: float, output: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` (non-blocking: the worker is not paused); wait on the returned process."""
    return subprocess.Popen(
        [
            str(PY_SPY),
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            str(rate),
            "-f",
            "raw",
            "-o",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def available() -> bool:
    return PY_SPY.exists()
