"""Finding peers: a zeroconf advertisement of this node, a browser for others, and static peers.

Every candidate, whether mDNS found it or `--peer` named it, is probed with `GET /health`; the
peer table holds the ones that answered within the expiry window. A peer advertising our own
node id (a copied FORGE_HOME) is logged at error level and flagged.

Any host on the LAN can advertise itself, so what a peer says is parsed, never trusted: its
/health is read up to HEALTH_MAX_BYTES through `wire.parse` and checked field by field
(`read_health`), and a peer whose answer fails is left out of the table (one log line) while
every other peer is still probed and expired.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from forge_cli import display, wire
from forge_cli.errors import BadResponse, ConfigError, ForgeError, NodeUnreachable
from forge_cli.wire import is_hex

log = logging.getLogger("forge.mesh")

SERVICE = "_forge._tcp.local."
PROTOCOL = 1
RESOLVE_MS = 3000
# A /health lists a node's offers (~150 bytes each): 64 KiB holds a few hundred, and parsing
# it costs the event loop well under a millisecond.
HEALTH_MAX_BYTES = 64 * 1024
MAX_OFFERS = 256  # models one peer may list
MAX_NAME = 255  # characters of a model name (what a TXT record holds)
# mDNS candidates held at once: each costs a probe a round, and anyone on the LAN can
# advertise services; past this, new ones wait until others expire.
MAX_CANDIDATES = 512


@dataclass(frozen=True)
class Offer:
    """One model a node sells: its name, sha256 prefix, size and current price."""

    model: str
    sha256: str
    params: int
    price_ucu_per_token: int

    def txt(self) -> str:
        return f"{self.sha256} {self.price_ucu_per_token} {self.params} {self.model}"

    @classmethod
    def from_txt(cls, text: str) -> Offer:
        """An offer from its TXT record; ValueError when malformed."""
        sha, price, params, model = text.split(" ", 3)
        return cls.checked(model, sha, int(params), int(price))

    @classmethod
    def from_json(cls, data: Any) -> Offer:
        """An offer from a peer's /health; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"an offer is an object, found {type(data).__name__}")
        return cls.checked(data.get("model"), data.get("sha256"), data.get("params"),
                           data.get("price_ucu_per_token"))

    @classmethod
    def checked(cls, model: Any, sha256: Any, params: Any, price: Any) -> Offer:
        """An offer whose every field has the type and range a forge node sends."""
        name = _name(model, "an offer's model")
        if not isinstance(sha256, str) or len(sha256) > 64 or not is_hex(sha256, len(sha256)):
            raise ValueError(f"offer {name!r}: sha256 is not a hex digest")
        params_n = wire.finite_int(params)
        price_n = wire.finite_int(price)
        if params_n is None or price_n is None:
            raise ValueError(f"offer {name!r}: params and price_ucu_per_token must be integers "
                             f"from 0 to 2^53, found {repr(params)[:40]} and {repr(price)[:40]}")
        return cls(name, sha256[:16], params_n, price_n)


@dataclass
class Peer:
    url: str
    source: str  # "mdns" | "static"
    node_id: str | None = None
    offers: list[Offer] = field(default_factory=list)
    instance: str | None = None  # the mDNS service name, when mDNS found it
    found_ms: int = 0
    last_seen_ms: int | None = None
    latency_ms: int | None = None
    flag: str | None = None  # why this peer is not trusted (duplicate node id)
    lends_mb: int | None = None  # a layer peer (`forge rpc serve`): the MiB it offers a head
    problem: str | None = None  # why its last answer was refused (logged once per change)

    @property
    def price_ucu_per_token(self) -> int | None:
        return min((o.price_ucu_per_token for o in self.offers), default=None)

    def to_json(self, reputation: int | None = None, flag: str | None = None) -> dict[str, Any]:
        reason = flag or self.flag
        return {"node_id": self.node_id, "url": self.url,
                "models": [{"name": o.model, "sha256": o.sha256, "params": o.params,
                            "price_ucu_per_token": o.price_ucu_per_token} for o in self.offers],
                "price_ucu_per_token": self.price_ucu_per_token, "reputation": reputation,
                "last_seen_ms": self.last_seen_ms, "latency_ms": self.latency_ms,
                "flagged": reason is not None, "flag_reason": reason, "source": self.source}


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
        raise ValueError(f"{what} must be text of 1 to {MAX_NAME} characters")
    return value


def _lends(record: dict[str, Any]) -> int | None:
    """The MiB a layer peer says it offers (its TXT record or /health), None when malformed."""
    value = record.get("free_mb") or 0
    if isinstance(value, str):  # a TXT record
        value = int(value) if value.isdecimal() and len(value) <= 16 else None
    return wire.finite_int(value)


@dataclass(frozen=True)
class Health:
    """What a peer's /health says, every field checked (`read_health`)."""

    node_id: str
    instance: str | None
    lends_mb: int | None  # set for a layer peer (`forge rpc serve`)
    offers: list[Offer]
    models: list[str]


def read_health(body: Any) -> Health:
    """A peer's /health, or BadResponse naming the first field that is not what a forge node
    (or layer peer) sends: a node key as `node_id`, offers and model names of the right types.

    >>> read_health({"node_id": "ab" * 32, "models": ["tiny.gguf"]}).models
    ['tiny.gguf']
    """
    try:
        if not isinstance(body, dict):
            raise ValueError(f"it is {type(body).__name__}, not an object")
        node_id = body.get("node_id")
        if not is_hex(node_id, 64):
            raise ValueError("node_id is not a node key (64 hex digits)")
        instance = body.get("mesh_instance")
        if instance is not None and not (isinstance(instance, str) and len(instance) <= 255):
            raise ValueError("mesh_instance is not a service name")
        lends = None
        if body.get("role") == "layer-peer":
            lends = _lends(body)
            if lends is None:
                raise ValueError("free_mb is not an integer from 0 to 2^53")
        offers, models = body.get("offers", []), body.get("models", [])
        for key, value in (("offers", offers), ("models", models)):
            if not isinstance(value, list) or len(value) > MAX_OFFERS:
                raise ValueError(f"{key} is not a list of at most {MAX_OFFERS}")
        return Health(node_id, instance, lends, [Offer.from_json(o) for o in offers],
                      [_name(m, "a model name") for m in models])
    except ValueError as exc:
        raise BadResponse(f"its /health is not a forge node's: {exc}") from None


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


class Mesh:
    """This node's view of the LAN: advertise, browse, probe, expire.

    Example (inside the node's event loop)::

        mesh = Mesh(node_id, offers, interfaces=["127.0.0.1"], probe_s=5, expire_s=30)
        await mesh.start(port=3001)
        mesh.peers()   # the peers that answered /health within the last 30 s
        await mesh.stop()
    """

    def __init__(self, node_id: str, offers: Callable[[], list[Offer]], *, interfaces: list[str],
                 static_peers: Sequence[str] = (), mdns: bool = True, probe_s: float = 5,
                 expire_s: float = 30,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 txt: Callable[[], dict[str, str]] | None = None) -> None:
        for address in interfaces:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"mesh interface {address!r} is not an IP address; expected "
                                  "an address of this machine such as 127.0.0.1") from None
        self.node_id = node_id
        self.offers = offers
        self.extra_txt = txt  # more TXT records (a layer peer's role and free memory)
        self.interfaces = list(interfaces)
        self.mdns = mdns
        self.probe_s = probe_s
        self.expire_ms = int(expire_s * 1000)
        self.clock = clock
        # Unique per run, so a copy of this node (same key, same id) is told apart from us.
        self.name = f"forge-{node_id[:12]}-{secrets.token_hex(4)}"
        self.instance = f"{self.name}.{SERVICE}"
        self.candidates: dict[str, Peer] = {}
        self.static = [normalise_url(u) for u in static_peers]
        self._reported: set[str] = set()
        # node id → why it is not trusted (a forked log); gossip sets these and persists them.
        self.flags: dict[str, str] = {}
        self._zc: Any = None
        self._info: Any = None
        self._browser: Any = None
        self._session: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, port: int | None) -> None:
        """Advertise on `port` (the API's bound port), browse, and start probing.

        With `port=None` nothing is advertised: a buyer (`forge worker`) only looks."""
        import aiohttp

        self.port = port
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=max(1.0, self.probe_s)))
        now = self.clock()
        for url in self.static:
            self.candidates[url] = Peer(url, "static", found_ms=now)
        if self.mdns:
            await self._start_zeroconf(port)
        self._loop_task = asyncio.create_task(self._probe_loop())

    async def _start_zeroconf(self, port: int | None) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        v6 = [a for a in self.interfaces if ipaddress.ip_address(a).version == 6]
        version = IPVersion.All if v6 and len(v6) < len(self.interfaces) else \
            IPVersion.V6Only if v6 else IPVersion.V4Only
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=version)
            if port is not None:
                self._info = AsyncServiceInfo(SERVICE, self.instance, port=port,
                                              properties=self._txt(),
                                              parsed_addresses=self.interfaces,
                                              server=f"{self.name}.local.")
                await self._zc.async_register_service(self._info)
        except OSError as exc:
            raise ConfigError(f"cannot start mDNS on {', '.join(self.interfaces)}: {exc}",
                              hint="set mesh.interfaces (or --interface) to addresses of this "
                              "machine, or turn mDNS off with mesh.mdns = false") from exc
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE],
                                            handlers=[self._on_service])

    async def stop(self) -> None:
        """Withdraw the advertisement (a goodbye packet) and stop browsing and probing."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()
        if self._session is not None:
            await self._session.close()
        self._zc = self._browser = self._session = self._loop_task = None

    def _txt(self) -> dict[str, str]:
        txt = {"id": self.node_id, "proto": str(PROTOCOL), "port": str(self.port)}
        offers = self.offers()
        txt["price"] = str(min((o.price_ucu_per_token for o in offers), default=0))
        txt["models"] = str(len(offers))
        for i, offer in enumerate(offers):
            txt[f"m{i}"] = offer.txt()[:255]
        if self.extra_txt is not None:
            txt.update(self.extra_txt())
        return txt

    # -- mDNS --------------------------------------------------------------------------------

    def _on_service(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if name == self.instance:
            return
        if state_change is ServiceStateChange.Removed:
            for url, peer in list(self.candidates.items()):
                if peer.instance == name and peer.source == "mdns":
                    log.info("peer %s withdrew (%s)", url, name)
                    del self.candidates[url]
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        try:
            await self._resolve_service(name)
        except Exception as exc:  # one advertisement's problem must not reach the loop
            log.warning("ignoring mDNS service %s: %s", display.plain(name[:80]),
                        display.plain(f"{type(exc).__name__}: {exc}"[:200]))

    async def _resolve_service(self, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(SERVICE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_MS):
            log.warning("could not resolve mDNS service %s", display.plain(name[:80]))
            return
        txt = {k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace")
               for k, v in info.properties.items()}
        addresses = info.parsed_addresses()
        if not addresses:
            return
        host = addresses[0]
        host = f"[{host}]" if ":" in host else host
        port = txt.get("port") or str(info.port)
        if not (port.isdecimal() and 0 < int(port) < 65536):
            log.warning("mDNS service %s advertises port %s; ignoring it",
                        display.plain(name[:80]), display.plain(port[:20]))
            return
        url = f"http://{host}:{int(port)}"
        try:
            count = txt.get("models", "0")
            if not (count.isdecimal() and int(count) <= MAX_OFFERS):
                raise ValueError(f"{count[:20]!r} models")
            offers = [Offer.from_txt(txt[f"m{i}"]) for i in range(int(count))]
        except (KeyError, ValueError):
            log.warning("peer %s advertises malformed model records; ignoring them", url)
            offers = []
        peer = self.candidates.get(url)
        if peer is None:
            if len(self.candidates) >= MAX_CANDIDATES:
                log.warning("not probing %s (%s): %d candidates already, the most held at once",
                            url, display.plain(name[:80]), MAX_CANDIDATES)
                return
            peer = self.candidates[url] = Peer(url, "mdns", found_ms=self.clock())
            log.info("found peer %s via mDNS (%s)", url, display.plain(name[:80]))
        peer.instance = name
        advertised = txt.get("id")
        peer.node_id = advertised if is_hex(advertised, 64) else peer.node_id
        peer.offers = offers or peer.offers
        peer.lends_mb = _lends(txt) if txt.get("role") == "layer-peer" else peer.lends_mb
        self._check_duplicate(peer)

    # -- probing -----------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception as exc:  # a bug in one round must not end discovery for good
                log.error("mesh probe round failed (%s: %s); probing again in %gs",
                          type(exc).__name__, display.plain(exc), self.probe_s)
            await asyncio.sleep(self.probe_s)

    async def probe_all(self) -> None:
        """Probe every candidate once and expire the ones silent for longer than the window."""
        await asyncio.gather(*(self._probe(p) for p in list(self.candidates.values())))
        now = self.clock()
        for url, peer in list(self.candidates.items()):
            silent_since = peer.last_seen_ms if peer.last_seen_ms is not None else peer.found_ms
            if now - silent_since <= self.expire_ms:
                continue
            if peer.source == "static":
                if peer.last_seen_ms is not None:
                    log.warning("static peer %s stopped answering; still probing it", url)
                peer.last_seen_ms = None
                peer.found_ms = now
            else:
                log.warning("peer %s stopped answering /health; dropped", url)
                del self.candidates[url]

    async def _probe(self, peer: Peer) -> None:
        """Probe one peer; whatever goes wrong stays with this peer (it is not marked seen,
        so it expires) and is logged once, in one line, until it answers well again."""
        try:
            await self._probe_health(peer)
        except NodeUnreachable:  # down, or not there yet: expiry says so
            return
        except Exception as exc:
            problem = display.plain(f"{exc}" if isinstance(exc, ForgeError)
                                    else f"{type(exc).__name__}: {exc}")[:300]
            if problem != peer.problem:
                log.warning("peer %s: %s; leaving it out of the peer table", peer.url, problem)
            peer.problem = problem

    async def _probe_health(self, peer: Peer) -> None:
        from forge_cli.client import AsyncClient

        started = time.perf_counter()
        health = read_health(await AsyncClient(
            peer.url, timeout=max(1.0, self.probe_s), session=self._session,
            max_bytes=HEALTH_MAX_BYTES).get("/health"))
        if health.instance == self.name:
            self.candidates.pop(peer.url, None)  # a static peer that is this node
            return
        if peer.problem is not None:
            log.info("peer %s answers /health well again", peer.url)
            peer.problem = None
        peer.latency_ms = max(0, round((time.perf_counter() - started) * 1000))
        peer.last_seen_ms = self.clock()
        peer.node_id = health.node_id
        if health.lends_mb is not None:
            peer.lends_mb = health.lends_mb
        if health.offers:
            peer.offers = health.offers
        elif not peer.offers:
            peer.offers = [Offer(m, "", 0, 0) for m in health.models]
        self._check_duplicate(peer)

    def _check_duplicate(self, peer: Peer) -> None:
        if peer.node_id != self.node_id:
            return
        peer.flag = "duplicate node id: this peer uses our node key (a copied FORGE_HOME?)"
        if peer.url not in self._reported:
            self._reported.add(peer.url)
            log.error("DUPLICATE NODE ID: peer %s advertises this node's own id %s; was "
                      "FORGE_HOME (node.key) copied? Its trades cannot be told apart from ours",
                      peer.url, self.node_id)

    # -- the table ---------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers that answered /health within the expiry window, newest first."""
        return sorted((p for p in self.candidates.values() if p.last_seen_ms is not None),
                      key=lambda p: (p.node_id or "", p.url))

    def flag_peer(self, node_id: str, reason: str) -> None:
        """Stop trusting every peer that presents `node_id` (shown in the table with `reason`)."""
        self.flags[node_id] = reason

    def flag_of(self, peer: Peer) -> str | None:
        """Why `peer` is not trusted, or None: a duplicate node id or a flag on its node id."""
        return peer.flag or (self.flags.get(peer.node_id) if peer.node_id else None)

    def trusted_peers(self) -> list[Peer]:
        """Peers with a known node id shown by no other peer and no flag: the ones to gossip
        and trade with."""
        peers = self.peers()
        ids = [p.node_id for p in peers]
        return [p for p in peers
                if p.node_id and ids.count(p.node_id) == 1 and self.flag_of(p) is None]

    def table(self, reputation: Callable[[str], int | None] = lambda _: None
              ) -> list[dict[str, Any]]:
        """The peer table as JSON, with two peers sharing one node id flagged as well."""
        peers = self.peers()
        counts: dict[str | None, int] = {}
        for peer in peers:
            counts[peer.node_id] = counts.get(peer.node_id, 0) + 1
        rows = []
        for peer in peers:
            shared = None
            if peer.node_id is not None and counts[peer.node_id] > 1:
                shared = f"duplicate node id: {counts[peer.node_id]} peers advertise it"
            rep = reputation(peer.node_id) if peer.node_id else None
            rows.append(peer.to_json(rep, self.flag_of(peer) or shared))
        return rows

    def describe(self) -> str:
        """One line for the node's start-up banner."""
        where = ", ".join(self.interfaces) if self.mdns else "off (static peers only)"
        static = f"; static peers {', '.join(self.static)}" if self.static else ""
        return (f"mDNS {SERVICE} on {where}{static} "
                f"(probe every {self.probe_s:g}s, expire after {self.expire_ms / 1000:g}s)")
