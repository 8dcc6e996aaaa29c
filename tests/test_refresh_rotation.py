"""Refresh rotation: the grace window gives at most one extra pair, atomically, on the database's one clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy import func, select

from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db
from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient
from tests.test_authorization_flow import assert_token_response


def another_instance(start_proxy: Callable[..., RunningProxy], first: RunningProxy, **env: str) -> RunningProxy:
    """A second instance of the same deployment (PUBLIC_URL, database), listening on its own port."""
    second = start_proxy(PUBLIC_URL=first.url, **env)
    return replace(second, url=f"http://127.0.0.1:{second.server.server_port}")


def logged_in(proxy: RunningProxy) -> tuple[McpOAuthClient, dict]:
    client = proxy.register_client()
    return client, assert_token_response(client.exchange(client.login(proxy.browser())["code"]))


def live_pairs(app: Flask, refresh_token: str) -> int:
    """Token rows of the grant that can still be refreshed (not rotated, not revoked)."""
    with app.app_context():
        grant_id = db.session.scalar(
            select(Token.grant_id).where(Token.refresh_token_hash == hash_token(refresh_token))
        )
        return db.session.scalar(
            select(func.count())
            .select_from(Token)
            .where(Token.grant_id == grant_id, Token.rotated_at.is_(None), Token.revoked_at.is_(None))
        )


def revoked_reason(app: Flask, refresh_token: str) -> str | None:
    with app.app_context():
        row = db.session.scalar(select(Token).where(Token.refresh_token_hash == hash_token(refresh_token)))
        return db.session.get(Grant, row.grant_id).revoked_reason


def test_replays_within_the_grace_window_get_one_pair_between_them(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy()
    client, tokens = logged_in(proxy)
    rotated = assert_token_response(client.refresh(tokens["refresh_token"]))
    replays = [client.refresh(tokens["refresh_token"]) for _ in range(4)]
    assert [r.status_code for r in replays] == [200, 400, 400, 400], [r.text for r in replays]
    assert {r.json()["error"] for r in replays[1:]} == {"invalid_grant"}
    # A retry too many is refused, not punished: both pairs stay usable, nobody is logged out.
    assert revoked_reason(proxy.app, tokens["refresh_token"]) is None
    assert live_pairs(proxy.app, tokens["refresh_token"]) == 2
    assert_token_response(client.refresh(rotated["refresh_token"]))
    assert_token_response(client.refresh(replays[0].json()["refresh_token"]))


def test_a_twenty_way_race_across_two_instances_mints_at_most_two_pairs(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    first = start_proxy()
    second = another_instance(start_proxy, first)
    client, tokens = logged_in(first)
    barrier = threading.Barrier(20)
    statuses: list[int] = []

    def refresh(index: int) -> None:
        barrier.wait(timeout=30)
        instance = (first, second)[index % 2]
        statuses.append(replace(client, proxy_url=instance.url).refresh(tokens["refresh_token"]).status_code)

    threads = [threading.Thread(target=refresh, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(statuses) == 20 and set(statuses) <= {200, 400}, statuses
    assert statuses.count(200) == 2, statuses  # the rotation, and the grace window's one retry
    assert live_pairs(first.app, tokens["refresh_token"]) == 2
    assert revoked_reason(first.app, tokens["refresh_token"]) is None


@pytest.fixture
def skewed_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set the Python clock of the proxy code (its `utcnow`) `seconds` away from the real one.

    Both instances run in this process: the skew is set only while the "skewed instance" handles a request."""
    from oauthproxy import authorization_server, models

    real = models.utcnow

    def skew(seconds: float) -> None:
        def skewed() -> datetime:
            return real() + timedelta(seconds=seconds)

        monkeypatch.setattr(models, "utcnow", skewed)
        monkeypatch.setattr(authorization_server, "utcnow", skewed)

    return skew


def test_a_skewed_instance_honours_an_honest_retry(
    start_proxy: Callable[..., RunningProxy], skewed_clock: Callable[[float], None]
) -> None:
    first = start_proxy()
    ahead = another_instance(start_proxy, first)
    client, tokens = logged_in(first)
    assert_token_response(client.refresh(tokens["refresh_token"]))  # rotated by the first instance
    skewed_clock(30)  # the second instance's clock runs 30 s ahead
    retry = replace(client, proxy_url=ahead.url).refresh(tokens["refresh_token"])  # a second later
    assert retry.status_code == 200, retry.text
    assert revoked_reason(first.app, tokens["refresh_token"]) is None


def test_a_skewed_instance_refuses_a_late_replay(
    start_proxy: Callable[..., RunningProxy], skewed_clock: Callable[[float], None]
) -> None:
    first = start_proxy(REFRESH_GRACE_SECONDS="2")
    behind = another_instance(start_proxy, first, REFRESH_GRACE_SECONDS="2")
    client, tokens = logged_in(first)
    assert_token_response(client.refresh(tokens["refresh_token"]))
    time.sleep(3)  # past the grace window on any honest clock
    skewed_clock(-30)  # the second instance's clock runs 30 s behind
    replay = replace(client, proxy_url=behind.url).refresh(tokens["refresh_token"])
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant", replay.text
    assert revoked_reason(first.app, tokens["refresh_token"]) == "refresh_token_reuse"


def test_a_purge_on_a_skewed_instance_keeps_a_token_inside_its_grace_window(
    start_proxy: Callable[..., RunningProxy], skewed_clock: Callable[[float], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    from oauthproxy import database, models

    first = start_proxy()
    client, tokens = logged_in(first)
    assert_token_response(client.refresh(tokens["refresh_token"]))  # rotated now, on the database's clock
    skewed_clock(3700)  # an instance whose clock runs past the access token's hour purges
    monkeypatch.setattr(database, "utcnow", models.utcnow)
    with first.app.app_context():
        database.purge_expired()
    retry = client.refresh(tokens["refresh_token"])  # the honest retry of a lost response, a second later
    assert retry.status_code == 200, retry.text
