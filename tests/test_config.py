"""Start-up configuration: every problem reported at once, with what was expected; the process exits non-zero."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oauthproxy.config import ConfigError, load_server_settings, load_settings, normalise_database_dsn

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "OAUTH_CLIENT_ID": "id",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_AUTHORIZE_URL": "https://accounts.google.com",
    "MCP_SERVER_URL": "http://localhost:9000/mcp/gmail",
    "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
}


def problems_for(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return caught.value.problems


def test_seed_example_with_a_path_is_valid() -> None:
    settings = load_settings(GOOD)
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.mcp_resource == "http://127.0.0.1:8080/mcp/gmail"
    assert settings.issuer == "http://127.0.0.1:8080"
    assert settings.callback_url == "http://127.0.0.1:8080/callback"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert (settings.access_token_ttl, settings.refresh_token_ttl, settings.refresh_grace_seconds) == (
        3600,
        2592000,
        10,
    )


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_for(
        {
            "ENCRYPTION_KEY": base64.b64encode(b"x" * 17).decode(),
            "PORT": "eighty",
            "ACCESS_TOKEN_TTL": "5",
            "HOST": "0.0.0.0",
        }
    )
    text = "\n".join(problems)
    for name in (
        "OAUTH_CLIENT_ID",
        "OAUTH_CLIENT_SECRET",
        "OAUTH_AUTHORIZE_URL",
        "MCP_SERVER_URL",
        "PORT",
        "ACCESS_TOKEN_TTL",
        "PUBLIC_URL",
    ):
        assert name in text, name
    assert "ENCRYPTION_KEY must be base64 of 32 bytes; got 17 bytes; generate one with `oauthproxy gen-key`" in text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"x" * 31).decode(), "got 31 bytes"),
    ],
)
def test_bad_encryption_key(value: str, message: str) -> None:
    assert any(message in p for p in problems_for({**GOOD, "ENCRYPTION_KEY": value}))


def test_several_keys_rotate_first_encrypts() -> None:
    first, second = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    settings = load_settings({**GOOD, "ENCRYPTION_KEY": f"{first},{second}"})
    assert settings.encryption_keys == (base64.b64decode(first), base64.b64decode(second))


def test_public_url_must_be_https_unless_loopback() -> None:
    assert any("must use https" in p for p in problems_for({**GOOD, "PUBLIC_URL": "http://mcp.example.com"}))
    assert load_settings({**GOOD, "PUBLIC_URL": "https://MCP.example.com/"}).issuer == "https://mcp.example.com"


def test_postgres_urls_use_psycopg3() -> None:
    assert normalise_database_dsn("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_database_dsn("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert load_settings({**GOOD, "DATABASE_URL": "postgres://u@h/db"}).database_dsn == "postgresql+psycopg://u@h/db"


def test_allowlist() -> None:
    settings = load_settings({**GOOD, "ALLOWED_EMAILS": "Boss@Other.org", "ALLOWED_EMAIL_DOMAINS": "example.com"})
    assert settings.user_is_allowed("alice@example.com", frozenset())
    assert settings.user_is_allowed("boss@other.org", frozenset())
    assert not settings.user_is_allowed("eve@example.com.evil.test", frozenset())
    assert not settings.user_is_allowed(None, frozenset())
    assert load_settings(GOOD).user_is_allowed(None, frozenset())  # no allowlist: everyone who can log in upstream


def test_server_refuses_to_start_and_lists_problems(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "ENCRYPTION_KEY": "c2hvcnQ=", "OAUTHPROXY_ENV_FILE": str(tmp_path / "none.env")}
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "OAUTH_CLIENT_ID is required" in result.stderr
    assert "ENCRYPTION_KEY must be base64 of 32 bytes; got 5 bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    lines = [f"{k}={v}" for k, v in {**GOOD, "ENCRYPTION_KEY": "c2hvcnQ="}.items()]
    (tmp_path / ".env").write_text("\n".join(lines) + "\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    # The .env was read: the only complaint left is the short key it contains.
    assert result.returncode != 0
    assert "ENCRYPTION_KEY must be base64 of 32 bytes; got 5 bytes" in result.stderr
    assert "OAUTH_CLIENT_ID" not in result.stderr


def test_gen_key_prints_a_valid_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oauthproxy.cli", "gen-key"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode == 0, result.stderr
    assert len(base64.b64decode(result.stdout.strip())) == 32


#: The settings that were constants in code; their defaults are the values those constants had.
LIFETIMES_AND_LIMITS = {
    "AUTHORIZATION_CODE_TTL": ("authorization_code_ttl", 300, 30, 600),
    "UNUSED_CLIENT_TTL": ("unused_client_ttl", 30 * 24 * 3600, 3600, 365 * 24 * 3600),
    "PENDING_LOGIN_TTL": ("pending_login_ttl", 600, 60, 3600),
    "CONSENT_TTL": ("consent_ttl", 365 * 24 * 3600, 60, 400 * 24 * 3600),
    "CONSENT_PAGE_TTL": ("consent_page_ttl", 600, 60, 3600),
    "PROVIDER_HTTP_TIMEOUT": ("provider_http_timeout", 10.0, 1, 120),
    "CLIENT_METADATA_FETCH_TIMEOUT": ("client_metadata_fetch_timeout", 5.0, 0.5, 30),
    "CLIENT_METADATA_MAX_BYTES": ("client_metadata_max_bytes", 5 * 1024, 1024, 1024 * 1024),
    "CLIENT_METADATA_CACHE_SIZE": ("client_metadata_cache_size", 1024, 1, 1_000_000),
    "CLIENT_METADATA_CACHE_TTL": ("client_metadata_cache_ttl", 300, 1, 7 * 24 * 3600),
    "CLIENT_METADATA_MIN_CACHE_TTL": ("client_metadata_min_cache_ttl", 60, 1, 24 * 3600),
    "CLIENT_METADATA_MAX_CACHE_TTL": ("client_metadata_max_cache_ttl", 24 * 3600, 60, 7 * 24 * 3600),
    "CLIENT_METADATA_FAILURE_TTL": ("client_metadata_failure_ttl", 30, 1, 3600),
}


def test_lifetimes_and_limits_default_to_what_the_code_used() -> None:
    from oauthproxy.client_metadata import ClientMetadataFetcher

    settings = load_settings(GOOD)
    for name, (field, default, _, _) in LIFETIMES_AND_LIMITS.items():
        assert getattr(settings, field) == default, name
    fetcher = ClientMetadataFetcher()  # the fetcher's own defaults (tests build it bare) match the settings'
    assert (fetcher.timeout, fetcher.max_bytes, fetcher.max_entries) == (5.0, 5 * 1024, 1024)
    assert (fetcher.default_ttl, fetcher.min_ttl, fetcher.max_ttl, fetcher.failure_ttl) == (300, 60, 24 * 3600, 30)


@pytest.mark.parametrize("name", sorted(LIFETIMES_AND_LIMITS))
def test_lifetimes_and_limits_are_read_and_bounded(name: str) -> None:
    field, default, minimum, maximum = LIFETIMES_AND_LIMITS[name]
    for value in (minimum, maximum):
        assert getattr(load_settings({**GOOD, name: str(value)}), field) == value
    if field == "client_metadata_min_cache_ttl":
        maximum = 24 * 3600  # at most CLIENT_METADATA_MAX_CACHE_TTL's default: tested on its own below
    for bad, expected in (
        ("soon", f"{name} must be a "),
        ("-5", f"{name} must be between {minimum:.15g} and {maximum:.15g}; got -5"),
        (str(maximum * 2), f"{name} must be between {minimum:.15g} and {maximum:.15g}; got {maximum * 2}"),
        ("", None),
    ):
        env = {**GOOD, name: bad}
        if expected is None:
            assert getattr(load_settings(env), field) == default
            continue
        problems = problems_for(env)
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_the_smallest_metadata_cache_time_must_not_exceed_the_largest() -> None:
    env = {**GOOD, "CLIENT_METADATA_MIN_CACHE_TTL": "7200", "CLIENT_METADATA_MAX_CACHE_TTL": "3600"}
    assert problems_for(env) == [
        "CLIENT_METADATA_MIN_CACHE_TTL (7200) must not exceed CLIENT_METADATA_MAX_CACHE_TTL (3600)"
    ]


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS", "CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS"),
        ("DOWNSTREAM_IDENTITY_HEADERS", "MCP_SERVER_URL: identity_headers"),
        ("DOWNSTREAM_FORWARD_ACCESS_TOKEN", "MCP_SERVER_URL: forward_access_token"),
    ],
)
def test_every_boolean_setting_reads_the_same_spellings_and_refuses_the_rest(name: str, where: str) -> None:
    """One parser: a boolean in the environment, in the single-route variables and in a routes file alike."""
    assert problems_for({**GOOD, name: "maybe"}) == [
        f"{where} must be true or false (also accepted: 1/0, yes/no, on/off); got 'maybe'"
    ]
    for word, expected in (("YES", True), ("on", True), ("1", True), ("No", False), ("off", False), ("0", False)):
        settings = load_settings({**GOOD, name: word})
        value = {
            "CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS": settings.allow_private_client_metadata_urls,
            "DOWNSTREAM_IDENTITY_HEADERS": settings.routes[0].identity_headers,
            "DOWNSTREAM_FORWARD_ACCESS_TOKEN": settings.routes[0].forward_access_token,
        }[name]
        assert value is expected, (name, word)


def test_custom_redirect_schemes_take_the_boolean_spellings_or_a_list() -> None:
    assert load_settings({**GOOD, "ALLOW_CUSTOM_REDIRECT_SCHEMES": "Yes"}).private_use_redirect_schemes is None
    assert load_settings({**GOOD, "ALLOW_CUSTOM_REDIRECT_SCHEMES": "off"}).private_use_redirect_schemes == frozenset()
    settings = load_settings({**GOOD, "ALLOW_CUSTOM_REDIRECT_SCHEMES": "cursor, vscode"})
    assert settings.private_use_redirect_schemes == frozenset({"cursor", "vscode"})


def test_server_settings_default_to_what_gunicorn_conf_used() -> None:
    server = load_server_settings({})
    assert (server.host, server.port, server.workers) == ("127.0.0.1", 8080, os.cpu_count() or 1)
    assert (server.worker_connections, server.heartbeat_timeout, server.graceful_timeout, server.keepalive) == (
        10_000,
        60,
        30,
        75,
    )
    assert (server.access_log, server.log_level) == (None, "info")
    assert (server.request_head_timeout, server.request_body_timeout, server.max_waiting_connections) == (10, 30, None)
    assert load_server_settings({"LOG_LEVEL": "WARNING", "MAX_WAITING_CONNECTIONS": "10"}).log_level == "warning"


def test_server_settings_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_server_settings(
            {
                "PORT": "http",
                "WEB_CONCURRENCY": "0",
                "WORKER_CONNECTIONS": "many",
                "KEEPALIVE": "-1",
                "REQUEST_HEAD_TIMEOUT": "0",
                "REQUEST_BODY_TIMEOUT": "slow",
                "MAX_WAITING_CONNECTIONS": "0",
            }
        )
    assert caught.value.problems == [
        "PORT must be a whole number; got 'http'",
        "WEB_CONCURRENCY must be between 1 and 1024; got 0",
        "WORKER_CONNECTIONS must be a whole number; got 'many'",
        "KEEPALIVE must be between 0 and 86400; got -1",
        "REQUEST_HEAD_TIMEOUT must be between 0.1 and 86400; got 0",
        "REQUEST_BODY_TIMEOUT must be a number of seconds; got 'slow'",
        "MAX_WAITING_CONNECTIONS must be between 1 and 1000000; got 0",
    ]


def run_gunicorn(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`gunicorn -c gunicorn.conf.py wsgi:app` as deployed, for settings it refuses before serving anything."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gunicorn_refuses_bad_server_settings_in_plain_words(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "OAUTHPROXY_ENV_FILE": str(tmp_path / "none.env"),
        "WORKER_CONNECTIONS": "many",
        "GRACEFUL_TIMEOUT": "soon",
    }
    result = run_gunicorn(env)
    assert result.returncode == 2, result.stderr
    assert "WORKER_CONNECTIONS must be a whole number; got 'many'" in result.stderr
    assert "GRACEFUL_TIMEOUT must be a number of seconds; got 'soon'" in result.stderr
    assert "Traceback" not in result.stderr


def test_gunicorn_reads_its_settings_from_the_env_file_as_the_app_does(tmp_path: Path) -> None:
    # Before: only create_app read .env, so a PORT set there was advertised by the app but not listened on.
    env_file = tmp_path / "proxy.env"
    env_file.write_text("WORKER_CONNECTIONS=many\n")
    env = {"PATH": os.environ["PATH"], "OAUTHPROXY_ENV_FILE": str(env_file)}
    result = run_gunicorn(env)
    assert result.returncode == 2, result.stderr
    assert "WORKER_CONNECTIONS must be a whole number; got 'many'" in result.stderr
