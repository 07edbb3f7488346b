"""Signed checkpoints in the C2SP signed-note format, and witness cosignatures.

A checkpoint is `origin\\nsize\\nbase64(root)\\n`, signed with Ed25519 (signature type 0x01);
a witness adds a timestamped cosignature (type 0x04, c2sp.org/tlog-cosignature) after
checking that the checkpoint is consistent with the last one it saw from that log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from forge_cli import identity
from forge_cli.errors import ProofFailed, UsageError

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
DASH = "\u2014"
MAX_SIGNATURES = 16


def origin_for(node_id: str) -> str:
    """The log origin (and checkpoint key name) of the ledger kept by `node_id`."""
    return f"forge.local/{node_id}"


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    """A (name, type, public key) triple, printable as a C2SP vkey."""

    name: str
    public_key: bytes
    sig_type: int = ED25519

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.sig_type, self.public_key)

    def vkey(self) -> str:
        material = base64.b64encode(bytes([self.sig_type]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{material}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Parse `name+hexid+base64(type‖key)`; UsageError if malformed or inconsistent."""
        try:
            name, hexid, material = vkey.strip().split("+", 2)  # names hold no "+"; base64 may
            raw = base64.b64decode(material, validate=True)
            kid = bytes.fromhex(hexid)
        except (ValueError, binascii.Error):
            raise UsageError(f"not a verifier key (name+keyid+base64): {vkey!r}") from None
        if len(raw) != 33 or raw[0] not in (ED25519, COSIGNATURE_V1) or len(kid) != 4:
            raise UsageError(f"verifier key {name!r} is not an Ed25519 note or cosignature key")
        verifier = cls(name, raw[1:], raw[0])
        if verifier.key_id != kid:
            raise UsageError(f"verifier key {name!r}: key id {hexid} does not match the key")
        return verifier


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse_body(cls, body: str) -> Checkpoint:
        lines = body.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise UsageError("checkpoint body must be origin, size and root lines")
        origin, size_text, root_b64 = lines[0], lines[1], lines[2]
        if not origin or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
            raise UsageError(f"checkpoint has a malformed origin or size line: {size_text!r}")
        try:
            root = base64.b64decode(root_b64, validate=True)
        except binascii.Error:
            raise UsageError("checkpoint root is not base64") from None
        if len(root) != 32:
            raise UsageError(f"checkpoint root is {len(root)} bytes, expected 32")
        return cls(origin, int(size_text), root)


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    blob: bytes  # the signature bytes after the key id

    def line(self) -> str:
        return f"{DASH} {self.name} {base64.b64encode(self.key_id + self.blob).decode()}\n"


@dataclass(frozen=True)
class SignedNote:
    text: str
    signatures: tuple[Signature, ...]

    def render(self) -> str:
        return self.text + "\n" + "".join(sig.line() for sig in self.signatures)

    @classmethod
    def parse(cls, note: str) -> SignedNote:
        """Split a note into text and signature lines; UsageError if it is not a signed note."""
        if any(ord(c) < 0x20 and c != "\n" for c in note):
            raise UsageError("signed note contains control characters")
        text, sep, sig_block = note.rpartition("\n\n")
        if not sep or not sig_block.endswith("\n"):
            raise UsageError("not a signed note: no blank line before the signature lines")
        signatures = []
        for line in sig_block[:-1].split("\n"):
            prefix = f"{DASH} "
            if not line.startswith(prefix) or line.count(" ") != 2:
                raise UsageError(f"malformed signature line in note: {line[:60]!r}")
            name, b64 = line[len(prefix):].split(" ")
            try:
                raw = base64.b64decode(b64, validate=True)
            except binascii.Error:
                raise UsageError(f"signature of {name!r} is not base64") from None
            if len(raw) < 5:
                raise UsageError(f"signature of {name!r} is too short")
            signatures.append(Signature(name, raw[:4], raw[4:]))
        if not signatures or len(signatures) > MAX_SIGNATURES:
            raise UsageError(f"a note carries 1 to {MAX_SIGNATURES} signatures")
        return cls(text + "\n", tuple(signatures))


def sign_checkpoint(checkpoint: Checkpoint, signer: identity.Identity) -> str:
    """The checkpoint as a signed note, signed by `signer` under the checkpoint's origin."""
    text = checkpoint.body()
    verifier = Verifier(checkpoint.origin, signer.public_key)
    sig = Signature(verifier.name, verifier.key_id, signer.sign(text.encode()))
    return SignedNote(text, (sig,)).render()


def _find(note: SignedNote, verifier: Verifier) -> Signature | None:
    for sig in note.signatures:
        if sig.name == verifier.name and sig.key_id == verifier.key_id:
            return sig
    return None


def open_checkpoint(note_text: str, verifier: Verifier) -> Checkpoint:
    """Parse a checkpoint note and check the log's signature; ProofFailed if it does not verify."""
    note = SignedNote.parse(note_text)
    checkpoint = Checkpoint.parse_body(note.text)
    if checkpoint.origin != verifier.name:
        raise ProofFailed(
            f"checkpoint origin {checkpoint.origin!r} is not the expected log {verifier.name!r}"
        )
    sig = _find(note, verifier)
    if sig is None:
        raise ProofFailed(f"checkpoint carries no signature by {verifier.name}")
    if not identity.verify(verifier.public_key, note.text.encode(), sig.blob):
        raise ProofFailed(f"checkpoint signature by {verifier.name} does not verify")
    return checkpoint


def _cosigned_message(timestamp: int, text: str) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def cosignature(note_text: str, witness_name: str, witness: identity.Identity,
                timestamp: int) -> Signature:
    """A timestamped Ed25519 cosignature (tlog-cosignature v1) on a checkpoint note."""
    note = SignedNote.parse(note_text)
    verifier = Verifier(witness_name, witness.public_key, COSIGNATURE_V1)
    blob = struct.pack(">Q", timestamp) + witness.sign(_cosigned_message(timestamp, note.text))
    return Signature(witness_name, verifier.key_id, blob)


def cosign(note_text: str, witness_name: str, witness: identity.Identity, timestamp: int) -> str:
    """The checkpoint note with a cosignature by `witness` added (replacing its earlier one)."""
    note = SignedNote.parse(note_text)
    others = tuple(s for s in note.signatures if s.name != witness_name)
    sig = cosignature(note_text, witness_name, witness, timestamp)
    return SignedNote(note.text, (*others, sig)).render()


def verify_cosignature(note_text: str, verifier: Verifier) -> int:
    """The cosignature's timestamp if `verifier` cosigned this note; ProofFailed otherwise."""
    note = SignedNote.parse(note_text)
    sig = _find(note, verifier)
    if sig is None or len(sig.blob) != 8 + 64:
        raise ProofFailed(f"note carries no cosignature by {verifier.name}")
    timestamp: int = struct.unpack(">Q", sig.blob[:8])[0]
    if not identity.verify(verifier.public_key, _cosigned_message(timestamp, note.text),
                           sig.blob[8:]):
        raise ProofFailed(f"cosignature by {verifier.name} does not verify")
    return timestamp
