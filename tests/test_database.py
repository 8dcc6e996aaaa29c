"""Database maintenance: migrations under concurrent start-up, purging expired rows, re-encrypting under a new key."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, inspect, select, update

from oauthproxy import create_app
from oauthproxy.components import components
from oauthproxy.database import purge_expired, rotate_encryption_key, schema_is_current
from oauthproxy.models import AuthorizationCode, Grant, OAuthClient, PendingAuthorization, Token, db, utcnow
from tests.conftest import POSTGRES_DSN, RunningProxy
from tests.support.settings import TEST_KEY, base_env

ROOT = Path(__file__).resolve().parent.parent


def count(model) -> int:
    return db.session.scalar(select(func.count()).select_from(model))


def test_concurrent_migrations_on_a_fresh_postgres_database(oidc_provider) -> None:
    """Four instances starting at once each run `oauthproxy db upgrade`; all succeed and the schema is current."""
    name = f"oauthproxy_migrate_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = POSTGRES_DSN.rsplit("/", 1)[0] + "/" + name
        env = {
            "PATH": os.environ["PATH"],
            **base_env(8080, oidc_provider, dsn, "c"),
            "OAUTHPROXY_ENV_FILE": "/nonexistent.env",
        }
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "oauthproxy.cli", "db", "upgrade"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [process.communicate(timeout=120)[0] for process in processes]
        assert [process.returncode for process in processes] == [0, 0, 0, 0], outputs
        assert sum("Running upgrade  -> " in output for output in outputs) == 1, outputs
        app = create_app(base_env(8080, oidc_provider, dsn, "c"))
        with app.app_context():
            assert schema_is_current(app)
            assert {"oauth_clients", "grants", "tokens", "authorization_codes"} <= set(
                inspect(db.engine).get_table_names()
            )
            db.engine.dispose()
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_purge_removes_expired_rows_and_keeps_live_ones(proxy: RunningProxy) -> None:
    client = proxy.register_client()
    live = client.exchange(client.login(proxy.browser())["code"]).json()
    stale_client = proxy.register_client(client_name="Stale")
    stale_tokens = stale_client.exchange(stale_client.login(proxy.browser())["code"]).json()
    abandoned = proxy.register_client(client_name="Abandoned")
    proxy.browser().session.get(client.authorize_url(), timeout=10)
    long_ago = utcnow() - timedelta(days=400)
    with proxy.app.app_context():
        db.session.execute(
            update(Token)
            .where(Token.client_id == stale_client.client_id)
            .values(access_expires_at=long_ago, refresh_expires_at=long_ago)
        )
        db.session.execute(update(Grant).where(Grant.client_id == stale_client.client_id).values(created_at=long_ago))
        db.session.execute(update(AuthorizationCode).values(expires_at=long_ago))
        db.session.execute(
            update(OAuthClient).where(OAuthClient.client_id == abandoned.client_id).values(last_used_at=long_ago)
        )
        db.session.add(
            PendingAuthorization(
                state_hash="x" * 64,
                browser_binding_hash="y",
                client_id="c",
                request_json="{}",
                upstream_secrets="v1",
                expires_at=long_ago,
            )
        )
        db.session.commit()
        report = purge_expired()
        assert report.tokens >= 1 and report.authorization_codes >= 2 and report.pending_authorizations >= 1
        assert report.clients >= 1
        assert db.session.get(OAuthClient, abandoned.client_id) is None
        assert db.session.get(OAuthClient, client.client_id) is not None
        assert (
            db.session.scalar(select(func.count()).select_from(Grant).where(Grant.client_id == stale_client.client_id))
            == 0
        )
    # what is live still works
    assert client.refresh(live["refresh_token"]).status_code == 200
    assert stale_client.refresh(stale_tokens["refresh_token"]).status_code == 400


def test_rotate_key_re_encrypts_everything(start_proxy) -> None:
    old_key = TEST_KEY
    proxy = start_proxy()
    confidential = proxy.register_client(auth_method="client_secret_basic")
    tokens = confidential.exchange(confidential.login(proxy.browser())["code"]).json()
    new_key = base64.b64encode(os.urandom(32)).decode()
    rotated = start_proxy(ENCRYPTION_KEY=f"{new_key},{old_key}")
    rotated_client = type(confidential)(
        rotated.url,
        confidential.client_id,
        confidential.client_secret,
        confidential.auth_method,
        confidential.redirect_uri,
    )
    with rotated.app.app_context():
        changed = rotate_encryption_key()
        assert changed >= 3  # the client secret and both upstream tokens
        assert rotate_encryption_key() == 0
    # only the new key now: everything still opens, and the client still authenticates
    only_new = start_proxy(ENCRYPTION_KEY=new_key)
    with only_new.app.app_context():
        box = components(only_new.app).secret_box
        for grant in db.session.scalars(select(Grant).where(Grant.client_id == confidential.client_id)):
            assert box.decrypt(grant.upstream_access_token, f"grant:{grant.id}:upstream_access_token")
    only_new_client = type(confidential)(
        only_new.url,
        confidential.client_id,
        confidential.client_secret,
        confidential.auth_method,
        confidential.redirect_uri,
    )
    assert only_new_client.refresh(tokens["refresh_token"]).status_code == 200
    assert rotated_client.client_id == confidential.client_id
    # and back, so the shared test database is under the suite's key again
    back = start_proxy(ENCRYPTION_KEY=f"{old_key},{new_key}")
    with back.app.app_context():
        assert rotate_encryption_key() >= 3


def test_rotate_key_without_the_old_key_explains_itself(start_proxy) -> None:
    proxy = start_proxy()
    proxy.register_client(auth_method="client_secret_post")
    wrong = start_proxy(ENCRYPTION_KEY=base64.b64encode(os.urandom(32)).decode())
    result = wrong.app.test_cli_runner().invoke(args=["rotate-key"])
    assert result.exit_code == 1
    assert "list the old key after the new one in ENCRYPTION_KEY" in result.output


@pytest.mark.parametrize("command", [["purge"], ["rotate-key"], ["db", "upgrade"]])
def test_cli_commands_run(proxy: RunningProxy, command: list[str]) -> None:
    runner = proxy.app.test_cli_runner()
    result = runner.invoke(args=command)
    assert result.exit_code == 0, result.output
