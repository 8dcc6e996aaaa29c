"""The `oauthproxy` command line (also `flask --app wsgi ...`): keys, database, purge, check, clients, grants, audit."""

from __future__ import annotations

import sys
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext
from flask_migrate import cli as migrate_cli

from oauthproxy.components import components, current_application
from oauthproxy.crypto import generate_key


def create_app_or_exit() -> Flask:
    from oauthproxy import create_app
    from oauthproxy.audit import EXTENSION_KEY
    from oauthproxy.config import ConfigError

    try:
        app = create_app()
    except ConfigError as error:
        report_config_error(error)
        sys.exit(2)
    trail = app.extensions.get(EXTENSION_KEY)
    if trail is not None and trail.destination == "stdout":
        # A command's standard output is its answer, which scripts read (`oauthproxy audit --format json | jq`); the events
        # it causes (a revocation, a rotated key) go beside it, to standard error.
        trail.destination = "stderr"
    return app


def report_config_error(error) -> None:
    click.echo("oauthproxy cannot start; fix these settings (environment or .env):", err=True)
    for problem in error.problems:
        click.echo(f"  - {problem}", err=True)


@click.command("gen-key")
def gen_key() -> None:
    """Print a new ENCRYPTION_KEY (base64 of 32 random bytes)."""
    click.echo(generate_key())


@click.command("purge")
@with_appcontext
def purge() -> None:
    """Delete expired codes, tokens, pending logins, empty grants and long-unused clients."""
    from oauthproxy.database import purge_expired

    report = purge_expired()
    click.echo(", ".join(f"{name.replace('_', ' ')}: {count}" for name, count in vars(report).items()))


@click.command("rotate-key")
@with_appcontext
def rotate_key() -> None:
    """Re-encrypt every stored secret under the first key in ENCRYPTION_KEY."""
    from oauthproxy.database import UnreadableSecrets, rotate_encryption_key

    try:
        changed = rotate_encryption_key()
    except UnreadableSecrets as error:
        for row in error.rows:
            click.echo(f"cannot decrypt {row}", err=True)
        advice = [
            f"Nothing was changed: {len(error.rows)} stored value(s) cannot be decrypted with any key in "
            "ENCRYPTION_KEY."
        ]
        if error.unknown_key:
            advice.append(
                "For 'no configured ENCRYPTION_KEY has key id' rows: list the old key after the new one "
                "in ENCRYPTION_KEY (ENCRYPTION_KEY=new,old) and run rotate-key again."
            )
        advice.append(
            "Rows that no key opens (tampered, or copied from another row) cannot be recovered: revoke "
            "those grants (`oauthproxy grants revoke ID`; their users sign in again), delete those "
            "clients (`oauthproxy clients delete ID`; they register again), let pending logins expire "
            "(10 minutes), then run rotate-key again."
        )
        raise click.ClickException(" ".join(advice)) from None
    click.echo(f"re-encrypted {changed} value(s) under key {components().secret_box.current_key_id}")


@click.command("check")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each network request.")
@click.option(
    "--skip-public-url",
    is_flag=True,
    help="Do not walk the discovery chain through PUBLIC_URL (e.g. before the proxy is started).",
)
@with_appcontext
def check(timeout: float, skip_public_url: bool) -> None:
    """Check the configuration, database, provider, callback URL, downstream and the discovery chain."""
    import logging

    from oauthproxy.self_check import SelfCheck

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-connection notes are not findings
    click.echo(f"oauthproxy check ({current_app.config['SETTINGS'].public_url})")
    failures = 0
    for finding in SelfCheck(current_application(), timeout, not skip_public_url).run():
        failures += finding.level == "fail"
        click.echo(finding.render())
    if failures:
        click.echo(f"{failures} problem(s) found.")
        sys.exit(1)
    click.echo("No problems found.")


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


@click.group("clients")
def clients() -> None:
    """List or delete registered OAuth clients."""


@clients.command("list")
@with_appcontext
def clients_list() -> None:
    """Registered clients, with their live grants (users still signed in)."""
    from sqlalchemy import func, select

    from oauthproxy.models import Grant, OAuthClient, db

    live = dict(
        db.session.execute(
            select(Grant.client_id, func.count()).where(Grant.revoked_at.is_(None)).group_by(Grant.client_id)
        ).all()
    )
    rows = db.session.scalars(select(OAuthClient).order_by(OAuthClient.last_used_at.desc())).all()
    click.echo(f"{'CLIENT ID':<40} {'NAME':<28} {'AUTH':<20} {'CREATED':<16} {'LAST USED':<16} GRANTS  REDIRECT URIS")
    for row in rows:
        metadata = row.client_metadata
        click.echo(
            f"{row.client_id:<40} {str(metadata.get('client_name', ''))[:28]:<28} "
            f"{metadata.get('token_endpoint_auth_method', 'none'):<20} {_when(row.created_at):<16} "
            f"{_when(row.last_used_at):<16} {live.pop(row.client_id, 0):<7} "
            f"{' '.join(metadata.get('redirect_uris', []))}"
        )
    for client_id, count in sorted(live.items()):  # metadata-document clients: their id is a URL, not a row
        click.echo(f"{client_id:<40} {'(client metadata document)':<28} {'none':<20} {'-':<16} {'-':<16} {count}")
    click.echo(f"{len(rows)} registered client(s)")


@clients.command("delete")
@click.argument("client_id")
@with_appcontext
def clients_delete(client_id: str) -> None:
    """Delete a client and revoke every grant it holds (its users must sign in again)."""
    from sqlalchemy import delete, select

    from oauthproxy.authorization_server import revoke_grant
    from oauthproxy.models import Grant, OAuthClient, db, rows_affected

    grant_ids = db.session.scalars(
        select(Grant.id).where(Grant.client_id == client_id, Grant.revoked_at.is_(None))
    ).all()
    for grant_id in grant_ids:
        revoke_grant(grant_id, "revoked_by_operator")
    deleted = rows_affected(db.session.execute(delete(OAuthClient).where(OAuthClient.client_id == client_id)))
    db.session.commit()
    if not deleted and not grant_ids:
        raise click.ClickException(f"no client {client_id!r}; see `oauthproxy clients list`")
    click.echo(f"deleted client {client_id}; revoked {len(grant_ids)} grant(s)")
    _cache_note(len(grant_ids))


def _cache_note(revoked: int) -> None:
    if revoked:
        settings = current_app.config["SETTINGS"]
        ttl = settings.proxy.token_cache_ttl
        if settings.revocation_feed == "off" or ttl == 0:
            click.echo(f"Running proxies refuse the revoked tokens within {ttl} s (TOKEN_CACHE_TTL).")
        else:
            click.echo(
                f"Running proxies refuse the revoked tokens within a second (revocation feed: "
                f"{settings.revocation_feed}); a worker whose feed is down, within {ttl} s (TOKEN_CACHE_TTL)."
            )


@click.group("grants")
def grants() -> None:
    """List or revoke grants: one user's sign-in through one client, with its tokens."""


def _grant_filter(user: str | None, client: str | None):
    from sqlalchemy import or_

    from oauthproxy.models import Grant

    conditions = []
    if user:
        conditions.append(or_(Grant.user_id == user, Grant.user_email == user.lower()))
    if client:
        conditions.append(Grant.client_id == client)
    return conditions


@grants.command("list")
@click.option("--user", help="Only this user (user id or email).")
@click.option("--client", "client", help="Only this client id.")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked grants.")
@with_appcontext
def grants_list(user: str | None, client: str | None, include_revoked: bool) -> None:
    """Grants, newest first (live ones unless --all)."""
    from sqlalchemy import select

    from oauthproxy.models import Grant, db

    query = select(Grant).where(*_grant_filter(user, client)).order_by(Grant.created_at.desc())
    if not include_revoked:
        query = query.where(Grant.revoked_at.is_(None))
    rows = db.session.scalars(query).all()
    click.echo(f"{'ID':<7} {'USER':<24} {'EMAIL':<28} {'CLIENT ID':<40} {'CREATED':<16} {'REVOKED':<16} RESOURCE")
    for row in rows:
        revoked = f"{_when(row.revoked_at)} {row.revoked_reason or ''}".strip() if row.revoked_at else "-"
        click.echo(
            f"{row.id:<7} {row.user_id[:24]:<24} {(row.user_email or '-')[:28]:<28} {row.client_id[:40]:<40} "
            f"{_when(row.created_at):<16} {revoked:<16} {row.resource}"
        )
    click.echo(f"{len(rows)} grant(s)")


@grants.command("revoke")
@click.argument("grant_id", required=False, type=int)
@click.option("--user", help="Every live grant of this user (user id or email).")
@click.option("--client", "client", help="Every live grant of this client id.")
@with_appcontext
def grants_revoke(grant_id: int | None, user: str | None, client: str | None) -> None:
    """Revoke one grant by id, or every live grant of a user and/or a client."""
    from sqlalchemy import select

    from oauthproxy.authorization_server import revoke_grant
    from oauthproxy.models import Grant, db

    if grant_id is None and not user and not client:
        raise click.UsageError("name a GRANT_ID, or --user and/or --client")
    query = select(Grant.id).where(Grant.revoked_at.is_(None), *_grant_filter(user, client))
    if grant_id is not None:
        query = query.where(Grant.id == grant_id)
    ids = db.session.scalars(query).all()
    for found in ids:
        revoke_grant(found, "revoked_by_operator")
    db.session.commit()
    if not ids:
        raise click.ClickException("no live grant matches; see `oauthproxy grants list`")
    click.echo(f"revoked {len(ids)} grant(s): {', '.join(map(str, ids))}")
    _cache_note(len(ids))


@click.group("identity-keys")
def identity_keys() -> None:
    """List or rotate the keys that sign identity assertions (published at /.well-known/jwks.json)."""


def _key_timing():
    from oauthproxy.signing_keys import KeyTiming

    proxy = current_app.config["SETTINGS"].proxy
    return KeyTiming(proxy.identity_assertion_ttl, proxy.identity_keys_reload_interval)


@identity_keys.command("list")
@with_appcontext
def identity_keys_list() -> None:
    """Every signing key, newest first: active (signs), retiring (published until its assertions expire), removed."""
    from oauthproxy.signing_keys import list_signing_keys

    rows = list_signing_keys(_key_timing())
    click.echo(f"{'KID':<44} {'ALG':<6} {'STATE':<9} {'CREATED':<16} {'RETIRED':<16} PUBLISHED UNTIL")
    for row in rows:
        until = _when(row.published_until) if row.published_until else ("-" if row.state == "removed" else "(active)")
        click.echo(
            f"{row.kid:<44} {row.algorithm:<6} {row.state:<9} {_when(row.created_at):<16} "
            f"{_when(row.retired_at):<16} {until}"
        )
    click.echo(f"{len(rows)} signing key(s); times in UTC")


@identity_keys.command("rotate")
@click.option(
    "--algorithm",
    type=click.Choice(["ES256", "EdDSA"], case_sensitive=False),
    help="Of the new key; default IDENTITY_ASSERTION_ALGORITHM (ES256).",
)
@with_appcontext
def identity_keys_rotate(algorithm: str | None) -> None:
    """Make a new signing key active; the one it replaces stays published until its assertions have expired."""
    from oauthproxy.routes import ASSERTION_ALGORITHMS
    from oauthproxy.signing_keys import RotationConflict, rotate_signing_key

    chosen = current_app.config["SETTINGS"].proxy.identity_assertion_algorithm
    if algorithm:
        chosen = next(name for name in ASSERTION_ALGORITHMS if name.lower() == algorithm.lower())
    try:
        rotation = rotate_signing_key(current_application(), chosen)
    except RotationConflict as error:
        raise click.ClickException(str(error)) from None
    timing = _key_timing()
    click.echo(f"new signing key {rotation.new_kid} ({rotation.algorithm}) is published now")
    click.echo(
        f"every worker signs with it from {timing.publication_delay} s from now (twice "
        "IDENTITY_KEYS_RELOAD_INTERVAL): until then it is only published, so that downstreams' cached JWKS know it"
    )
    for kid in rotation.retired_kids:
        click.echo(
            f"key {kid} is retiring: it leaves /.well-known/jwks.json {timing.published_after_retirement} s from now, "
            "once every assertion it signed has expired"
        )


class AuditTime(click.ParamType):
    """An ISO 8601 time (naive: UTC) or a duration back from now (`2h`, `7d`)."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from oauthproxy.audit import BadTime, parse_time

        try:
            return parse_time(str(value))
        except BadTime as error:
            self.fail(str(error), param, ctx)


_FILTER_TEXT = 512  # longer than any user id, email, client id, route or tool name the table holds


def _filter_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (len(value) > _FILTER_TEXT or not value.isprintable()):
        raise click.BadParameter(f"at most {_FILTER_TEXT} printable characters", ctx, param)
    return value


@click.command("audit")
@click.option("--user", callback=_filter_text, help="Only this user (user id or email).")
@click.option("--client", "client", callback=_filter_text, help="Only this OAuth client id.")
@click.option("--route", callback=_filter_text, help="Only this route (its name).")
@click.option("--tool", callback=_filter_text, help="Only calls of this tool.")
@click.option(
    "--since",
    type=AuditTime(),
    help="From this time: ISO 8601 (2026-11-30T14:00Z; UTC unless a zone is "
    "given) or a duration back from now (90s, 15m, 2h, 7d, 2w).",
)
@click.option("--until", type=AuditTime(), help="Up to this time, same forms as --since.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="Newest events first.")
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json: one JSON object per line.",
)
@with_appcontext
def audit_events(
    user: str | None,
    client: str | None,
    route: str | None,
    tool: str | None,
    since: Any,
    until: Any,
    limit: int,
    output: str,
) -> None:
    """The audit trail: sign-ins, consents, tokens issued, refreshed and revoked, connections, tool calls."""
    import json

    from oauthproxy.audit import query_events

    if since is not None and until is not None and since > until:
        raise click.BadParameter("--since is after --until", param_hint="--since")
    rows = query_events(user=user, client=client, route=route, tool=tool, since=since, until=until, limit=limit)
    if output == "json":
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    click.echo(f"{'TIME (UTC)':<23} {'EVENT':<18} {'USER':<24} {'CLIENT ID':<36} {'ROUTE':<12} {'OUTCOME':<10} DETAIL")
    for row in rows:
        detail = " ".join(
            part
            for part in (
                row["tool"] and f"tool={row['tool']}",
                row["duration_ms"] is not None and f"{row['duration_ms']}ms",
                row["reason"] and f"reason={row['reason']}",
            )
            if part
        )
        click.echo(
            f"{row['time'][:23]:<23} {row['event']:<18} {_cell(row['user_email'] or row['user_id'], 24)} "
            f"{_cell(row['client_id'], 36)} {_cell(row['route'], 12)} {_cell(row['outcome'], 10)} "
            f"{_cell(detail, 200)}"
        )
    click.echo(f"{len(rows)} event(s), newest first" + (f" (--limit {limit} reached)" if len(rows) == limit else ""))


def _cell(value: Any, width: int) -> str:
    # Values come from clients and providers: no control characters reach the terminal.
    text = "".join(c if c.isprintable() else "?" for c in str(value or "-"))
    return f"{text[:width]:<{width}}"


#: Exit status of a database command that could not reach or use the database (as gunicorn's start-up).
DATABASE_PROBLEM = 3


class DatabaseCommands(click.Group):
    """Flask-Migrate's `db` commands; a database that cannot be used is one line saying what to check (as at
    gunicorn's start-up), not a traceback: `db upgrade` is a release step whose output people read in a deploy log."""

    def invoke(self, ctx: click.Context) -> Any:
        from sqlalchemy.exc import DBAPIError

        from oauthproxy.self_check import database_problem

        try:
            return super().invoke(ctx)
        except DBAPIError as error:
            action = "upgrade the database" if ctx.invoked_subcommand == "upgrade" else "use the database"
            click.echo(
                f"oauthproxy cannot {action}: {database_problem(current_app.config['SETTINGS'].database_dsn, error)}",
                err=True,
            )
            ctx.exit(DATABASE_PROBLEM)


database_commands = DatabaseCommands(
    "db",
    commands=dict(migrate_cli.db.commands),
    callback=migrate_cli.db.callback,
    params=migrate_cli.db.params,
    help=migrate_cli.db.help,
)


def register_commands(app: Flask) -> None:
    for command in (purge, rotate_key, check, clients, grants, identity_keys, audit_events):
        app.cli.add_command(command)
    app.cli.add_command(database_commands, "db")  # in place of Flask-Migrate's own group (`flask --app wsgi db`)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oauthproxy")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class ProxyCommands(FlaskGroup):
    """Flask's command group, less what belongs to Flask: its development commands (`run`, `shell`, `routes`), its
    `--app`/`--debug`/`--env-file` options and its version. `--help` lists this project's commands without loading
    the app, so it works before the settings are complete; other plugin commands still run when named."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.commands)


# load_dotenv=False: create_app reads OAUTHPROXY_ENV_FILE (default .env in the working directory), as gunicorn
# does; Flask's own loader would also pick up a .env or .flaskenv from any parent folder.
main = ProxyCommands(
    create_app=create_app_or_exit,
    add_default_commands=False,
    add_version_option=False,
    load_dotenv=False,
    set_debug_flag=False,
    help="oauthproxy: an OAuth 2.1 authorization server and proxy for MCP servers. Settings come "
    "from the environment or .env (OAUTHPROXY_ENV_FILE); see the README.",
)
main.params = [param for param in main.params if param.name not in ("env_file", "app", "debug")]
click.version_option(package_version(), "--version", package_name="oauthproxy", message="%(prog)s %(version)s")(main)
main.add_command(gen_key)
# Also on the top-level group, so that `oauthproxy --help` lists them even before the settings are complete.
for _command in (purge, rotate_key, check, clients, grants, identity_keys, audit_events):
    main.add_command(_command)
main.add_command(database_commands, "db")


if __name__ == "__main__":
    main()
