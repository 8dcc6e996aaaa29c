"""Logging: set-up, and redaction that keeps codes, states, tokens and secrets out of every log line."""

from __future__ import annotations

import logging
import re

# Query and form parameters whose values are credentials or one-time secrets.
SECRET_PARAMETERS = ("code", "state", "code_verifier", "code_challenge", "access_token", "refresh_token",
                     "id_token", "token", "client_secret", "csrf_token", "request")
_SECRET_VALUE = re.compile(r"(?<=[?&])(" + "|".join(SECRET_PARAMETERS) + r")=[^&\s\"]*")


def redact(text: str) -> str:
    """`text` with the value of every secret query parameter replaced, e.g. `/callback?code=…&state=…`."""
    return _SECRET_VALUE.sub(r"\1=[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message through `redact`; for access loggers that print request lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Authlib logs whole token responses at DEBUG ("Issue token {...}"): never let them through.
    logging.getLogger("authlib").setLevel(logging.INFO)
    for name in ("werkzeug", "gunicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
