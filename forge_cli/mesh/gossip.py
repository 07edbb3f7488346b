"""Gossip: push new trades to peers, pull what they have, and watch their logs for forks.

Each round pushes every trusted peer the trades it has not been sent (never back to the peer
a trade came from), pulls from each peer's stored cursor, and checks the peer's signed
checkpoint for consistency with the last one seen. A failed call is logged and retried next
round; a fork flags the peer for good (persisted in the network view).

What a peer answers is parsed, never trusted: each answer is read up to a stated cap
(PAGE_MAX_BYTES for a pull page, REPLY_MAX_BYTES for the rest) through `wire.parse`, off the
event loop when it is large, and every field is checked before it is used; a bad answer is one
log line and a retry next round, never a traceback. At most MAX_PULLING pages are fetched and
parsed at once, so many hostile peers hold at most that many pages in memory.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from forge_cli import canonical, display, wire
from forge_cli.client import AsyncClient
from forge_cli.errors import (
    BadResponse,
    ConfigError,
    ForgeError,
    GossipBusy,
    GossipQuota,
    TradeRejected,
)
from forge_cli.ledger import merkle, note
from forge_cli.mesh.network import ACCEPTED, DUPLICATE, NetworkView
from forge_cli.mesh.witnesses import Witnesses

log = logging.getLogger("forge.gossip")

MAX_BATCH = 500  # trades per POST or pull page, both ways (a trade is ~0.9 kB of JSON)
PAGES_PER_ROUND = 20  # pull or push at most this many pages per peer per round
MAX_WAITING = 8  # pushed batches queued for verification before the next one gets 429
PUSH_PATH = PULL_PATH = "/v1/forge/gossip/trades"
REQUEST_TIMEOUT_S = 30  # each call to a peer
# A pull page is read no further than this. A full page of MAX_BATCH trades of ~0.9 kB is
# ~450 kB; a node serving pages stops adding trades before a page passes it (PAGE_TRADE_BYTES),
# so an honest page always fits. Parsed, the worst page this size (1 MiB of `[],`) takes
# ~55 MiB for a moment, which is why at most MAX_PULLING pages are in hand at once.
PAGE_MAX_BYTES = 1024 * 1024
PAGE_TRADE_BYTES = PAGE_MAX_BYTES - 1024  # what the trades of a page served may take
REPLY_MAX_BYTES = 256 * 1024  # a checkpoint, a consistency proof, the answer to a push
MAX_PULLING = 2  # pages fetched and parsed at once, over every peer
_HEX64 = re.compile(r"[0-9a-f]{64}")


QUOTA_WINDOW_S = 3600  # a source's quota is per hour
MAX_SOURCES = 10_000  # sources remembered at once; older windows are dropped first


class Quotas:
    """How many foreign trades gossip may still add: per source (an IP address, never what a
    sender says it is) per hour, and in all (the most foreign trades the view keeps; with
    `evicts`, the view makes room instead, evicting its lowest-trust trades first).

    Room is claimed before a batch is verified and what was not used is given back after, so
    concurrent batches from one source cannot pass its quota together.

    Example::

        quotas = Quotas(view, per_source=5000, total=200_000)
        room, reason, why = quotas.claim("10.0.0.7", 500)   # room 0: refuse with `why`
        ...add at most `room` trades...
        quotas.settle("10.0.0.7", room, accepted)
    """

    def __init__(self, view: NetworkView, *, per_source: int, total: int,
                 clock: Callable[[], float] = time.monotonic, evicts: bool = False) -> None:
        self.view = view
        self.per_source = per_source
        self.total = total
        # With `evicts`, a full view makes room by evicting its lowest-trust trades (the view
        # decides, trade by trade: NetworkView.add_many's cap), so only the source binds here.
        self.evicts = evicts
        self.clock = clock
        self._used: dict[str, tuple[int, int]] = {}  # source → (window, trades taken in it)
        self._claimed = 0  # room handed out to batches still being verified

    def _window(self) -> int:
        return int(self.clock() // QUOTA_WINDOW_S)

    def _taken(self, source: str) -> int:
        window, used = self._used.get(source, (self._window(), 0))
        return used if window == self._window() else 0

    def room(self, source: str, want: int) -> tuple[int, str, str]:
        """(room, reason, why): how many new trades `source` may add now (at most `want`);
        which quota binds ("source_quota" or "total_quota"); and a sentence saying so."""
        source_left = max(0, self.per_source - self._taken(source))
        total_left = want if self.evicts else \
            max(0, self.total - self.view.foreign() - self._claimed)
        if source_left <= total_left:
            reason = "source_quota"
            why = (f"gossip source {source} added its quota of {self.per_source} foreign "
                   f"trades this hour (mesh.gossip_source_quota); the rest waits")
        else:
            reason = "total_quota"
            why = (f"the network view holds {self.total} foreign trades or is about to, the "
                   f"most it keeps (mesh.gossip_max_trades)")
        return min(source_left, total_left, want), reason, why

    def claim(self, source: str, want: int) -> tuple[int, str, str]:
        """`room`, held for `source` until `settle` gives back what was not used."""
        room, reason, why = self.room(source, want)
        self._record(source, room)
        self._claimed += room
        return room, reason, why

    def settle(self, source: str, claimed: int, accepted: int) -> None:
        """Give back the part of a claim that was not accepted."""
        self._claimed -= claimed
        self._record(source, accepted - claimed)

    def _record(self, source: str, delta: int) -> None:
        window = self._window()
        self._used[source] = (window, self._taken(source) + delta)
        if len(self._used) > MAX_SOURCES:
            self._used = {s: (w, n) for s, (w, n) in self._used.items() if w == window}


class PeerClient(Protocol):
    """What gossip asks of a connection to one peer (an `AsyncClient` over HTTP, or the
    in-memory transport of bench/mesh_sim.py): a route's parsed JSON answer, or its error as
    a ForgeError."""

    async def call(self, method: str, path: str, body: Any = None, *,
                   encoded: bytes | None = None) -> Any: ...

    async def get(self, path: str) -> Any: ...


def check_settings(round_s: int, batch: int) -> None:
    if round_s < 1:
        raise ConfigError(f"mesh.gossip_s must be at least 1 second, found {round_s}")
    if not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"mesh.gossip_batch must be between 1 and {MAX_BATCH}, found {batch}")


class Gossip:
    """The node's gossip rounds over `mesh.trusted_peers()`.

    Example (inside the node's event loop, once the mesh has started)::

        gossip = Gossip(view, mesh, round_s=10, batch=200)
        await gossip.start()     # rounds every 10 s, and a push as soon as a trade arrives
        await gossip.stop()
    """

    def __init__(self, view: NetworkView, mesh: Any, *, round_s: int = 10,
                 batch: int = 200, source_quota: int = 5000, max_trades: int = 200_000,
                 on_refused: Callable[[str, int], None] | None = None,
                 rank: Callable[[str], int] | None = None,
                 connect: Callable[[Any, int], PeerClient] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        check_settings(round_s, batch)
        self.view = view
        self.quotas = Quotas(view, per_source=source_quota, total=max_trades,
                             evicts=rank is not None, clock=clock)
        # A key's trust here in bp (mesh.trust): with it, a full view evicts its lowest-trust
        # trades for new ones instead of refusing them, and never evicts a trusted key's
        # trade for a trade between keys nobody here trusts.
        self.rank = rank
        # connect(peer, max_bytes): the connection to a peer; HTTP unless a simulation swaps it.
        self.connect = connect
        self.clock = clock
        # Called with (reason, count) for trades refused: "source_quota", "total_quota",
        # or "invalid" (malformed, forged, replayed or out of range).
        self.on_refused = on_refused or (lambda _reason, _count: None)
        self.mesh = mesh
        self.round_s = round_s
        self.batch = batch
        self.checked_at: dict[str, float] = {}  # node id → monotonic time of its last pull
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[Any] | None = None
        self._peer_tasks: dict[str, asyncio.Task[Any]] = {}  # at most one job per peer
        self._session: Any = None
        self._listener: Any = None
        # One verifying thread: signature checks hold the GIL, so two threads only contend;
        # batches from several pushers queue here instead (at most MAX_WAITING of them).
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="forge-gossip")
        self._waiting = 0
        self._pulling = asyncio.Semaphore(MAX_PULLING)
        self.witnesses: Witnesses | None = None  # build_node sets it: cosigning with peers

    async def start(self) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        wake = self._wake
        self._listener = lambda _new: loop.call_soon_threadsafe(wake.set)
        self.view.listeners.append(self._listener)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))
        for node_id, reason in (await asyncio.to_thread(self.view.flags)).items():
            self.mesh.flag_peer(node_id, reason)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._listener in self.view.listeners:
            self.view.listeners.remove(self._listener)
        tasks = [t for t in (self._task, *self._peer_tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._task = self._session = None
        self._verifier.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> str:
        return f"gossip every {self.round_s}s, up to {self.batch} trades a message"

    # -- rounds ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(1.0, self.round_s))
            except TimeoutError:
                pass
            self._wake.clear()
            self.round()

    def round(self) -> list[asyncio.Task[Any]]:
        """Start a job for every trusted peer that has none running (a slow peer delays
        only itself): push what is new, and every `round_s` (at once for a new peer) check
        its checkpoint and pull."""
        started = []
        for peer in self.mesh.trusted_peers():
            running = self._peer_tasks.get(peer.node_id)
            if running is None or running.done():
                task = asyncio.create_task(self._peer_round(peer))
                self._peer_tasks[peer.node_id] = task
                started.append(task)
        return started

    async def _peer_round(self, peer: Any) -> None:
        node_id = peer.node_id
        if not _HEX64.fullmatch(node_id):
            return  # not a node key: nothing it signs could be checked
        try:
            now = self.clock()
            last = self.checked_at.get(node_id)
            if last is None or now - last >= self.round_s:
                self.checked_at[node_id] = now
                await self._guard(peer, "checkpoint check", self.check_checkpoint(peer))
                if self.mesh.flag_of(peer) is not None:
                    return
                if self.witnesses is not None:
                    await self._guard(peer, "witness request",
                                      self.witnesses.ask(peer, self._session))
                    await self._guard(peer, "evidence pull",
                                      self.witnesses.pull_evidence(peer, self._client(peer)))
                await self._guard(peer, "pull", self.pull(peer))
            await self._guard(peer, "push", self.push(peer))
        except Exception:  # a bug must not end gossip with this peer for good
            log.exception("gossip with %s failed; trying again next round", peer.url)

    async def _guard(self, peer: Any, what: str, job: Any) -> bool:
        try:
            await job
            return True
        except (ValueError, KeyError, TypeError, ForgeError) as exc:  # the client's, a bad answer
            log.warning("gossip %s with %s failed (%s: %s); retrying next round", what,
                        peer.url, type(exc).__name__, display.plain(exc)[:300])
            return False

    # -- push and pull -----------------------------------------------------------------------

    def _client(self, peer: Any, max_bytes: int = REPLY_MAX_BYTES) -> PeerClient:
        if self.connect is not None:
            return self.connect(peer, max_bytes)
        return AsyncClient(peer.url, timeout=REQUEST_TIMEOUT_S, session=self._session,
                           max_bytes=max_bytes)

    async def push(self, peer: Any) -> int:
        """Send `peer` the trades it has not been sent yet; returns how many.

        A new peer is sent our whole history too (a peer that knows us only as a static
        `--peer` never pulls from us); what it already has costs it a lookup each.
        """
        cursor = (await asyncio.to_thread(self.view.peer, peer.node_id)).pushed
        sent = 0
        for _ in range(PAGES_PER_ROUND):
            batch, after = await asyncio.to_thread(self.view.pending_for, cursor, peer.node_id,
                                                   self.batch)
            if after == cursor:
                return sent
            if batch:
                body = b'{"from":"' + self.mesh.node_id.encode() + b'","trades":[' + \
                    b",".join(batch) + b"]}"
                answer = await self._client(peer).call("POST", PUSH_PATH, encoded=body)
                rejected = wire.finite_int(answer.get("rejected")) \
                    if isinstance(answer, dict) else None
                if rejected is None:
                    raise BadResponse(f"{peer.url} answered a push without a count of the "
                                      "trades it rejected")
                if rejected:
                    reasons = answer.get("rejections")
                    log.warning("peer %s rejected %d of the trades we pushed: %s", peer.url,
                                rejected, display.plain(reasons[:3] if isinstance(reasons, list)
                                                        else reasons)[:500])
                sent += len(batch)
            cursor = after
            await asyncio.to_thread(self.view.set_pushed, peer.node_id, cursor)
        return sent

    async def pull(self, peer: Any) -> int:
        """Fetch `peer`'s trades after our stored cursor and add them; returns how many were new."""
        state = await asyncio.to_thread(self.view.peer, peer.node_id)
        cursor, added = state.cursor, 0
        source = urllib.parse.urlsplit(peer.url).hostname or peer.url
        for _ in range(PAGES_PER_ROUND):
            room, _reason, why = self.quotas.room(source, self.batch)  # the page's size
            if room == 0:
                log.warning("not pulling from %s: %s", peer.url, why)
                break
            async with self._pulling:
                page = await self._client(peer, PAGE_MAX_BYTES).get(
                    f"{PULL_PATH}?since={cursor}&limit={room}")
                count, trades, after = read_page(page, room, peer.url)
                if count < cursor:
                    log.warning("peer %s now holds %d trades, fewer than our cursor %d (its "
                                "network view was reset?); pulling from the start", peer.url,
                                count, cursor)
                    cursor = 0
                    continue
                if after < cursor:
                    raise BadResponse(f"{peer.url} served a page whose next cursor {after} is "
                                      f"before the one asked for, {cursor}")
                outcomes = await self._add(trades, peer.node_id, source) if trades else []
            if trades:
                added += sum(o == ACCEPTED for o in outcomes)
                bad = [o for o in outcomes if isinstance(o, TradeRejected)]
                if bad:
                    log.warning("peer %s served %d trades we reject, e.g. %s", peer.url,
                                len(bad), bad[0])
                forged = [o for o in bad if o.forged]
                if forged:  # an honest node verifies before it stores, so it never serves these
                    await self.flag(peer, f"served {len(forged)} forged or malformed trade(s): "
                                    f"{forged[0]}")
                    return added
            cursor = after
            await asyncio.to_thread(self.view.set_cursor, peer.node_id, cursor)
            if not trades or after >= count:
                break
        if added:
            log.info("pulled %d new trades from %s", added, peer.url)
        return added

    async def receive(self, trades: list[Any], sender: str, address: str) -> dict[str, Any]:
        """Verify and add a batch pushed from `address`, whose sender says it is `sender`
        (believed only so its trades are not pushed back to it); counts and a reason for
        each rejected trade."""
        if self._waiting >= MAX_WAITING:
            raise GossipBusy(f"{self._waiting} gossip batches are already waiting to be "
                             "verified; push again shortly")
        return tally(await self._add(trades, sender, address))

    async def _add(self, trades: list[Any], sender: str, source: str) -> list[Any]:
        """Add at most the room `source` has left; GossipQuota when it has none."""
        room, reason, why = self.quotas.claim(source, len(trades))
        if room == 0 and trades:
            self.on_refused(reason, len(trades))
            raise GossipQuota(why, hint="a peer retries refused trades in a later round")
        outcomes: list[Any] = []
        self._waiting += 1
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._verifier, lambda: self.view.add_many(
                    trades, sender, room=room, full=why,
                    cap=self.quotas.total if self.rank is not None else None,
                    rank=self.rank))
        finally:
            self._waiting -= 1
            self.quotas.settle(source, room, sum(o == ACCEPTED for o in outcomes))
        refused = [o for o in outcomes if isinstance(o, TradeRejected)]
        if quota := sum(o.quota for o in refused):
            # With eviction, a trade the source had room for and the view still refused was
            # outranked: every trade the full view holds was made by keys trusted more.
            outranked = sum(o.quota and str(o) != why for o in refused)
            if quota - outranked:
                self.on_refused(reason, quota - outranked)
            if outranked:
                self.on_refused("total_quota", outranked)
        if invalid := len(refused) - quota:
            self.on_refused("invalid", invalid)
        return outcomes

    # -- checkpoints -------------------------------------------------------------------------

    async def check_checkpoint(self, peer: Any) -> None:
        """Fetch `peer`'s signed checkpoint, verify it against its node id, and prove it
        consistent with the last one seen; flag the peer if it is not."""
        node_id = peer.node_id
        body = await self._client(peer).get("/v1/forge/ledger/checkpoint")
        if not isinstance(body, dict) or not isinstance(body.get("note"), str):
            raise BadResponse(f"{peer.url} answered its checkpoint without a signed note")
        verifier = note.Verifier(note.origin_for(node_id), bytes.fromhex(node_id))
        try:
            cp = note.open_checkpoint(body["note"], verifier)
        except ForgeError as exc:
            await self.flag(peer, f"bad checkpoint: {exc}")
            return
        last = await asyncio.to_thread(self.view.peer, node_id)
        if last.cp_size is None or last.cp_root is None:
            await asyncio.to_thread(self.view.save_checkpoint, node_id, cp.size, cp.root,
                                    body["note"])
            return
        if cp.size < last.cp_size:
            await self.flag(peer, f"log fork: checkpoint {cp.size} is smaller than checkpoint "
                            f"{last.cp_size} seen earlier (its tail was truncated)")
            return
        if cp.size == last.cp_size:
            if cp.root != last.cp_root:
                if self.witnesses is not None and last.cp_note:
                    await self.witnesses.fork_seen(cp.origin, last.cp_note, body["note"],
                                                   f"gossip check of {peer.url}")
                await self.flag(peer, f"log fork: checkpoint {cp.size} has root "
                                f"{cp.root.hex()[:16]}… but root {last.cp_root.hex()[:16]}… "
                                f"was seen earlier at the same size")
            return
        proof = await self._client(peer).get(
            f"/v1/forge/ledger/consistency?old={last.cp_size}&new={cp.size}")
        try:
            path = [bytes.fromhex(h) for h in proof["proof"]]
        except (TypeError, ValueError, KeyError):
            path = None
        if path is None or not merkle.verify_consistency(last.cp_size, cp.size, last.cp_root,
                                                         cp.root, path):
            await self.flag(peer, f"log fork: checkpoint {cp.size} is not consistent with "
                            f"checkpoint {last.cp_size} seen earlier")
            return
        await asyncio.to_thread(self.view.save_checkpoint, node_id, cp.size, cp.root,
                                body["note"])

    async def flag(self, peer: Any, reason: str) -> None:
        log.error("PEER FLAGGED: %s (node %s): %s; no more gossip or trade with it", peer.url,
                  peer.node_id, reason)
        self.mesh.flag_peer(peer.node_id, reason)
        await asyncio.to_thread(self.view.flag, peer.node_id, reason)


def read_page(page: Any, room: int, source: str) -> tuple[int, list[Any], int]:
    """(count, trades, next) of a pull page, or BadResponse naming what is malformed: counts
    are integers from 0 to 2^53 (never a float, an infinity or a string), and the trades a
    list of at most the `room` asked for (each trade is checked when it is added)."""
    if not isinstance(page, dict):
        raise BadResponse(f"{source} served a pull page that is not an object")
    count, after = wire.finite_int(page.get("count")), wire.finite_int(page.get("next"))
    if count is None or after is None:
        raise BadResponse(f"{source} served a pull page whose count and next are not integers "
                          f"from 0 to 2^53: {display.plain(page.get('count'))[:40]}, "
                          f"{display.plain(page.get('next'))[:40]}")
    trades = page.get("trades")
    if not isinstance(trades, list) or len(trades) > room:
        raise BadResponse(f"{source} served a pull page whose trades are not a list of at most "
                          f"the {room} asked for")
    return count, trades, after


def tally(outcomes: list[Any]) -> dict[str, Any]:
    """The answer to a pushed batch: counts, and why each rejected trade was refused."""
    rejections = [{"index": i, "reason": str(o)} for i, o in enumerate(outcomes)
                  if isinstance(o, TradeRejected)]
    return {"accepted": sum(o == ACCEPTED for o in outcomes),
            "duplicate": sum(o == DUPLICATE for o in outcomes),
            "rejected": len(rejections), "rejections": rejections}


def encode_page(trades: list[bytes], after: int, count: int, node_id: str) -> bytes:
    """A pull page as JSON, splicing the stored canonical trade bytes in unchanged."""
    head = canonical.encode({"count": count, "next": after, "node_id": node_id})
    return head[:-1] + b',"trades":[' + b",".join(trades) + b"]}"
