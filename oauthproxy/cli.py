"""The `oauthproxy` command line (also `flask --app wsgi ...`): keys, database, purge."""

from __future__ import annotations

import sys

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from oauthproxy.crypto import generate_key


def create_app_or_exit() -> Flask:
    from oauthproxy import create_app
    from oauthproxy.config import ConfigError

    try:
        return create_app()
    except ConfigError as error:
        report_config_error(error)
        sys.exit(2)


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
    from oauthproxy.crypto import DecryptionError
    from oauthproxy.database import rotate_encryption_key

    try:
        changed = rotate_encryption_key()
    except DecryptionError as error:
        raise click.ClickException(f"{error}. Nothing was changed: list the old key after the new one in "
                                   "ENCRYPTION_KEY (ENCRYPTION_KEY=new,old) and run rotate-key again.") from None
    click.echo(f"re-encrypted {changed} value(s) under key {current_app.extensions['secret_box'].current_key_id}")


def register_commands(app: Flask) -> None:
    for command in (purge, rotate_key):
        app.cli.add_command(command)


main = FlaskGroup(create_app=create_app_or_exit, add_default_commands=True, load_dotenv=True,
                  help="oauthproxy: OAuth 2.1 proxy for MCP servers.")
main.add_command(gen_key)


if __name__ == "__main__":
    main()
