"""What a provider says about the user is stored cleaned and within its columns, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import secrets

from sqlalchemy import select

from oauthproxy.models import Grant, db
from tests.conftest import RunningProxy


def sign_in(proxy: RunningProxy, login: str) -> dict[str, str]:
    client = proxy.register_client()
    return client.login(proxy.browser(login))


def stored_grant(proxy: RunningProxy, subject: str) -> Grant:
    with proxy.app.app_context():
        grant = db.session.scalars(select(Grant).where(Grant.user_id == subject)).one()
        db.session.expunge(grant)
        return grant


def test_a_long_display_name_with_nul_is_stored_cleaned(proxy: RunningProxy) -> None:
    login = f"long-{secrets.token_hex(4)}"
    name = "Ada \x00Lovelace\x07 " + "é" * 300 + "\ud800"
    proxy.provider.add_user(login, f"{login}@example.com", name)
    result = sign_in(proxy, login)
    assert "code" in result, result  # before: PostgreSQL refused the row and /callback answered 500
    grant = stored_grant(proxy, login)
    assert grant.user_name == ("Ada Lovelace " + "é" * 300)[:255]
    assert grant.user_email == f"{login}@example.com"


def test_an_email_that_does_not_fit_is_dropped_not_cut(proxy: RunningProxy) -> None:
    login = f"mail-{secrets.token_hex(4)}"
    proxy.provider.add_user(login, "x" * 320 + "@example.com", "Long Mail")
    result = sign_in(proxy, login)
    assert "code" in result, result
    grant = stored_grant(proxy, login)
    assert grant.user_email is None and grant.user_name == "Long Mail"


def test_an_email_with_control_characters_is_dropped(proxy: RunningProxy) -> None:
    login = f"ctl-{secrets.token_hex(4)}"
    proxy.provider.add_user(login, "eve@example.com\x00@evil.example", "Eve")
    result = sign_in(proxy, login)
    assert "code" in result, result
    assert stored_grant(proxy, login).user_email is None


def test_a_subject_that_does_not_fit_ends_the_sign_in_cleanly(proxy: RunningProxy) -> None:
    login = "s" * 300
    proxy.provider.add_user(login, "long-subject@example.com", "Long Subject")
    result = sign_in(proxy, login)
    assert result.get("error") == "server_error", result
    assert "user id" in result.get("error_description", "")
    with proxy.app.app_context():
        assert db.session.scalars(select(Grant).where(Grant.user_email == "long-subject@example.com")).all() == []
