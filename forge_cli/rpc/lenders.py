"""Layer peers as the head sees them, and the head's JSON client for them: each peer's
self-description (`/health`), the terms it offers for the layers planned on it (checked
before any tunnel opens), and every answer mapped to the errors a split engine reports
(PeerLost when a peer cannot be reached, TunnelRefused in the peer's own words)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from forge_cli.errors import ForgeError, PeerLost, TunnelRefused, UsageError
from forge_cli.rpc import terms

if TYPE_CHECKING:
    import aiohttp

    from forge_cli.rpc.tunnel import HeadTunnel

HTTP_TIMEOUT_S = 30


@dataclass
class Lender:
    """A layer peer as the head sees it."""

    url: str
    node_id: str
    free_mb: int
    rate: int
    layers: list[int] = field(default_factory=list)
    agreed: dict[str, Any] | None = None
    tunnel: HeadTunnel | None = None
    lost: str | None = None
    paid_cu: int = 0
    trades: int = 0

    @property
    def short(self) -> str:
        return f"{self.node_id[:12]}… at {self.url}"

    def describe(self) -> dict[str, Any]:
        traffic = self.tunnel.traffic.as_dict() if self.tunnel else {}
        return {"peer": self.node_id, "url": self.url, "layers": self.layers,
                "free_mb": self.free_mb, "rate_ucu_per_layer_token": self.rate,
                "paid_cu": self.paid_cu, "trades": self.trades, "lost": self.lost,
                "tunnel_bytes_up": traffic.get("up", 0),
                "tunnel_bytes_down": traffic.get("down", 0)}


class PeerClient:
    """The head's HTTP sessions with its layer peers, made and closed on the loop that runs
    the tunnels: `http` for JSON calls (each timed), `tunnels` for the long-lived relays (only
    connecting is timed: they live as long as the model is loaded)."""

    def __init__(self, http: aiohttp.ClientSession, tunnels: aiohttp.ClientSession) -> None:
        self.http = http
        self.tunnels = tunnels

    @classmethod
    async def open(cls) -> PeerClient:
        import aiohttp

        return cls(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)),
                   aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                       total=None, sock_connect=HTTP_TIMEOUT_S)))

    async def close(self) -> None:
        await self.http.close()
        await self.tunnels.close()

    async def json(self, method: str, url: str, body: Any = None) -> Any:
        import aiohttp

        from forge_cli.client import answer

        try:
            async with self.http.request(method, url, json=body) as response:
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise PeerLost(f"layer peer at {url} is unreachable: {exc or type(exc).__name__}"
                           ) from None
        try:
            return answer(response.status, response.reason or "", raw, f"layer peer at {url}")
        except ForgeError as exc:  # the peer's own words where it gave an envelope
            said = (getattr(exc, "envelope", None) or {}).get("message") or exc.message
            raise TunnelRefused(f"layer peer at {url} refused: {said}") from None

    async def hello(self, url: str) -> Lender:
        """The layer peer at `url`, as its /health describes it."""
        url = url.rstrip("/")
        health = await self.json("GET", f"{url}/health")
        if not isinstance(health, dict) or health.get("role") != "layer-peer":
            raise UsageError(f"{url} is not a layer peer (start one with `forge rpc serve`)")
        try:
            return Lender(url, str(health["node_id"]), int(health["free_mb"]),
                          int(health["rate_ucu_per_layer_token"]))
        except (KeyError, TypeError, ValueError):
            raise TunnelRefused(f"layer peer at {url} describes itself badly: {health}") from None

    async def terms(self, lender: Lender, *, head: str, model_sha256: str) -> dict[str, Any]:
        """The terms `lender` offers `head` for its planned layers, checked: signed by it,
        for exactly what was asked, and buying some tunnel bytes per paid token."""
        agreed = await self.json("POST", f"{lender.url}/v1/forge/rpc/terms", {
            "head": head, "model_sha256": model_sha256, "layers": len(lender.layers)})
        reason = terms.terms_problem(agreed)
        if reason is None and (agreed["terms"]["peer"] != lender.node_id
                               or agreed["terms"]["layers"] != len(lender.layers)
                               or agreed["terms"]["head"] != head):
            reason = "they are not the terms asked for"
        if reason is None and agreed["terms"]["bytes_per_layer_token"] < 1:
            reason = "a paid token buys no tunnel bytes under them"
        if reason:
            raise TunnelRefused(f"layer peer {lender.short} sent bad terms: {reason}")
        return cast(dict[str, Any], agreed)  # terms_problem found it an object of signed terms


__all__ = ["HTTP_TIMEOUT_S", "Lender", "PeerClient"]
