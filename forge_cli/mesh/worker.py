"""`forge worker` without the terminal: find sellers, pick one, buy, record.

A worker is a consumer node without an API: it holds this FORGE_HOME's ledger as its writer
(so it cannot run beside a `forge node` on the same home), looks for sellers with mDNS and
static peers, and buys with the node key's account.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from forge_cli import config, identity
from forge_cli.errors import LedgerLocked, MeshError, NoProvider
from forge_cli.mesh.buyer import Buyer, Purchase, Seller, choose, offered


class Worker:
    """Example::

        async with Worker(ledger_path, peers=["http://127.0.0.1:3001"]) as worker:
            sellers = await worker.find(model="smollm2:135m", wait_s=5)
            purchase = await worker.buy(sellers, {"model": ..., "messages": [...]})
    """

    def __init__(self, ledger_path: Path, *, interfaces: list[str] | None = None,
                 peers: list[str] | None = None, mdns: bool | None = None) -> None:
        self.ledger_path = ledger_path
        self.interfaces = interfaces
        self.peers = peers or []
        self.mdns = mdns
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="forge-worker-ledger")

    async def __aenter__(self) -> Worker:
        import aiohttp

        from forge_cli.economy.safety import BreakerRules, Policy, Safety
        from forge_cli.ledger.store import Ledger
        from forge_cli.mesh.discovery import Mesh

        settings = config.load()
        self.signer = identity.load_or_create()
        try:
            self.ledger = Ledger.open_writer(self.ledger_path, self.signer)
        except LedgerLocked as exc:
            raise LedgerLocked(
                f"{exc.message}: a node on this FORGE_HOME holds the ledger",
                hint="buy through that node instead (`forge chat --node URL -m MODEL`: it "
                "forwards to a peer that has the model), or give the worker its own FORGE_HOME",
            ) from None
        clock = lambda: time.time_ns() // 1_000_000  # noqa: E731
        self.safety = Safety(self.ledger, clock=clock, defaults=Policy.from_config(),
                             breaker=BreakerRules.from_config(),
                             approval_ttl_ms=settings["safety.approval_ttl_s"] * 1000)
        self.mesh = Mesh(self.signer.node_id, lambda: [],
                         interfaces=self.interfaces or settings["mesh.interfaces"],
                         static_peers=[*settings["mesh.peers"], *self.peers],
                         mdns=settings["mesh.mdns"] if self.mdns is None else self.mdns,
                         probe_s=1, expire_s=settings["mesh.expire_s"])
        await self.mesh.start(None)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        from forge_cli.economy.credit import account_reputation
        from forge_cli.trade.wallet import Wallet

        self.reputation = lambda account: account_reputation(self.ledger, account)
        self.wallet = Wallet(self.ledger, self.safety, self._run, clock=clock)
        # This process holds the ledger's writer, so no one else can turn the kill switch
        # on while it runs: read once, it is the switch for every piece it buys.
        killed = bool(self.safety.kill_state()["active"])
        self.buyer = Buyer(self.wallet, self.signer, self.session, killed=lambda: killed)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mesh.stop()
        await self.session.close()
        self._pool.shutdown(wait=True)
        self.ledger.close()

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool,
                                                                lambda: fn(*args, **kwargs))

    def sellers(self, model: str | None = None, seller: str | None = None) -> list[Seller]:
        """Offers of trusted peers, of `model` (any when None), from `seller` (an id prefix)."""
        return [s for s in offered(self.mesh, self.reputation)
                if model in (None, s.model) and (not seller or s.node_id.startswith(seller))]

    async def find(self, model: str | None = None, seller: str | None = None,
                   wait_s: float = 5.0) -> list[Seller]:
        """Sellers of `model` (any model when None), probing until one answers or `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            await self.mesh.probe_all()
            found = self.sellers(model, seller)
            if found or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        if not found:
            what = f"model {model!r}" if model else "any model"
            who = f" from seller {seller}" if seller else ""
            seen = ", ".join(f"{p.url} ({', '.join(o.model for o in p.offers) or 'no models'})"
                             for p in self.mesh.peers()) or "none"
            raise NoProvider(f"no seller of {what}{who} answered within {wait_s:g} s; "
                             f"peers seen: {seen}",
                             hint="start one with `forge seed -m MODEL`, name it with --peer URL "
                             "where multicast is blocked, or wait longer with --wait")
        return found

    async def buy(self, sellers: list[Seller], payload: dict[str, Any], *, mode: str = "balanced",
                  retries: int = 1, on_piece: Any = None, on_retry: Any = None) -> Purchase:
        """Buy from the best seller for `mode`; on a failed seller, try the next (`retries`)."""
        ranked = choose(sellers, mode)
        last: MeshError | None = None
        for attempt, seller in enumerate(ranked[: retries + 1]):
            try:
                return await self.buyer.buy(
                    seller, {**payload, "model": seller.model},
                    on_piece=None if on_piece is None else lambda piece, _n: piece and on_piece(piece))
            except MeshError as exc:
                last = exc
                if on_retry is not None and attempt < min(retries, len(ranked) - 1):
                    on_retry(exc, ranked[attempt + 1])
        assert last is not None
        raise last
