"""Check a C2SP tlog-tiles log with tlog-scales, a tiles client published by someone else
(PyPI `tlog-scales`, Apache-2.0): none of forge's code is imported here.

    python tests/tlog_verify.py LOCATION LOG_VKEY [--cosigner VKEY]... [--old-checkpoint FILE]...

LOCATION is a URL (http://127.0.0.1:8000/ledger) or a folder (./site). tlog-scales reads the
checkpoint and tiles; this script only decides which of its checks to run:
- the checkpoint carries a valid Ed25519 signature by LOG_VKEY (and each --cosigner's
  tlog-cosignature/v1 signature);
- the root it computes from the hash tiles (full and partial, every level) is the signed root;
- every entry in the entry bundles hashes to its leaf in the level-0 tiles;
- inclusion proofs it builds from the tiles verify at the first and last index of the tree
  and at each side of every tile boundary below 512;
- for each --old-checkpoint (a signed older checkpoint of the same log): the root computed
  from the partial tiles of its size, and a consistency proof from it to the current tree.
Prints one JSON line; exit 0 when every check passed, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tlog_scales import backend, tiles, tlog
from tlog_scales.reader import TilesReader
from tlog_scales.signing import Vkey, VkeySet


def _checkpoint(text: str, log_key: Vkey) -> tlog.Checkpoint:
    cp = tlog.Checkpoint.from_text(text)
    cp.verify(log_key)  # raises unless a signature by the log's key verifies
    return cp


def check(location: str, log_vkey: str, cosigners: list[str], old_files: list[Path]) -> dict:
    log_key = Vkey.from_string(log_vkey)
    reader = TilesReader(backend.make_backend(location))
    cp = reader.get_checkpoint()
    cp.verify(log_key)
    if cp.origin != log_key.name:
        raise ValueError(f"checkpoint origin {cp.origin!r} is not the log {log_key.name!r}")
    if cosigners:
        keys = [Vkey.from_string(v) for v in cosigners]
        valid = VkeySet(*keys).verify(cp.signatures, cp)
        if len(valid) != len(keys):
            raise ValueError(f"{len(valid)} of {len(keys)} cosignatures verify")
    root = reader.calculate_root_hash()
    if root != cp.root_hash:
        raise ValueError(f"root from the tiles {root.hex()} is not the signed {cp.root_hash.hex()}")
    for index in range(cp.size):
        leaf = reader.get_entry(index)
        if tiles.leaf_hash(leaf) != reader.mth(index, index + 1):
            raise ValueError(f"entry {index} in its bundle does not hash to its level-0 tile hash")
    probes = sorted({i for i in (0, 255, 256, 511, cp.size - 1) if 0 <= i < cp.size})
    for index in probes:
        proof = reader.get_inclusion_proof(index, cp.size)
        proof.check(tiles.leaf_hash(reader.get_entry(index)), cp.root_hash)
    old_sizes = []
    for path in old_files:
        old = _checkpoint(path.read_text(encoding="utf-8"), log_key)
        past = TilesReader(backend.make_backend(location))  # fresh: reads the old partial tiles
        past.set_size(old.size)
        if past.calculate_root_hash() != old.root_hash:
            raise ValueError(f"tiles of size {old.size} do not hash to that checkpoint's root")
        reader.get_consistency_proof(old.size, cp.size).check(old.root_hash, cp.root_hash)
        old_sizes.append(old.size)
    return {"ok": True, "verifier": "tlog-scales", "origin": cp.origin, "size": cp.size,
            "root": cp.root_hash.hex(), "entries_checked": cp.size,
            "inclusion_proofs": probes, "cosignatures": len(cosigners),
            "old_sizes_consistent": old_sizes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("location")
    parser.add_argument("log_vkey")
    parser.add_argument("--cosigner", action="append", default=[])
    parser.add_argument("--old-checkpoint", action="append", default=[], type=Path)
    args = parser.parse_args()
    try:
        result = check(args.location, args.log_vkey, args.cosigner, args.old_checkpoint)
    except Exception as exc:  # any failure of the log is a failed check, reported in one line
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
