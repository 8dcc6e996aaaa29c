"""No secret of a whole flow (tokens, codes, verifiers, client and upstream secrets) in any log line, even at DEBUG."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from oauthproxy.components import components
from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db
from tests.bad_input_fixtures import (
    callback_url,
    consent_form,
    get,
    new_client,
)
from tests.conftest import RunningProxy
from tests.flows import query_of

# --- logs ------------------------------------------------------------------------------------------------------------


def full_flow_secrets(proxy: RunningProxy) -> dict[str, str]:
    """A complete flow (consent, upstream login, callback, code, refresh, revoke); every secret it involved."""
    client = new_client(proxy, auth_method="client_secret_post")
    browser = proxy.browser()
    _, form = consent_form(proxy, client, browser)
    url = callback_url(proxy, client, browser)
    back = get(url, browser.session)
    assert back.status_code == 302, back.text[:500]
    code = query_of(back.headers["Location"])["code"]
    first = client.exchange(code)
    assert first.status_code == 200, first.text
    second = client.refresh(first.json()["refresh_token"])
    assert second.status_code == 200, second.text
    assert client.revoke(second.json()["refresh_token"]).status_code == 200
    with proxy.app.app_context():
        row = db.session.scalar(
            select(Token).where(Token.access_token_hash == hash_token(first.json()["access_token"]))
        )
        grant = db.session.get(Grant, row.grant_id)
        box = components(proxy.app).secret_box
        upstream_access = box.decrypt(grant.upstream_access_token, f"grant:{grant.id}:upstream_access_token")
        upstream_refresh = box.decrypt(grant.upstream_refresh_token, f"grant:{grant.id}:upstream_refresh_token")
    return {
        "access token": first.json()["access_token"],
        "refresh token": first.json()["refresh_token"],
        "rotated access token": second.json()["access_token"],
        "rotated refresh token": second.json()["refresh_token"],
        "authorization code": code,
        "PKCE code_verifier": client.verifier,
        "client secret": client.client_secret,
        "CSRF token": form["csrf_token"],
        "upstream access token": upstream_access,
        "upstream refresh token": upstream_refresh,
        "upstream authorization code": query_of(url)["code"],
    }


def leaks(records: list[logging.LogRecord], secrets_by_name: dict[str, str]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    found = []
    for record in records:
        line = formatter.format(record)
        found += [
            f"{name} in {record.name} {record.levelname}: {line[:200]!r}"
            for name, value in secrets_by_name.items()
            if value and value in line
        ]
    return found


# Loggers whose level the migrations' alembic.ini sets (fileConfig) in whatever process ran them; a server
# started by `make run` (migrations in their own process) has them unset, inheriting the root level.
MIGRATION_CONFIGURED_LOGGERS = ("sqlalchemy.engine", "alembic", "flask_migrate")


@pytest.fixture
def every_logger_at_debug(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The root logger at DEBUG (an operator debugging the proxy) with every logger enabled; restored afterwards.

    Alembic's `fileConfig` (run by the migrations in this process) disables every logger that existed at that
    moment and pins the levels above; without undoing that, records from oauthproxy.* and authlib would silently
    go missing. Levels the application sets on purpose are left alone.
    """
    saved = []
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            saved.append((logger, logger.disabled, logger.level))
            logger.disabled = False
            if logger.name in MIGRATION_CONFIGURED_LOGGERS:
                logger.setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for logger, disabled, level in saved:
        logger.disabled, logger.level = disabled, level


def test_no_secret_in_application_logs(proxy: RunningProxy, every_logger_at_debug: pytest.LogCaptureFixture) -> None:
    """Everything the proxy's threads log at DEBUG (oauthproxy, authlib, SQLAlchemy statements and parameters,
    urllib3 calls to the provider), except the access log, which the next test covers. The test's own thread is
    left out: its requests/urllib3 lines are the test client's, not the proxy's."""
    test_thread = threading.get_ident()
    found = full_flow_secrets(proxy)
    records = [r for r in every_logger_at_debug.records if r.thread != test_thread and r.name != "werkzeug"]
    assert records, "no log records captured from the proxy"
    leaked = leaks(records, found)
    assert not leaked, "\n".join(leaked)


def test_no_secret_in_access_log(proxy: RunningProxy, every_logger_at_debug: pytest.LogCaptureFixture) -> None:
    """The request log of `flask --app wsgi run` (werkzeug; its line shows the query string, like gunicorn's
    default access-log format). The upstream provider's code arrives at /callback in the query."""
    test_thread = threading.get_ident()
    found = full_flow_secrets(proxy)
    records = [r for r in every_logger_at_debug.records if r.thread != test_thread and r.name == "werkzeug"]
    assert any("/callback" in r.getMessage() for r in records), "werkzeug request log not captured"
    leaked = leaks(records, found)
    assert not leaked, "\n".join(leaked)
