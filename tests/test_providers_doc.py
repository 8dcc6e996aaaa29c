"""docs/providers.md stays true: its .env lines name settings the proxy reads and select the provider they mean."""

from __future__ import annotations

import re
from pathlib import Path

from oauthproxy.config import load_settings
from oauthproxy.providers import GitHubProvider, build_login_provider, detect_provider
from tests.support.settings import TEST_KEY
from tests.test_newcomer_traps import _settings_read

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "providers.md").read_text()
SECTIONS = dict(re.findall(r"^##+ (.+?)\n(.*?)(?=^##+ |\Z)", GUIDE, re.MULTILINE | re.DOTALL))


def env_blocks(section: str) -> list[dict[str, str]]:
    blocks = re.findall(r"```sh\n(.*?)```", SECTIONS[section], re.DOTALL)
    return [
        dict(line.split("=", 1) for line in block.splitlines() if line and not line.startswith("#")) for block in blocks
    ]


def test_every_provider_has_its_steps_env_lines_and_check_output() -> None:
    expected = {
        "Google": "google",
        "Microsoft Entra ID": "microsoft",
        "GitHub": "github",
        "Keycloak": "generic",
        "Auth0": "generic",
        "Okta": "generic",
    }
    settings = _settings_read()
    for section, kind in expected.items():
        text = SECTIONS[section]
        assert "https://mcp.example.com/callback" in text, section  # PUBLIC_URL + /callback, exactly
        assert "`oauthproxy check`" in text and "ok    identity provider:" in text, section
        (env,) = env_blocks(section)[:1]
        assert set(env) <= settings, (section, set(env) - settings)
        assert detect_provider(env["OAUTH_AUTHORIZE_URL"]) == kind, section


def test_the_github_enterprise_lines_select_the_github_provider() -> None:
    (env,) = env_blocks("GitHub Enterprise Server")
    settings = load_settings(
        {
            **env,
            "OAUTH_CLIENT_ID": "c",
            "OAUTH_CLIENT_SECRET": "s",
            "ENCRYPTION_KEY": TEST_KEY,
            "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        }
    )
    provider = build_login_provider(settings)
    assert isinstance(provider, GitHubProvider)
    assert provider.load_metadata()["authorization_endpoint"] == "https://github.example.com/login/oauth/authorize"
    assert "https://github.example.com/login/oauth/authorize" in SECTIONS["GitHub Enterprise Server"]
