"""Per-tool policy of a route: which MCP tools each caller may list and call, from the routes file's tool rules."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oauthproxy.allowlists import email_address

if TYPE_CHECKING:
    from oauthproxy.downstream_credentials import Caller

#: Keys of one `[[routes.tool_rules]]` table.
RULE_KEYS = frozenset({"allow", "deny", "emails", "email_domains", "groups"})
#: fnmatch's wildcards: a name without any of them is compared as it is.
_GLOB_CHARACTERS = frozenset("*?[")
#: At most this many rules per route, and names or patterns per list: a policy is read by people, and every tool
#: call walks it.
MAX_RULES = 200
MAX_ENTRIES = 500
MAX_ENTRY_LENGTH = 256


@dataclass(frozen=True)
class ToolRule:
    """One rule: allow or deny the tools it names, for everyone or only for the people it names."""

    allow: bool
    #: Exact tool names, compared case-sensitively (MCP servers look tools up by exact name).
    names: frozenset[str]
    #: The glob patterns (fnmatchcase: `*`, `?`, `[...]`, exact case) as one compiled expression, or None.
    pattern: re.Pattern[str] | None
    #: Who the rule is for; all three empty means everyone. A caller matches when any of them matches.
    emails: frozenset[str] = frozenset()
    email_domains: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def names_tool(self, tool_name: str) -> bool:
        return tool_name in self.names or (self.pattern is not None and self.pattern.match(tool_name) is not None)

    def applies_to(self, caller: Caller) -> bool:
        if not (self.emails or self.email_domains or self.groups):
            return True
        if self.emails or self.email_domains:
            address = email_address(caller.email)
            if address is not None:
                # As the allowlists compare: A-Z folded only (allowlists.email_is_allowed says why).
                address = address.encode().lower().decode()
                if address in self.emails or address.partition("@")[2] in self.email_domains:
                    return True
        # The groups the login provider stated (groups.py). They are read whenever a rule names groups, and a sign-in
        # whose groups cannot be read whole is refused, so a deny rule for a group never meets a caller whose groups
        # are unknown.
        return bool(self.groups) and not self.groups.isdisjoint(caller.groups)


@dataclass(frozen=True)
class ToolPolicy:
    """A route's tool rules, in the order written. The first rule that names the tool and applies to the caller
    decides; when none does, the tool is denied."""

    rules: tuple[ToolRule, ...]


def tool_allowed(policy: ToolPolicy, tool_name: str, caller: Caller) -> bool:
    """Whether `caller` may see and call the tool `tool_name` under `policy`.

    First match, not deny-overrides: order lets an exception stand before the general rule ("the ops group may
    call delete_*", then "nobody may call delete_*"), which deny-overrides cannot say without a second mechanism,
    and the answer for any call is one rule of the file. No rule matching denies: a policy is written to restrict,
    so a tool the downstream adds later stays unavailable until a rule names it (end with `allow = ["*"]` for a
    deny list).
    """
    for rule in policy.rules:
        if rule.names_tool(tool_name) and rule.applies_to(caller):
            return rule.allow
    return False


def filter_tools_list(policy: ToolPolicy, tools: list[Any], caller: Caller) -> list[Any]:
    """The entries of a `tools/list` result's `tools` that `caller` may use: those whose `name` the policy allows.
    An entry without a string name is kept: it names no tool, and a client refuses it as malformed anyway.
    Returns `tools` itself when nothing is removed."""
    kept = [
        tool
        for tool in tools
        if not isinstance(tool, dict)
        or not isinstance(tool.get("name"), str)
        or tool_allowed(policy, tool["name"], caller)
    ]
    return tools if len(kept) == len(tools) else kept


# -- the routes file ------------------------------------------------------------------------------


def _has_control_characters(value: str) -> bool:
    return any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value)


def _entries(value: Any, where: str, what: str, problems: list[str], *, required: bool = False) -> list[str] | None:
    """A TOML list of text entries, each non-empty, without control characters or surrounding spaces."""
    if not isinstance(value, list):
        problems.append(f'{where} must be a list of {what}, e.g. ["{_EXAMPLE[what]}"]; got {_shown(value)}')
        return None
    if required and not value:
        problems.append(f"{where} is empty: list at least one {what[:-1]}")
        return None
    if len(value) > MAX_ENTRIES:
        problems.append(f"{where} has {len(value)} entries; at most {MAX_ENTRIES}")
        return None
    entries = []
    for item in value:
        if not isinstance(item, str):
            problems.append(f"{where}: every entry must be text; got {_shown(item)}")
            return None
        if not item:
            problems.append(f"{where}: an entry is empty; an empty {what[:-1]} matches nothing")
            return None
        if _has_control_characters(item):
            problems.append(f"{where}: the entry {item!r} contains a control character")
            return None
        if item != item.strip():
            problems.append(f"{where}: the entry {item!r} has leading or trailing spaces")
            return None
        if len(item) > MAX_ENTRY_LENGTH:
            problems.append(f"{where}: an entry is longer than {MAX_ENTRY_LENGTH} characters")
            return None
        entries.append(item)
    return entries


_EXAMPLE = {
    "tool names or patterns": "search_*",
    "emails": "alice@example.com",
    "email domains": "example.com",
    "groups": "admins",
}


def _shown(value: Any) -> str:
    """A configured value in a problem message, cut short: a rule may be long, the message should not be."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rule(table: Any, where: str, problems: list[str]) -> ToolRule | None:
    if not isinstance(table, Mapping):
        problems.append(f"{where} must be a table with allow or deny; got {_shown(table)}")
        return None
    unknown = sorted(str(key) for key in set(table) - RULE_KEYS)
    if unknown:
        problems.append(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(RULE_KEYS))}"
        )
    if ("allow" in table) == ("deny" in table):
        problems.append(
            f'{where} needs exactly one of allow or deny, a list of tool names or patterns such as "search_*"'
        )
        return None
    action = "allow" if "allow" in table else "deny"
    tools = _entries(table[action], f"{where}: {action}", "tool names or patterns", problems, required=True)
    emails = _entries(table.get("emails", []), f"{where}: emails", "emails", problems)
    domains = _entries(table.get("email_domains", []), f"{where}: email_domains", "email domains", problems)
    groups = _entries(table.get("groups", []), f"{where}: groups", "groups", problems)
    for email in emails or []:
        if email_address(email) is None:
            problems.append(f"{where}: emails: {email!r} is not an email address (one @, nothing else around it)")
    for domain in domains or []:
        if "@" in domain.lstrip("@") or any(char.isspace() for char in domain):
            problems.append(f"{where}: email_domains: {domain!r} is not a domain such as example.com")
    if tools is None or emails is None or domains is None or groups is None or unknown:
        return None
    patterns = [tool for tool in tools if _GLOB_CHARACTERS.intersection(tool)]
    return ToolRule(
        allow=action == "allow",
        names=frozenset(tool for tool in tools if not _GLOB_CHARACTERS.intersection(tool)),
        # One expression for all of a rule's patterns: one match call per rule, however many patterns it lists.
        pattern=re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)) if patterns else None,
        emails=frozenset(email.encode().lower().decode() for email in emails or ()),
        email_domains=frozenset(domain.lstrip("@").encode().lower().decode() for domain in domains or ()),
        groups=frozenset(groups or ()),
    )


def parse_tool_rules(value: Any, where: str, problems: list[str]) -> ToolPolicy | None:
    """A route's `tool_rules`: a list of `[[routes.tool_rules]]` tables. Every problem is added to `problems`."""
    if not isinstance(value, list):
        problems.append(
            f"{where} must be a list of [[routes.tool_rules]] tables, each with allow or deny; got {_shown(value)}"
        )
        return None
    if not value:
        problems.append(f"{where} is empty: add [[routes.tool_rules]] tables, or remove tool_rules to allow every tool")
        return None
    if len(value) > MAX_RULES:
        problems.append(f"{where} has {len(value)} rules; at most {MAX_RULES}")
        return None
    rules = [_rule(table, f"{where} #{index + 1}", problems) for index, table in enumerate(value)]
    if any(rule is None for rule in rules):
        return None
    checked = tuple(rule for rule in rules if rule is not None)
    if not any(rule.allow for rule in checked):
        # No rule matching denies, so a list of deny rules alone would deny every tool: surely not what was meant.
        problems.append(
            f"{where} only denies, and a tool no rule names is denied too, so every tool would be: end with a rule "
            'allow = ["*"] to allow the tools the deny rules do not name'
        )
        return None
    return ToolPolicy(checked)
