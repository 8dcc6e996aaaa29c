"""Rate limits: one budget per instance whatever WEB_CONCURRENCY is; their headers only where a limit applies."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from oauthproxy.config import ConfigError, load_settings
from oauthproxy.rate_limits import SqliteCounterStorage
from tests.conftest import RunningProxy
from tests.proxy_fixtures import GunicornProxy
from tests.test_authorization_flow import assert_token_response
from tests.test_config import GOOD

REGISTRATION = {
    "redirect_uris": ["http://127.0.0.1:9/cb"],
    "token_endpoint_auth_method": "none",
    "client_name": "Rate Limit Test",
}


def register_many(url: str, count: int) -> list[int]:
    """`count` registrations at once, each on its own connection, so that every worker gets some."""
    barrier = threading.Barrier(count)

    def register(_: int) -> int:
        barrier.wait(timeout=30)
        with requests.Session() as session:
            return session.post(url + "/register", json=REGISTRATION, timeout=30).status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(register, range(count)))


def test_the_workers_of_one_instance_share_one_budget(start_gunicorn: Callable[..., GunicornProxy]) -> None:
    proxy = start_gunicorn(workers=3, REGISTER_RATE_LIMIT="5 per minute")
    statuses = register_many(proxy.url, 40)
    assert sorted(set(statuses)) == [201, 429], statuses
    assert statuses.count(201) == 5, statuses  # not 5 per worker


def test_rate_limit_headers_only_where_a_limit_applies(proxy: RunningProxy) -> None:
    client = proxy.register_client()
    tokens = assert_token_response(client.exchange(client.login(proxy.browser())["code"]))
    refreshed = client.refresh(tokens["refresh_token"])
    assert refreshed.status_code == 200
    assert "Retry-After" not in refreshed.headers  # a success has nothing to wait for
    assert int(refreshed.headers["X-RateLimit-Limit"]) == 120 and "X-RateLimit-Remaining" in refreshed.headers
    for path in ("/.well-known/oauth-authorization-server", "/healthz", "/mcp"):
        answer = requests.get(proxy.url + path, timeout=5)
        assert not any(name.startswith(("X-RateLimit", "Retry-After")) for name in answer.headers), (
            path,
            answer.headers,
        )


def test_retry_after_comes_with_the_429(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(TOKEN_RATE_LIMIT="2 per minute")
    answers = [
        requests.post(
            proxy.url + "/token",
            data={"grant_type": "refresh_token", "refresh_token": "x", "client_id": "unknown"},
            timeout=5,
        )
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [401, 401, 429]
    assert not any("Retry-After" in a.headers for a in answers[:2])
    assert 0 < int(answers[2].headers["Retry-After"]) <= 61
    assert answers[2].headers["X-RateLimit-Remaining"] == "0"


def test_counter_storage_counts_windows(tmp_path) -> None:
    storage = SqliteCounterStorage(f"sqlite:///{tmp_path}/counters.sqlite3")
    other = SqliteCounterStorage(f"sqlite:///{tmp_path}/counters.sqlite3")  # another process's connection
    assert [storage.incr("k", 60) for _ in range(3)] == [1, 2, 3]
    assert other.incr("k", 60) == 4 and storage.get("k") == 4
    assert storage.incr("short", 0) == 1 and storage.get("short") == 0  # an ended window starts again
    assert storage.incr("short", 60) == 1
    assert storage.get_expiry("k") > storage.get_expiry("missing") - 1
    storage.clear("k")
    assert other.get("k") == 0 and storage.check()
    with pytest.raises(ValueError, match="names a file"):
        SqliteCounterStorage("sqlite:///")


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite://host/x", "sqlite:////tmp/"])
def test_a_counters_uri_without_a_file_is_a_configuration_error(uri: str) -> None:
    with pytest.raises(ConfigError, match="RATE_LIMIT_STORAGE_URI as sqlite names a file"):
        load_settings({**GOOD, "RATE_LIMIT_STORAGE_URI": uri})


def test_a_broken_counters_file_keeps_limiting_in_memory_and_says_so_once(
    start_proxy: Callable[..., RunningProxy], tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    counters = tmp_path / "counters.db"
    counters.write_bytes(b"this is not an SQLite database" * 200)  # every statement fails: "file is not a database"
    proxy = start_proxy(RATE_LIMIT_STORAGE_URI=f"sqlite:///{counters}", REGISTER_RATE_LIMIT="3 per minute")
    statuses = [requests.post(proxy.url + "/register", json=REGISTRATION, timeout=10).status_code for _ in range(5)]
    # The limit still holds (in this process's memory) rather than failing open or failing every request.
    assert statuses == [201, 201, 201, 429, 429], statuses
    limiter_records = [record for record in caplog.records if record.name == "flask-limiter"]
    assert len(limiter_records) == 1 and "falling back to in-memory" in limiter_records[0].getMessage()
    assert not any(record.exc_info for record in caplog.records), "no traceback per request"
