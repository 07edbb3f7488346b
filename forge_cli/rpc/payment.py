"""How a split model pays its layer peers: each generation metered as a dual-signed layer trade
per peer (layers × tokens × the peer's rate), and tunnel bytes bought ahead (`top_up`) when a
peer's credit runs low. Payments go through the node's wallet as the node's account; a split
engine attached to no node pays no one (a peer then carries it no further than its credit)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from forge_cli import errors
from forge_cli.errors import ModelError, TunnelRefused
from forge_cli.ledger import entries
from forge_cli.rpc import terms

if TYPE_CHECKING:
    from collections.abc import Callable

    from forge_cli.rpc.lenders import Lender, PeerClient
    from forge_cli.trade.wallet import Wallet

log = logging.getLogger("forge.rpc")


class Paying(Protocol):
    """What a split model needs of the node to pay its peers: the node's account and wallet."""

    node_id: str
    wallet: Wallet
    clock: Callable[[], int]


class Payer:
    """The head's payments to its layer peers, run on the tunnels' event loop."""

    def __init__(self, model: str, signer: Any, client: PeerClient,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.model = model
        self.signer = signer  # the head's identity: it countersigns as the consumer
        self.client = client
        self.node: Paying | None = None
        self._loop = loop
        self._payments: set[Future[bool]] = set()

    def meter(self, lenders: list[Lender], prompt_tokens: int, tokens: int,
              response: bytes) -> None:
        """Pay each live peer a generation ran on for it (in the background)."""
        if self.node is None or tokens + prompt_tokens == 0:
            return
        for lender in lenders:
            if lender.lost is None and lender.agreed is not None and lender.rate > 0:
                future = asyncio.run_coroutine_threadsafe(
                    self.pay(lender, lender.agreed, prompt_tokens, tokens, response), self._loop)
                self._payments.add(future)
                future.add_done_callback(self._payments.discard)

    async def top_up(self, lender: Lender, agreed: dict[str, Any], tokens: int) -> bool:
        """Pay `lender` ahead for `tokens` (the tunnel bytes they buy): False when this engine
        pays no one (not attached) or the payment failed."""
        if self.node is None or lender.rate == 0:
            return False
        return await self.pay(lender, agreed, 0, tokens, b"")

    async def pay(self, lender: Lender, agreed: dict[str, Any], prompt_tokens: int,
                  tokens: int, response: bytes) -> bool:
        """One dual-signed trade: the head pays `lender` for its layers over `tokens`."""
        from forge_cli import identity

        node = self.node
        if node is None:  # attach(node) comes before any generation; a payment without it is a bug
            raise ModelError(f"the split engine for {self.model} pays its peers through a node, "
                             "and none is attached")
        request = terms.agreement_body(agreed)
        record = terms.metering_body(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                                     response=response)
        trade = terms.layer_trade(agreed, model=self.model, prompt_tokens=prompt_tokens,
                                  completion_tokens=tokens, request=request, response=record,
                                  now_ms=node.clock())
        consumer_sig = self.signer.sign(entries.trade_message(trade)).hex()

        async def countersigned() -> tuple[dict[str, Any], list[bytes]]:
            answer = await self.client.json("POST", f"{lender.url}/v1/forge/rpc/settle", {
                "trade": trade, "consumer_sig": consumer_sig, "request": request.decode(),
                "response": record.decode()})
            provider_sig = answer.get("provider_sig") if isinstance(answer, dict) else None
            if not isinstance(provider_sig, str) or not identity.verify_hex(
                    lender.node_id, entries.trade_message(trade), provider_sig):
                raise TunnelRefused(f"layer peer {lender.short} did not sign the layer trade")
            tunnel = lender.tunnel
            if tunnel is not None and tunnel.agreed is agreed:  # what the peer now lets flow
                tunnel.paid_tokens += trade["completion_tokens"]
            return ({"terms": trade, "provider_sig": provider_sig, "consumer_sig": consumer_sig},
                    [request, record])

        try:
            await node.wallet.pay(node.node_id, trade["cu"], countersigned,
                                  what=f"{trade['cu']} CU owed to layer peer {lender.short}")
        except errors.ForgeError as exc:
            log.error("layer trade with %s not settled: %s", lender.short, exc)
            return False
        lender.paid_cu += trade["cu"]
        lender.trades += 1
        return True

    def settled(self, timeout: float = 30) -> None:
        """Wait for the payments under way (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._payments and time.monotonic() < deadline:
            time.sleep(0.05)


__all__ = ["Payer", "Paying"]
