"""Signing leaf hashes as the writer builds them: inline, or on a helper process for a large batch.

Threads cannot share the signing: PyNaCl needs the GIL between two signatures, and a thread
waiting for it behind a busy builder loses a whole switch interval per signature. A separate
process signs one chunk while the writer encodes and hashes the next entries.

Protocol on the child's stdin/stdout: the 32-byte seed once, then per chunk a 4-byte
big-endian count and count × 32-byte hashes; the child answers count × 64-byte signatures.
The seed travels only over this private pipe and lives only in the two processes' memory.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import IO

from forge_cli import identity

HASH, SIG = 32, 64
IN_FLIGHT = 8  # chunks sent but not read back: 8 × 64 × 64 B stays under a pipe buffer


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data: bytes | None = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError("the signing process went away")
    return data


class SignWorker:
    """Client of one signing process; falls back to signing inline if the process fails."""

    def __init__(self, signer: identity.Identity) -> None:
        self.signer = signer
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "forge_cli.ledger.signing"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            assert self.proc.stdin is not None
            self.proc.stdin.write(signer.signing_key.encode())
            self.proc.stdin.flush()
        except OSError:
            self.proc = None

    def batch(self) -> Batch:
        return Batch(self)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Batch:
    """One append batch: chunks go to the worker as they fill; `signatures()` gathers all."""

    def __init__(self, worker: SignWorker) -> None:
        self.worker = worker
        self.parts: list[list[bytes] | int] = []  # signatures, or a chunk size still in flight
        self.sent: list[list[bytes]] = []  # the hashes of chunks in flight, for the fallback
        self.in_flight = 0

    def send(self, hashes: list[bytes]) -> None:
        proc = self.worker.proc
        if proc is None:
            self.parts.append([self.worker.signer.sign(h) for h in hashes])
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(struct.pack(">I", len(hashes)) + b"".join(hashes))
            proc.stdin.flush()
        except OSError:
            self._give_up()
            self.parts.append([self.worker.signer.sign(h) for h in hashes])
            return
        self.parts.append(len(hashes))
        self.sent.append(hashes)
        self.in_flight += 1
        while self.in_flight > IN_FLIGHT:
            self._receive_one()

    def _receive_one(self) -> None:
        index = next(i for i, p in enumerate(self.parts) if isinstance(p, int))
        hashes = self.sent.pop(0)
        self.in_flight -= 1
        proc = self.worker.proc
        try:
            assert proc is not None and proc.stdout is not None
            data = _read_exact(proc.stdout, SIG * len(hashes))
            self.parts[index] = [data[i:i + SIG] for i in range(0, len(data), SIG)]
        except (EOFError, OSError, AssertionError):
            self._give_up()
            self.parts[index] = [self.worker.signer.sign(h) for h in hashes]

    def _give_up(self) -> None:
        self.worker.close()

    def signatures(self) -> list[bytes]:
        while self.in_flight:
            self._receive_one()
        return [sig for part in self.parts for sig in part]  # type: ignore[union-attr]


class LeafSigner:
    """Signs leaf hashes as they are built: inline, or, given a worker, on its process."""

    CHUNK = 64

    def __init__(self, signer: identity.Identity, worker: SignWorker | None) -> None:
        self.signer = signer
        self.batch = worker.batch() if worker is not None else None
        self.inline: list[bytes] = []
        self.waiting: list[bytes] = []

    def add(self, leaf: bytes) -> None:
        if self.batch is None:
            self.inline.append(self.signer.sign(leaf))
            return
        self.waiting.append(leaf)
        if len(self.waiting) >= self.CHUNK:
            self.batch.send(self.waiting)
            self.waiting = []

    def signatures(self) -> list[bytes]:
        if self.batch is None:
            return self.inline
        if self.waiting:
            self.batch.send(self.waiting)
        return self.batch.signatures()


def main() -> None:
    from nacl.bindings import crypto_sign

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    secret = identity.Identity.from_seed(_read_exact(stdin, HASH)).signing_key._signing_key
    while True:
        try:
            (count,) = struct.unpack(">I", _read_exact(stdin, 4))
            data = _read_exact(stdin, HASH * count)
        except EOFError:
            return
        stdout.write(b"".join(crypto_sign(data[i:i + HASH], secret)[:SIG]
                              for i in range(0, len(data), HASH)))
        stdout.flush()


if __name__ == "__main__":
    main()
