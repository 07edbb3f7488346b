"""Agent accounts held by the node: one Ed25519 key and one API token each, plus the operator.

    FORGE_HOME/api_token          the operator's token (the node's own account), 0600
    FORGE_HOME/keys/NAME.key      an agent's key, same format and rules as node.key, 0600
    FORGE_HOME/keys/tokens.json   SHA-256(token) hex → {name, account, created_ms, revoked}, 0600

Only hashes of agent tokens are stored; a token is shown once, when it is made. Lookups
compare hashes with `hmac.compare_digest` against every record, so timing says nothing about
which token (if any) matched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_cli import config, identity
from forge_cli.errors import IdentityError, StorageError, UsageError
from forge_cli.identity import Identity

KEYS_DIR = "keys"
TOKENS_FILE = "tokens.json"
API_TOKEN_FILE = "api_token"
OPERATOR = "operator"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def token_hash(token: str) -> str:
    """SHA-256 of the token's UTF-8 bytes, hex: the only form in which tokens are kept."""
    return hashlib.sha256(token.encode()).hexdigest()


def _check_private(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"{what} {path} has mode {mode:04o}; it must be 0600 because it "
                            "grants access to an account", hint=f"chmod 600 {path}")


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write a 0600 file atomically; with replace=False fail if it exists (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def operator_token(home: Path | None = None) -> str:
    """The operator's API token, created on first call (32 random bytes, urlsafe base64).

    Never regenerated: a file that is too open or empty is an error for a person to fix.
    """
    path = (home or config.home()) / API_TOKEN_FILE
    if not path.exists():
        try:
            _write_private(path, secrets.token_urlsafe(32) + "\n", replace=False)
        except FileExistsError:
            pass  # another process made it first; use theirs
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
    return _read_operator_token(path)


def _read_operator_token(path: Path) -> str:
    try:
        _check_private(path, "token file")
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read token file {path}: {exc}") from exc
    if not token:
        raise IdentityError(f"token file {path} is empty; forge will not replace it",
                            hint="write a token into it, or move it away to make a new one")
    return token


@dataclass(frozen=True)
class Resolved:
    """Who a bearer token belongs to."""

    name: str
    account_hex: str
    identity: Identity | None
    is_operator: bool


class Accounts:
    """The keystore under FORGE_HOME/keys and the operator token, as a running node reads them.

    tokens.json is re-read whenever its mtime, size or inode changes, so agents created by
    `forge wallet agent create` while a node runs are seen on their first request.
    """

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else config.home()
        self.dir = self.home / KEYS_DIR
        self.tokens_path = self.dir / TOKENS_FILE
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._digests: list[tuple[bytes, str]] = []  # (sha256 digest, hex key into _records)
        self._stamp: tuple[int, int, int] | None = None
        self._operator: tuple[tuple[int, int, int], bytes] | None = None
        self._keys: dict[str, Identity] = {}  # account hex → loaded key

    # -- files -----------------------------------------------------------------------------

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int] | None:
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _refresh(self) -> None:
        stamp = self._stat(self.tokens_path)
        if stamp == self._stamp:
            return
        records = {} if stamp is None else self._read_tokens()
        self._records = records
        self._digests = [(bytes.fromhex(h), h) for h in records]
        self._stamp = stamp

    def _read_tokens(self) -> dict[str, dict[str, Any]]:
        path = self.tokens_path
        try:
            _check_private(path, "token store")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IdentityError(f"token store {path} is unreadable: {exc}; forge will not "
                                "replace it", hint="restore it from a backup") from exc
        if not isinstance(data, dict) or not all(
            isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) and isinstance(r, dict)
            and {"name", "account", "created_ms", "revoked"} <= set(r)
            for h, r in data.items()
        ):
            raise IdentityError(f"token store {path} is not a map of token hashes to "
                                "{name, account, created_ms, revoked}; forge will not replace it")
        return data

    def _write_tokens(self, records: dict[str, dict[str, Any]]) -> None:
        try:
            _write_private(self.tokens_path, json.dumps(records, indent=2, sort_keys=True) + "\n",
                           replace=True)
        except OSError as exc:
            raise StorageError(f"cannot write {self.tokens_path}: {exc.strerror}") from exc
        self._stamp = None  # re-read on next use

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise changes across threads and processes (create/revoke read-modify-write)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot use keystore {self.dir}: {exc.strerror}") from exc
        with self._lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._stamp = None
                self._refresh()
                yield
            finally:
                os.close(fd)

    def _key_path(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def _load_key(self, name: str, account: str) -> Identity:
        key = self._keys.get(account)
        if key is None:
            key = identity.load_existing(self._key_path(name))
            if key is None:
                raise IdentityError(f"agent {name!r} has a token but no key file "
                                    f"{self._key_path(name)}")
            if key.node_id != account:
                raise IdentityError(f"key file {self._key_path(name)} holds account "
                                    f"{key.node_id[:16]}…, not {account[:16]}… as tokens.json says")
            self._keys[account] = key
        return key

    # -- agents ----------------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise UsageError(f"agent name {name!r} must be 1 to 32 of a-z, 0-9, '_' or '-', "
                             "starting with a letter or digit")
        if name == OPERATOR:
            raise UsageError(f"agent name {OPERATOR!r} is reserved for the node's own account")
        return name

    def create(self, name: str) -> tuple[Identity, str]:
        """A new agent: its key file and a token, returned once and stored only as a hash."""
        self.check_name(name)
        with self._exclusive():
            path = self._key_path(name)
            if path.exists() or any(r["name"] == name for r in self._records.values()):
                raise UsageError(f"agent {name!r} already exists ({path})",
                                 hint="pick another name, or `forge wallet agent list`")
            agent = Identity.generate()
            try:
                identity.write_new_key(path, agent)
            except FileExistsError:
                raise UsageError(f"agent {name!r} already exists ({path})") from None
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
            token = secrets.token_urlsafe(32)
            records = dict(self._records)
            records[token_hash(token)] = {"name": name, "account": agent.node_id,
                                          "created_ms": time.time_ns() // 1_000_000,
                                          "revoked": False}
            self._write_tokens(records)
            self._keys[agent.node_id] = agent
        return agent, token

    def list(self) -> list[dict[str, Any]]:
        """Every agent: name, account, created_ms, revoked (never a token or its hash)."""
        with self._lock:
            self._refresh()
            rows = [{"name": r["name"], "account": r["account"], "created_ms": r["created_ms"],
                     "revoked": r["revoked"]} for r in self._records.values()]
        return sorted(rows, key=lambda r: (r["created_ms"], r["name"]))

    def revoke(self, name: str) -> bool:
        """Revoke the agent's token(s); False if they were revoked already. The key stays, as
        the account may still hold CU and appears in the ledger."""
        with self._exclusive():
            hits = [h for h, r in self._records.items() if r["name"] == name]
            if not hits:
                raise UsageError(f"no agent named {name!r}", hint="see `forge wallet agent list`")
            if all(self._records[h]["revoked"] for h in hits):
                return False
            records = {h: dict(r) for h, r in self._records.items()}
            for h in hits:
                records[h]["revoked"] = True
            self._write_tokens(records)
        return True

    # -- lookups ---------------------------------------------------------------------------

    def _operator_digest(self) -> bytes | None:
        path = self.home / API_TOKEN_FILE
        stamp = self._stat(path)
        if stamp is None:
            return None
        if self._operator is None or self._operator[0] != stamp:
            self._operator = (stamp, hashlib.sha256(_read_operator_token(path).encode()).digest())
        return self._operator[1]

    def _node(self) -> Identity | None:
        return identity.load_existing(self.home / identity.KEY_FILE)

    def resolve(self, token: str | None) -> Resolved | None:
        """The account a bearer token names, or None (unknown, revoked or empty)."""
        if not isinstance(token, str) or not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            self._refresh()
            operator = self._operator_digest()
            is_operator = operator is not None and hmac.compare_digest(digest, operator)
            match = None
            for stored, key in self._digests:  # every record, no early exit
                if hmac.compare_digest(digest, stored):
                    match = key
            record = self._records.get(match) if match is not None else None
        if is_operator:
            node = self._node()
            return Resolved(OPERATOR, node.node_id if node else "", node, True)
        if record is None or record["revoked"]:
            return None
        return Resolved(record["name"], record["account"],
                        self._load_key(record["name"], record["account"]), False)

    def signer_for(self, account_hex: str) -> Identity | None:
        """The key that signs for `account_hex`: the node's own, or a live agent's; else None."""
        node = self._node()
        if node is not None and node.node_id == account_hex:
            return node
        with self._lock:
            self._refresh()
            record = next((r for r in self._records.values()
                           if r["account"] == account_hex and not r["revoked"]), None)
        return None if record is None else self._load_key(record["name"], account_hex)
