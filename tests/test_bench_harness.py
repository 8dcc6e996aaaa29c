"""The benchmark harness parses its options, reads py-spy's output and renders its report. The benchmarks themselves
run with `make bench`, never in the suite: they measure, and a number never fails a build."""

from __future__ import annotations

from bench import harness, profile, report


def test_the_options_parse() -> None:
    options = harness.parse_args(["--quick", "--sections", "throughput,delay", "--workers", "2"])
    assert options.sections == ("throughput", "delay")
    assert (options.rounds, options.workers, options.stream_counts) == (1, 2, (100,))
    assert harness.LUA_SCRIPT.is_file()


def test_percentiles_are_observed_values() -> None:
    values = [float(n) for n in range(1, 101)]
    assert (harness.percentile(values, 0.5), harness.percentile(values, 0.99)) == (50.0, 99.0)


def test_samples_are_charged_to_the_innermost_known_component() -> None:
    collapsed = (
        "run (gunicorn/workers/ggevent.py:1);forward (oauthproxy/proxy/streaming.py:2);send (socket.py:3) 3\n"
        "run (gunicorn/workers/ggevent.py:1);urlopen (urllib3/connectionpool.py:4) 1\n"
    )
    parsed = profile.parse_collapsed(collapsed)
    assert parsed.samples == 4
    assert dict(parsed.by_component) == {"oauthproxy/proxy/streaming": 3, "requests + urllib3": 1}
    assert dict(parsed.ours_inclusive) == {"forward (oauthproxy/proxy/streaming.py)": 3}


def test_the_report_names_each_target() -> None:
    def wrk(rps: float, p50: float, p99: float) -> dict:
        return {
            "rps": rps,
            "p50_us": p50,
            "p90_us": p50,
            "p99_us": p99,
            "mean_us": p50,
            "cpu_us_per_request": 1e6 / rps,
            "requests": 100,
            "errors": 0,
            "rounds": [],
        }

    results = {
        "machine": {
            "date": "today",
            "cpus": 2,
            "cpu_model": "cpu",
            "kernel": "k",
            "python": "3.11",
            "packages": {},
            "nginx": "1",
            "wrk": "4",
            "node": "20",
            "oidc_provider": "9",
            "revision": "abc",
        },
        "options": {
            "workers": 1,
            "rounds": 3,
            "seconds": 5,
            "delay_streams": 20,
            "delay_interval": 0.05,
            "delay_events": 100,
            "delay_rounds": 2,
        },
        "throughput": {
            "direct|1": wrk(40_000, 20, 200),
            "floor|1": wrk(1_500, 600, 1_500),
            "proxy|1": wrk(1_400, 650, 1_700),
            "direct|20": wrk(100_000, 100, 1_000),
            "floor|20": wrk(1_600, 12_000, 25_000),
            "proxy|20": wrk(1_300, 14_000, 40_000),
        },
        "streams": {
            "proxy|5000": {
                "opened": 5000,
                "open_after_hold": 5000,
                "downstream_open": 5000,
                "released_ok": 4999,
                "baseline_rss_kib": 90_000,
                "rss_kib": 220_000,
                "rss_after_close_kib": 100_000,
                "bytes_per_stream": 19_000.0,
                "open_seconds": 5.0,
                "open_cpu_us_per_stream": 900,
            }
        },
        "delay": {
            name: {
                "events": 100,
                "expected": 100,
                "p50_ms": p50,
                "p99_ms": p99,
                "max_ms": p99,
                "steady_events": 90,
                "all_p50_ms": p50,
                "all_p99_ms": p99,
                "all_max_ms": p99,
                "round_p99_ms": [p99, p99 + 0.1, 40.0],
                "round_all_p99_ms": [p99, p99, p99],
            }
            for name, p50, p99 in (("direct", 0.1, 0.5), ("proxy", 0.3, 1.5))
        },
        "mcp": {
            "direct": {"calls": 50, "call_p50_ms": 2.0, "call_p99_ms": 4, "first_p50_ms": 1.5, "first_p99_ms": 3},
            "proxy": {"calls": 50, "call_p50_ms": 3.0, "call_p99_ms": 6, "first_p50_ms": 2.7, "first_p99_ms": 5},
        },
        "mcpload": {
            "tools/call|direct|1": wrk(1_000, 800, 2_000),
            "tools/call|proxy|1": {**wrk(750, 1_200, 3_000), "cpu_us_per_request": 650.0},
            "tools/call|direct|20": wrk(1_150, 15_000, 40_000),
            "tools/call|proxy|20": {**wrk(1_000, 18_000, 50_000), "cpu_us_per_request": 680.0},
            "session set-up|direct|20": wrk(2_000, 8_000, 20_000),
            "session set-up|proxy|20": {**wrk(900, 20_000, 60_000), "cpu_us_per_request": 900.0},
        },
        "token": {
            "database": "sqlite",
            "hit_us": 2.0,
            "miss_p50_us": 200,
            "miss_p99_us": 300,
            "queries_first_request": 1,
            "queries_per_request_cached": 0,
            "queries_per_request_cache_off": 1,
        },
    }
    found = {name: met for name, _, _, met in report.targets(results)}
    assert found["throughput vs floor, 1 connection(s)"] is True  # 93 %
    assert found["throughput vs floor, 20 connection(s)"] is False  # 81 %
    assert found["5,000 idle SSE streams on one worker: memory each"] is True  # 19 KB < 20 KB
    assert found["5,000 idle SSE streams on one worker: RSS after they close, over idle RSS"] is False  # 11 %
    assert found["first event of a streamed tools/call: latency added, p50"] is False  # 1.2 ms
    assert found["proxy CPU per tools/call answered as an event stream (20 connections)"] is True  # 0.68 ms
    assert found["tools/call throughput through the proxy vs the MCP server direct, 1 connection(s)"] is True  # 75 %
    assert found["tools/call throughput through the proxy vs the MCP server direct, 20 connection(s)"] is False  # 87 %
    assert found["5,000 idle SSE streams on one worker: none dropped"] is False  # one stream lost its last event
    assert found["database queries per proxied request, cached token"] is True
    assert found["SSE event delay added by the proxy, p99 (steady; all events: 1.00 ms)"] is True
    text = report.render(results)
    assert "## Targets" in text and "## Throughput and latency" in text and "## Event delay" in text
    assert "| proxy | 1,400 |" in text
    assert "## The real MCP server under load" in text and "| tools/call | proxy | 20 | 1,000 | 87% |" in text
    assert (
        found["proxy CPU per session set-up request (initialize, notifications/initialized) vs per tools/call"] is False
    )  # 900 vs 680 µs


def test_the_report_shows_what_tool_rules_cost() -> None:
    def wrk(rps: float, cpu: float) -> dict:
        return {"rps": rps, "p50_us": 700, "p99_us": 2000, "cpu_us_per_request": cpu, "requests": 10, "errors": 0}

    policy = {
        "no tool rules|tools/list|1": wrk(1000, 800),
        "no tool rules|tools/call|1": wrk(1000, 800),
        "tool rules|tools/list (answer filtered)|1": wrk(900, 890),
        "tool rules|tools/call (allowed)|1": wrk(950, 840),
        "tool rules|tools/call (denied, answered by the proxy)|1": wrk(2000, 400),
    }
    lines = report._policy({"policy": policy})
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| tool rules")}
    assert "| 90% |" in rows["tools/list (answer filtered)"] and "| 90 |" in rows["tools/list (answer filtered)"]
    assert "| 95% |" in rows["tools/call (allowed)"] and "| 40 |" in rows["tools/call (allowed)"]
    assert "| 200% |" in rows["tools/call (denied, answered by the proxy)"]
    assert report._policy({}) == []


def test_the_assertion_section_compares_the_two_routes() -> None:
    def wrk(rps: float) -> dict:
        return {"rps": rps, "p50_us": 1_000, "p99_us": 3_000, "cpu_us_per_request": 1e6 / rps, "errors": 0}

    results = {
        "options": {"workers": 1},
        "assertion": {
            "wrk": {
                "no assertion|1": wrk(500),
                "identity assertion|1": wrk(490),
                "no assertion|20": wrk(800),
                "identity assertion|20": wrk(760),
            },
            "requests_with_assertion": 12_345,
            "signatures": 1,
            "sign_ES256_us": 120.4,
            "sign_EdDSA_us": 95.2,
            "reuse_us": 4.7,
            "header_ES256_bytes": 513,
            "header_EdDSA_bytes": 513,
        },
    }
    text = "\n".join(report._assertion(results))
    assert "## Signed identity assertion" in text
    assert "| identity assertion | 20 | 760 | 1.00 | 3.00 | 1,316 | 95% | 0 |" in text
    assert "| signatures the proxy made in that time (`oauthproxy_identity_assertions_signed_total`) | 1 |" in text
    assert harness.parse_args(["--sections", "assertion"]).sections == ("assertion",)


def test_the_report_shows_what_the_audit_trail_costs() -> None:
    def wrk(rps: float, cpu: float) -> dict:
        return {"rps": rps, "p50_us": 700, "p99_us": 2000, "cpu_us_per_request": cpu, "requests": 10, "errors": 0}

    audit = {
        "in_process": {"hooks_us": 5.7, "flush_us": 18.8, "events": 2000, "batches": 7},
        "wrk": {
            "audit on|tools/call|1": wrk(980, 830),
            "audit off|tools/call|1": wrk(1000, 800),
            "audit off, control|tools/call|1": wrk(990, 810),
            "audit off|tools/list|1": wrk(1000, 790),
            "audit on|tools/list|1": wrk(1000, 792),
        },
        "cpu_added": {
            "audit on|tools/call|1": {"median": 30, "rounds": [25, 30, 41]},
            "audit off, control|tools/call|1": {"median": 10, "rounds": [-12, 10, 14]},
            "audit on|tools/list|1": {"median": 2, "rounds": [2]},
        },
        "tool_calls_served": 10,
        "tool_call_lines": 10,
    }
    lines = report._audit({"audit": audit})
    rows = {tuple(line.split(" | ")[:2]): line for line in lines if line.startswith("| audit")}
    assert "| 30 (25, 30, 41) |" in rows[("| audit on", "tools/call")]
    assert "| 10 (-12, 10, 14) |" in rows[("| audit off, control", "tools/call")]
    assert "| 2 (2) |" in rows[("| audit on", "tools/list")] and "| - |" in rows[("| audit off", "tools/call")]
    # Each request's rows in the order off, on, control.
    order = [line.split(" | ")[0] for line in lines if line.startswith("| audit") and "tools/call" in line]
    assert order == ["| audit off", "| audit on", "| audit off, control"]
    assert any("hooks 5.7 µs per call" in line and "flush 18.8 µs per event" in line for line in lines)
    assert report._audit({}) == []
