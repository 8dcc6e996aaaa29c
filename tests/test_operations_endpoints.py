"""/healthz, /readyz, /metrics, request ids and log lines, trusted forwarded headers: in-process, no network."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy import text

from oauthproxy import create_app, metrics
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.database import upgrade_database
from oauthproxy.logs import ACCESS_LOGGER, JsonFormatter
from oauthproxy.models import db
from oauthproxy.providers import ProviderError
from tests.support.settings import TEST_KEY

ENV = {
    "OAUTH_CLIENT_ID": "ops-client",
    "OAUTH_CLIENT_SECRET": "ops-secret",
    "OAUTH_AUTHORIZE_URL": "http://127.0.0.1:9",  # never contacted by these tests
    "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
    "ENCRYPTION_KEY": TEST_KEY,
    "SCOPES_SUPPORTED": "openid,email,profile",
    "PUBLIC_URL": "http://127.0.0.1:8080",
}
METRICS_TOKEN = "m" * 24


class ClosingClient(FlaskClient):
    """Closes each response as a WSGI server does, so the request's log line and metrics are written."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied for each app: migrating inside a test would run alembic's logging set-up
    (fileConfig), which replaces the handlers that capture the log lines under test."""
    path = tmp_path_factory.mktemp("ops-template") / "template.sqlite3"
    app = create_app({**ENV, "DATABASE_DSN": f"sqlite:///{path}"})
    upgrade_database(app)
    with app.app_context():
        db.engine.dispose()
    return path


@pytest.fixture
def make_app(tmp_path: Path, migrated_template: Path) -> Callable[..., Flask]:
    apps: list[Flask] = []

    def make(migrate: bool = True, **overrides: str) -> Flask:
        path = tmp_path / f"ops-{len(apps)}.sqlite3"
        if migrate:
            shutil.copyfile(migrated_template, path)
        app = create_app({**ENV, "DATABASE_DSN": f"sqlite:///{path}", **overrides})
        app.test_client_class = ClosingClient
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            db.engine.dispose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS_LOGGER]


# -- health -----------------------------------------------------------------------------------------


def test_healthz_answers_without_the_database_and_readyz_says_it_is_unreachable(make_app) -> None:
    app = make_app(migrate=False, DATABASE_DSN="postgresql://nobody@127.0.0.1:9/none")
    client = app.test_client()
    health = client.get("/healthz")
    assert (health.status_code, health.text, health.headers["Cache-Control"]) == (200, "ok\n", "no-store")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json == {"status": "unavailable", "database": "unreachable"}


def test_readyz_follows_the_schema(make_app) -> None:
    app = make_app(migrate=False)
    client = app.test_client()
    never_migrated = client.get("/readyz")
    assert never_migrated.status_code == 503 and "oauthproxy db upgrade" in never_migrated.json["database"]
    upgrade_database(app)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["database"] == "ok" and ready.json["status"] == "ok"
    with app.app_context(), db.engine.begin() as connection:
        # A newer release migrated already (rolling upgrade): the old code keeps serving until replaced.
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed0000'"))
    newer = client.get("/readyz")
    assert newer.status_code == 200 and "newer schema" in newer.json["database"]
    with app.app_context(), db.engine.begin() as connection:
        connection.execute(text("DELETE FROM alembic_version"))
    assert client.get("/readyz").status_code == 503


def test_probes_need_no_token_are_not_rate_limited_and_stay_out_of_the_log(
    make_app, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        REGISTER_RATE_LIMIT="1 per minute", AUTHORIZE_RATE_LIMIT="1 per minute", TOKEN_RATE_LIMIT="1 per minute"
    )
    client = app.test_client()
    caplog.set_level(logging.INFO)
    answers = [client.get(path) for path in ["/healthz", "/readyz"] * 15]
    assert {answer.status_code for answer in answers} == {200}
    assert not any("X-RateLimit-Limit" in answer.headers for answer in answers)
    assert access_lines(caplog) == []  # probes every few seconds would drown the log; failures are logged


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template_status_and_error(make_app) -> None:
    app = make_app()
    client = app.test_client()
    before = {
        "mcp_401": sample("oauthproxy_http_requests_total", route="/mcp", method="POST", status="401"),
        "sub_401": sample("oauthproxy_http_requests_total", route="/mcp/<below:subpath>", method="GET", status="401"),
        "unmatched": sample("oauthproxy_http_requests_total", route="unmatched", method="GET", status="404"),
        "unauthorized": sample("oauthproxy_http_errors_total", route="/mcp", error="unauthorized"),
        "invalid_redirect": sample("oauthproxy_http_errors_total", route="/register", error="invalid_redirect_uri"),
        "registrations": sample("oauthproxy_client_registrations_total"),
        "latency": sample("oauthproxy_http_request_duration_seconds_count", route="/mcp", method="POST"),
        "brew": sample("oauthproxy_http_requests_total", route="unmatched", method="other", status="405"),
    }
    client.open("/healthz", method="BREW")  # any token is a method; the label set stays bounded
    client.post("/mcp", json={})
    client.get("/mcp/a/b/c")
    client.get("/no/such/page")
    client.post("/register", json={"redirect_uris": "not a list"})
    created = client.post(
        "/register", json={"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none"}
    )
    assert created.status_code == 201
    assert sample("oauthproxy_http_requests_total", route="/mcp", method="POST", status="401") == before["mcp_401"] + 1
    # The template, not the path: clients cannot grow the number of series.
    assert (
        sample("oauthproxy_http_requests_total", route="/mcp/<below:subpath>", method="GET", status="401")
        == before["sub_401"] + 1
    )
    assert (
        sample("oauthproxy_http_requests_total", route="unmatched", method="GET", status="404")
        == before["unmatched"] + 1
    )
    assert sample("oauthproxy_http_errors_total", route="/mcp", error="unauthorized") == before["unauthorized"] + 1
    assert (
        sample("oauthproxy_http_errors_total", route="/register", error="invalid_redirect_uri")
        == before["invalid_redirect"] + 1
    )
    assert sample("oauthproxy_client_registrations_total") == before["registrations"] + 1
    assert (
        sample("oauthproxy_http_request_duration_seconds_count", route="/mcp", method="POST") == before["latency"] + 1
    )
    assert (
        sample("oauthproxy_http_requests_total", route="unmatched", method="other", status="405") == before["brew"] + 1
    )
    page = client.get("/metrics")
    assert page.status_code == 200 and page.content_type.startswith("text/plain")
    for name in (
        "oauthproxy_http_requests_total",
        "oauthproxy_http_request_duration_seconds_bucket",
        "oauthproxy_open_streams",
        "oauthproxy_tokens_issued_total",
        "oauthproxy_upstream_errors_total",
        "oauthproxy_client_registrations_total",
        "oauthproxy_grants_revoked_total",
    ):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in page.text, name


def test_an_unknown_error_code_is_counted_as_other() -> None:
    assert metrics.error_label("invalid_grant") == "invalid_grant"
    assert metrics.error_label("made-up-by-a-client") == "other"
    assert metrics.error_label(["not", "a", "string"]) == "other"


def test_metrics_can_require_a_token(make_app) -> None:
    client = make_app(METRICS_TOKEN=METRICS_TOKEN).test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200
    basic = base64.b64encode(f"prometheus:{METRICS_TOKEN}".encode()).decode()
    assert client.get("/metrics", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/healthz").status_code == 200  # the probes stay open


def test_provider_calls_are_timed_and_their_failures_counted_by_kind() -> None:
    class Provider:
        def _call(self, description, url, func):
            return func()

        def _fetch_metadata(self, url):
            raise ProviderError("transient", "could not reach the identity provider")

    provider = Provider()
    metrics.instrument_provider(provider)
    before = (
        sample("oauthproxy_upstream_request_duration_seconds_count", action="refresh"),
        sample("oauthproxy_upstream_errors_total", action="discovery", kind="transient"),
    )
    assert provider._call("refreshing the upstream token", "https://idp/token", lambda: "tokens") == "tokens"
    with pytest.raises(ProviderError):
        provider._fetch_metadata("https://idp/.well-known/openid-configuration")
    assert sample("oauthproxy_upstream_request_duration_seconds_count", action="refresh") == before[0] + 1
    assert sample("oauthproxy_upstream_errors_total", action="discovery", kind="transient") == before[1] + 1
    assert metrics.provider_action("exchanging the authorization code") == "code_exchange"
    assert metrics.provider_action("fetching the user's profile") == "userinfo"


def test_an_event_stream_counts_as_open_until_closed() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self):
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"

        def close(self) -> None:
            closed.append(True)

    before = sample("oauthproxy_stream_duration_seconds_count", route="/test-stream")
    counted = metrics.StreamCounter(Body(), "/test-stream")
    chunks = iter(counted)
    next(chunks)
    assert sample("oauthproxy_open_streams", route="/test-stream") == 1
    counted.close()
    counted.close()
    assert closed == [True]  # the body's own close (ending the downstream request) ran, once
    assert sample("oauthproxy_open_streams", route="/test-stream") == 0
    assert sample("oauthproxy_stream_duration_seconds_count", route="/test-stream") == before + 1


# -- request ids and log lines -----------------------------------------------------------------------------


def test_every_answer_carries_a_request_id_and_a_sane_incoming_one_is_kept(make_app) -> None:
    client = make_app().test_client()
    generated = client.get("/healthz").headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert (
        client.get("/healthz", headers={"X-Request-Id": "nginx-42:abc.DEF"}).headers["X-Request-Id"]
        == "nginx-42:abc.DEF"
    )
    for forged in ("two words", "x" * 200, "id\u2028evil"):
        kept = client.get("/healthz", headers={"X-Request-Id": forged}).headers["X-Request-Id"]
        assert kept != forged and re.fullmatch(r"[0-9a-f]{32}", kept)


def test_one_line_per_request_and_never_a_secret(make_app, caplog: pytest.LogCaptureFixture) -> None:
    client = make_app().test_client()
    caplog.set_level(logging.DEBUG)
    secrets_sent = ["the-code-1234", "the-state-5678", "bearer-token-9999", "cookie-value-0000", "client-secret-777"]
    client.set_cookie("oauthproxy-session", secrets_sent[3])
    client.get(f"/callback?code={secrets_sent[0]}&state={secrets_sent[1]}", headers={"X-Request-Id": "req-1"})
    client.post("/mcp?x=1", json={}, headers={"Authorization": f"Bearer {secrets_sent[2]}", "X-Request-Id": "req-2"})
    client.post(
        "/token",
        data={"grant_type": "client_credentials", "client_id": "nobody", "client_secret": secrets_sent[4]},
        headers={"X-Request-Id": "req-3"},
    )
    lines = {record.request_id: record for record in access_lines(caplog)}
    assert set(lines) == {"req-1", "req-2", "req-3"}
    assert (lines["req-1"].method, lines["req-1"].path, lines["req-1"].status) == ("GET", "/callback", 400)
    assert (lines["req-2"].path, lines["req-2"].status) == ("/mcp", 401)  # the path without its query
    assert lines["req-3"].user_id == "-" and lines["req-3"].duration_ms >= 0
    everything = "\n".join(record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records)
    for secret in secrets_sent:
        assert secret not in everything, secret


def test_json_lines_carry_the_request_fields(make_app, caplog: pytest.LogCaptureFixture) -> None:
    client = make_app().test_client()
    caplog.set_level(logging.INFO)
    client.get("/no/such/page", headers={"X-Request-Id": "json-1"})
    record = next(record for record in access_lines(caplog) if record.request_id == "json-1")
    document = json.loads(JsonFormatter().format(record))
    assert document["level"] == "info" and document["logger"] == ACCESS_LOGGER
    assert {key: document[key] for key in ("request_id", "method", "path", "status", "client")} == {
        "request_id": "json-1",
        "method": "GET",
        "path": "/no/such/page",
        "status": 404,
        "client": "127.0.0.1",
    }
    assert "user_id" not in document  # nobody was signed in
    assert document["time"].endswith("Z")


# -- forwarded headers -------------------------------------------------------------------------------------


FORWARDED = {
    "X-Forwarded-For": "198.51.100.1, 203.0.113.9",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "attacker.example",
}


@pytest.mark.parametrize(("hops", "client_address"), [("0", "127.0.0.1"), ("1", "203.0.113.9"), ("2", "198.51.100.1")])
def test_forwarded_headers_count_only_as_far_as_the_trusted_hops(
    make_app, caplog: pytest.LogCaptureFixture, hops: str, client_address: str
) -> None:
    client = make_app(TRUSTED_PROXY_HOPS=hops).test_client()
    caplog.set_level(logging.INFO)
    metadata = client.get("/.well-known/oauth-authorization-server", headers={**FORWARDED, "X-Request-Id": "fwd"})
    # PUBLIC_URL stays the only source of advertised URLs, whatever the headers say.
    assert metadata.json["issuer"] == "http://127.0.0.1:8080"
    assert metadata.json["token_endpoint"] == "http://127.0.0.1:8080/token"
    record = next(record for record in access_lines(caplog) if record.request_id == "fwd")
    assert record.client == client_address


@pytest.mark.parametrize("hops", ["0", "1"])
def test_rate_limits_key_on_the_trusted_client_address(make_app, hops: str) -> None:
    client = make_app(TRUSTED_PROXY_HOPS=hops, REGISTER_RATE_LIMIT="2 per minute").test_client()
    body = {"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none"}

    def register(forwarded_for: str) -> int:
        return client.post("/register", json=body, headers={"X-Forwarded-For": forwarded_for}).status_code

    # A client that makes up X-Forwarded-For gets no fresh allowance when it is not trusted (hops=0); behind one
    # trusted proxy, the address that proxy adds (the last one) is the key.
    answers = [
        register("192.0.2.1, 203.0.113.1"),
        register("192.0.2.2, 203.0.113.1"),
        register("192.0.2.3, 203.0.113.2"),
        register("192.0.2.4, 203.0.113.1"),
    ]
    if hops == "0":
        assert answers == [201, 201, 429, 429]
    else:
        assert answers == [201, 201, 201, 429]


def test_operations_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**ENV, "TRUSTED_PROXY_HOPS": "many", "LOG_FORMAT": "xml", "METRICS_TOKEN": "short"})
    problems = "\n".join(caught.value.problems)
    assert "TRUSTED_PROXY_HOPS must be a whole number" in problems
    assert "LOG_FORMAT must be text or json" in problems
    assert "METRICS_TOKEN must be at least 16 characters" in problems
    for path in ("/healthz", "/readyz", "/metrics"):  # an MCP route there would hide the operations endpoint
        with pytest.raises(ConfigError, match="would shadow"):
            load_settings({**ENV, "MCP_SERVER_URL": f"http://127.0.0.1:9{path}"})
    settings = load_settings({**ENV, "TRUSTED_PROXY_HOPS": "1", "LOG_FORMAT": "JSON"})
    assert (settings.trusted_proxy_hops, settings.log_format, settings.metrics_token) == (1, "json", "")
