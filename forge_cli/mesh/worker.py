"""`forge worker` without the terminal: find sellers, pick one, buy, record, audit.

A worker is a consumer node without an API: it holds this FORGE_HOME's ledger as its writer
(so it cannot run beside a `forge node` on the same home), looks for sellers with mDNS and
static peers, and buys with the node key's account. When the GGUF it buys is on its disk it
audits one purchase in `audit.every` with it (loaded on the first audit, for scoring only),
and sends a dispute to the peers it knows, as a node's buyer does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge_cli import config, identity
from forge_cli.errors import LedgerLocked, MeshError, NoProvider
from forge_cli.mesh.buyer import Buyer, Purchase, Seller, choose, offered

if TYPE_CHECKING:
    from forge_cli.inference.engine import Engine
    from forge_cli.ledger.store import Ledger
    from forge_cli.mesh.audit import Auditor


class ScoringModel:
    """A local GGUF an auditor scores with, loaded on first use (off the event loop: the
    auditor runs `audit` in a thread) and never asked to generate.

    Its `sha256` is known without loading, so deciding whether a purchase is due for an audit
    costs nothing; any other attribute is the loaded Engine's."""

    def __init__(self, path: Path, sha256: str, *, n_ctx: int, threads: int = 0) -> None:
        self.path = path
        self.sha256 = sha256
        self.n_ctx = n_ctx
        self.threads = threads
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def load(self) -> Engine:
        with self._lock:
            if self._engine is None:
                from forge_cli.inference.engine import Engine

                # One slot and a short queue: it runs one audit's prefill at a time.
                self._engine = Engine(self.path, name=self.path.name, n_ctx=self.n_ctx,
                                      n_threads=self.threads or None, slots=1, queue_size=2)
            return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.load(), name)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None


def local_auditor(signer: identity.Identity, ledger: Ledger, run: Callable[..., Awaitable[Any]],
                  model: ScoringModel | None, *, every: int,
                  peers: Callable[[], list[str]] = list,
                  send: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
                  flag: Callable[[str, str], Any] = lambda node_id, reason: None) -> Auditor:
    """An auditor over a ledger this process writes (a worker's, or `forge audit run`
    offline): it audits with `model` when a trade names that GGUF, records through `run`
    (the ledger's one writer thread), and takes no peer's dispute (no server here)."""
    from forge_cli.ledger import queries
    from forge_cli.mesh.audit import Auditor

    def append(kind: str, data: dict[str, Any], *, bodies: Any = ()) -> Awaitable[Any]:
        return run(ledger.append, kind, data, bodies=list(bodies))

    return Auditor(signer, every=max(1, every),
                   engines=lambda sha: model if model is not None and model.sha256 == sha
                   else None,
                   append=append,
                   # No trust graph here, and only this key's own disputes in its ledger: each
                   # distinct auditor counts one and two flag, so its own never flags alone.
                   disputes_against=lambda p: (queries.dispute_auditors(ledger, p), 2),
                   flag=flag, peers=peers, send=send)


async def audit_offline(ledger_path: Path, seq: int, *, model: str | None = None,
                        peers: list[str] | None = None) -> Any:
    """Audit the trade at `seq` of a ledger no node holds (a worker's), with the GGUF on this
    disk that the trade names (or `model`, a name or path): the `audit` or `dispute` entry,
    recorded there; a dispute is also sent to `peers`. ModelError when the GGUF is absent."""
    import aiohttp

    from forge_cli.errors import ModelError, NotFound, UsageError
    from forge_cli.ledger.store import Ledger

    signer = identity.load_or_create()
    try:
        ledger = Ledger.open_writer(ledger_path, signer)
    except LedgerLocked as exc:
        raise LedgerLocked(f"{exc.message}: a node on this FORGE_HOME holds the ledger",
                           hint="audit through that node: `forge audit run SEQ --node URL`"
                           ) from None
    pool = ThreadPoolExecutor(1, thread_name_prefix="forge-audit-ledger")
    scoring: ScoringModel | None = None
    try:
        if not 0 <= seq < ledger.size:
            raise NotFound(f"no entry {seq}; the ledger {ledger_path} holds {ledger.size}")
        entry = ledger.entry(seq)
        if entry.kind != "trade":
            raise UsageError(f"entry {seq} is a {entry.kind} entry, not a trade")
        terms = entry.data["terms"]
        path, sha256 = await asyncio.to_thread(_gguf_of, model or terms["model"])
        if path is None or sha256 != terms["model_sha256"]:
            found = ("no such GGUF is on this disk" if path is None else
                     f"{path} has sha256 {sha256[:16]}…")
            raise ModelError(f"cannot audit trade {seq}: it names the GGUF "
                             f"{terms['model'][:64]} (sha256 {terms['model_sha256'][:16]}…), "
                             f"and {found}",
                             hint="pass --model PATH to the GGUF it names, or pull it with "
                             "`forge models pull NAME`")
        settings = config.load()
        scoring = ScoringModel(path, sha256, n_ctx=settings["models.n_ctx"],
                               threads=settings["engine.threads"])
        loop = asyncio.get_running_loop()

        async def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return await loop.run_in_executor(pool, lambda: fn(*args, **kwargs))

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def send(url: str, payload: dict[str, Any]) -> Any:
                from forge_cli.client import AsyncClient

                return await AsyncClient(url, timeout=60, session=session).post(
                    "/v1/forge/audit/dispute", payload)

            auditor = local_auditor(signer, ledger, run, scoring, every=1,
                                    peers=lambda: list(peers or []), send=send)
            return await auditor.audit_held(entry.data, ledger.body)
    finally:
        if scoring is not None:
            scoring.close()
        pool.shutdown(wait=True)
        ledger.close()


def _gguf_of(name: str) -> tuple[Path | None, str]:
    """The local GGUF `name` resolves to and its sha256, (None, "") when it is not here."""
    from forge_cli.errors import ForgeError
    from forge_cli.inference import catalog
    from forge_cli.inference import identity as model_identity

    try:
        path = catalog.local_file(catalog.resolve(name), prepare=True)
    except ForgeError:
        return None, ""
    return (path, model_identity.sha256_file(path)) if path is not None else (None, "")


class Worker:
    """Example::

        async with Worker(ledger_path, peers=["http://127.0.0.1:3001"]) as worker:
            sellers = await worker.find(model="smollm2:135m", wait_s=5)
            purchase = await worker.buy(sellers, {"model": ..., "messages": [...]})
    """

    def __init__(self, ledger_path: Path, *, interfaces: list[str] | None = None,
                 peers: list[str] | None = None, mdns: bool | None = None,
                 audit_with: ScoringModel | None = None, audit_every: int | None = None) -> None:
        """`audit_with`: the local GGUF purchases of it are audited with (none: no audits);
        `audit_every`: one purchase in that many (default audit.every; 0 turns audits off)."""
        self.ledger_path = ledger_path
        self.interfaces = interfaces
        self.peers = peers or []
        self.mdns = mdns
        self.audit_with = audit_with
        self.audit_every = audit_every
        self.auditor: Auditor | None = None
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
        every = settings["audit.every"] if self.audit_every is None else self.audit_every
        if self.audit_with is not None and every > 0:
            self.auditor = local_auditor(self.signer, self.ledger, self._run, self.audit_with,
                                         every=every, peers=self.dispute_peers,
                                         send=self.send_dispute,
                                         flag=lambda node_id, reason: self.mesh.flag_peer(
                                             node_id, reason))
            self.buyer.auditor = self.auditor
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mesh.stop()
        await self.session.close()
        self._pool.shutdown(wait=True)
        if self.audit_with is not None:
            self.audit_with.close()
        self.ledger.close()

    def dispute_peers(self) -> list[str]:
        """Where a dispute goes: every peer this worker knows (a seller among them)."""
        return [p.url for p in self.mesh.trusted_peers() if p.node_id != self.signer.node_id]

    async def send_dispute(self, url: str, payload: dict[str, Any]) -> Any:
        from forge_cli.client import AsyncClient

        return await AsyncClient(url, timeout=60, session=self.session).post(
            "/v1/forge/audit/dispute", payload)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool,
                                                                lambda: fn(*args, **kwargs))

    def sellers(self, model: str | None = None, seller: str | None = None,
                sha256: str | None = None) -> list[Seller]:
        """Offers of trusted peers, of `model` (any when None), from `seller` (an id prefix);
        with `sha256`, offers of that GGUF under whatever name a seller gives it."""
        if sha256 is not None:
            same = {(p.node_id, o.model) for p in self.mesh.trusted_peers() for o in p.offers
                    if o.sha256 and sha256.startswith(o.sha256)}
            return [s for s in offered(self.mesh, self.reputation)
                    if (s.node_id, s.model) in same
                    and (not seller or s.node_id.startswith(seller))]
        return [s for s in offered(self.mesh, self.reputation)
                if model in (None, s.model) and (not seller or s.node_id.startswith(seller))]

    async def find(self, model: str | None = None, seller: str | None = None,
                   wait_s: float = 5.0, sha256: str | None = None) -> list[Seller]:
        """Sellers of `model` (any model when None; the GGUF of `sha256` when given),
        probing until one answers or `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            await self.mesh.probe_all()
            found = self.sellers(model, seller, sha256)
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
