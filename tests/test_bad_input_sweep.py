"""Garbage at the paths without a bad-input module of their own (the metadata documents, a static file): never a 5xx,
never a connection closed without an answer. Each endpoint's module sweeps its own path the same way."""

from __future__ import annotations

import pytest

from tests.bad_input_fixtures import assert_garbage_never_causes_a_server_error
from tests.conftest import RunningProxy


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration", "/static/missing.css"]
)
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
