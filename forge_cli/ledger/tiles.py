"""The ledger as C2SP tlog-tiles: tile paths, hash tiles and entry bundles read from the stored
tree, and an export of the whole tree as static files.

A tile at level L holds up to 256 consecutive Merkle hashes of RFC 9162 level 8·L (level 0:
the entry hashes); an entry bundle holds the entries themselves, each after its length as a
big-endian uint16. Partial tiles exist only for tree sizes that a stored checkpoint names.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from forge_cli.errors import LedgerError, UsageError
from forge_cli.ledger.entries import MAX_LEAF_BYTES
from forge_cli.ledger.store import Ledger

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # hashes in a full tile
MAX_LEVEL = 63
MAX_GROUPS = 8  # 3-digit path groups of a tile index: far beyond any SQLite rowid
SQLITE_MAX = 2**63 - 1


@dataclass(frozen=True)
class Tile:
    """One tile: hashes at `level`, or (entries=True) the entry bundle beside level 0.

    >>> Tile(0, 1234067, 5).path()
    'tile/0/x001/x234/067.p/5'
    """

    level: int
    index: int
    width: int = TILE_WIDTH
    entries: bool = False

    @property
    def full(self) -> bool:
        return self.width == TILE_WIDTH

    @property
    def start(self) -> int:
        """Index of the tile's first hash among the hashes of its level."""
        return self.index * TILE_WIDTH

    def path(self) -> str:
        groups = [f"{self.index % 1000:03d}"]
        rest = self.index // 1000
        while rest:
            groups.insert(0, f"x{rest % 1000:03d}")
            rest //= 1000
        tail = "/".join(groups) + ("" if self.full else f".p/{self.width}")
        return f"tile/{'entries' if self.entries else self.level}/{tail}"


def _decimal(text: str, what: str, low: int, high: int) -> int:
    """A decimal with no sign and no leading zero, within low..high."""
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
        raise UsageError(f"{what} must be a decimal without leading zeros, found {text[:20]!r}")
    value = int(text)
    if not low <= value <= high:
        raise UsageError(f"{what} must be between {low} and {high}, found {value}")
    return value


def parse_path(path: str) -> Tile:
    """The tile named by a path after `tile/`: `<L>/<N>[.p/<W>]` or `entries/<N>[.p/<W>]`.

    Only the one canonical spelling of each tile is accepted (UsageError otherwise).

    >>> parse_path("entries/x001/234.p/7")
    Tile(level=0, index=1234, width=7, entries=True)
    """
    parts = path.split("/")
    if len(parts) < 2 or len(parts) > MAX_GROUPS + 2:
        raise UsageError(f"a tile path is <L>/<N>[.p/<W>] or entries/<N>[.p/<W>], found {path[:80]!r}")
    entries = parts[0] == "entries"
    level = 0 if entries else _decimal(parts[0], "tile level", 0, MAX_LEVEL)
    groups, width = parts[1:], TILE_WIDTH
    if len(groups) >= 2 and groups[-2].endswith(".p"):
        width = _decimal(groups[-1], "partial tile width", 1, TILE_WIDTH - 1)
        groups = [*groups[:-2], groups[-2][:-2]]
    index = 0
    for position, group in enumerate(groups):
        last = position == len(groups) - 1
        digits = group if last else group[1:]
        if (not last and group[:1] != "x") or len(digits) != 3 or not (
                digits.isascii() and digits.isdigit()):
            raise UsageError("a tile index is 3-digit groups, all but the last after an x "
                             f"(x001/x234/067), found {'/'.join(groups)[:80]!r}")
        if position == 0 and not last and digits == "000":
            raise UsageError(f"tile index {'/'.join(groups)!r} has a leading x000 group")
        index = index * 1000 + int(digits)
    return Tile(level, index, width, entries)


def tiles_for_size(size: int) -> Iterator[Tile]:
    """Every tile and entry bundle of a tree of `size` entries: the full ones level by level,
    then the partial ones (where a level's count of hashes is not a multiple of 256)."""
    for level, count in enumerate(_level_counts(size)):
        for n in range(count // TILE_WIDTH):
            yield Tile(level, n)
            if level == 0:
                yield Tile(0, n, entries=True)
    yield from partial_tiles(size)


def partial_tiles(size: int) -> list[Tile]:
    """The partial tiles (entry bundle included) that a checkpoint of `size` entries needs."""
    found = []
    for level, count in enumerate(_level_counts(size)):
        width = count % TILE_WIDTH
        if width:
            found.append(Tile(level, count // TILE_WIDTH, width))
            if level == 0:
                found.append(Tile(0, count // TILE_WIDTH, width, entries=True))
    return found


def _level_counts(size: int) -> list[int]:
    """How many hashes each tile level has in a tree of `size` entries (level 0 first)."""
    counts = []
    while size:
        counts.append(size)
        size >>= TILE_HEIGHT
    return counts


def _named_by_checkpoint(ledger: Ledger, tile: Tile) -> bool:
    # A partial tile of width W at level L belongs to every size s with
    # floor(s / 256**L) == index*256 + W.
    count = tile.start + tile.width
    low, high = count << (TILE_HEIGHT * tile.level), (count + 1) << (TILE_HEIGHT * tile.level)
    if low > SQLITE_MAX:
        return False
    row = ledger.conn.execute("SELECT 1 FROM checkpoints WHERE size >= ? AND size < ? LIMIT 1",
                              (low, min(high, SQLITE_MAX))).fetchone()
    return row is not None


def read(ledger: Ledger, tile: Tile) -> bytes | None:
    """The tile's bytes, or None where this ledger does not serve it: a tile the tree has not
    reached, or a partial tile that no stored checkpoint names."""
    end = tile.start + tile.width
    if end > SQLITE_MAX or (not tile.full and not _named_by_checkpoint(ledger, tile)):
        return None
    if tile.entries:
        rows = ledger.conn.execute("SELECT seq, entry FROM entries WHERE seq >= ? AND seq < ? "
                                   "ORDER BY seq", (tile.start, end)).fetchall()
        if len(rows) != tile.width:
            return None
        return bundle(rows)
    if tile.level == 0:
        rows = ledger.conn.execute("SELECT hash FROM entries WHERE seq >= ? AND seq < ? "
                                   "ORDER BY seq", (tile.start, end)).fetchall()
    else:
        rows = ledger.conn.execute(
            "SELECT hash FROM merkle_nodes WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (TILE_HEIGHT * tile.level, tile.start, end)).fetchall()
    if len(rows) != tile.width:
        return None
    return b"".join(bytes(row[0]) for row in rows)


def bundle(rows: list[tuple[int, bytes]]) -> bytes:
    """An entry bundle of (seq, entry bytes) rows: each entry after its uint16 length."""
    out = bytearray()
    for seq, raw in rows:
        if len(raw) > MAX_LEAF_BYTES:  # refused at append; only an old ledger could hold one
            raise LedgerError(f"entry {seq} is {len(raw)} bytes, more than an entry bundle "
                              f"can carry ({MAX_LEAF_BYTES})")
        out += len(raw).to_bytes(2, "big")
        out += raw
    return bytes(out)


@dataclass(frozen=True)
class Export:
    size: int
    files: int
    bytes: int


def export(ledger: Ledger, directory: Path) -> Export:
    """Write the tree of the latest stored checkpoint under `directory` as static files:
    `checkpoint`, every full tile and entry bundle, and the partial tiles of every stored
    checkpoint up to it. The checkpoint is written last, so a server never shows a checkpoint
    whose tiles are not there yet; each file is replaced whole (rename)."""
    latest = ledger.latest_checkpoint()
    if latest is None:
        raise UsageError("the ledger has no signed checkpoint to export",
                         hint="sign one first: `forge ledger checkpoint`")
    size, _, note_text, _ = latest
    wanted = {tile.path(): tile for tile in tiles_for_size(size)}
    for stored_size, *_ in ledger.checkpoints():
        wanted.update((tile.path(), tile) for tile in partial_tiles(stored_size))
    files = written = 0
    for rel, tile in wanted.items():
        data = read(ledger, tile)
        if data is None:
            raise LedgerError(f"{rel} is missing from {ledger.path}; "
                              "run `forge ledger verify --deep`")
        _write(directory / rel, data)
        files, written = files + 1, written + len(data)
    _write(directory / "checkpoint", note_text.encode())
    return Export(size, files + 1, written + len(note_text.encode()))


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
