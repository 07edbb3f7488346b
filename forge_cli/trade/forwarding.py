"""A chat completion for a model this node lacks, bought from a peer that has it.

The node buys with its own account (a dual-signed peer-to-peer trade in both ledgers) and
charges the local consumer the same CU in a local trade, so the consumer pays what the peer
charged and the node neither gains nor loses. An operator token buys with the node's own
account directly (only the peer-to-peer trade). The response's `x_forge.served_by` names
the peer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge_cli.errors import NoProvider
from forge_cli.trade.offers import Seller, choose, offered
from forge_cli.trade.seams import Bought, Node, PeerBuyer
from forge_cli.trade.session import (
    Completion,
    Pieces,
    RemoteCompletion,
    RemoteOffer,
    Settled,
    TradeSession,
)

if TYPE_CHECKING:
    from forge_cli.economy.accounts import Resolved


class RemotePump(Pieces):
    """The peer's reply as an async iterator of pieces; `close()` waits for the purchase to
    end and returns a RemoteCompletion (None when nothing was bought).

    A consumer that hangs up does not cut the purchase short: it runs to its end and is
    countersigned, so it is on both ledgers, and the consumer pays for every token the node
    received on its behalf (within the quote it reserved), as a local consumer pays for the
    tokens produced. Cut short, the peer would record its terms unsettled against this node,
    and a few consumers hanging up would spend the node's standing at that peer (past
    `mesh.max_unsettled` it sells the node nothing more). The purchase still stops at the
    kill switch, and a purchase that fails is not paid."""

    def __init__(self, buyer: PeerBuyer, seller: Seller, payload: dict[str, Any],
                 signed_quote: dict[str, Any]) -> None:
        super().__init__()
        self.purchase: Bought | None = None
        self.max_tokens = payload["max_tokens"]

        def on_piece(piece: str, tokens: int) -> None:
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
        try:
            await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if not self.task.done():  # this close was cancelled (the node stopping): so is it
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
                raise
        except Exception:  # noqa: S110  the purchase's own error reached the consumer already
            pass
        p = self.purchase
        if p is None:
            return None
        terms = p.terms
        finish = "length" if terms["completion_tokens"] >= self.max_tokens else "stop"
        return RemoteCompletion(terms["prompt_tokens"], terms["completion_tokens"], finish,
                                p.first_piece_s, max(0.0, p.total_s - p.first_piece_s))


def sellers(node: Node, model: str) -> list[Seller]:
    """Unflagged peers that offer `model` (none without --mesh)."""
    return [s for s in all_sellers(node) if s.model == model]


def all_sellers(node: Node) -> list[Seller]:
    """Every offer of the node's trusted mesh peers (none without --mesh)."""
    return [] if node.mesh is None else offered(node.mesh, node.effective_reputation)


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


async def forward(node: Node, who: Resolved, model: str, max_tokens: int, request: bytes,
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

    async def peer_only(session: TradeSession, completion: Completion | None) -> Settled:
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
