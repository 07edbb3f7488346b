"""A model's identity: the SHA-256 of its GGUF file, computed once per (path, size, mtime).

Hashing a multi-GB file takes seconds, so results are kept in memory and in
FORGE_HOME/model-hashes.json; a file that changes size or mtime is hashed again, and entries of
files changed or gone are dropped from that file when the next digest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from forge_cli import config
from forge_cli.errors import ModelError

CACHE_FILE = "model-hashes.json"
_lock = threading.Lock()
_memory: dict[str, str] = {}


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _cache_path() -> Path:
    return config.home() / CACHE_FILE


def _load_disk() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _current(key: str) -> bool:
    """Whether the file a cache key names still has that path, size and mtime."""
    path = key.rsplit("|", 2)[0]
    try:
        return _key(Path(path)) == key
    except OSError:
        return False


def _store_disk(key: str, digest: str) -> None:
    # Entries of files since changed or deleted are dropped as each new one is written, so the
    # file holds about one entry per model on disk however often models are replaced.
    data = {k: v for k, v in _load_disk().items() if _current(k)}
    data[key] = digest
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{CACHE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs a re-hash next time


def remember(path: str | os.PathLike[str], digest: str) -> None:
    """Record a digest that is already known (e.g. verified by the embedded package)."""
    key = _key(Path(path))
    with _lock:
        _memory[key] = digest
        _store_disk(key, digest)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a model file, from the cache when its path, size and mtime are unchanged."""
    path = Path(path)
    try:
        key = _key(path)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    with _lock:
        if key in _memory:
            return _memory[key]
        cached = _load_disk().get(key)
        if cached:
            _memory[key] = cached
            return cached
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(4 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    hexdigest = digest.hexdigest()
    with _lock:
        _memory[key] = hexdigest
        _store_disk(key, hexdigest)
    return hexdigest
