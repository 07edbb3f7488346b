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
from typing import Any

from forge_cli.errors import NoProvider
from forge_cli.node.service import LoadedModel, Node, Pieces


@dataclass
class RemoteCompletion:
    """What a peer produced, in the shape the routes read from a local Completion."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    time_to_first_token_s: float
    generation_s: float


class RemotePump(Pieces):
    """The peer's reply as an async iterator of pieces; `close()` returns a RemoteCompletion
    (or None when nothing was bought) and cancels a purchase still running."""

    def __init__(self, buyer: Any, seller: Any, payload: dict[str, Any],
                 signed_quote: dict[str, Any]) -> None:
        super().__init__()
        self.purchase: Any = None
        self.max_tokens = payload["max_tokens"]

        async def run() -> None:
            try:
                self.purchase = await buyer.buy(
                    seller, payload, on_piece=lambda p: self.queue.put_nowait(("text", (p, 0))),
                    signed_quote=signed_quote)
                self.queue.put_nowait(("done", None))
            except BaseException as exc:
                self.queue.put_nowait(("error", exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise

        self.task = asyncio.create_task(run())

    async def close(self) -> RemoteCompletion | None:
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        p = self.purchase
        if p is None:
            return None
        terms = p.terms
        finish = "length" if terms["completion_tokens"] >= self.max_tokens else "stop"
        return RemoteCompletion(terms["prompt_tokens"], terms["completion_tokens"], finish,
                                p.first_piece_s, max(0.0, p.total_s - p.first_piece_s))


def buyer(node: Node) -> Any:
    """The node's buyer: its own account, its ledger thread, one HTTP session."""
    if node.buyer is None:
        import aiohttp

        from forge_cli.mesh.buyer import Buyer, LedgerWallet

        wallet = LedgerWallet(node.ledger, node.safety, node.signer, node.on_ledger)
        node.buyer = Buyer(wallet, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)),
                           clock=node.clock)
    return node.buyer


def sellers(node: Node, model: str) -> list[Any]:
    """Unflagged peers that offer `model` (none without --mesh)."""
    return [s for s in all_sellers(node) if s.model == model]


def all_sellers(node: Node) -> list[Any]:
    """Every offer of the node's trusted mesh peers (none without --mesh)."""
    from forge_cli.mesh.buyer import offered

    return [] if node.mesh is None else offered(node.mesh, node.reader)


async def reserve(node: Node, who: Any, model: str, max_tokens: int,
                  mode: str = "balanced") -> tuple[Any, Any, dict[str, Any]]:
    """Quote from the best peer for `mode` and reserve the local consumer's CU at that quote.

    Returns (the local reservation, or None for the operator; the seller; its signed quote).
    Nothing is bought yet: `RemotePump(buyer(node), seller, payload, signed_quote)` buys.
    """
    from forge_cli.mesh.buyer import choose

    ranked = choose(sellers(node, model), mode)
    if not ranked:
        raise NoProvider(f"model {model!r} is not served here and no peer on the mesh offers it; "
                         f"this node serves {', '.join(sorted(node.models))}")
    seller = ranked[0]
    signed_quote = await buyer(node).quote(seller, model, max_tokens)
    quote = signed_quote["quote"]
    reservation = None
    if not who.is_operator:
        stand_in = LoadedModel(model, None, quote["model_sha256"], seller.params, None)  # type: ignore[arg-type]
        reservation = await node.reserve(who.account_hex, who.name, stand_in, max_tokens,
                                         price=quote["price_ucu_per_token"])
    return reservation, seller, signed_quote


async def start(node: Node, who: Any, model: str, payload: dict[str, Any], max_tokens: int,
                mode: str = "balanced") -> tuple[Any, RemotePump, dict[str, Any]]:
    """Quote, reserve and start buying: (reservation or None, the pump, x_forge.served_by)."""
    reservation, seller, signed_quote = await reserve(node, who, model, max_tokens, mode)
    pump = RemotePump(buyer(node), seller, {**payload, "model": model, "max_tokens": max_tokens},
                      signed_quote)
    return reservation, pump, served_by(seller, signed_quote)


def served_by(seller: Any, signed_quote: dict[str, Any]) -> dict[str, Any]:
    return {"node_id": seller.node_id, "url": seller.url, "model": seller.model,
            "price_ucu_per_token": signed_quote["quote"]["price_ucu_per_token"]}


def peer_trade(pump: RemotePump) -> dict[str, Any]:
    p = pump.purchase
    if p is None:
        return {}
    return {"peer_trade_seq": p.provider_trade_seq, "node_trade_seq": p.trade_seq,
            "peer_cu": p.cu}

