"""Tool rules without a server: matching (first match, globs, who), every problem a routes file can have, and the
pieces of the gate (reading JSON-RPC bodies and headers, filtering tools/list answers as JSON and as events)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from oauthproxy.config import ConfigError, load_settings
from oauthproxy.downstream_credentials import Caller
from oauthproxy.proxy.tool_gate import (
    RESPONSE_LIMIT,
    ToolsListFilter,
    _Refused,
    check_headers,
    decode_header_value,
    parse_messages,
)
from oauthproxy.tool_policy import MAX_RULES, ToolPolicy, filter_tools_list, parse_tool_rules, tool_allowed
from tests.support.settings import TEST_KEY

BASE = {
    "OAUTH_CLIENT_ID": "client",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_AUTHORIZE_URL": "http://127.0.0.1:9999",
    "ENCRYPTION_KEY": TEST_KEY,
    "PUBLIC_URL": "https://mcp.example.com",
}
ALICE = Caller("alice", "alice@example.com", "Alice")
BOB = Caller("bob", "Bob@Example.ORG", "Bob")
NOBODY = Caller("dave", None, "Dave")  # no verified email


def policy(*rules: dict[str, Any]) -> ToolPolicy:
    problems: list[str] = []
    parsed = parse_tool_rules(list(rules), "tool_rules", problems)
    assert parsed is not None and not problems, problems
    return parsed


# -- matching -------------------------------------------------------------------------------------


def test_the_first_rule_that_names_the_tool_and_the_caller_decides() -> None:
    rules = policy(
        {"allow": ["delete_*"], "emails": ["alice@example.com"]},  # an exception before the general rule
        {"deny": ["delete_*", "admin"]},
        {"allow": ["*"]},
    )
    assert tool_allowed(rules, "delete_repo", ALICE)
    assert not tool_allowed(rules, "delete_repo", BOB)
    assert not tool_allowed(rules, "admin", ALICE)  # the exception names delete_* only
    assert tool_allowed(rules, "search", BOB) and tool_allowed(rules, "search", NOBODY)
    # The same rules in another order mean something else: deny first, and alice's exception never applies.
    reordered = policy(
        {"deny": ["delete_*"]}, {"allow": ["delete_*"], "emails": ["alice@example.com"]}, {"allow": ["*"]}
    )
    assert not tool_allowed(reordered, "delete_repo", ALICE)


def test_a_tool_no_rule_names_is_denied() -> None:
    rules = policy({"allow": ["search", "read_*"]})
    assert tool_allowed(rules, "search", ALICE) and tool_allowed(rules, "read_file", ALICE)
    assert not tool_allowed(rules, "write_file", ALICE)
    assert not tool_allowed(rules, "searching", ALICE)


@pytest.mark.parametrize(
    ("pattern", "allowed", "denied"),
    [
        ("search", ["search"], ["Search", "SEARCH", "search ", " search", "searchx", "xsearch", "", "search\n"]),
        ("search_*", ["search_", "search_docs", "search_a/b", "search_\n"], ["search", "Search_docs", "xsearch_a"]),
        ("get_?", ["get_a", "get_é"], ["get_", "get_ab", "GET_a"]),
        ("[abc]_tool", ["a_tool", "c_tool"], ["d_tool", "A_tool", "[abc]_tool"]),
        ("[!a]_tool", ["b_tool"], ["a_tool"]),
        ("météo", ["météo"], ["meteo", "MÉTÉO"]),
        ("a.b", ["a.b"], ["axb"]),  # fnmatch has no regex dot
        ("a+b(c)", ["a+b(c)"], ["aab(c)", "a+bc"]),
        ("[", ["["], ["x"]),  # an unmatched bracket is itself
        ("*", ["anything", "", "with space"], []),
    ],
)
def test_names_and_globs_match_exactly_as_fnmatchcase(pattern: str, allowed: list[str], denied: list[str]) -> None:
    rules = policy({"allow": [pattern]})
    for name in allowed:
        assert tool_allowed(rules, name, ALICE), (pattern, name)
    for name in denied:
        assert not tool_allowed(rules, name, ALICE), (pattern, name)


def test_rules_for_some_people_only() -> None:
    rules = policy(
        {"allow": ["by_email"], "emails": ["ALICE@example.com"]},
        {"allow": ["by_domain"], "email_domains": ["@example.org"]},
        {"allow": ["by_group"], "groups": ["admins"]},
        {"allow": ["by_any"], "emails": ["carol@example.net"], "email_domains": ["example.org"], "groups": ["ops"]},
    )
    assert tool_allowed(rules, "by_email", ALICE) and not tool_allowed(rules, "by_email", BOB)
    assert tool_allowed(rules, "by_domain", BOB) and not tool_allowed(rules, "by_domain", ALICE)  # case-insensitive
    assert tool_allowed(rules, "by_any", BOB) and not tool_allowed(rules, "by_any", ALICE)
    # A caller without a verified email matches no email or domain rule.
    assert not any(tool_allowed(rules, name, NOBODY) for name in ("by_email", "by_domain", "by_any"))
    # Addresses fold A-Z only, as the allowlists do: the Kelvin sign is not a K.
    assert not tool_allowed(
        policy({"allow": ["x"], "emails": ["kate@example.com"]}), "x", Caller("k", "\u212aate@example.com", None)
    )
    assert not tool_allowed(rules, "by_domain", Caller("m", "mallory@example.org.evil.test", None))
    assert not tool_allowed(rules, "by_domain", Caller("m", "mallory@sub.example.org", None))  # no subdomains


def test_group_rules_match_the_callers_groups_exactly() -> None:
    """A rule naming groups only matches a caller in one of them (exact names): an allow for a group allows no one
    else, a deny for a group denies no one else."""
    rules = policy({"allow": ["admin_*"], "groups": ["admins"]}, {"deny": ["admin_*"]}, {"allow": ["*"]})
    assert not tool_allowed(rules, "admin_reset", ALICE)
    assert tool_allowed(rules, "admin_reset", Caller("alice", None, None, groups=frozenset({"admins"})))
    assert not tool_allowed(rules, "admin_reset", Caller("alice", None, None, groups=frozenset({"Admins"})))
    deny_for_group = policy({"deny": ["search"], "groups": ["interns"]}, {"allow": ["*"]})
    assert tool_allowed(deny_for_group, "search", ALICE)
    assert not tool_allowed(deny_for_group, "search", Caller("i", None, None, groups=frozenset({"interns"})))


def test_filter_tools_list_keeps_order_and_entries_without_a_name() -> None:
    rules = policy({"deny": ["secret*"]}, {"allow": ["*"]})
    tools = [{"name": "b"}, {"name": "secret_x"}, {"title": "no name"}, "junk", {"name": 5}, {"name": "a"}]
    assert filter_tools_list(rules, tools, ALICE) == [
        {"name": "b"},
        {"title": "no name"},
        "junk",
        {"name": 5},
        {"name": "a"},
    ]
    unchanged = [{"name": "a"}]
    assert filter_tools_list(rules, unchanged, ALICE) is unchanged


# -- the routes file ------------------------------------------------------------------------------


def routes_file(tmp_path: Path, rules_toml: str) -> str:
    path = tmp_path / "routes.toml"
    path.write_text(f'[[routes]]\nname = "gh"\npath = "/mcp/gh"\nurl = "http://127.0.0.1:9000/mcp"\n{rules_toml}\n')
    return str(path)


def problems_for(tmp_path: Path, rules_toml: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, "MCP_ROUTES_FILE": routes_file(tmp_path, rules_toml)})
    return caught.value.problems


def test_tool_rules_tables_in_the_routes_file(tmp_path: Path) -> None:
    settings = load_settings(
        {
            **BASE,
            "MCP_ROUTES_FILE": routes_file(
                tmp_path,
                """
[[routes.tool_rules]]
allow = ["delete_*"]
groups = ["admins"]

[[routes.tool_rules]]
deny = ["delete_*", "admin_reset"]

[[routes.tool_rules]]
allow = ["*"]
emails = ["Alice@Example.com"]
email_domains = ["example.org"]
""",
            ),
        }
    )
    (route,) = settings.routes
    assert route.tool_policy is not None
    first, second, third = route.tool_policy.rules
    assert first.allow and first.groups == {"admins"} and first.names == frozenset()
    assert not second.allow and second.names == {"admin_reset"} and second.pattern is not None
    assert third.emails == {"alice@example.com"} and third.email_domains == {"example.org"}
    assert tool_allowed(route.tool_policy, "search", ALICE) and not tool_allowed(route.tool_policy, "search", NOBODY)
    # Without tool_rules there is no policy at all: the proxy never reads that route's bodies.
    plain = load_settings({**BASE, "MCP_ROUTES_FILE": routes_file(tmp_path, "")})
    assert plain.routes[0].tool_policy is None


@pytest.mark.parametrize(
    ("rules_toml", "expected"),
    [
        ('tool_rules = "deny delete_*"', "tool_rules must be a list of [[routes.tool_rules]] tables"),
        ("tool_rules = { deny = ['x'] }", "tool_rules must be a list of [[routes.tool_rules]] tables"),
        ("tool_rules = []", "tool_rules is empty"),
        ("tool_rules = ['allow *']", "#1 must be a table with allow or deny"),
        ("tool_rules = [[ 'x' ]]", "#1 must be a table with allow or deny"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nuser = "alice"', "#1: unknown key(s) user"),
        ('[[routes.tool_rules]]\nallow = ["*"]\ndomains = ["x.org"]', "unknown key(s) domains"),
        ('[[routes.tool_rules]]\nallow = ["*"]\ndeny = ["x"]', "needs exactly one of allow or deny"),
        ('[[routes.tool_rules]]\nemails = ["a@b.c"]', "needs exactly one of allow or deny"),
        ('[[routes.tool_rules]]\nallow = "*"', 'allow must be a list of tool names or patterns, e.g. ["search_*"]'),
        ("[[routes.tool_rules]]\nallow = 1", "allow must be a list of tool names or patterns"),
        ("[[routes.tool_rules]]\nallow = { name = 'x' }", "allow must be a list of tool names or patterns"),
        ("[[routes.tool_rules]]\nallow = true", "allow must be a list"),
        ("[[routes.tool_rules]]\nallow = []", "allow is empty"),
        ('[[routes.tool_rules]]\nallow = [""]', "an entry is empty"),
        ('[[routes.tool_rules]]\nallow = ["a", 1]', "every entry must be text; got 1"),
        ('[[routes.tool_rules]]\nallow = [["a"]]', "every entry must be text"),
        ('[[routes.tool_rules]]\nallow = ["a\\nb"]', "contains a control character"),
        ('[[routes.tool_rules]]\nallow = ["a\\u0000"]', "contains a control character"),
        ('[[routes.tool_rules]]\nallow = ["a\\u007f"]', "contains a control character"),
        ('[[routes.tool_rules]]\nallow = ["a\\u0085"]', "contains a control character"),
        ('[[routes.tool_rules]]\nallow = ["\\ta"]', "contains a control character"),
        ('[[routes.tool_rules]]\nallow = [" search"]', "has leading or trailing spaces"),
        ('[[routes.tool_rules]]\nallow = ["search "]', "has leading or trailing spaces"),
        (f'[[routes.tool_rules]]\nallow = ["{"x" * 257}"]', "longer than 256 characters"),
        ("[[routes.tool_rules]]\nallow = [" + ", ".join(f'"t{i}"' for i in range(501)) + "]", "at most 500"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemails = "alice@example.com"', "emails must be a list of emails"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemails = ["alice"]', "'alice' is not an email address"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemails = ["a@b@c"]', "is not an email address"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemails = ["a@"]', "is not an email address"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemails = [""]', "an entry is empty"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemail_domains = "example.com"', "email_domains must be a list"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemail_domains = ["a@example.com"]', "is not a domain"),
        ('[[routes.tool_rules]]\nallow = ["*"]\nemail_domains = ["exa mple.com"]', "is not a domain"),
        ('[[routes.tool_rules]]\nallow = ["*"]\ngroups = "admins"', "groups must be a list of groups"),
        ('[[routes.tool_rules]]\nallow = ["*"]\ngroups = [1]', "every entry must be text"),
        ('[[routes.tool_rules]]\nallow = ["*"]\ngroups = ["a\\rb"]', "contains a control character"),
        ('[[routes.tool_rules]]\ndeny = ["delete_*"]', "only denies"),
        ('[[routes.tool_rules]]\ndeny = ["a"]\n[[routes.tool_rules]]\ndeny = ["b"]', 'end with a rule allow = ["*"]'),
        ("\n".join('[[routes.tool_rules]]\nallow = ["x"]' for _ in range(MAX_RULES + 1)), f"at most {MAX_RULES}"),
    ],
)
def test_tool_rules_problems_are_reported_clearly(tmp_path: Path, rules_toml: str, expected: str) -> None:
    problems = problems_for(tmp_path, rules_toml)
    assert any(expected in problem and "[[routes]] #1: tool_rules" in problem for problem in problems), problems


def test_every_problem_of_every_rule_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_for(
        tmp_path,
        '[[routes.tool_rules]]\nallow = []\n[[routes.tool_rules]]\ndeny = ["x"]\ncolour = 1\n'
        '[[routes.tool_rules]]\nallow = ["ok"]\nemails = ["nope"]',
    )
    assert any("#1: allow is empty" in p for p in problems), problems
    assert any("#2: unknown key(s) colour" in p for p in problems), problems
    assert any("#3: emails: 'nope'" in p for p in problems), problems


def test_a_problem_message_never_repeats_a_long_value_whole(tmp_path: Path) -> None:
    problems = problems_for(tmp_path, f'tool_rules = "{"y" * 500}"')
    assert all(len(problem) < 300 for problem in problems), problems


# -- reading a request's JSON-RPC messages ------------------------------------------------------------


def refusal(body: bytes) -> tuple[int, dict[str, Any]]:
    with pytest.raises(_Refused) as caught:
        parse_messages(body)
    document = caught.value.refusal.document
    return caught.value.refusal.status, document["error"]


def test_single_messages_and_batches_are_read() -> None:
    messages, batch = parse_messages(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}')
    assert not batch and messages[0]["params"]["name"] == "x"
    messages, batch = parse_messages(
        b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, {"jsonrpc": "2.0", "id": 1, "result": {}}]'
    )
    assert batch and len(messages) == 2
    # What the proxy does not need to understand passes: responses, unknown methods, ids of every valid kind.
    for body in (b'{"id": "a", "result": 1}', b'{"method": "x/y", "id": 1.5}', b'{"method": "ping", "id": null}'):
        parse_messages(body)


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"", -32700, "empty"),
        (b"\n\t ", -32700, "empty"),
        (b"{", -32700, "not valid JSON"),
        (b'{"a": 1} {"b": 2}', -32700, "not valid JSON"),
        (b'{"a": Infinity}', -32700, "not valid JSON"),
        (b'{"a": -Infinity}', -32700, "not valid JSON"),
        (b"\xff\xfe{}", -32700, "not UTF-8"),
        (b'{"method": "tools/call", "params": {"name": "\xed\xa0\x80"}}', -32700, "not UTF-8"),  # a UTF-8 surrogate
        (b"[" * 50_000 + b"]" * 50_000, -32700, "nested too deeply"),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, -32700, "nested too deeply"),
        (b"[]", -32600, "batch is empty"),
        (b"null", -32600, "must be a JSON object"),
        (b"[null]", -32600, "must be a JSON object"),
        (b'{"id": [1], "method": "ping"}', -32600, "id must be"),
        (b'{"id": false, "method": "ping"}', -32600, "id must be"),
        (b'{"id": 1, "method": null}', -32600, "method must be a string"),
        (b'{"id": 1, "method": "ping", "id": 2}', -32600, 'repeats the key "id"'),
        (
            b'{"id": 1, "method": "tools/call", "params": {"name": "a", "arguments": {"k": 1, "k": 2}}}',
            -32600,
            "repeats",
        ),
        (b'{"id": 1, "method": "tools/call", "params": {"name": 1}}', -32602, "params.name"),
        (b'{"id": 1, "method": "tools/call", "params": {"name": {"name": "x"}}}', -32602, "params.name"),
        (b'{"id": 1, "method": "tools/call", "params": {"name": true}}', -32602, "params.name"),
        (b'{"id": 1, "method": "tools/call", "params": "x"}', -32602, "params.name"),
        (b'{"id": 1, "method": "tools/call", "params": null}', -32602, "params.name"),
    ],
)
def test_bodies_the_proxy_cannot_read_as_the_downstream_would_are_refused(body: bytes, code: int, message: str) -> None:
    status, error = refusal(body)
    assert status == 400 and error["code"] == code and message in error["message"], error


def test_a_refusal_names_the_offending_request_and_quotes_values_safely() -> None:
    with pytest.raises(_Refused) as caught:
        parse_messages(b'{"id": "r1", "method": "tools/call", "params": {"name": 5}}')
    assert caught.value.refusal.document["id"] == "r1"
    with pytest.raises(_Refused) as caught:
        parse_messages(b'{"id": 1, "method": "x", "\\u0000evil\\r\\n": 1, "\\u0000evil\\r\\n": 2}')
    assert "\r" not in caught.value.refusal.document["error"]["message"]


# -- headers against the body ---------------------------------------------------------------------


def check(headers: dict[str, str], body: Any) -> dict[str, Any] | None:
    messages, batch = parse_messages(json.dumps(body).encode())
    environ = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    try:
        check_headers(environ, messages, batch)
    except _Refused as refused:
        assert refused.refusal.status == 400
        return refused.refusal.document["error"]
    return None


CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "météo"}}


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, CALL),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?bcOpdMOpbw==?="}, CALL),
        ({"Mcp-Method": "tools/list"}, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        (
            {"Mcp-Method": "resources/read", "Mcp-Name": "file:///a b"},
            {"id": 1, "method": "resources/read", "params": {"uri": "file:///a b"}},
        ),
        ({"Mcp-Method": "prompts/get"}, {"id": 1, "method": "prompts/get", "params": {"name": "p"}}),
        (
            {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="},
            {"id": 1, "method": "tools/call", "params": {"name": "=?base64?literal?="}},
        ),
    ],
)
def test_headers_that_agree_with_the_body_pass(headers: dict[str, str], body: Any) -> None:
    assert check(headers, body) is None


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Mcp-Method": "tools/call", "Mcp-Name": "météo"}, CALL),  # must be base64: not header-safe
        ({"Mcp-Method": "tools/call", "Mcp-Name": "m%C3%A9t%C3%A9o"}, CALL),  # percent-encoding is not decoded
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?TcOpdMOpbw==?="}, CALL),  # "Météo"
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?bcOpdMOpbw=?="}, CALL),  # broken padding
        ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?bcOpdMOpbw==?= "}, CALL),
        (
            {"Mcp-Method": "tools/call", "Mcp-Name": "a\x00b"},
            {"id": 1, "method": "tools/call", "params": {"name": "a\x00b"}},
        ),
        (
            {"Mcp-Method": "tools/call\x7f", "Mcp-Name": "x"},
            {"id": 1, "method": "tools/call\x7f", "params": {"name": "x"}},
        ),
        (
            {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?literal?="},
            {"id": 1, "method": "tools/call", "params": {"name": "=?base64?literal?="}},
        ),
        ({"Mcp-Method": "TOOLS/CALL", "Mcp-Name": "x"}, {"id": 1, "method": "tools/call", "params": {"name": "x"}}),
        ({"Mcp-Method": "tools/call", "Mcp-Name": "x"}, {"id": 1, "result": {}}),
        ({"Mcp-Method": "prompts/get", "Mcp-Name": "x"}, {"id": 1, "method": "prompts/get", "params": {"name": "y"}}),
        ({"Mcp-Name": "x"}, {"id": 1, "method": "tools/list"}),
        ({"Mcp-Method": ""}, {"id": 1, "method": "ping"}),
        ({"Mcp-Method": "ping"}, [{"id": 1, "method": "ping"}]),
        ({"Mcp-Name": "x"}, [{"id": 1, "method": "tools/call", "params": {"name": "x"}}]),
    ],
)
def test_headers_that_disagree_with_the_body_are_refused(headers: dict[str, str], body: Any) -> None:
    error = check(headers, body)
    assert error is not None and error["code"] == -32020 and error["message"].startswith("Header mismatch: "), error


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("plain_name", "plain_name"),
        ("with space", "with space"),
        ("=?base64?SGVsbG8sIOS4lueVjA==?=", "Hello, 世界"),
        ("=?base64?IHBhZGRlZCA=?=", " padded "),
        ("=?base64??=", ""),
        ("=?base64?AA==?=", "\x00"),  # decoded names may hold anything the body could: they are compared, not sent
        ("=?base64?AB==?=", None),  # non-canonical: stray bits
        ("=?base64?QQ?=", None),  # unpadded
        ("=?base64?Q Q==?=", None),
        ("=?base64?//79?=", None),  # not UTF-8
        ("=?Base64?QQ==?=", "=?Base64?QQ==?="),  # not the sentinel: taken as it is
        ("caf\xe9", None),
        ("a\nb", None),
    ],
)
def test_mcp_name_values_decode_as_the_transport_says(value: str, decoded: str | None) -> None:
    assert decode_header_value(value) == decoded


# -- filtering answers ----------------------------------------------------------------------------

RULES = policy({"deny": ["wait", "who*"]}, {"allow": ["*"]})
LISTED = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {"tools": [{"name": "wait"}, {"name": "progress"}, {"name": "whoami"}], "nextCursor": "c"},
}
FILTERED = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "progress"}], "nextCursor": "c"}}


def test_json_answers_to_the_requests_tools_list_are_filtered() -> None:
    tools_filter = ToolsListFilter(RULES, ALICE, frozenset({1}))
    assert json.loads(tools_filter.json_body(json.dumps(LISTED).encode()) or b"") == FILTERED
    # Another id (another request's answer, or a string "1"), an error, a request, non-JSON: left as they are.
    for other in (
        {**LISTED, "id": 2},
        {**LISTED, "id": "1"},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "tools"}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "result": LISTED["result"]},
        {"jsonrpc": "2.0", "id": 1, "result": {"tools": "wait"}},
        {"jsonrpc": "2.0", "id": 1, "result": [{"name": "wait"}]},
        {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "progress"}]}},
    ):
        assert tools_filter.json_body(json.dumps(other).encode()) is None, other
    assert tools_filter.json_body(b"not json, with tools") is None
    # A batch's answer: each element on its own.
    batch = [LISTED, {**LISTED, "id": 2}, {"jsonrpc": "2.0", "id": 3, "result": {}}]
    assert json.loads(tools_filter.json_body(json.dumps(batch).encode()) or b"") == [FILTERED, batch[1], batch[2]]
    # A GET stream's replay: any answer carrying tools, whatever its id.
    assert ToolsListFilter(RULES, ALICE, None).message({**LISTED, "id": "replayed"})["result"] == FILTERED["result"]


def events(chunks: list[bytes], ids: frozenset[Any] | None = frozenset({1})) -> list[bytes]:
    return list(ToolsListFilter(RULES, ALICE, ids).events(chunks))


def test_event_streams_are_filtered_event_by_event_and_the_rest_passes_byte_for_byte() -> None:
    progress = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{"tools":1}}\n\n'
    listed = b"event: message\nid: 7\ndata: " + json.dumps(LISTED).encode() + b"\n\n"
    comment = b": stream open\n\n"
    stream = comment + progress + listed
    out = events([stream])
    assert out[0] == comment and out[1] == progress
    assert out[2] == b"event: message\nid: 7\ndata: " + json.dumps(FILTERED, separators=(",", ":")).encode() + b"\n\n"
    # However the bytes are cut into chunks, each event leaves whole, and as soon as its blank line has arrived.
    for cut in range(1, len(stream)):
        assert b"".join(events([stream[:cut], stream[cut:]])) == b"".join(out), cut
    chunked = events([stream[i : i + 1] for i in range(len(stream))])
    assert chunked == out
    # Events that are not answers to this request's tools/list are not touched, even when they mention tools.
    other_id = b"data: " + json.dumps({**LISTED, "id": 2}).encode() + b"\n\n"
    assert events([other_id]) == [other_id]
    named = b"event: other\ndata: " + json.dumps(LISTED).encode() + b"\n\n"
    assert events([named]) == [named]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r", b"\n"])
def test_every_line_ending_and_data_over_several_lines(newline: bytes) -> None:
    text = json.dumps(LISTED, indent=1).encode().replace(b"\n", newline + b"data: ")
    event = b"retry: 5" + newline + b"data: " + text + newline + newline
    (out,) = events([event, b""])
    lines = out.split(newline)
    assert lines[0] == b"retry: 5" and lines[-2:] == [b"", b""]
    assert json.loads(lines[1][len(b"data: ") :]) == FILTERED


def test_an_unfinished_last_event_is_filtered_too() -> None:
    (out,) = events([b"data: " + json.dumps(LISTED).encode()])
    assert b"wait" not in out and b"progress" in out


def test_an_event_too_large_to_filter_cuts_the_stream() -> None:
    cut: list[bool] = []
    head = b"data: " + b"x" * 1000 + b"\n\n"
    chunks = [head, b"data: ", b"y" * (RESPONSE_LIMIT + 1), b"\n\n", b"data: after\n\n"]
    out = list(ToolsListFilter(RULES, ALICE, frozenset({1})).events(chunks, lambda: cut.append(True)))
    assert out == [head] and cut == [True]
