"""The Bitcoin anchor of the original Forge: a 40-byte OP_RETURN payload committing to a root.

Layout: "FRGE" ‖ version 0x01 ‖ network (0 main, 1 test, 2 signet, 3 regtest) ‖ 0x0000 ‖
the 32-byte root; the output script is OP_RETURN (0x6a) and a 40-byte push (0x28), so its hex
starts `6a28`. forge commits to the root of a signed checkpoint; nothing is broadcast here.
"""

from __future__ import annotations

from dataclasses import dataclass

from forge_cli.errors import UsageError

MAGIC = b"FRGE"
VERSION = 1
NETWORKS = {"mainnet": 0, "testnet": 1, "signet": 2, "regtest": 3}
ALIASES = {"main": "mainnet", "bitcoin": "mainnet", "test": "testnet"}
PAYLOAD_BYTES = 40
SCRIPT_PREFIX = bytes([0x6A, PAYLOAD_BYTES])  # OP_RETURN, push 40 bytes


@dataclass(frozen=True)
class Anchor:
    network: str
    root: bytes

    def payload(self) -> bytes:
        return MAGIC + bytes([VERSION, NETWORKS[self.network]]) + b"\x00\x00" + self.root

    def script(self) -> bytes:
        return SCRIPT_PREFIX + self.payload()


def network_name(name: str) -> str:
    """The canonical network name for `name` (mainnet, bitcoin, testnet, signet, regtest…)."""
    canonical = ALIASES.get(name.lower(), name.lower())
    if canonical not in NETWORKS:
        raise UsageError(f"unknown network: {name} (expected one of "
                         f"{', '.join([*NETWORKS, *ALIASES])})")
    return canonical


def anchor(root: bytes, network: str = "mainnet") -> Anchor:
    """The anchor of a 32-byte root.

    Example::

        anchor(bytes(32), "testnet").payload().hex()
        # '46524745' '01' '01' '0000' + 64 zeros
    """
    if len(root) != 32:
        raise UsageError(f"a root is 32 bytes, found {len(root)}")
    return Anchor(network_name(network), root)


def parse(hex_text: str) -> Anchor:
    """Read a payload (or the whole `6a28…` script) from hex; UsageError naming what is wrong."""
    try:
        raw = bytes.fromhex(hex_text.strip())
    except ValueError:
        raise UsageError("an anchor payload is hex") from None
    if len(raw) == PAYLOAD_BYTES + 2 and raw[:2] == SCRIPT_PREFIX:
        raw = raw[2:]
    if len(raw) != PAYLOAD_BYTES:
        raise UsageError(f"an anchor payload is {PAYLOAD_BYTES} bytes (or the script "
                         f"6a28 + payload), found {len(raw)}")
    if raw[:4] != MAGIC:
        raise UsageError(f"an anchor payload starts with 'FRGE', found {raw[:4]!r}")
    if raw[4] != VERSION:
        raise UsageError(f"anchor payload version {raw[4]} is not {VERSION}")
    names = {v: k for k, v in NETWORKS.items()}
    if raw[5] not in names:
        raise UsageError(f"anchor payload network byte {raw[5]} is not 0-3")
    if raw[6:8] != b"\x00\x00":
        raise UsageError("anchor payload bytes 6-7 must be zero")
    return Anchor(names[raw[5]], raw[8:])
