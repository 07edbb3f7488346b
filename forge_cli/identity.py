"""Ed25519 identities: the node key at FORGE_HOME/node.key and signature checks.

A key file holds the 32-byte seed as 64 hex digits, mode 0600. It is created once, atomically,
and never regenerated: a file that is too open or malformed is an error for a person to fix.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_sign
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from forge_cli import config
from forge_cli.errors import IdentityError

KEY_FILE = "node.key"


@dataclass(frozen=True)
class Identity:
    """A private key and the public account it controls."""

    signing_key: SigningKey

    @functools.cached_property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @functools.cached_property
    def node_id(self) -> str:
        """The account name everywhere in forge: the hex public key."""
        return self.public_key.hex()

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature."""
        # The binding directly: SigningKey.sign wraps the result in objects we would discard.
        return crypto_sign(message, self.signing_key._signing_key)[:64]

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(SigningKey(seed))


def _load_verify_detached() -> Callable[[bytes, bytes, int, bytes], int] | None:
    """libsodium's crypto_sign_ed25519_verify_detached from the copy PyNaCl loaded, or None.

    PyNaCl's bindings reach it only through crypto_sign_open, which costs two buffer
    allocations and a copy of signature + message per call; the library itself exports the
    detached check. cffi releases the GIL around the call, so threads verify in parallel.
    """
    try:
        import cffi
        from nacl import _sodium

        ffi = cffi.FFI()
        ffi.cdef("int crypto_sign_ed25519_verify_detached(const unsigned char *sig, "
                 "const unsigned char *m, unsigned long long mlen, const unsigned char *pk);")
        function: Callable[[bytes, bytes, int, bytes], int] = ffi.dlopen(
            _sodium.__file__).crypto_sign_ed25519_verify_detached
        return function
    except (ImportError, OSError, AttributeError):  # no such symbol, or no cffi: PyNaCl's path
        return None


# The raw call: (signature, message, message length, public key) -> 0 if valid. It reads 64
# and 32 bytes whatever it is given, so every caller checks those lengths first.
verify_detached = _load_verify_detached()

_verify_keys: dict[bytes, VerifyKey] = {}


def verify_with_pynacl(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """PyNaCl's path to the same libsodium check (the fallback, and the reference tests
    compare the direct call with)."""
    try:
        key = _verify_keys.get(public_key)
        if key is None:
            if len(_verify_keys) > 4096:
                _verify_keys.clear()
            key = _verify_keys[public_key] = VerifyKey(public_key)
        key.verify(message, signature)
        return True
    except (BadSignatureError, ValueError, TypeError):  # nacl's own errors subclass these
        return False


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if `signature` is `public_key`'s Ed25519 signature of `message`; never raises."""
    if verify_detached is None:
        return verify_with_pynacl(public_key, message, signature)
    if not (isinstance(public_key, bytes) and len(public_key) == 32
            and isinstance(signature, bytes) and len(signature) == 64):
        return False
    if not isinstance(message, bytes):
        if not isinstance(message, bytearray | memoryview):
            return False
        message = bytes(message)
    return verify_detached(signature, message, len(message), public_key) == 0


def verify_many(checks: Iterable[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """`verify` of each (public key, message, signature), in order: the loop without a
    Python call per check when every check has the shape libsodium reads."""
    function = verify_detached
    out = []
    for public_key, message, signature in checks:
        if (function is not None and type(public_key) is bytes and len(public_key) == 32
                and type(signature) is bytes and len(signature) == 64 and type(message) is bytes):
            out.append(function(signature, message, len(message), public_key) == 0)
        else:
            out.append(verify(public_key, message, signature))
    return out


def verify_hex(public_hex: str, message: bytes, signature_hex: str) -> bool:
    try:
        return verify(bytes.fromhex(public_hex), message, bytes.fromhex(signature_hex))
    except (ValueError, TypeError):
        return False


def _read_key(path: Path) -> Identity:
    try:
        info = path.stat()
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0600 "
            f"because it holds a private key",
            hint=f"chmod 600 {path}",
        )
    try:
        text = path.read_text(encoding="ascii").strip()
        seed = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IdentityError(
            f"key file {path} is not 64 hex digits; it is corrupt, and forge will not replace it",
            hint="restore it from a backup, or move it away to make a new identity",
        ) from exc
    if len(seed) != 32:
        raise IdentityError(
            f"key file {path} holds {len(seed)} bytes, expected a 32-byte Ed25519 seed; "
            "forge will not replace it",
            hint="restore it from a backup, or move it away to make a new identity",
        )
    return Identity.from_seed(seed)


def write_new_key(path: Path, identity: Identity) -> None:
    """Write a key file with mode 0600 atomically; fails if one already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (identity.signing_key.encode().hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created the key first
    finally:
        tmp.unlink()


def load_or_create(path: Path | None = None) -> Identity:
    """The node identity, created on first use."""
    path = path or config.home() / KEY_FILE
    if not path.exists():
        try:
            write_new_key(path, Identity.generate())
        except FileExistsError:
            pass
        except OSError as exc:
            raise IdentityError(f"cannot create key file {path}: {exc.strerror}") from exc
    return _read_key(path)


def load_existing(path: Path | None = None) -> Identity | None:
    """The node identity if one exists (never creates one)."""
    path = path or config.home() / KEY_FILE
    return _read_key(path) if path.exists() else None
