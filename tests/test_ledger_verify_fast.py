"""The short cuts that make verify fast decide exactly what the slow paths decide.

Signatures go straight to libsodium's detached check instead of PyNaCl's wrapper; entries
are read by one decoder call instead of `json.loads`; a whole span joins the Merkle tree as
one subtree root. Each is held here to its slow twin, hostile inputs first.
"""

from __future__ import annotations

import pytest

from forge_cli import identity, parallel
from forge_cli.identity import Identity

SIGNER = Identity.generate()
MESSAGE = b"\x00" * 31 + b"\x01"
GOOD = SIGNER.sign(MESSAGE)


def flipped(data: bytes, at: int = 0, bits: int = 1) -> bytes:
    return data[:at] + bytes([data[at] ^ bits]) + data[at + 1:]


HOSTILE_CHECKS = [
    (SIGNER.public_key, MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, flipped(GOOD)),
    (SIGNER.public_key, MESSAGE, flipped(GOOD, 63, 0xE0)),  # S not reduced
    (SIGNER.public_key, flipped(MESSAGE), GOOD),
    (SIGNER.public_key, b"", GOOD),
    (SIGNER.public_key, b"", SIGNER.sign(b"")),
    (flipped(SIGNER.public_key), MESSAGE, GOOD),
    (bytes(32), MESSAGE, GOOD),  # a small-order key
    (bytes([1]) + bytes(31), MESSAGE, bytes(64)),  # the identity point and a zero signature
    (SIGNER.public_key[:31], MESSAGE, GOOD),  # libsodium would read past these ends
    (SIGNER.public_key + b"\x00", MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, GOOD[:63]),
    (SIGNER.public_key, MESSAGE, GOOD + b"\x00"),
    (b"", MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, b""),
    (SIGNER.public_key.hex(), MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, GOOD.hex()),
    (SIGNER.public_key, MESSAGE.hex(), GOOD),
    (SIGNER.public_key, 32, GOOD),  # bytes(32) would be 32 zero bytes: must not be
    (SIGNER.public_key, None, GOOD),
    (None, MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, None),
    (SIGNER.public_key, bytearray(MESSAGE), GOOD),
    (SIGNER.public_key, memoryview(MESSAGE), GOOD),
    (bytearray(SIGNER.public_key), MESSAGE, GOOD),
    (SIGNER.public_key, MESSAGE, bytearray(GOOD)),
]


def test_verify_calls_libsodium_directly_here():
    """PyNaCl's bundled libsodium exports the detached check: verify must not pay for the
    wrapper's copies where the call is there to make."""
    assert identity.verify_detached is not None


@pytest.mark.parametrize("index", range(len(HOSTILE_CHECKS)))
def test_the_direct_check_agrees_with_pynacl_on_every_input(index):
    public_key, message, signature = HOSTILE_CHECKS[index]
    slow = identity._verify_with_pynacl(public_key, message, signature)  # type: ignore[arg-type]
    assert identity.verify(public_key, message, signature) is slow  # type: ignore[arg-type]
    assert identity.verify_many([(public_key, message, signature)]) == [slow]  # type: ignore[list-item]


def test_only_the_good_signatures_verify_in_a_mixed_batch_on_every_core():
    expected = [identity._verify_with_pynacl(*check) for check in HOSTILE_CHECKS]  # type: ignore[arg-type]
    assert [i for i, ok in enumerate(expected) if ok] == [0, 5, 22, 23]
    many = HOSTILE_CHECKS * 4  # past parallel.SPLIT_AT, so threads share the batch
    assert len(many) >= parallel.SPLIT_AT
    assert parallel.verify_all(many, workers=3) == expected * 4  # type: ignore[arg-type]
    assert identity.verify_many(HOSTILE_CHECKS) == expected  # type: ignore[arg-type]
