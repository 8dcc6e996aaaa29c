"""Crypto: AES-256-GCM for secrets at rest (key ids, rotation, associated data), token hashing, key derivation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CIPHERTEXT_VERSION = "v1"


class DecryptionError(Exception):
    """A ciphertext could not be opened: unknown key id, tampering, or the wrong row or purpose."""


class UnknownKeyError(DecryptionError):
    """The key that sealed a ciphertext is not in ENCRYPTION_KEY here: a configuration fault, the data may be intact."""


def generate_key() -> str:
    """A fresh `ENCRYPTION_KEY` value: base64 of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def derive_key(key: bytes, purpose: bytes) -> bytes:
    """A 32-byte subkey for `purpose`, so one operator secret never serves two uses directly."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(key)


def key_id(key: bytes) -> str:
    """A short public fingerprint stored beside each ciphertext, so rotation knows which key opens it."""
    return hashlib.sha256(b"oauthproxy key id" + key).hexdigest()[:8]


def hash_token(token: str) -> str:
    """Tokens, codes and states are stored only as SHA-256: they are 256-bit random, so no salt is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """An opaque token with 256 bits of randomness."""
    return secrets.token_urlsafe(32)


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class SecretBox:
    """Encrypts under the first key; decrypts under any listed key (ENCRYPTION_KEY may list several to rotate).

    Every ciphertext carries `v1.<key id>.<base64(nonce || ciphertext)>`. The associated data names the row
    and purpose (e.g. `grant:42:upstream_refresh_token`), so a ciphertext copied to another row or column
    fails to open instead of decrypting as someone else's token.
    """

    def __init__(self, keys: tuple[bytes, ...] | list[bytes]):
        if not keys:
            raise ValueError("at least one key is required")
        self._keys = {key_id(key): AESGCM(key) for key in keys}
        self.current_key_id = key_id(keys[0])

    def encrypt(self, plaintext: str, associated_data: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._keys[self.current_key_id].encrypt(nonce, plaintext.encode(), associated_data.encode())
        return f"{CIPHERTEXT_VERSION}.{self.current_key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def decrypt(self, ciphertext: str, associated_data: str) -> str:
        try:
            version, kid, payload = ciphertext.split(".", 2)
        except ValueError:
            raise DecryptionError("malformed ciphertext") from None
        if version != CIPHERTEXT_VERSION:
            raise DecryptionError(f"unknown ciphertext version {version!r}")
        aead = self._keys.get(kid)
        if aead is None:
            raise UnknownKeyError(
                f"no configured ENCRYPTION_KEY has key id {kid}; was a key removed before `oauthproxy rotate-key`?"
            )
        try:
            raw = base64.urlsafe_b64decode(payload.encode())
            return aead.decrypt(raw[:12], raw[12:], associated_data.encode()).decode()
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError; so is a nonce of the wrong size
            raise DecryptionError("malformed ciphertext") from None
        except InvalidTag:
            raise DecryptionError(
                "ciphertext failed authentication (tampered, or bound to another row or purpose)"
            ) from None

    def needs_rotation(self, ciphertext: str) -> bool:
        return ciphertext.split(".", 2)[1:2] != [self.current_key_id]

    def rotate(self, ciphertext: str, associated_data: str) -> str:
        return self.encrypt(self.decrypt(ciphertext, associated_data), associated_data)
