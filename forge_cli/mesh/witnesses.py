"""Witnesses on the mesh: each trusted peer is asked to cosign this node's newest checkpoint
(c2sp.org/tlog-witness add-checkpoint), what it signs is verified and kept, and the split-view
evidence peers hold is checked and taken in, flagging the log that signed both checkpoints.

Runs inside gossip's per-peer round, so it is as bounded as gossip: one peer at a time per
peer, at most every `round_s`, at most two add-checkpoint calls (the second after a 409 that
names the size the witness holds) and one evidence page per peer per round.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from forge_cli import client, display
from forge_cli.errors import BadResponse, ForgeError, NodeUnreachable
from forge_cli.ledger import note, witness
from forge_cli.ledger.store import Ledger

log = logging.getLogger("forge.witness")

ADD_PATH = "/ledger/witness/add-checkpoint"
EVIDENCE_PATH = "/v1/forge/witness/evidence"
SIZE_TYPE = "text/x.tlog.size"
ANSWER_MAX_BYTES = 16 * 1024  # signature lines, a size, or an error envelope
MAX_EVIDENCE = 100  # pieces of evidence read from one peer per round

T = TypeVar("T")


class Reads(Protocol):
    """A connection that GETs a peer's route (an AsyncClient, or gossip's PeerClient)."""

    async def get(self, path: str) -> Any: ...


class WitnessNode(Protocol):
    """What witnessing needs of the node: its ledger (written on the ledger thread), a reader,
    and the way a peer is flagged."""

    node_id: str
    ledger: Ledger
    reader: Ledger

    async def on_ledger(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    async def flag_peer(self, node_id: str, reason: str) -> None: ...


class Witnesses:
    """This node's side of witnessing with its peers.

    Example (gossip calls it once per peer round)::

        witnesses = Witnesses(node)
        await witnesses.ask(peer, session)          # cosign our newest checkpoint, please
        await witnesses.pull_evidence(peer, client)  # split views it knows of
    """

    def __init__(self, node: WitnessNode) -> None:
        self.node = node
        self.held: dict[str, int] = {}  # peer node id → the size of our log it holds
        self._known: set[tuple[str, int]] | None = None  # evidence already on record

    async def ask(self, peer: Any, session: Any) -> int | None:
        """Ask `peer` to cosign our newest checkpoint unless it has; the size cosigned."""
        text = await self.node.on_ledger(self.node.ledger.checkpoint)
        cp = note.Checkpoint.parse_body(note.SignedNote.parse(text).text)
        key = witness.witness_verifier(peer.node_id)
        cosigned = witness.cosigned_size(self.node.reader, key)
        if cosigned == cp.size:
            return None
        held = self.held.get(peer.node_id, cosigned or 0)
        for _ in range(2):  # the second call after a 409 that names the size it holds
            if held > cp.size:
                log.error("witness %s holds size %d of our log, which has %d entries: our "
                          "log lost its tail", peer.url, held, cp.size)
                return None
            proof = [] if held in (0, cp.size) else await self.node.on_ledger(
                self.node.ledger.consistency_proof, held, cp.size)
            body = (f"old {held}\n" + "".join(base64.b64encode(p).decode() + "\n"
                                              for p in proof) + "\n" + text)
            status, kind, answer = await _post(session, peer.url + ADD_PATH, body.encode())
            if status == 200:
                await self.node.on_ledger(witness.keep_cosignatures, self.node.ledger, text,
                                          answer, key)
                self.held[peer.node_id] = cp.size
                log.info("witness %s cosigned our checkpoint of size %d", peer.url, cp.size)
                return cp.size
            if status == 409 and kind == SIZE_TYPE:
                size = answer.strip()
                if not size.isdigit() or len(size) > 20:
                    raise BadResponse(f"witness {peer.url} answered 409 without a size")
                held = self.held[peer.node_id] = int(size)
                continue
            # 404: it does not know us as a peer yet (or is no witness); it asks again later.
            level = {409: logging.ERROR, 404: logging.DEBUG}.get(status, logging.WARNING)
            log.log(level, "witness %s refused our checkpoint of size %d: %d %s", peer.url,
                    cp.size, status, display.plain(_message(status, answer))[:300])
            return None
        return None

    async def pull_evidence(self, peer: Any, client: Reads) -> int:
        """Take in the split views `peer` holds: each is believed only once both checkpoints
        verify under the log's key; a new one is kept and flags the log. Returns how many."""
        body = await client.get(EVIDENCE_PATH)
        items = body.get("evidence") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise BadResponse(f"{peer.url} answered its evidence without a list")
        if self._known is None:
            self._known = {(e.origin, e.size) for e in witness.evidence(self.node.reader, 10**6)}
        added = 0
        for item in items[:MAX_EVIDENCE]:
            if isinstance(item, dict) and (item.get("origin"), item.get("size")) in self._known:
                continue
            try:
                found = witness.check_evidence(item)
            except ForgeError as exc:
                log.warning("peer %s serves fork evidence that does not hold: %s", peer.url,
                            display.plain(exc)[:300])
                continue
            if await self.record(found, f"gossip from {peer.node_id}"):
                added += 1
        return added

    async def record(self, found: witness.Evidence, source: str) -> bool:
        """Keep checked evidence and flag the log that signed it; True if it was new here."""
        if self._known is not None:
            self._known.add((found.origin, found.size))
        new = await self.node.on_ledger(witness.record_evidence, self.node.ledger, found, source)
        if not new:
            return False
        if found.node_id == self.node.node_id:
            log.error("evidence that OUR log forked at size %d came by %s", found.size, source)
            return True
        await self.node.flag_peer(found.node_id, f"split view: two checkpoints of size "
                                  f"{found.size} signed by its log with different roots "
                                  f"({source})")
        return True

    async def fork_seen(self, origin: str, old_note: str, new_note: str, source: str) -> None:
        """Gossip saw two checkpoints of one size with different roots: keep them as evidence."""
        try:
            found = witness.check_evidence({"origin": origin, "notes": [old_note, new_note]})
        except ForgeError:
            return  # not a same-size pair: the flag stands on gossip's own word
        await self.record(found, source)


async def _post(session: Any, url: str, body: bytes) -> tuple[int, str, str]:
    """(status, content type, text of at most ANSWER_MAX_BYTES) of a POST; NodeUnreachable
    when the peer does not answer."""
    import aiohttp

    try:
        async with session.post(url, data=body, headers={"Content-Type": "text/plain"}) as resp:
            raw = await resp.content.read(ANSWER_MAX_BYTES + 1)
            if len(raw) > ANSWER_MAX_BYTES:
                raise BadResponse(f"{url} answered more than {ANSWER_MAX_BYTES} bytes")
            return resp.status, resp.content_type, raw.decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NodeUnreachable(f"{url} did not answer: {type(exc).__name__}") from exc


def _message(status: int, answer: str) -> str:
    """The message of a refusal's error envelope (read by forge_cli.client), or the text."""
    try:
        client.answer(status, "", answer.encode(), "witness")
    except ForgeError as exc:
        envelope = getattr(exc, "envelope", None)
        if isinstance(envelope, dict) and envelope.get("message"):
            return str(envelope["message"])
    return answer
