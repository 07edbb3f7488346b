"""A chat completion for a model this node lacks, bought from a peer that has it.

The node buys with its own account (a dual-signed peer-to-peer trade in both ledgers) and
charges the local consumer the same CU in a local trade, so the consumer pays what the peer
charged and the node neither gains nor loses. An operator token buys with the node's own
account directly (only the peer-to-peer trade). The response's `x_forge.served_by` names
the peer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from forge_cli.errors import NoProvider
from forge_cli.trade.offers import Seller, choose, offered
from forge_cli.trade.seams import Bought, Node, PeerBuyer
from forge_cli.trade.session import (
    Pieces,
    RemoteCompletion,
    RemoteOffer,
    Settled,
    TradeSession,
)


class RemotePump(Pieces):
    """The peer's reply as an async iterator of pieces; `close()` returns a RemoteCompletion
    (or None when nothing was bought) and cancels a purchase still running.

    Cut short by `close()` (the consumer hung up), the purchase ends in a recorded outcome
    on its own (forge_cli.mesh.buyer), and what was received from the peer is what the
    consumer pays for, as the local engine's tokens produced are."""

    def __init__(self, buyer: PeerBuyer, seller: Seller, payload: dict[str, Any],
                 signed_quote: dict[str, Any]) -> None:
        super().__init__()
        self.purchase: Bought | None = None
        self.max_tokens = payload["max_tokens"]
        self.received = 0  # the peer's running count of tokens sent to this node
        self.started = time.perf_counter()
        self.first: float | None = None

        def on_piece(piece: str, tokens: int) -> None:
            self.received = max(self.received, tokens)
            if self.first is None:
                self.first = time.perf_counter() - self.started
            if piece:
                self.queue.put_nowait(("text", (piece, tokens)))

        async def run() -> None:
            try:
                self.purchase = await buyer.buy(seller, payload, on_piece=on_piece,
                                                signed_quote=signed_quote)
                self.queue.put_nowait(("done", None))
            except BaseException as exc:
                self.queue.put_nowait(("error", exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise

        self.task = asyncio.create_task(run())

    async def close(self) -> RemoteCompletion | None:
        cut = not self.task.done()
        if cut:
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        p = self.purchase
        if p is None:
            # A purchase that failed on its own is not paid; one this node cut is, for the
            # tokens that reached this node.
            if not cut or self.received == 0:
                return None
            finish = "length" if self.received >= self.max_tokens else "stop"
            first = self.first or 0.0
            return RemoteCompletion(0, self.received, finish, first,
                                    max(0.0, time.perf_counter() - self.started - first))
        terms = p.terms
        finish = "length" if terms["completion_tokens"] >= self.max_tokens else "stop"
        return RemoteCompletion(terms["prompt_tokens"], terms["completion_tokens"], finish,
                                p.first_piece_s, max(0.0, p.total_s - p.first_piece_s))


def sellers(node: Node, model: str) -> list[Seller]:
    """Unflagged peers that offer `model` (none without --mesh)."""
    return [s for s in all_sellers(node) if s.model == model]


def all_sellers(node: Node) -> list[Seller]:
    """Every offer of the node's trusted mesh peers (none without --mesh)."""
    return [] if node.mesh is None else offered(node.mesh, node.reputation)


@dataclass
class Forward:
    """A forwarded purchase: the local session, and how to start buying from the peer."""

    session: TradeSession
    seller: Seller
    signed_quote: dict[str, Any]
    pump: RemotePump | None = None

    def start(self, node: Node, payload: dict[str, Any]) -> RemotePump:
        self.pump = RemotePump(node.peer_buyer(), self.seller,
                               {**payload, "model": self.seller.model,
                                "max_tokens": self.session.max_tokens}, self.signed_quote)
        return self.pump

    def served_by(self) -> dict[str, Any]:
        out = {"node_id": self.seller.node_id, "url": self.seller.url, "model": self.seller.model,
               "price_ucu_per_token": self.signed_quote["quote"]["price_ucu_per_token"]}
        p = self.pump.purchase if self.pump is not None else None
        if p is not None:
            out.update(peer_trade_seq=p.provider_trade_seq, node_trade_seq=p.trade_seq,
                       peer_cu=p.cu)
        return out


async def forward(node: Node, who: Any, model: str, max_tokens: int, request: bytes,
                  mode: str = "balanced") -> Forward:
    """Quote from the best peer for `mode` and open a session for the local consumer at that
    quote (none is charged for the operator: the peer trade is the only trade). Nothing is
    bought yet: `Forward.start` buys."""
    ranked = choose(sellers(node, model), mode)
    if not ranked:
        raise NoProvider(f"model {model!r} is not served here and no peer on the mesh offers it; "
                         f"this node serves {', '.join(sorted(node.models))}")
    seller = ranked[0]
    signed_quote = await node.peer_buyer().quote_from(seller, model, max_tokens)
    quote = signed_quote["quote"]
    offer = RemoteOffer(model, quote["model_sha256"], seller.params)
    holder: list[Forward] = []

    async def peer_only(session: TradeSession, completion: Any) -> Settled:
        pump = holder[0].pump
        purchase = pump.purchase if pump is not None else None
        return Settled(purchase.cu if purchase else 0, quote["price_ucu_per_token"], 0, None)

    if who.is_operator:
        session = node.session(account=node.node_id, label="operator", model=offer,
                               max_tokens=max_tokens, request=request, settle=peer_only,
                               price=quote["price_ucu_per_token"], charge=False)
    else:
        session = node.session(account=who.account_hex, label=who.name, model=offer,
                               max_tokens=max_tokens, request=request,
                               price=quote["price_ucu_per_token"])
    found = Forward(session, seller, signed_quote)
    holder.append(found)
    return found


__all__ = ["Forward", "RemoteCompletion", "RemoteOffer", "RemotePump", "all_sellers",
           "forward", "sellers"]
