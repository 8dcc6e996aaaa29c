"""What the property-based fuzzers (tests/test_fuzz_*.py) share: the Hypothesis profile, hostile-input strategies,
and the properties every answer must have (no 5xx, no traceback logged, downstream paths inside their route).

`make test` runs FUZZ_EXAMPLES (default 200) examples per target, half on SQLite and half on PostgreSQL (every
target runs once per database); `FUZZ_EXAMPLES=5000 make test PYTEST_ARGS="tests/test_fuzz_*.py"` is a longer run.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from urllib.parse import unquote

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "fuzz",
    max_examples=max(1, int(os.environ.get("FUZZ_EXAMPLES") or 200) // 2),  # per database
    deadline=None,  # a request's time depends on the machine's load, not on the input
    # One proxy (a fixture) serves every example of a test: that is the point, not an accident.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    database=None,  # no .hypothesis folder in the work tree; a failure prints the seed to reproduce it
    print_blob=True,
)
FUZZ = settings.get_profile("fuzz")

# Strings that broke or nearly broke parsers, URL handling and storage somewhere.
TRICKY_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\r\n",
    "\u202e",
    "\ud7ff",
    "é",
    "💥",
    "%00",
    "%",
    "%%",
    "%zz",
    "%2e%2e",
    "%252e%252e",
    "..",
    "../",
    "..%2f",
    "%2e%2e%2f",
    "..\\",
    "%5c",
    "//",
    "\\\\evil.example",
    "http://[::1",
    "http://[::1]:99999/cb",
    "http://[::1]/cb",
    "http://127.0.0.2/cb",
    "http://127.0.0.1:33418/callback",
    "http://localhost:6274/oauth/callback",
    "https://client.example/cb",
    "https://client.example/cb#frag",
    "https://accounts.google.com@evil.example/cb",
    "http://evil.example/cb",
    "https://:443/x",
    "https:///x",
    "javascript:alert(1)",
    "JAVASCRIPT:alert(1)",
    "data:text/html,<script>x</script>",
    "file:///etc/passwd",
    "vbscript:x",
    "about:blank",
    "cursor://anysphere.cursor-retrieval/oauth/user-mcp/callback",
    "vscode://x/cb",
    "http://127.0.0.1:9/callback",
    "urn:ietf:wg:oauth:2.0:oob",
    "<script>",
    "'\"",
    "{}",
    "[]",
    "null",
    "a" * 201,
    "h" * 2049,
    "https://client.example/" + "p" * 2100,
]


def hostile_text(max_size: int = 64) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(TRICKY_STRINGS),
        st.text(max_size=max_size),
        st.text(alphabet="%./\\:@?#[]ab0", max_size=max_size),
    )


def url_like() -> st.SearchStrategy[str]:
    """URLs assembled from parts real and hostile: schemes, userinfo, IPv6 brackets, ports, paths, fragments."""
    return st.builds(
        lambda scheme, userinfo, host, port, path, tail: f"{scheme}{userinfo}{host}{port}{path}{tail}",
        st.sampled_from(["https://", "http://", "HTTP://", "cursor://", "javascript:", "data:", "", "//", "https:"]),
        st.sampled_from(["", "user@", "a:b@", "accounts.google.com@"]),
        st.sampled_from(
            [
                "127.0.0.1",
                "localhost",
                "[::1]",
                "[::1",
                "::1",
                "client.example",
                "evil.example",
                "127.0.0.2",
                "0.0.0.0",
                "",
                "xn--e1afmkfd.example",
                "ÿ.example",
            ]
        ),
        st.sampled_from(["", ":33418", ":0", ":99999", ":-1", ":x"]),
        st.sampled_from(["", "/", "/cb", "/callback", "/%2e%2e/x", "/a b", "/" + "p" * 2100]),
        st.sampled_from(["", "?x=1", "#frag", "?", "#"]),
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | hostile_text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=6,
)


def metadata_fields() -> st.SearchStrategy[dict]:
    """Client metadata (RFC 7591 fields) with values from plausible to hostile and oversized."""
    strings = url_like() | hostile_text() | json_values
    lists = st.lists(url_like() | hostile_text(), max_size=25) | json_values
    return st.fixed_dictionaries(
        {},
        optional={
            "redirect_uris": lists,
            "client_name": strings,
            "client_uri": strings,
            "logo_uri": strings,
            "tos_uri": strings,
            "policy_uri": strings,
            "jwks_uri": strings,
            "scope": st.sampled_from(["openid", "openid email profile", "offline_access", "admin"]) | hostile_text(),
            "contacts": lists,
            "grant_types": st.lists(
                st.sampled_from(["authorization_code", "refresh_token", "implicit", "password"]) | hostile_text(),
                max_size=12,
            )
            | json_values,
            "response_types": st.lists(st.sampled_from(["code", "token", "id_token"]) | hostile_text(), max_size=12),
            "token_endpoint_auth_method": st.sampled_from(
                ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]
            )
            | hostile_text(),
            "software_id": strings,
            "software_version": strings,
            "jwks": json_values,
            "client_secret": strings,
            "extra": json_values,
        },
    )


# The fuzzers send hundreds of requests a second from one address: rate limits would answer most of them 429.
UNLIMITED = {
    "REGISTER_RATE_LIMIT": "1000000 per minute",
    "AUTHORIZE_RATE_LIMIT": "1000000 per minute",
    "TOKEN_RATE_LIMIT": "1000000 per minute",
}

VALID_METADATA = {
    "client_name": "Fuzz Client",
    "redirect_uris": ["http://127.0.0.1:33418/callback"],
    "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
}


def client_metadata() -> st.SearchStrategy[dict]:
    """Metadata from scratch, or a valid registration with some fields replaced (so that many are accepted and
    what is stored can be checked)."""
    return metadata_fields() | metadata_fields().map(lambda fields: {**VALID_METADATA, **fields})


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Log records that carry a traceback, formatted for the failure message."""
    return [f"{record.name}: {record.getMessage()}" for record in records if record.exc_info or record.stack_info]


def normalised_path(target: str) -> str:
    """What a downstream that decodes percent-escapes (repeatedly), treats `\\` as `/` and resolves dot segments (as
    nginx and many frameworks do) makes of a request target's path."""
    path = target.split("?", 1)[0]
    for _ in range(5):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    return posixpath.normpath("/" + path.lstrip("/"))


def inside(target: str, prefix: str) -> bool:
    """The target's path is the prefix or below it on a segment boundary, both as a normalising downstream reads it
    and segment by segment as a literal one does (`/down/a%2F..` is the segment `a/..`, not `a`)."""
    raw_segments = [unquote(segment) for segment in target.split("?", 1)[0].split("/")]
    prefix_segments = prefix.split("/")
    normal = normalised_path(target)
    return raw_segments[: len(prefix_segments)] == prefix_segments and (
        normal == prefix or normal.startswith(prefix + "/")
    )


def json_error(body: bytes) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
