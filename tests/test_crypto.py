"""AES-256-GCM secrets at rest: fresh nonces, associated data binding each ciphertext to its row, key rotation."""

from __future__ import annotations

import os

import pytest

from oauthproxy.crypto import DecryptionError, SecretBox, hash_token, key_id, new_token


def test_round_trip_with_fresh_nonce() -> None:
    box = SecretBox([os.urandom(32)])
    first, second = (
        box.encrypt("upstream-token", "grant:1:upstream_access_token"),
        box.encrypt("upstream-token", "grant:1:upstream_access_token"),
    )
    assert first != second  # a fresh 96-bit nonce every time
    assert "upstream-token" not in first
    assert box.decrypt(first, "grant:1:upstream_access_token") == "upstream-token"


@pytest.mark.parametrize(
    "other_row", ["grant:2:upstream_access_token", "grant:1:upstream_refresh_token", "client:1:secret"]
)
def test_ciphertext_is_bound_to_its_row_and_purpose(other_row: str) -> None:
    box = SecretBox([os.urandom(32)])
    sealed = box.encrypt("token", "grant:1:upstream_access_token")
    with pytest.raises(DecryptionError, match="bound to another row"):
        box.decrypt(sealed, other_row)


def test_tampering_is_detected() -> None:
    box = SecretBox([os.urandom(32)])
    sealed = box.encrypt("token", "aad")
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(DecryptionError):
        box.decrypt(tampered, "aad")


def test_rotation_old_key_still_decrypts_and_rotate_moves_to_new_key() -> None:
    old, new = os.urandom(32), os.urandom(32)
    sealed = SecretBox([old]).encrypt("token", "aad")
    rotated_box = SecretBox([new, old])
    assert rotated_box.decrypt(sealed, "aad") == "token"
    assert rotated_box.needs_rotation(sealed)
    moved = rotated_box.rotate(sealed, "aad")
    assert not rotated_box.needs_rotation(moved)
    assert moved.split(".")[1] == key_id(new)
    with pytest.raises(DecryptionError, match="no configured ENCRYPTION_KEY has key id"):
        SecretBox([os.urandom(32)]).decrypt(moved, "aad")


def test_tokens_are_256_bit_and_stored_as_hashes() -> None:
    token = new_token()
    assert len(token) >= 43
    assert hash_token(token) != token and len(hash_token(token)) == 64
    assert len({new_token() for _ in range(1000)}) == 1000
