"""The benchmark harness: `make bench` (`bench/run`) measures the proxy side by side with what bounds it, on 127.0.0.1.

Targets of the same run, measured alternately so that their ratios hold on a noisy machine:
- direct: wrk → nginx answering a fixed JSON-RPC result (far faster than anything in Python);
- nginx: the same through a plain nginx `proxy_pass` (the native reference);
- floor: the same through `bench/floor_app.py`, a bare Flask + `requests` passthrough on gunicorn/gevent with the
  same worker count and no auth (the limit of this stack);
- proxy: the same through oauthproxy under its own gunicorn.conf.py, with a real access token from a real login.
Then: idle event streams held by one worker, the delay each event gains, the token check, a streamed tools/call
against a real MCP server, the same server under wrk (tools/call answered as an event stream, and session set-up),
py-spy profiles of the floor and proxy workers under load, a route with the signed identity assertion against
one without (wrk through one proxy, and the signing and reuse costs in-process), and a route with tool rules against
the same route without (tools/list answers read and filtered, tools/call checked, a denied call answered by the
proxy). The figures go to
docs/benchmarks.md (regenerated on every run). Benchmarks never fail on a number: they print tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import requests

from bench import profile, report
from bench.servers import (
    BENCH,
    ROOT,
    ProxyInstance,
    Service,
    cpu_seconds,
    rss_kib,
    start_fast_downstream,
    start_floor,
    start_mcp_server,
    start_proxy,
    start_reference_proxy,
    start_sse_downstream,
)
from bench.sse_client import event_delays, hold_idle_streams
from oauthproxy.components import components
from tests.provider_fixture import OidcProvider, launch_oidc_provider
from tests.proxy_fixtures import launch_mcp_downstream, log_in

SECTIONS = ("throughput", "profile", "token", "streams", "delay", "mcp", "mcpload", "assertion", "policy", "audit")
LUA_SCRIPT = BENCH / "jsonrpc_post.lua"
HANDSHAKE_SCRIPT = BENCH / "mcp_handshake.lua"
JSON_RPC_BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
#: What the mcpload section posts: a tools/call that the real MCP server answers with an event stream.
TOOLS_CALL_BODY = (
    '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello"}}}'
)
#: The policy section: a call its tool rules allow (forwarded), and one they deny (answered by the proxy).
ALLOWED_CALL_BODY = (
    '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_issues","arguments":{"q":"hello"}}}'
)
DENIED_CALL_BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"m":"hello"}}}'
#: A policy as an operator might write one: an exception for a group (never matching: callers carry no groups
#: yet), a deny list with globs that names the fixed answer's only tool, `echo`, and everything else allowed; the
#: tools/list answer is read, parsed and rewritten without it.
POLICY_ROUTES = """[[routes]]
name = "mcp"
path = "/mcp"
url = "{url}"

[[routes.tool_rules]]
allow = ["admin_*"]
groups = ["admins"]

[[routes.tool_rules]]
deny = ["delete_*", "admin_*", "echo"]

[[routes.tool_rules]]
allow = ["*"]
"""
#: Events at the start and end of each ticking stream that the steady-state delay leaves out.
STEADY_EDGE_EVENTS = 3


@dataclass
class Options:
    rounds: int = 3
    seconds: int = 5
    connections: tuple[int, ...] = (1, 20)
    workers: int = 1
    stream_counts: tuple[int, ...] = (100, 1000, 10000)
    hold_seconds: float = 5.0
    delay_streams: int = 20
    delay_events: int = 100
    delay_rounds: int = 4
    delay_interval: float = 0.05
    mcp_calls: int = 50
    #: Processes of the real MCP server and of the proxy in front of it in the mcpload section (the issue's setup).
    mcp_workers: int = 2
    profile_seconds: int = 10
    sections: tuple[str, ...] = SECTIONS
    database_dsn: str = ""
    output: Path = ROOT / "docs" / "benchmarks.md"
    render: Path | None = None


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation): a value that was actually observed."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# -- wrk ------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    service: Service
    token: str = ""
    #: The server behind `service` when its CPU is measured too (the real MCP server behind the proxy).
    downstream: Service | None = None


def _wrk_command(url: str, connections: int, seconds: int, script: Path) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url]


def _wrk_result(stdout: str, stderr: str) -> dict[str, Any]:
    line = next((line for line in stdout.splitlines() if line.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{stdout}\n{stderr}")
    result = json.loads(line.removeprefix("BENCH_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def run_wrk(
    url: str, connections: int, seconds: int, token: str, script: Path = LUA_SCRIPT, body: str = ""
) -> dict[str, Any]:
    completed = subprocess.run(
        _wrk_command(url, connections, seconds, script),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        env={**os.environ, "BENCH_TOKEN": token, "BENCH_BODY": body},
    )
    return _wrk_result(completed.stdout, completed.stderr)


def measure_wrk(
    target: Target, connections: int, seconds: int, script: Path = LUA_SCRIPT, body: str = ""
) -> dict[str, Any]:
    pids = target.service.pids()
    downstream_pids = target.downstream.pids() if target.downstream else []
    cpu_before, downstream_before = cpu_seconds(pids), cpu_seconds(downstream_pids)
    result = run_wrk(target.url, connections, seconds, target.token, script, body)
    served = max(result["requests"], 1)
    result["cpu_us_per_request"] = (cpu_seconds(pids) - cpu_before) * 1e6 / served
    if target.downstream:
        result["downstream_cpu_us_per_request"] = (cpu_seconds(downstream_pids) - downstream_before) * 1e6 / served
    return result


def measure_wrk_side_by_side(
    targets: list[Target], connections: int, seconds: int, script: Path, body: str
) -> list[dict[str, Any]]:
    """One wrk per target, all at once: whatever disturbs the machine meanwhile (another tenant of the host, a change
    of clock speed) falls on every target alike, so their difference is measured under the same conditions. Taken
    one after another on these machines, identical targets differ by up to 20 % in CPU per request."""
    pids = [target.service.pids() for target in targets]
    before = [cpu_seconds(found) for found in pids]
    running = [
        subprocess.Popen(
            _wrk_command(target.url, connections, seconds, script),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "BENCH_TOKEN": target.token, "BENCH_BODY": body},
        )
        for target in targets
    ]
    outputs = [process.communicate(timeout=seconds + 60) for process in running]
    results = []
    for found, cpu_before, (stdout, stderr) in zip(pids, before, outputs, strict=True):
        result = _wrk_result(stdout, stderr)
        result["cpu_us_per_request"] = (cpu_seconds(found) - cpu_before) * 1e6 / max(result["requests"], 1)
        results.append(result)
    return results


def check_target(target: Target) -> None:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    response = requests.post(target.url, data=JSON_RPC_BODY, headers=headers, timeout=10)
    if response.status_code != 200 or '"result"' not in response.text:
        raise RuntimeError(f"{target.name} answered {response.status_code}: {response.text[:300]}")


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of each figure (robust to one disturbed round)."""
    keys = ("rps", "p50_us", "p90_us", "p99_us", "mean_us", "cpu_us_per_request", "downstream_cpu_us_per_request")
    summary = {key: statistics.median(run[key] for run in runs) for key in keys if key in runs[0]}
    summary["requests"] = sum(run["requests"] for run in runs)
    summary["errors"] = sum(sum(run["errors"].values()) for run in runs)
    summary["rounds"] = [{key: run[key] for key in ("rps", "p50_us", "p99_us")} for run in runs]
    return summary


def audit_event_cpu(folder: Path, provider: OidcProvider, events: int = 2000, batches: int = 7) -> dict[str, float]:
    """CPU µs per tool call of the audit trail's two halves, measured in this process: the request's hooks (the
    tool name read from the body, the event built and buffered) and the flush (its JSON line written to a file and
    its row inserted with the rest of the batch into SQLite). The best of `batches` batches of `events`: unlike a
    difference between two wrk runs, a figure that does not move with the machine's load."""
    from oauthproxy import audit, create_app
    from oauthproxy.database import upgrade_database
    from tests.support.settings import base_env

    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **base_env(1, provider, f"sqlite:///{folder / 'audit.sqlite3'}", "bench-in-process"),
        "AUDIT_LOG": str(folder / "audit.jsonl"),
    }
    app = create_app(env)
    upgrade_database(app)
    trail = app.extensions[audit.EXTENSION_KEY]
    trail.batch = events + 1  # the test flushes; the background flusher waits its second
    body = ALLOWED_CALL_BODY.encode()
    hooks, flush = [], []
    with app.test_request_context("/mcp"):
        for _ in range(batches):
            environs = [
                {"oauthproxy.user_id": "user-1", "oauthproxy.client_id": "client-1", "oauthproxy.request_id": f"r{n}"}
                for n in range(events)
            ]
            started = time.process_time()
            for environ in environs:
                audit.note_tool_calls(environ, "mcp", body)
                audit.request_finished(environ, 200, 0.001)
            buffered = time.process_time()
            trail.flush()
            hooks.append((buffered - started) * 1e6 / events)
            flush.append((time.process_time() - buffered) * 1e6 / events)
    return {"hooks_us": min(hooks), "flush_us": min(flush), "events": events, "batches": batches}


# -- the run --------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    options: Options
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="oauthproxy-bench-")))
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    results: dict[str, Any] = field(default_factory=dict)
    _provider: OidcProvider | None = None

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    @property
    def database_dsn(self) -> str:
        return self.options.database_dsn or f"sqlite:///{self.run_dir / 'bench.sqlite3'}"

    @property
    def provider(self) -> OidcProvider:
        if self._provider is None:
            self.log("starting the test OpenID provider (tests/provider)")
            self._provider = launch_oidc_provider(self.run_dir / "provider.log")
            self.stack.callback(self._provider.stop)
        return self._provider

    def keep(self, service: Service) -> Service:
        self.stack.callback(service.stop)
        return service

    @contextlib.contextmanager
    def temporary(self, service: Service) -> Iterator[Service]:
        try:
            yield service
        finally:
            service.stop()

    def proxy(self, downstream_url: str, workers: int, **overrides: str) -> ProxyInstance:
        instance = start_proxy(self.run_dir, self.provider, downstream_url, workers, self.database_dsn, **overrides)
        self.keep(instance.service)
        return instance

    # -- throughput, latency, profiles ----------------------------------------------------------------------

    def throughput(self) -> None:
        options = self.options
        self.log(f"throughput: starting nginx, floor and proxy ({options.workers} worker(s) each)")
        downstream = self.keep(start_fast_downstream(self.run_dir / "nginx-downstream"))
        reference = self.keep(start_reference_proxy(self.run_dir / "nginx-proxy", {"json": downstream.url}))
        floor = self.keep(start_floor(self.run_dir, downstream.url + "/mcp", options.workers))
        proxy = self.proxy(downstream.url + "/mcp", options.workers)
        uncached = self.proxy(downstream.url + "/mcp", options.workers, TOKEN_CACHE_TTL="0")
        self.results["token_for_checks"] = {"env": proxy.env, "token": proxy.token}
        targets = [
            Target("direct", downstream.url + "/mcp", downstream, proxy.token),
            Target("nginx", reference.url + "/mcp", reference, proxy.token),
            Target("floor", floor.url + "/mcp", floor, proxy.token),
            Target("proxy", proxy.url + "/mcp", proxy.service, proxy.token),
            Target("proxy, token cache off", uncached.url + "/mcp", uncached.service, uncached.token),
        ]
        for target in targets:
            check_target(target)
            run_wrk(target.url, 20, 2, target.token)  # warm-up: pools filled, token cached, code paths hot
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for round_number in range(1, options.rounds + 1):
            for connections in options.connections:
                for target in targets:
                    self.log(f"wrk round {round_number}/{options.rounds}: {target.name}, {connections} connection(s)")
                    result = measure_wrk(target, connections, options.seconds)
                    runs.setdefault((target.name, connections), []).append(result)
        self.results["throughput"] = {
            f"{name}|{connections}": summarise_runs(found) for (name, connections), found in runs.items()
        }
        if "profile" in options.sections:
            self.profiles([target for target in targets if target.name in ("floor", "proxy")])

    def profiles(self, targets: list[Target]) -> None:
        if not profile.available():
            self.log("profile: py-spy is missing (bench/run installs it); skipped")
            return
        found: dict[str, Any] = {}
        for target in targets:
            worker = target.service.workers()[0]
            output = self.run_dir / f"profile-{target.name}.txt"
            self.log(f"profile: py-spy on the {target.name} worker (pid {worker}) under wrk, 20 connections")
            sampler = profile.record(worker, self.options.profile_seconds + 1, output)
            time.sleep(0.5)
            result = measure_wrk(target, 20, self.options.profile_seconds)
            _, stderr = sampler.communicate(timeout=60)
            if sampler.returncode != 0 or not output.exists():
                self.log(f"profile: py-spy failed: {stderr.decode(errors='replace')[-500:]}")
                continue
            parsed = profile.parse_collapsed(output.read_text())
            found[target.name] = {
                "samples": parsed.samples,
                "cpu_us_per_request": result["cpu_us_per_request"],
                "rps": result["rps"],
                "by_component": dict(parsed.by_component.most_common()),
                "top_self": dict(parsed.by_self_frame.most_common(15)),
                "ours_inclusive": dict(parsed.ours_inclusive.most_common(15)),
                "raw": str(output),
            }
        self.results["profile"] = found

    # -- token check ----------------------------------------------------------------------------------------

    def token_check(self) -> None:
        """In this process, on the proxy's own database: the cost of a cache hit and of a miss, and the database
        queries one proxied request makes (through the real view, forwarding to the real downstream)."""
        if "token_for_checks" not in self.results:
            downstream = self.keep(start_fast_downstream(self.run_dir / "nginx-downstream-token"))
            instance = self.proxy(downstream.url + "/mcp", 1)
            self.results["token_for_checks"] = {"env": instance.env, "token": instance.token}
        self.log("token check: cache hit and miss, database queries per proxied request")
        import logging

        from flask import Flask
        from sqlalchemy import event

        from oauthproxy import create_app
        from oauthproxy.models import db
        from oauthproxy.resource_server import forget_grant, load_token

        setup = self.results.pop("token_for_checks")
        env, token = setup["env"], setup["token"]
        app = create_app(env)
        # create_app set the root logger to INFO: no line per in-process request, nor per request of the MCP client.
        logging.getLogger().setLevel(logging.WARNING)
        route = next(iter(components(app).routes.values()))
        with app.test_request_context(route.path):
            _, validated = load_token(token, route)
            hits = 20_000
            started = time.perf_counter()
            for _ in range(hits):
                load_token(token, route)
            hit_us = (time.perf_counter() - started) * 1e6 / hits
            misses = []
            for _ in range(500):
                forget_grant(app, validated.grant_id)
                started = time.perf_counter()
                load_token(token, route)
                misses.append((time.perf_counter() - started) * 1e6)
            # Session binding (issue 16): a known session, answered from this worker's cache.
            sessions = components(app).mcp_sessions
            session_id = f"bench-{time.time_ns()}"
            sessions.record(route.name, session_id, validated.caller.user_id)
            started = time.perf_counter()
            for _ in range(hits):
                sessions.allows(route.name, session_id, validated.caller.user_id)
            session_hit_us = (time.perf_counter() - started) * 1e6 / hits

        def queries_per_request(flask_app: Flask, requests_count: int, **extra: str) -> tuple[int, float]:
            counted = [0]
            with flask_app.app_context():
                event.listen(db.engine, "before_cursor_execute", lambda *_: counted.__setitem__(0, counted[0] + 1))
            client = flask_app.test_client()
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **extra,
            }

            def one() -> None:
                response = client.post(route.path, data=JSON_RPC_BODY, headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"in-process request answered {response.status_code}: {response.get_data()!r}")
                response.close()

            forget_grant(flask_app, validated.grant_id)
            one()  # the first request of a token: a cache miss
            first = counted[0]
            counted[0] = 0
            for _ in range(requests_count):
                one()
            return first, counted[0] / requests_count

        first, cached = queries_per_request(app, 200)
        _, with_session = queries_per_request(app, 200, **{"Mcp-Session-Id": session_id})
        uncached_app = create_app({**env, "TOKEN_CACHE_TTL": "0"})
        _, uncached = queries_per_request(uncached_app, 50)
        for flask_app in (app, uncached_app):
            with flask_app.app_context():
                db.engine.dispose()
        self.results["token"] = {
            "database": env["DATABASE_DSN"].split(":", 1)[0],
            "hit_us": hit_us,
            "miss_p50_us": percentile(misses, 0.5),
            "miss_p99_us": percentile(misses, 0.99),
            "queries_first_request": first,
            "queries_per_request_cached": cached,
            "queries_per_request_cache_off": uncached,
            "session_hit_us": session_hit_us,
            "queries_per_request_with_session": with_session,
        }

    # -- idle streams ---------------------------------------------------------------------------------------

    def streams(self) -> None:
        options = self.options
        downstream = self.keep(start_sse_downstream(self.run_dir))
        found: dict[str, Any] = {}
        for count in options.stream_counts:
            for name in ("floor", "proxy"):
                # A fresh single worker for each count: memory a larger run once took is not handed back.
                if name == "floor":
                    service, token = start_floor(self.run_dir, downstream.url + "/mcp", 1), ""
                else:
                    instance = start_proxy(self.run_dir, self.provider, downstream.url + "/mcp", 1, self.database_dsn)
                    service, token = instance.service, instance.token
                with self.temporary(service):
                    self.log(f"streams: {count} idle event streams through one {name} worker")
                    found[f"{name}|{count}"] = self._hold(service, token, downstream.url, count)
        self.results["streams"] = found

    def _hold(self, service: Service, token: str, downstream_url: str, count: int) -> dict[str, Any]:
        worker = service.workers()[0]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = service.url + "/mcp/idle"
        # Warm-up: the first streams import and allocate what every later one reuses.
        asyncio.run(hold_idle_streams(url, headers, 20, 0.5, downstream_url, dict))
        time.sleep(0.5)
        baseline = rss_kib(worker)
        cpu_before = cpu_seconds([worker])
        held = asyncio.run(
            hold_idle_streams(
                url,
                headers,
                count,
                self.options.hold_seconds,
                downstream_url,
                lambda: {"rss_kib": rss_kib(worker), "cpu": cpu_seconds([worker])},
            )
        )
        rss = held.samples["rss_kib"]
        time.sleep(2)  # the worker closes its side of each ended stream, and gevent frees the greenlets
        return {
            **asdict(held),
            "baseline_rss_kib": baseline,
            "rss_kib": rss,
            "rss_after_close_kib": rss_kib(worker),
            "bytes_per_stream": (rss - baseline) * 1024 / count,
            "open_cpu_us_per_stream": (held.samples["cpu"] - cpu_before) * 1e6 / count,
        }

    # -- event delay ------------------------------------------------------------------------------------------

    def delay(self) -> None:
        options = self.options
        downstream = self.keep(start_sse_downstream(self.run_dir))
        reference = self.keep(start_reference_proxy(self.run_dir / "nginx-proxy-sse", {"sse": downstream.url}))
        floor = self.keep(start_floor(self.run_dir, downstream.url + "/mcp", 1))
        proxy = self.proxy(downstream.url + "/mcp", 1)
        targets = [
            ("direct", downstream.url, {}),
            ("nginx", reference.url, {}),
            ("floor", floor.url, {}),
            ("proxy", proxy.url, {"Authorization": f"Bearer {proxy.token}"}),
        ]
        rounds = options.delay_rounds
        # Per round and target: (event number, delay) of every event received, and how many were expected.
        runs: dict[str, list[list[tuple[int, float]]]] = {name: [] for name, _, _ in targets}
        expected: dict[str, int] = dict.fromkeys(runs, 0)
        for round_number in range(1, rounds + 1):
            for name, base, headers in targets:
                self.log(
                    f"event delay round {round_number}/{rounds}: {name}, {options.delay_streams} streams, "
                    f"an event every {options.delay_interval * 1000:.0f} ms on each"
                )
                got, wanted = asyncio.run(
                    event_delays(
                        base + "/mcp/tick", headers, options.delay_streams, options.delay_interval, options.delay_events
                    )
                )
                runs[name].append(got)
                expected[name] += wanted
        edge = STEADY_EDGE_EVENTS

        def steady(numbered: list[tuple[int, float]]) -> list[float]:
            # While all streams are open: not the first or last events of each, which wait for the other streams'
            # requests being opened or finished in the same worker (CPU that the throughput figures measure).
            return [delay for number, delay in numbered if edge <= number < options.delay_events - edge]

        found = {}
        for name, per_round in runs.items():
            every = [delay for numbered in per_round for _, delay in numbered]
            kept = [delay for numbered in per_round for delay in steady(numbered)]
            found[name] = {
                "events": len(every),
                "expected": expected[name],
                "p50_ms": percentile(kept, 0.5) * 1e3,
                "p99_ms": percentile(kept, 0.99) * 1e3,
                "max_ms": max(kept) * 1e3,
                "steady_events": len(kept),
                "all_p50_ms": percentile(every, 0.5) * 1e3,
                "all_p99_ms": percentile(every, 0.99) * 1e3,
                "all_max_ms": max(every) * 1e3,
                "round_p99_ms": [percentile(steady(numbered), 0.99) * 1e3 for numbered in per_round],
                "round_all_p99_ms": [percentile([d for _, d in numbered], 0.99) * 1e3 for numbered in per_round],
            }
        self.results["delay"] = found

    # -- the real thing -----------------------------------------------------------------------------------------

    def mcp(self) -> None:
        mcp_server = launch_mcp_downstream(self.run_dir)
        self.stack.callback(mcp_server.stop)
        proxy = self.proxy(mcp_server.url, self.options.workers)
        # The floor (a bare Flask + requests passthrough on the same stack, no auth): what the stack itself adds.
        floor = self.keep(start_floor(self.run_dir, mcp_server.url, self.options.workers))
        targets = (
            ("direct", mcp_server.url, {}),
            ("floor", floor.url + "/mcp", {}),
            ("proxy", proxy.url + "/mcp", {"Authorization": f"Bearer {proxy.token}"}),
        )
        found: dict[str, dict[str, list[float]]] = {name: {"call": [], "first": []} for name, _, _ in targets}
        rounds = 4
        for round_number in range(1, rounds + 1):  # alternating, so that a disturbance hits both sides alike
            for name, url, headers in targets:
                self.log(
                    f"real MCP server round {round_number}/{rounds}: {self.options.mcp_calls} streamed "
                    f"tools/call, {name}"
                )
                calls, firsts = asyncio.run(_tool_calls(url, headers, self.options.mcp_calls))
                found[name]["call"] += calls
                found[name]["first"] += firsts
        self.results["mcp"] = {
            name: {
                "calls": len(values["call"]),
                "call_p50_ms": percentile(values["call"], 0.5) * 1e3,
                "call_p99_ms": percentile(values["call"], 0.99) * 1e3,
                "first_p50_ms": percentile(values["first"], 0.5) * 1e3,
                "first_p99_ms": percentile(values["first"], 0.99) * 1e3,
            }
            for name, values in found.items()
        }

    def mcpload(self) -> None:
        """wrk against the real MCP server, directly and through the proxy (both with `mcp_workers` processes):
        tools/call answered as an event stream (stateless server), and session set-up (initialize, then
        notifications/initialized with the session id, then DELETE; a one-process stateful server, whose sessions
        are in its memory). CPU is measured for the proxy and for the server behind it."""
        options = self.options
        workers = options.mcp_workers
        self.log(f"mcpload: starting the real MCP server ({workers} worker(s)) and a proxy in front of it")
        stateless = self.keep(start_mcp_server(self.run_dir, "stateless", workers))
        stateful = self.keep(start_mcp_server(self.run_dir, "stateful", 1))
        proxy = self.proxy(stateless.url + "/mcp", workers)
        session_proxy = self.proxy(stateful.url + "/mcp", workers)
        # The floor in front of each: what Flask + requests on gunicorn/gevent cost on this path with no work of ours.
        floor = self.keep(start_floor(self.run_dir, stateless.url + "/mcp", workers))
        session_floor = self.keep(start_floor(self.run_dir, stateful.url + "/mcp", workers))
        scenarios = {
            "tools/call": (
                LUA_SCRIPT,
                TOOLS_CALL_BODY,
                [
                    Target("direct", stateless.url + "/mcp", stateless),
                    Target("floor", floor.url + "/mcp", floor, "", stateless),
                    Target("proxy", proxy.url + "/mcp", proxy.service, proxy.token, stateless),
                ],
            ),
            "session set-up": (
                HANDSHAKE_SCRIPT,
                "",
                [
                    Target("direct", stateful.url + "/mcp", stateful),
                    Target("floor", session_floor.url + "/mcp", session_floor, "", stateful),
                    Target("proxy", session_proxy.url + "/mcp", session_proxy.service, session_proxy.token, stateful),
                ],
            ),
        }
        for script, body, targets in scenarios.values():
            for target in targets:
                run_wrk(target.url, 20, 2, target.token, script, body)  # warm-up
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_number in range(1, options.rounds + 1):
            for connections in options.connections:
                for scenario, (script, body, targets) in scenarios.items():
                    for target in targets:
                        self.log(
                            f"mcpload round {round_number}/{options.rounds}: {scenario}, {target.name}, "
                            f"{connections} connection(s)"
                        )
                        result = measure_wrk(target, connections, options.seconds, script, body)
                        runs.setdefault(f"{scenario}|{target.name}|{connections}", []).append(result)
        self.results["mcpload"] = {key: summarise_runs(found) for key, found in runs.items()}

    # -- the signed identity assertion ------------------------------------------------------------------------------

    def assertion(self) -> None:
        """One proxy, two routes to the same fast downstream: `/mcp` plain, `/signed` with
        `identity_assertion = true`; wrk alternates between them. Then, in this process on the proxy's database:
        a signature (ES256, EdDSA) and an assertion answered from the per-grant cache."""
        options = self.options
        self.log(f"assertion: a proxy ({options.workers} worker(s)) with a plain and a signed route")
        downstream = self.keep(start_fast_downstream(self.run_dir / "nginx-downstream-assertion"))
        routes = self.run_dir / "assertion-routes.toml"
        routes.write_text(
            "\n".join(
                [
                    "[[routes]]",
                    'name = "plain"',
                    'path = "/mcp"',
                    f'url = "{downstream.url}/mcp"',
                    "",
                    "[[routes]]",
                    'name = "signed"',
                    'path = "/signed"',
                    f'url = "{downstream.url}/mcp"',
                    "identity_assertion = true",
                    "",
                ]
            )
        )
        proxy = self.proxy("", options.workers, MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes))
        signed_login = log_in(proxy.url, proxy.url + "/signed")
        targets = [
            Target("no assertion", proxy.url + "/mcp", proxy.service, proxy.token),
            Target("identity assertion", proxy.url + "/signed", proxy.service, signed_login.access_token),
        ]
        for target in targets:
            check_target(target)
            run_wrk(target.url, 20, 2, target.token)  # warm-up: the assertion signed, the token cached
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_number in range(1, options.rounds + 1):
            for connections in options.connections:
                for target in targets:
                    self.log(f"assertion round {round_number}/{options.rounds}: {target.name}, {connections} conn.")
                    runs.setdefault(f"{target.name}|{connections}", []).append(
                        measure_wrk(target, connections, options.seconds)
                    )
        served = sum(sum(run["requests"] for run in found) for key, found in runs.items() if "identity" in key)
        signed = _metric_total(proxy.url, "oauthproxy_identity_assertions_signed_total")
        self.results["assertion"] = {
            "wrk": {key: summarise_runs(found) for key, found in runs.items()},
            "requests_with_assertion": served,
            "signatures": signed,
            **self._assertion_costs(proxy.env),
        }

    def _assertion_costs(self, env: dict[str, str]) -> dict[str, Any]:
        import logging

        from oauthproxy import create_app
        from oauthproxy.downstream_credentials import Caller
        from oauthproxy.identity_assertions import ASSERTION_TYPE, assertion_claims
        from oauthproxy.models import db
        from oauthproxy.signing_keys import PrivateKey, generate_key

        app = create_app(env)
        logging.getLogger().setLevel(logging.WARNING)
        route = components(app).routes["signed"]
        caller = Caller("alice", "alice@example.com", "Alice Liddell")
        claims = assertion_claims(app.config["SETTINGS"].issuer, route, "client", caller, int(time.time()), 300, "j")
        costs: dict[str, Any] = {}
        for algorithm in ("ES256", "EdDSA"):
            key = generate_key(algorithm)
            signer = PrivateKey(key.thumbprint(), algorithm, key)
            token = signer.sign(claims, ASSERTION_TYPE)
            count = 2_000
            started = time.perf_counter()
            for _ in range(count):
                signer.sign(claims, ASSERTION_TYPE)
            costs[f"sign_{algorithm}_us"] = (time.perf_counter() - started) * 1e6 / count
            costs[f"header_{algorithm}_bytes"] = len(token)
        with app.test_request_context(route.path):
            assertions = components(app).identity_assertions
            assertions.assertion(route, 1, "client", caller)  # the first: the key set read, one signature
            count = 50_000
            started = time.perf_counter()
            for _ in range(count):
                assertions.assertion(route, 1, "client", caller)
            costs["reuse_us"] = (time.perf_counter() - started) * 1e6 / count
        with app.app_context():
            db.engine.dispose()
        return costs

    # -- tool rules -------------------------------------------------------------------------------------------------

    def policy(self) -> None:
        """The same route with and without tool rules, in front of the fixed-answer nginx (whose tools/list answer
        names one tool, `echo`), measured alternately: what a policy costs per request, and that routes without
        one do not pay for it."""
        options = self.options
        self.log(f"policy: starting nginx and two proxies, with and without tool rules ({options.workers} worker(s))")
        downstream = self.keep(start_fast_downstream(self.run_dir / "nginx-downstream-policy"))
        plain = self.proxy(downstream.url + "/mcp", options.workers)
        routes = self.run_dir / "policy-routes.toml"
        routes.write_text(POLICY_ROUTES.format(url=downstream.url + "/mcp"))
        ruled = self.proxy(downstream.url + "/mcp", options.workers, MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes))
        scenarios = [
            ("no tool rules", "tools/list", plain, JSON_RPC_BODY),
            ("no tool rules", "tools/call", plain, ALLOWED_CALL_BODY),
            ("tool rules", "tools/list (answer filtered)", ruled, JSON_RPC_BODY),
            ("tool rules", "tools/call (allowed)", ruled, ALLOWED_CALL_BODY),
            ("tool rules", "tools/call (denied, answered by the proxy)", ruled, DENIED_CALL_BODY),
        ]
        for _, _, instance, body in scenarios:
            run_wrk(instance.url + "/mcp", 20, 2, instance.token, LUA_SCRIPT, body)  # warm-up
        check = requests.post(
            ruled.url + "/mcp",
            data=JSON_RPC_BODY,
            headers={"Authorization": f"Bearer {ruled.token}", "Content-Type": "application/json"},
            timeout=10,
        )
        if check.status_code != 200 or check.json()["result"]["tools"] != []:
            raise RuntimeError(f"the route with tool rules answered {check.status_code}: {check.text[:300]}")
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_number in range(1, options.rounds + 1):
            for connections in options.connections:
                for route, request, instance, body in scenarios:
                    self.log(
                        f"policy round {round_number}/{options.rounds}: {route}, {request}, {connections} connection(s)"
                    )
                    target = Target(route, instance.url + "/mcp", instance.service, instance.token)
                    result = measure_wrk(target, connections, options.seconds, LUA_SCRIPT, body)
                    runs.setdefault(f"{route}|{request}|{connections}", []).append(result)
        self.results["policy"] = {key: summarise_runs(found) for key, found in runs.items()}

    # -- the audit trail ----------------------------------------------------------------------------------------------

    def audit(self) -> None:
        """The same route with the audit trail on (JSON lines to a file, rows to the table) and off, in front of the
        fixed-answer nginx, loaded side by side (measure_wrk_side_by_side): what recording a tool call costs per
        request (its name read from the body, one event buffered, written in batches off the request path), and what
        a request that is no tool call pays (one substring search of its body)."""
        options = self.options
        self.log(f"audit: starting nginx and two proxies, audit trail on and off ({options.workers} worker(s))")
        downstream = self.keep(start_fast_downstream(self.run_dir / "nginx-downstream-audit"))
        audit_log = self.run_dir / "audit.jsonl"
        recording = self.proxy(downstream.url + "/mcp", options.workers, AUDIT_LOG=str(audit_log))
        silent = self.proxy(downstream.url + "/mcp", options.workers, AUDIT_ENABLED="false")
        # The control: a second proxy with the trail off. What it differs from the first by, loaded the same way, is
        # the noise that the trail's own figure has to be read against.
        twin = self.proxy(downstream.url + "/mcp", options.workers, AUDIT_ENABLED="false")
        off, on, control = (
            Target(name, instance.url + "/mcp", instance.service, instance.token)
            for name, instance in (("audit off", silent), ("audit on", recording), ("audit off, control", twin))
        )
        requests_sent = (("tools/call", ALLOWED_CALL_BODY), ("tools/list", JSON_RPC_BODY))
        for target in (off, on, control):
            for _, body in requests_sent:
                run_wrk(target.url, 20, 2, target.token, LUA_SCRIPT, body)  # warm-up
        runs: dict[str, list[dict[str, Any]]] = {}
        added: dict[str, list[float]] = {}
        for round_number in range(1, options.rounds + 1):
            for connections in options.connections:
                for request, body in requests_sent:
                    for pair in ([off, on], [off, control]):
                        self.log(
                            f"audit round {round_number}/{options.rounds}: {request}, {connections} conn., "
                            f"{pair[1].name} beside audit off"
                        )
                        results = measure_wrk_side_by_side(pair, connections, options.seconds, LUA_SCRIPT, body)
                        runs.setdefault(f"{pair[1].name}|{request}|{connections}", []).append(results[1])
                        if pair[1] is on:
                            runs.setdefault(f"audit off|{request}|{connections}", []).append(results[0])
                        difference = results[1]["cpu_us_per_request"] - results[0]["cpu_us_per_request"]
                        added.setdefault(f"{pair[1].name}|{request}|{connections}", []).append(difference)
        time.sleep(2)  # the last batch flushed
        lines = audit_log.read_text().count('"tool_call"') if audit_log.exists() else 0
        calls = sum(
            sum(run["requests"] for run in found)
            for key, found in runs.items()
            if key.startswith("audit on|tools/call")
        )
        self.log("audit: the trail's CPU per tool call, in-process")
        in_process = audit_event_cpu(self.run_dir / "audit-in-process", self.provider)
        self.results["audit"] = {
            "in_process": in_process,
            "wrk": {key: summarise_runs(found) for key, found in runs.items()},
            "cpu_added": {key: {"median": statistics.median(found), "rounds": found} for key, found in added.items()},
            "tool_calls_served": calls,
            "tool_call_lines": lines,
        }

    # -- everything -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.results["machine"] = machine()
        self.results["options"] = {
            key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(self.options).items()
        }
        started = time.monotonic()
        with self.stack:
            for section in (
                "throughput",
                "token",
                "streams",
                "delay",
                "mcp",
                "mcpload",
                "assertion",
                "policy",
                "audit",
            ):
                if section in self.options.sections:
                    getattr(self, "token_check" if section == "token" else section)()
        self.results.pop("token_for_checks", None)
        self.results["elapsed_seconds"] = time.monotonic() - started
        return self.results


async def _tool_calls(url: str, headers: dict[str, str], count: int) -> tuple[list[float], list[float]]:
    """`count` calls of the `progress` tool (three progress notifications streamed, then the result) on one
    session: each call's duration, and when its first progress notification arrived."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    calls: list[float] = []
    firsts: list[float] = []
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        for index in range(count + 5):
            first: list[float] = []

            async def on_progress(
                progress: float, total: float | None, message: str | None, first: list[float] = first
            ) -> None:
                if not first:
                    first.append(time.perf_counter())

            started = time.perf_counter()
            result = await client.call_tool("progress", {"steps": 3, "pause": 0.0}, progress_callback=on_progress)
            ended = time.perf_counter()
            if result.is_error or not first:
                raise RuntimeError(f"tools/call through {url} failed: {result}")
            if index >= 5:  # the first calls warm up the session
                calls.append(ended - started)
                firsts.append(first[0] - started)
    return calls, firsts


def _metric_total(url: str, name: str) -> float:
    """The sum of a counter's series on the proxy's /metrics (every worker's, under gunicorn)."""
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _version(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (completed.stdout + completed.stderr).strip().splitlines()[0]


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    packages = {
        name: metadata.version(name)
        for name in (
            "flask",
            "werkzeug",
            "gunicorn",
            "gevent",
            "greenlet",
            "requests",
            "urllib3",
            "sqlalchemy",
            "mcp",
            "py-spy",
        )
        if _installed(name)
    }
    provider_package = ROOT / "tests" / "provider" / "node_modules" / "oidc-provider" / "package.json"
    revision = _version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "nginx": _version(["nginx", "-v"]).split("/", 1)[-1],
        "wrk": _version(["wrk", "--version"]).split(" [")[0],
        "node": _version(["node", "--version"]),
        "oidc_provider": json.loads(provider_package.read_text())["version"] if provider_package.exists() else "?",
        "revision": revision,
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


#: Descriptors the processes of the run may open: 10,000 streams need ~10,000 here, 20,000 and more in the proxy
#: worker (each stream holds the client's and the downstream's), 10,000 in the downstream.
OPEN_FILES = 65536


def raise_open_files_limit() -> None:
    """Up to OPEN_FILES where allowed (raising the hard limit needs CAP_SYS_RESOURCE), else to the hard limit. These
    machines' hard limit is 20,000 and may not be raised, which a worker holding 10,000 streams exceeds: it answers
    503 to the last dozen, and the report says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < OPEN_FILES:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
            return
        except (ValueError, OSError):
            pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per target, alternating (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument(
        "--workers", type=int, default=1, help="gunicorn workers of the floor and the proxy in the wrk runs (default 1)"
    )
    parser.add_argument("--streams", default="100,1000,10000", help="idle stream counts (default 100,1000,10000)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the idle streams are held (default 5)")
    parser.add_argument(
        "--mcp-calls", type=int, default=50, help="streamed tools/call per round (4 rounds) and path (default 50)"
    )
    parser.add_argument(
        "--mcp-workers",
        type=int,
        default=2,
        help="processes of the real MCP server and of the proxy in front of it in mcpload (default 2)",
    )
    parser.add_argument("--quick", action="store_true", help="one short round of everything (a smoke run)")
    parser.add_argument("--database-dsn", default="", help="the proxy's database (default: SQLite in the run dir)")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="the Markdown report to write (default docs/benchmarks.md)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write the report from an earlier run's results.json",
    )
    arguments = parser.parse_args(argv)
    sections = tuple(section.strip() for section in arguments.sections.split(",") if section.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    options = Options(
        rounds=arguments.rounds,
        seconds=arguments.seconds,
        workers=arguments.workers,
        stream_counts=tuple(int(n) for n in arguments.streams.split(",")),
        hold_seconds=arguments.hold,
        mcp_calls=arguments.mcp_calls,
        mcp_workers=arguments.mcp_workers,
        sections=sections,
        database_dsn=arguments.database_dsn,
        output=arguments.output,
        render=arguments.render,
    )
    if arguments.quick:
        options.rounds, options.seconds, options.hold_seconds, options.mcp_calls = 1, 2, 1.0, 10
        options.stream_counts, options.delay_events, options.profile_seconds = (100,), 30, 3
        options.delay_rounds = 2
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.render is not None:
        results = json.loads(options.render.read_text())
        options.output.write_text(report.render(results))
        print(report.summary(results), flush=True)
        return 0
    raise_open_files_limit()
    bench = Bench(options)
    bench.log(f"run folder (logs, raw profiles, results.json): {bench.run_dir}")
    results = bench.run()
    (bench.run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = report.render(results)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text)
    print(report.summary(results), flush=True)
    bench.log(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
