"""What the trade core's users need of a node, named: sellers, forwarding and agents depend on
these Protocols, never on the Node class and a bag of attributes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved
    from forge_cli.identity import Identity
    from forge_cli.inference.jobs import Sampling
    from forge_cli.ledger.entries import Entry
    from forge_cli.trade.offers import Directory, Seller
    from forge_cli.trade.session import (
        Completion,
        Partial,
        Settle,
        Settled,
        Source,
        TradeSession,
    )
    from forge_cli.trade.wallet import Wallet

T = TypeVar("T")


class Offer(Protocol):
    """A model as trades name it: served here (LoadedModel) or by a peer (RemoteOffer)."""

    @property
    def name(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def params(self) -> int: ...


class Engine(Protocol):
    @property
    def n_ctx(self) -> int: ...

    def check_prompt_bytes(self, size: int, what: str = ...) -> None: ...

    # -> Any: the engine's Stream (forge_cli.inference.engine), which only Node.pump walks, on a
    # thread of its own; trade/ hands it over and never reads it.
    def chat(self, messages: list[dict[str, Any]], sampling: Sampling, *,
             block: bool = ...) -> Any: ...


class Served(Offer, Protocol):
    """A model this node runs."""

    @property
    def engine(self) -> Engine: ...


class Breakers(Protocol):
    def record_outcome(self, account: str, ok: bool) -> None: ...

    def record_spend(self, account: str, cu: int) -> None: ...


class Desk(Protocol):
    """What a TradeSession needs: prices, the wallet, the kill switch and the breakers."""

    @property
    def wallet(self) -> Wallet: ...

    @property
    def safety(self) -> Breakers: ...

    def quote(self, model: Offer) -> int: ...

    def safety_killed(self) -> bool: ...

    def generating(self, delta: int) -> None: ...


class Bought(Protocol):
    """A finished purchase from a peer (forge_cli.mesh.buyer.Purchase)."""

    terms: dict[str, Any]
    trade_seq: int  # in this node's ledger
    provider_trade_seq: int | None
    first_piece_s: float
    total_s: float

    @property
    def cu(self) -> int: ...


class PeerBuyer(Protocol):
    """What forwarding needs of the node's buyer on the mesh (forge_cli.mesh.buyer.Buyer)."""

    session: Any  # the aiohttp ClientSession every call to a peer shares

    async def quote_from(self, seller: Seller, model: str, max_tokens: int
                         ) -> dict[str, Any]: ...

    async def buy(self, seller: Seller, payload: dict[str, Any],
                  on_piece: Callable[[str, int], Any] | None = None, max_cu: int | None = None,
                  signed_quote: dict[str, Any] | None = None) -> Bought: ...


class Node(Desk, Protocol):
    """What P2P selling, forwarding and agent runs need of the node."""

    node_id: str
    signer: Identity
    clock: Callable[[], int]
    # Any: the values are root's LoadedModel (above trade/), and a dict's value type is
    # invariant, so `Served` would not accept it; read one through `model(name)`, typed Served.
    models: dict[str, Any]
    @property
    def mesh(self) -> Directory | None: ...  # forge_cli.mesh.discovery.Mesh; None without --mesh

    # Any: the verified network view (forge_cli.mesh.network.NetworkView) is read only by the
    # mesh's own seller, and trade/ names no mesh module, not even for a type.
    network: Any

    def model(self, name: str | None) -> Served: ...

    def price(self, model: Offer) -> int: ...

    # Any: `start` returns the engine's Stream, as Engine.chat above does.
    async def pump(self, start: Callable[[], Any]) -> Source: ...

    def session(self, *, account: str, label: str, model: Offer, max_tokens: int,
                request: bytes, settle: Settle | None = None, price: int | None = None,
                peer: bool = False, charge: bool = True, partial: Partial = "produced"
                ) -> TradeSession: ...

    def buyer_session(self, who: Resolved, *, model: Offer, max_tokens: int, request: bytes,
                      price: int | None = None) -> TradeSession: ...

    async def on_ledger(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    async def append(self, kind: str, data: dict[str, Any], *, parent: int | None = None,
                     bodies: tuple[bytes, ...] | list[bytes] = ()) -> Entry: ...

    def reputation(self, account: str) -> int: ...

    def effective_reputation(self, account: str) -> int: ...

    def nonce_seq(self, consumer: str, nonce: str) -> int | None: ...

    def approval_status(self, approval_id: str) -> str | None: ...

    def entry_body(self, seq: int, field: str) -> bytes | None: ...

    def unsettled_count(self, consumer: str) -> int: ...

    def peer_buyer(self) -> PeerBuyer: ...

    def observe(self, completion: Completion | None) -> None: ...

    def counted(self, settled: Settled, model: str, completion: Completion | None) -> None: ...


__all__ = ["Bought", "Breakers", "Desk", "Engine", "Node", "Offer", "PeerBuyer", "Served"]
