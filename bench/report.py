"""docs/benchmarks.md from a run's results: the figures, the targets met or missed, and the hand-written analysis."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

ANALYSIS = Path(__file__).resolve().parent / "analysis.md"
DASH = "-"  # an empty cell
WRK_TARGETS = ("direct", "nginx", "floor", "proxy", "proxy, token cache off")


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.2f}"


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, goal, measured, met) for each of the issue's targets that this run measured."""
    found: list[tuple[str, str, str, bool | None]] = []
    throughput = results.get("throughput", {})
    for connections in (1, 20):
        proxy, floor = throughput.get(f"proxy|{connections}"), throughput.get(f"floor|{connections}")
        if proxy and floor:
            ratio = proxy["rps"] / floor["rps"]
            found.append((f"throughput vs floor, {connections} connection(s)", "≥ 85 %", f"{ratio:.0%}", ratio >= 0.85))
    proxy, direct = throughput.get("proxy|1"), throughput.get("direct|1")
    if proxy and direct:
        added_p50 = (proxy["p50_us"] - direct["p50_us"]) / 1000
        added_p99 = (proxy["p99_us"] - direct["p99_us"]) / 1000
        found.append(("added latency over direct, 1 connection, p50", "< 1 ms", f"{added_p50:.2f} ms", added_p50 < 1))
        found.append(("added latency over direct, 1 connection, p99", "< 3 ms", f"{added_p99:.2f} ms", added_p99 < 3))
    streams = results.get("streams", {})
    largest = max((int(key.split("|")[1]) for key in streams if key.startswith("proxy|")), default=0)
    if largest:
        held = streams[f"proxy|{largest}"]
        kept = min(held["opened"], held["open_after_hold"], held["released_ok"])
        per_stream = held["bytes_per_stream"] / 1000
        found.append(
            (
                f"{largest:,} idle SSE streams on one worker: memory each",
                "< 20 KB",
                f"{per_stream:.1f} KB",
                per_stream < 20,
            )
        )
        found.append(
            (
                f"{largest:,} idle SSE streams on one worker: none dropped",
                f"{largest:,} of {largest:,}",
                f"{kept:,} of {largest:,}" + _descriptor_note(results, largest),
                kept == largest,
            )
        )
        if "rss_after_close_kib" in held:
            # Returned (or reusable) memory: the worker's RSS once the streams closed, against its idle RSS.
            excess = held["rss_after_close_kib"] / held["baseline_rss_kib"] - 1
            found.append(
                (
                    f"{largest:,} idle SSE streams on one worker: RSS after they close, over idle RSS",
                    "≤ 10 %",
                    f"{excess:.0%}",
                    excess <= 0.10,
                )
            )
    delay = results.get("delay", {})
    if "proxy" in delay and "direct" in delay:
        added = delay_added_p99(delay, "proxy")
        found.append(
            (
                "SSE event delay added by the proxy, p99 (steady; all events: "
                f"{delay_added_p99(delay, 'proxy', 'round_all_p99_ms'):.2f} ms)",
                "< 2 ms",
                f"{added:.2f} ms",
                added < 2,
            )
        )
    mcp = results.get("mcp", {})
    if "proxy" in mcp and "direct" in mcp:
        added = mcp["proxy"]["first_p50_ms"] - mcp["direct"]["first_p50_ms"]
        found.append(
            ("first event of a streamed tools/call: latency added, p50", "< 1 ms", f"{added:.2f} ms", added < 1)
        )
    found += _mcp_load_targets(results.get("mcpload", {}))
    token = results.get("token")
    if token:
        queries = token["queries_per_request_cached"]
        found.append(("database queries per proxied request, cached token", "0", f"{queries:g}", queries == 0))
    return found


def _descriptor_note(results: dict[str, Any], streams: int) -> str:
    """Why streams were refused, when the machine's descriptor limit is the reason: a worker holds two per stream
    (the client's, the downstream's), and it answers 503 past its limit (streams that were not opened)."""
    limit = results["machine"].get("open_files_limit")
    if not limit or limit > 2 * streams + 200:
        return ""
    return f" (descriptor limit {limit:,}, 2 per stream: at most about {limit // 2 - 10:,} per worker)"


def _mcp_load_targets(load: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """Issue 12's targets on the real MCP server, fixed before the first run: CPU is the proxy's own, per request."""
    found: list[tuple[str, str, str, bool | None]] = []
    call = load.get("tools/call|proxy|20")
    if call:
        cpu = call["cpu_us_per_request"] / 1000
        found.append(
            (
                "proxy CPU per tools/call answered as an event stream (20 connections)",
                "≤ 0.7 ms",
                f"{cpu:.2f} ms",
                cpu <= 0.7,
            )
        )
    for connections, goal in ((1, 0.70), (20, 0.90)):
        proxy, direct = load.get(f"tools/call|proxy|{connections}"), load.get(f"tools/call|direct|{connections}")
        if proxy and direct:
            ratio = proxy["rps"] / direct["rps"]
            found.append(
                (
                    f"tools/call throughput through the proxy vs the MCP server direct, {connections} connection(s)",
                    f"≥ {goal:.0%}",
                    f"{ratio:.0%}",
                    ratio >= goal,
                )
            )
    handshake = load.get("session set-up|proxy|20")
    if call and handshake:
        # Per request: initialize and notifications/initialized each cost no more proxy CPU than a tools/call.
        ratio = handshake["cpu_us_per_request"] / call["cpu_us_per_request"]
        found.append(
            (
                "proxy CPU per session set-up request (initialize, notifications/initialized) vs per tools/call",
                "≤ 100 %",
                f"{ratio:.0%}",
                ratio <= 1.0,
            )
        )
    return found


def delay_added_p99(delay: dict[str, Any], name: str, key: str = "round_p99_ms") -> float:
    """The p99 event delay a path adds to direct's: the median over rounds of each, then the difference, so that a
    burst of other work on the machine during one round of either path does not decide it."""
    return statistics.median(delay[name][key]) - statistics.median(delay["direct"][key])


def summary(results: dict[str, Any]) -> str:
    lines = ["", "Targets:"]
    for name, goal, measured, met in targets(results):
        lines.append(f"  {'MET   ' if met else 'MISSED'} {name}: {measured} (goal {goal})")
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    machine, options = results["machine"], results["options"]
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run`, see `bench/harness.py`); rerun it to refresh this page. Every process "
        "runs on 127.0.0.1 of one machine, side by side in the same run; wrk runs alternate between targets, and "
        "each figure is the median over the rounds, so that ratios hold on a noisy machine. Benchmarks never fail "
        "a build: they measure. The analysis at the end is written by hand (`bench/analysis.md`).",
        "",
    ]
    out += ["## Machine and versions", ""]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    out += _table(
        ["", ""],
        [
            ["date", machine["date"]],
            ["CPUs", f"{machine['cpus']} ({machine['cpu_model']})"],
            ["kernel", machine["kernel"]],
            ["Python", machine["python"]],
            ["Python packages", packages],
            ["nginx", machine["nginx"]],
            ["wrk", machine["wrk"]],
            ["node / oidc-provider", f"{machine['node']} / {machine['oidc_provider']}"],
            ["revision", f"`{machine['revision']}`"],
            [
                "settings",
                f"{options['workers']} gunicorn worker(s) for floor and proxy in the wrk runs; "
                f"{options['rounds']} rounds x {options['seconds']} s per wrk figure; wrk with 1 thread; floor and "
                "proxy with `PYTHONMALLOC=malloc`, as the Dockerfile and Procfile run the proxy",
            ],
        ],
    )
    found = targets(results)
    if found:
        out += ["## Targets", ""]
        out += _table(
            ["target", "goal", "measured", "met"],
            [[name, goal, measured, "yes" if met else "**no**"] for name, goal, measured, met in found],
        )
    out += _throughput(results)
    out += _profile(results)
    out += _token(results)
    out += _streams(results)
    out += _delay(results)
    out += _mcp(results)
    out += _mcp_load(results)
    out += _policy(results)
    out += _audit(results)
    out += _assertion(results)
    if ANALYSIS.exists():
        out += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(out)


def _throughput(results: dict[str, Any]) -> list[str]:
    throughput = results.get("throughput")
    if not throughput:
        return []
    out = [
        "## Throughput and latency",
        "",
        "wrk (one thread, `bench/jsonrpc_post.lua`) sends the same authenticated MCP JSON-RPC POST (`tools/list`) "
        "over kept-alive connections. **direct**: nginx answering a fixed JSON-RPC result; **nginx**: the same "
        "through a plain nginx `proxy_pass`; **floor**: through `bench/floor_app.py` (Flask + `requests` "
        "streaming passthrough, gunicorn/gevent, no auth); **proxy**: through oauthproxy (`gunicorn.conf.py`, "
        "real access token, token check, header rules, identity headers, request log and metrics on); "
        "**proxy, token cache off**: the same with `TOKEN_CACHE_TTL=0` (a database query per request). "
        "Server CPU is the user+system time of the target's processes divided by the requests served.",
        "",
    ]
    for connections in (1, 20):
        floor, direct = throughput.get(f"floor|{connections}"), throughput.get(f"direct|{connections}")
        rows = []
        for name in WRK_TARGETS:
            figure = throughput.get(f"{name}|{connections}")
            if not figure:
                continue
            rows.append(
                [
                    name,
                    _num(figure["rps"]),
                    _ms(figure["p50_us"]),
                    _ms(figure["p99_us"]),
                    _num(figure["cpu_us_per_request"]),
                    f"{figure['rps'] / floor['rps']:.0%}" if floor else DASH,
                    f"{figure['rps'] / direct['rps']:.1%}" if direct else DASH,
                    _ms(figure["p50_us"] - direct["p50_us"]) if direct else DASH,
                    str(figure["errors"]),
                ]
            )
        out += [f"### {connections} connection{'s' if connections > 1 else ''}", ""]
        out += _table(
            [
                "target",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "server CPU µs/request",
                "÷ floor",
                "÷ direct",
                "p50 added over direct, ms",
                "errors",
            ],
            rows,
        )
    return out


def _profile(results: dict[str, Any]) -> list[str]:
    found = results.get("profile")
    if not found or "proxy" not in found:
        return []
    proxy, floor = found["proxy"], found.get("floor")
    out = [
        "## Where the worker's CPU goes (py-spy)",
        "",
        "py-spy (`--nonblocking`, 250 Hz) sampled the one worker of the floor and of the proxy while wrk ran at 20 "
        "connections. Each sample is charged to the innermost frame that belongs to a known library or to one of "
        "our modules (standard-library frames count for their caller, except `logging`, `json` and "
        "`http.client`, which is counted with requests + urllib3). µs/request = share of samples x the worker's "
        "measured CPU per request in that run.",
        "",
    ]

    def per_request(entry: dict[str, Any], component: str) -> float:
        return entry["by_component"].get(component, 0) / max(entry["samples"], 1) * entry["cpu_us_per_request"]

    components = sorted(
        set(proxy["by_component"]) | set(floor["by_component"] if floor else {}), key=lambda c: -per_request(proxy, c)
    )
    rows = []
    for component in components:
        ours = per_request(proxy, component)
        theirs = per_request(floor, component) if floor else float("nan")
        rows.append([f"`{component}`", _num(theirs), _num(ours), _num(ours - theirs) if floor else DASH])
    rows.append(
        [
            "**total**",
            _num(floor["cpu_us_per_request"]) if floor else DASH,
            _num(proxy["cpu_us_per_request"]),
            _num(proxy["cpu_us_per_request"] - floor["cpu_us_per_request"]) if floor else DASH,
        ]
    )
    out += _table(["component", "floor µs/request", "proxy µs/request", "difference"], rows)
    out += ["Proxy worker, innermost frames with the most samples:", ""]
    out += _table(
        ["frame", "share"],
        [[f"`{frame}`", f"{count / proxy['samples']:.1%}"] for frame, count in list(proxy["top_self"].items())[:12]],
    )
    out += ["Our functions, inclusive of everything they call:", ""]
    out += _table(
        ["function", "share", "µs/request"],
        [
            [
                f"`{frame}`",
                f"{count / proxy['samples']:.1%}",
                _num(count / proxy["samples"] * proxy["cpu_us_per_request"]),
            ]
            for frame, count in list(proxy["ours_inclusive"].items())[:12]
        ],
    )
    return out


def _token(results: dict[str, Any]) -> list[str]:
    token = results.get("token")
    if not token:
        return []
    out = [
        "## Token check",
        "",
        f"`load_token` in-process on the proxy's own database ({token['database']}): a cached token, and a miss "
        "(cache entry dropped before each call: one query joining the token and its grant, then the checks). "
        "Queries are counted with an SQLAlchemy `before_cursor_execute` listener around real proxied requests "
        "(the real view, forwarding to the nginx downstream).",
        "",
    ]
    out += _table(
        ["figure", "value"],
        [
            ["cache hit", f"{token['hit_us']:.1f} µs"],
            ["cache miss, p50 / p99", f"{token['miss_p50_us']:.0f} / {token['miss_p99_us']:.0f} µs"],
            ["database queries, first request of a token (miss)", f"{token['queries_first_request']}"],
            ["database queries per proxied request, cached token", f"{token['queries_per_request_cached']:g}"],
            [
                "database queries per proxied request, `TOKEN_CACHE_TTL=0`",
                f"{token['queries_per_request_cache_off']:g}",
            ],
            *(
                [
                    ["session binding: a known `Mcp-Session-Id` (cache hit)", f"{token['session_hit_us']:.1f} µs"],
                    [
                        "database queries per proxied request with a known `Mcp-Session-Id`",
                        f"{token['queries_per_request_with_session']:g}",
                    ],
                ]
                if "session_hit_us" in token
                else []
            ),
        ],
    )
    throughput = results.get("throughput", {})
    cached, uncached = throughput.get("proxy|1"), throughput.get("proxy, token cache off|1")
    if cached and uncached:
        out += [
            f"Under gunicorn at 1 connection, turning the cache off costs "
            f"{uncached['cpu_us_per_request'] - cached['cpu_us_per_request']:.0f} µs of server CPU and "
            f"{(uncached['p50_us'] - cached['p50_us']) / 1000:.2f} ms of p50 per request.",
            "",
        ]
    return out


def _streams(results: dict[str, Any]) -> list[str]:
    streams = results.get("streams")
    if not streams:
        return []
    out = [
        "## Idle event streams on one worker",
        "",
        "An asyncio client (`bench/sse_client.py`) opens N `GET` event streams (200 at a time) through one gevent "
        "worker to an asyncio downstream (`bench/sse_server.py`) that sends a comment and then nothing; holds them; "
        "samples the worker's resident memory (VmRSS) while all are open; then has the downstream send each stream a "
        "last event and end it, and samples it again 2 s later (*closed*). Memory per stream = (RSS with N open - RSS before) / N, in KB of 1,000 bytes; each "
        "count runs on a freshly started worker. *held*: no stream ended while idle; *downstream*: streams the "
        "downstream still had connected; *last event*: streams that received the final event.",
        "",
    ]
    rows = []
    for key, held in sorted(streams.items(), key=lambda item: (int(item[0].split("|")[1]), item[0])):
        name, count = key.split("|")
        rows.append(
            [
                name,
                f"{int(count):,}",
                f"{held['opened']:,}",
                f"{held['open_after_hold']:,}",
                f"{held['downstream_open']:,}",
                f"{held['released_ok']:,}",
                f"{held['baseline_rss_kib'] / 1024:.1f} → {held['rss_kib'] / 1024:.1f}"
                + (f" → {held['rss_after_close_kib'] / 1024:.1f}" if "rss_after_close_kib" in held else ""),
                f"{held['bytes_per_stream'] / 1000:.1f}",
                f"{held['open_seconds']:.1f}",
                _num(held["open_cpu_us_per_stream"]),
            ]
        )
    out += _table(
        [
            "worker",
            "streams",
            "opened",
            "held",
            "downstream",
            "last event",
            "RSS MiB: idle → open → closed",
            "KB per stream",
            "seconds to open",
            "CPU µs to open one",
        ],
        rows,
    )
    return out


def _delay(results: dict[str, Any]) -> list[str]:
    delay = results.get("delay")
    if not delay:
        return []
    options = results["options"]
    out = [
        "## Event delay",
        "",
        f"{options['delay_streams']} streams at once through one worker, each with an event every "
        f"{options['delay_interval'] * 1000:.0f} ms from the downstream (`/tick`), {options['delay_events']} events "
        f"per stream, {options['delay_rounds']} rounds alternating between the paths. Each event carries the time "
        "the downstream wrote it; delay = arrival at the client - that time (same clock). **Steady**: while all "
        "the streams are open, i.e. without the first and last 3 events of each stream: those wait for the other "
        "streams' requests that the same worker is opening or finishing at that moment (about a millisecond of "
        "CPU each, which the throughput figures measure); **all events** are shown too. Percentiles pool every "
        "round; *added p99* is the median of this path's per-round p99 minus the median of direct's, so that a "
        "burst of other work on the machine during one round does not decide it.",
        "",
    ]
    rows = []
    for name in ("direct", "nginx", "floor", "proxy"):
        figure = delay.get(name)
        if not figure:
            continue
        rounds = " / ".join(f"{value:.2f}" for value in figure["round_p99_ms"])
        rows.append(
            [
                name,
                f"{figure['events']:,} of {figure['expected']:,}",
                f"{figure['p50_ms']:.2f}",
                f"{figure['p99_ms']:.2f}",
                f"{figure['max_ms']:.2f}",
                rounds,
                f"{delay_added_p99(delay, name):.2f}" if "direct" in delay else DASH,
                f"{figure['all_p99_ms']:.2f}",
                f"{figure['all_max_ms']:.2f}",
                f"{delay_added_p99(delay, name, 'round_all_p99_ms'):.2f}" if "direct" in delay else DASH,
            ]
        )
    out += _table(
        [
            "path",
            "events received",
            "steady p50 ms",
            "steady p99 ms",
            "steady max ms",
            "steady p99 per round, ms",
            "steady added p99 ms",
            "all events p99 ms",
            "all events max ms",
            "all events added p99 ms",
        ],
        rows,
    )
    return out


def _mcp(results: dict[str, Any]) -> list[str]:
    found = results.get("mcp")
    if not found:
        return []
    out = [
        "## The real thing: a streamed tools/call",
        "",
        "The MCP Python SDK client (`mcp.Client`, streamable HTTP) calls the `progress` tool of the real MCP server "
        "the tests use (`tests/mcp_downstream.py`, the SDK's server under uvicorn): three progress notifications "
        "streamed as SSE events, then the result; one session per round, calls one after another, four rounds "
        "alternating between direct, through the floor (`bench/floor_app.py`: Flask + `requests` on the same "
        "gunicorn/gevent stack, no auth) and through the proxy (worker count as in the wrk runs, real access token).",
        "",
    ]
    direct = found.get("direct")
    rows = []
    for name in ("direct", "floor", "proxy"):
        figure = found.get(name)
        if not figure:
            continue
        rows.append(
            [
                name,
                str(figure["calls"]),
                f"{figure['call_p50_ms']:.2f}",
                f"{figure['call_p99_ms']:.2f}",
                f"{figure['first_p50_ms']:.2f}",
                f"{figure['first_p99_ms']:.2f}",
                f"{figure['call_p50_ms'] - direct['call_p50_ms']:.2f}" if direct else DASH,
            ]
        )
    out += _table(
        [
            "path",
            "calls",
            "call p50 ms",
            "call p99 ms",
            "first progress p50 ms",
            "first progress p99 ms",
            "p50 added, ms",
        ],
        rows,
    )
    return out


def _mcp_load(results: dict[str, Any]) -> list[str]:
    load = results.get("mcpload")
    if not load:
        return []
    workers = results["options"].get("mcp_workers", 2)
    out = [
        "## The real MCP server under load",
        "",
        f"wrk against the MCP SDK's server under uvicorn ({workers} processes; `bench/mcp_server.py`), directly and "
        f"through the floor (`bench/floor_app.py`, {workers} workers: the same stack with no auth, the cost of Flask "
        f"+ `requests` on gunicorn/gevent on this path) and through the proxy ({workers} gunicorn workers, real access "
        "token). *tools/call*: the `echo` tool on a "
        "stateless server, answered as an event stream. *session set-up*: `initialize`, then "
        "`notifications/initialized` with the session id it gave, then `DELETE` to close it "
        "(`bench/mcp_handshake.lua`), on a one-process stateful server; the proxy records each session (its "
        "binding to the token's user) and forgets it at the DELETE. CPU columns are "
        "user+system time per request of the proxy's (or the floor's) processes and of the MCP server's.",
        "",
    ]
    rows = []
    for key, figure in load.items():
        scenario, name, connections = key.split("|")
        direct = load.get(f"{scenario}|direct|{connections}")
        rows.append(
            [
                scenario,
                name,
                connections,
                _num(figure["rps"]),
                f"{figure['rps'] / direct['rps']:.0%}" if direct and name != "direct" else DASH,
                _ms(figure["p50_us"]),
                _ms(figure["p99_us"]),
                _num(figure["cpu_us_per_request"]) if name != "direct" else DASH,
                _num(figure.get("downstream_cpu_us_per_request", figure["cpu_us_per_request"])),
                str(figure["errors"]),
            ]
        )
    out += _table(
        [
            "scenario",
            "path",
            "connections",
            "req/s",
            "of direct",
            "p50 ms",
            "p99 ms",
            "proxy (floor) CPU µs/req",
            "MCP server CPU µs/req",
            "errors",
        ],
        rows,
    )
    return out


def _audit(results: dict[str, Any]) -> list[str]:
    audit = results.get("audit")
    if not audit:
        return []
    out = [
        "## Audit trail",
        "",
        "wrk against two proxies in front of the fixed-answer nginx, loaded at the same time (one wrk each, so "
        "that whatever disturbs the machine falls on both alike): the audit trail on "
        "(`AUDIT_LOG` a file, and the `audit_events` table) and off (`AUDIT_ENABLED=false`). A `tools/call` is "
        "recorded: its tool name read from the body, one event buffered, written with the others about once a "
        "second by a background greenlet (JSON lines, one batched INSERT). A `tools/list` is not recorded: it pays "
        "one substring search of its body. *CPU added*: proxy CPU µs per request minus the `audit off` proxy's "
        "beside it, the median over rounds of each round's difference (the rounds' differences in brackets). The "
        "control is a second proxy with the trail off: its difference is the noise the trail's figure stands in. "
        f"Tool calls served with the trail on: {_num(audit['tool_calls_served'])}; `tool_call` lines written (warm-up runs included): "
        f"{_num(audit['tool_call_lines'])}.",
        "",
    ]
    in_process = audit.get("in_process")
    if in_process:
        out += [
            f"In-process, best of {in_process['batches']} batches of {_num(in_process['events'])} tool calls: the "
            f"request's hooks {in_process['hooks_us']:.1f} µs per call (the tool name read from the body, the event "
            f"built and buffered), the flush {in_process['flush_us']:.1f} µs per event (its JSON line to a file, its "
            "row in one batched INSERT into SQLite), off the request's path but in the same worker.",
            "",
        ]
    rows = []
    wrk = audit["wrk"]
    added = audit.get("cpu_added", {})
    modes = ("audit off", "audit on", "audit off, control")
    for key in sorted(wrk, key=lambda key: (int(key.split("|")[2]), key.split("|")[1], modes.index(key.split("|")[0]))):
        figure = wrk[key]
        mode, request, connections = key.split("|")
        difference = added.get(key)
        rows.append(
            [
                mode,
                request,
                connections,
                _num(figure["rps"]),
                _ms(figure["p50_us"]),
                _ms(figure["p99_us"]),
                _num(figure["cpu_us_per_request"]),
                f"{_num(difference['median'])} ({', '.join(_num(value) for value in difference['rounds'])})"
                if difference
                else DASH,
                str(figure["errors"]),
            ]
        )
    out += _table(
        ["audit", "request", "connections", "req/s", "p50", "p99", "proxy CPU µs/req", "CPU added", "errors"], rows
    )
    return [*out, ""]


def _policy(results: dict[str, Any]) -> list[str]:
    policy = results.get("policy")
    if not policy:
        return []
    out = [
        "## Tool rules",
        "",
        "wrk against two proxies in front of the fixed-answer nginx (whose `tools/list` answer names one tool, "
        "`echo`), measured alternately: a route without tool rules, and the same route with three rules (an "
        'exception for a group, a deny list with globs naming `echo`, then `allow = ["*"]`). With rules, each '
        "POST body is read whole and parsed before forwarding; a `tools/list` answer is read, parsed and rewritten "
        "without `echo`; an allowed `tools/call` is forwarded, its answer untouched; a denied one (`echo`) is "
        "answered by the proxy with the JSON-RPC error, the downstream never contacted. *of no rules*: requests/s "
        "against the route without rules, same request and connections.",
        "",
    ]
    rows = []
    for key, figure in policy.items():
        route, request, connections = key.split("|")
        method = request.split(" ", 1)[0]
        plain = policy.get(f"no tool rules|{method}|{connections}")
        rows.append(
            [
                route,
                request,
                connections,
                _num(figure["rps"]),
                f"{figure['rps'] / plain['rps']:.0%}" if plain and route != "no tool rules" else DASH,
                _ms(figure["p50_us"]),
                _ms(figure["p99_us"]),
                _num(figure["cpu_us_per_request"]),
                _num(figure["cpu_us_per_request"] - plain["cpu_us_per_request"])
                if plain and route != "no tool rules"
                else DASH,
                str(figure["errors"]),
            ]
        )
    out += _table(
        [
            "route",
            "request",
            "connections",
            "req/s",
            "of no rules",
            "p50 ms",
            "p99 ms",
            "proxy CPU µs/req",
            "CPU added, µs/req",
            "errors",
        ],
        rows,
    )
    return out


def _assertion(results: dict[str, Any]) -> list[str]:
    found = results.get("assertion")
    if not found:
        return []
    workers = results["options"]["workers"]
    out = [
        "## Signed identity assertion",
        "",
        f"One proxy ({workers} gunicorn worker(s)) with two routes to the same nginx downstream: `/mcp` plain and "
        "`/signed` with `identity_assertion = true` (an ES256 JWT in `X-Forwarded-Identity`, reused per grant "
        "and route for 80% of its 5-minute lifetime); wrk alternates between them as in the throughput runs, each "
        "with its own real access token.",
        "",
    ]
    rows = []
    for connections in (1, 20):
        plain = found["wrk"].get(f"no assertion|{connections}")
        for name in ("no assertion", "identity assertion"):
            figure = found["wrk"].get(f"{name}|{connections}")
            if not figure:
                continue
            rows.append(
                [
                    name,
                    str(connections),
                    _num(figure["rps"]),
                    _ms(figure["p50_us"]),
                    _ms(figure["p99_us"]),
                    _num(figure["cpu_us_per_request"]),
                    f"{figure['rps'] / plain['rps']:.0%}" if plain else DASH,
                    str(figure["errors"]),
                ]
            )
    out += _table(
        ["route", "connections", "requests/s", "p50 ms", "p99 ms", "server CPU µs/request", "÷ no assertion", "errors"],
        rows,
    )
    out += _table(
        ["in-process, on the proxy's code", ""],
        [
            ["requests sent with an assertion during the wrk runs", _num(found["requests_with_assertion"])],
            [
                "signatures the proxy made in that time (`oauthproxy_identity_assertions_signed_total`)",
                _num(found["signatures"]),
            ],
            ["ES256 signature", f"{found['sign_ES256_us']:.0f} µs"],
            ["EdDSA (Ed25519) signature", f"{found['sign_EdDSA_us']:.0f} µs"],
            ["an assertion reused from the per-grant cache", f"{found['reuse_us']:.1f} µs"],
            ["header size, ES256 / EdDSA", f"{found['header_ES256_bytes']} / {found['header_EdDSA_bytes']} bytes"],
        ],
    )
    return out
