"""The proxy's keys for signing identity assertions: created on first use, sealed at rest, rotated, published."""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from flask import Flask
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey
from sqlalchemy import Connection, Table, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from oauthproxy.clock import database_now
from oauthproxy.components import components
from oauthproxy.crypto import DecryptionError, SecretBox, UnknownKeyError
from oauthproxy.models import SigningKey, db

log = logging.getLogger(__name__)

SIGNING_KEYS = cast(Table, SigningKey.__table__)
ACTIVE, RETIRING, REMOVED = "active", "retiring", "removed"
#: How far a downstream's clock may run behind the proxy's and still accept an assertion until its `exp`: a retiring
#: key stays published this much longer than its last assertion can live.
CLOCK_SKEW_SECONDS = 60

# RFC 9864 deprecates the name "EdDSA" for "Ed25519", but verifiers (PyJWT, node's jose until recently, most JWT
# libraries) know only "EdDSA": the assertion uses the name they check, and joserfc's warning is not news.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)


class SigningUnavailable(Exception):
    """No signing key can be used right now (database unreachable, or the sealed key cannot be opened here)."""

    def __init__(self, description: str, retry_after: int = 5):
        super().__init__(description)
        self.description = description
        self.retry_after = retry_after


@dataclass(frozen=True)
class KeyTiming:
    """The lifetimes that decide when a replaced key may leave the JWKS."""

    assertion_ttl: int
    reload_interval: int

    @property
    def publication_delay(self) -> int:
        """Seconds a new key is published before it signs (see SigningKeys)."""
        return 2 * self.reload_interval

    @property
    def published_after_retirement(self) -> int:
        """Seconds a retiring key stays in the JWKS: workers sign with it until the new key has been published for
        `publication_delay` (a worker that read the set before the rotation reads it again within a reload
        interval, and then waits too); the last assertion it signed then lives `assertion_ttl`, read by a
        downstream whose clock may be behind."""
        return self.publication_delay + self.assertion_ttl + CLOCK_SKEW_SECONDS


@dataclass(frozen=True)
class PrivateKey:
    """A key this process can sign with: its `kid`, JWS algorithm and joserfc key."""

    kid: str
    algorithm: str
    key: ECKey | OKPKey

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        """A JWS of `claims`; `typ` says what kind of token it is (RFC 8725 §3.11 explicit typing)."""
        header = {"alg": self.algorithm, "kid": self.kid, "typ": typ}
        return jwt.encode(header, claims, self.key, algorithms=[self.algorithm])


def generate_key(algorithm: str) -> ECKey | OKPKey:
    if algorithm == "EdDSA":
        return OKPKey.generate_key("Ed25519")
    return ECKey.generate_key("P-256")


def public_jwk(key: ECKey | OKPKey, algorithm: str) -> dict[str, Any]:
    """The JWKS entry: RFC 7517 public members, `kid` the RFC 7638 thumbprint, `alg` and `use` for verifiers."""
    return {**key.as_dict(private=False), "kid": key.thumbprint(), "alg": algorithm, "use": "sig"}


def sealed_key_label(kid: str) -> str:
    """The associated data the private key is sealed with: the ciphertext opens only as this row's key."""
    return f"signing-key:{kid}:private_jwk"


def insert_key(connection: Connection, box: SecretBox, algorithm: str) -> str:
    """Insert a new active key (the caller's transaction); IntegrityError when another active key exists."""
    key = generate_key(algorithm)
    kid = key.thumbprint()
    connection.execute(
        insert(SIGNING_KEYS).values(
            kid=kid,
            algorithm=algorithm,
            state=ACTIVE,
            public_jwk=json.dumps(public_jwk(key, algorithm)),
            private_jwk=box.encrypt(json.dumps(key.as_dict(private=True)), sealed_key_label(kid)),
            created_at=database_now(),
        )
    )
    return kid


@dataclass(frozen=True)
class Rotation:
    new_kid: str
    algorithm: str
    retired_kids: tuple[str, ...]


class RotationConflict(Exception):
    """Another rotation (or a worker creating the first key) committed at the same moment; nothing was changed."""


def rotate_signing_key(app: Flask, algorithm: str) -> Rotation:
    """Retire the active key and make a new one active, in one transaction (the command `identity-keys rotate`)."""
    box = components(app).secret_box
    try:
        with app.app_context(), db.engine.begin() as connection:
            retired = tuple(connection.scalars(select(SIGNING_KEYS.c.kid).where(SIGNING_KEYS.c.state == ACTIVE)).all())
            connection.execute(
                update(SIGNING_KEYS)
                .where(SIGNING_KEYS.c.state == ACTIVE)
                .values(state=RETIRING, retired_at=database_now())
            )
            new_kid = insert_key(connection, box, algorithm)
    except IntegrityError:
        raise RotationConflict("another rotation committed at the same time; run the command again") from None
    log.info("signing key %s (%s) is now active; retiring %s", new_kid, algorithm, ", ".join(retired) or "none")
    return Rotation(new_kid, algorithm, retired)


@dataclass(frozen=True)
class KeyRow:
    kid: str
    algorithm: str
    state: str
    created_at: datetime
    retired_at: datetime | None
    removed_at: datetime | None
    #: Until when a retiring key stays in the JWKS (database clock); None for the others.
    published_until: datetime | None


def list_signing_keys(timing: KeyTiming) -> list[KeyRow]:
    """Every key, newest first (the command `identity-keys list`)."""
    from datetime import timedelta

    with db.engine.connect() as connection:
        rows = connection.execute(
            select(
                SIGNING_KEYS.c.kid,
                SIGNING_KEYS.c.algorithm,
                SIGNING_KEYS.c.state,
                SIGNING_KEYS.c.created_at,
                SIGNING_KEYS.c.retired_at,
                SIGNING_KEYS.c.removed_at,
            ).order_by(SIGNING_KEYS.c.created_at.desc())
        ).all()
    keep = timedelta(seconds=timing.published_after_retirement)
    return [
        KeyRow(
            *row,
            published_until=row.retired_at + keep if row.state == RETIRING and row.retired_at else None,
        )
        for row in rows
    ]


@dataclass(frozen=True)
class _KeySet:
    """One reading of the table, as this process uses it until the next."""

    loaded_at: float  # monotonic
    published: tuple[dict[str, Any], ...]
    signer: PrivateKey | None
    #: The active key, while it is still being published ahead of use, and the monotonic time it may sign from.
    pending: tuple[PrivateKey, float] | None = None


class SigningKeys:
    """This process's view of the signing keys: which one signs, and which are published.

    States: `active` (one key; the partial unique index on `state` decides every race to create or rotate one),
    `retiring` (replaced: signs no more, stays published until every assertion it may have signed has expired),
    `removed` (gone from the JWKS, its private key erased). Times are the database's clock (clock.py).

    The set is re-read at most every `reload_interval` seconds, never per request, by one greenlet at a time while
    the others go on with the set they have. A rotated-in key is published for two reload intervals before any worker
    signs with it: one for every worker's JWKS to show it, one for a downstream's copy (cached for at most the
    endpoint's max-age, a reload interval) to expire, so the first assertion it signs finds its `kid` known.

    When the table cannot be read, the set read before keeps signing until two reload intervals after its reading: a
    rotation this process missed happened after that reading, and the key it retired stays published for two reload
    intervals, the assertions' lifetime and the clock skew allowance after it. Later, signing raises
    `SigningUnavailable` until the table answers.
    """

    #: Seconds between attempts while the table cannot be read: not on every request.
    RETRY_SECONDS = 2.0
    #: The longest a request waits for another greenlet's first reading of the table.
    FIRST_READ_WAIT = 15.0

    def __init__(self, app: Flask, algorithm: str, timing: KeyTiming, create_on_first_use: bool):
        self.app = app
        self.algorithm = algorithm
        self.timing = timing
        self.create_on_first_use = create_on_first_use
        self._set: _KeySet | None = None
        self._next_read = 0.0  # monotonic
        self._reload = threading.Lock()
        self._opened: dict[str, PrivateKey] = {}  # kid -> key, so a reload does not decrypt again
        #: How many times this process read the table (the tests check it is periodic, not per request).
        self.reloads = 0

    @property
    def usable_for(self) -> float:
        """Seconds after its reading that a set may still sign (see the class's docstring)."""
        return 2 * self.timing.reload_interval

    # -- what callers use ---------------------------------------------------------------------------

    def signing_key(self) -> PrivateKey:
        keys = self._current()
        now = time.monotonic()
        if now - keys.loaded_at > self.usable_for:
            raise SigningUnavailable("the signing key store is unavailable; retry shortly")
        if keys.pending is not None and keys.pending[1] <= now:
            keys = self._set = _KeySet(keys.loaded_at, keys.published, keys.pending[0])
        if keys.signer is None:
            raise SigningUnavailable("no identity assertion signing key exists yet; retry shortly")
        return keys.signer

    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._current().published)}

    # -- reading the table ----------------------------------------------------------------------------

    def _current(self) -> _KeySet:
        keys = self._set
        if keys is not None and time.monotonic() < self._next_read:
            return keys
        # One reader at a time; the others go on with the set they have, and only a process without one waits.
        if keys is not None:
            if not self._reload.acquire(blocking=False):
                return keys
        elif not self._reload.acquire(timeout=self.FIRST_READ_WAIT):
            raise SigningUnavailable("the signing keys are still being read; retry shortly")
        try:
            keys = self._set
            if keys is not None and time.monotonic() < self._next_read:
                return keys  # another greenlet read them while this one waited
            try:
                self._set = self._load()
                self._next_read = self._set.loaded_at + self.timing.reload_interval
                return self._set
            except (SQLAlchemyError, SigningUnavailable) as error:
                self._next_read = time.monotonic() + self.RETRY_SECONDS
                log.warning("could not read the identity assertion signing keys: %s", _why(error))
                if keys is not None:
                    return keys  # signing_key() decides whether it is still fresh enough to sign with
                if isinstance(error, SigningUnavailable):
                    raise
                raise SigningUnavailable("the signing key store is unavailable; retry shortly") from None
        finally:
            self._reload.release()

    def _load(self) -> _KeySet:
        self.reloads += 1
        with self.app.app_context():
            rows = self._read()
            if self.create_on_first_use and not any(row.state == ACTIVE for row in rows):
                self._create_first_key()
                rows = self._read()
            rows = self._retire_expired(rows)
        loaded_at = time.monotonic()
        active = next((row for row in rows if row.state == ACTIVE), None)
        retiring = sorted((row for row in rows if row.state == RETIRING), key=lambda row: row.retired_at, reverse=True)
        published = tuple(json.loads(row.public_jwk) for row in ([active] if active else []) + retiring)
        if active is None:
            return _KeySet(loaded_at, published, None)
        published_for = (active.now - active.created_at).total_seconds()
        wait = self.timing.publication_delay - published_for
        signer = self._open(active)
        if wait > 0 and retiring:
            # The new key is not yet in every downstream's cached JWKS: go on with the one it replaced until it is
            # (unless that one cannot be opened, which may be why it was replaced).
            try:
                return _KeySet(loaded_at, published, self._open(retiring[0]), (signer, loaded_at + wait))
            except SigningUnavailable:
                pass
        return _KeySet(loaded_at, published, signer)

    def _read(self) -> list[Any]:
        with db.engine.connect() as connection:
            return list(
                connection.execute(
                    select(
                        SIGNING_KEYS.c.kid,
                        SIGNING_KEYS.c.algorithm,
                        SIGNING_KEYS.c.state,
                        SIGNING_KEYS.c.public_jwk,
                        SIGNING_KEYS.c.private_jwk,
                        SIGNING_KEYS.c.created_at,
                        SIGNING_KEYS.c.retired_at,
                        database_now().label("now"),
                    ).where(SIGNING_KEYS.c.state.in_((ACTIVE, RETIRING)))
                ).all()
            )

    def _create_first_key(self) -> None:
        try:
            with db.engine.begin() as connection:
                kid = insert_key(connection, components(self.app).secret_box, self.algorithm)
        except IntegrityError:
            return  # another worker or instance created it first: the next read finds theirs
        log.info("created the first identity assertion signing key %s (%s)", kid, self.algorithm)

    def _retire_expired(self, rows: list[Any]) -> list[Any]:
        """Mark retiring keys removed once their last assertion has expired; written only when one is due."""
        keep = self.timing.published_after_retirement
        due = [
            row.kid
            for row in rows
            if row.state == RETIRING and row.retired_at and (row.now - row.retired_at).total_seconds() >= keep
        ]
        if not due:
            return rows
        with db.engine.begin() as connection:
            connection.execute(
                update(SIGNING_KEYS)
                .where(
                    SIGNING_KEYS.c.kid.in_(due),
                    SIGNING_KEYS.c.state == RETIRING,
                    SIGNING_KEYS.c.retired_at <= database_now(-keep),
                )
                .values(state=REMOVED, removed_at=database_now(), private_jwk=None)
            )
        log.info("signing key(s) %s left the JWKS: every assertion they signed has expired", ", ".join(due))
        return [row for row in rows if row.kid not in due]

    def _open(self, row: Any) -> PrivateKey:
        opened = self._opened.get(row.kid)
        if opened is not None:
            return opened
        box = components(self.app).secret_box
        try:
            document = json.loads(box.decrypt(row.private_jwk, sealed_key_label(row.kid)))
        except UnknownKeyError as error:
            log.error("signing key %s: %s", row.kid, error)
            raise SigningUnavailable(
                "the identity assertion signing key was sealed with an encryption key missing here", retry_after=60
            ) from None
        except (DecryptionError, TypeError, ValueError) as error:
            log.error(
                "signing key %s cannot be opened (%s); run `oauthproxy identity-keys rotate` to replace it",
                row.kid,
                error,
            )
            raise SigningUnavailable("the identity assertion signing key cannot be read", retry_after=60) from None
        key: ECKey | OKPKey = (OKPKey if row.algorithm == "EdDSA" else ECKey).import_key(document)
        opened = PrivateKey(row.kid, row.algorithm, key)
        if len(self._opened) > 16:  # keys come and go with rotations; a handful are ever in use
            self._opened.clear()
        self._opened[row.kid] = opened
        return opened


def _why(error: Exception) -> str:
    if isinstance(error, SigningUnavailable):
        return error.description
    return type(error).__name__  # never the statement or its parameters: a sealed key could be among them
