"""The trade lifecycle, once: quote → reserve → generate → settle, for every way a node sells.

HTTP chat/completions, forwarding to a peer, P2P sales and agent calls all run a
`TradeSession`. It reserves the most a request can cost (free tier, available balance, every
safety gate), checks the kill switch on every generated piece, settles exactly once for the
tokens produced, and on every way out (success, error, cancellation, a client gone, bad input
found late) releases the reservation, gives back the queue slot and tells the breaker whether
the request failed, in the one meaning of "failed" below. Both sides of a peer-to-peer trade
run one: the seller's settles as signed terms, the buyer's as its countersignature.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from forge_cli.errors import EngineBusy, SpendDenied, UsageError
from forge_cli.ledger import entries

log = logging.getLogger("forge.trade")

if TYPE_CHECKING:
    from forge_cli.trade.seams import Desk, Offer
    from forge_cli.trade.wallet import Hold

# Ends of a request that are not the node's fault and do not count towards the breaker: a busy
# queue, a refused spend (kill switch included), bad input, a client that went away.
NOT_FAILURES: tuple[type[BaseException], ...] = (EngineBusy, SpendDenied, UsageError,
                                                 ConnectionError, asyncio.CancelledError,
                                                 GeneratorExit)


def failed(exc: BaseException | None) -> bool:
    """The one meaning of "this request failed" for the circuit breaker."""
    return exc is not None and not isinstance(exc, NOT_FAILURES)


def hung_up(exc: BaseException | None) -> bool:
    """The consumer went away: a write to its connection failed. (A cancelled handler is the
    node stopping, not the consumer leaving.)"""
    return isinstance(exc, ConnectionError)


# What a session left without `settle()` records: "produced" settles for the tokens produced on
# every way out (a local consumer pays for what it got); "hang-up" settles only when the
# consumer went away, for the tokens delivered to it (a P2P sale: the node's own failures cost
# the peer nothing, but a peer that takes tokens and leaves is on the record).
Partial = Literal["produced", "hang-up"]


@dataclass
class Settled:
    cu: int
    price_ucu: int
    balance: int
    trade_seq: int | None  # None: nothing was produced (or it is not this ledger's trade)

    def x_forge(self) -> dict[str, Any]:
        return {"cu_cost": self.cu, "price_ucu_per_token": self.price_ucu,
                "balance": self.balance, "trade_seq": self.trade_seq}


class Completion(Protocol):
    """What a finished generation reports (the engine's Completion, or a peer's)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    generation_s: float

    @property
    def time_to_first_token_s(self) -> float: ...

    @property
    def tokens_per_s(self) -> float: ...


@dataclass(frozen=True)
class RemoteOffer:
    """A peer's model, as a trade names it."""

    name: str
    sha256: str
    params: int


@dataclass
class RemoteCompletion:
    """What a peer produced, in the shape a local Completion has."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    time_to_first_token_s: float
    generation_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed as the buyer saw it: tokens after the first, over their time."""
        if self.completion_tokens < 2 or self.generation_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.generation_s


class Source(Protocol):
    """Generated text as an async iterator of pieces; `close()` stops it and returns what
    was produced (None when nothing was)."""

    tokens: int

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def close(self) -> Completion | None: ...


class Settle(Protocol):
    """How a session's trade is recorded (a local trade, a P2P sale's terms, …)."""

    async def __call__(self, session: TradeSession, completion: Completion | None) -> Settled: ...


class TradeSession:
    """One sale. Use as `async with` (or `open()` then `close()`)::

        async with desk.session(account=a, label="alice", model=m, max_tokens=64,
                                request=raw, settle=desk.local_trade) as trade:
            async for piece in trade.run(await desk.pump(lambda: m.engine.chat(...))):
                ...
            settled = await trade.settle()

    `settle()` records the trade; a session left without it settles for the tokens produced
    (nothing when the kill switch stopped it), so the consumer pays for what it got and only
    for that; with `partial="hang-up"` it settles only when the consumer went away, and for
    the tokens `delivered` (a P2P sale: see `Partial`). With `charge=False` nothing is
    reserved or recorded here (the operator buying from a peer: the peer-to-peer trade is the
    only trade). `what` and `hint` name the spend in a refused reservation.
    """

    def __init__(self, desk: Desk, *, account: str, label: str, model: Offer, max_tokens: int,
                 request: bytes, settle: Settle, price: int | None = None, peer: bool = False,
                 charge: bool = True, partial: Partial = "produced", what: str | None = None,
                 hint: str | None = None) -> None:
        self.desk = desk
        self.account = account
        self.label = label
        self.model = model
        self.max_tokens = max_tokens
        self.request = request
        self._settle = settle
        self.price = price
        self.peer = peer
        self.charge = charge
        self.partial = partial
        self.what = what
        self.hint = hint
        self.hold: Hold | None = None
        self.max_cu = 0
        self.source: Source | None = None
        self.pieces: list[str] = []  # produced (the last one may never have reached the consumer)
        self.taken = 0  # pieces the consumer took: it asked for the next one after them
        self.delivered = 0  # tokens of the pieces taken (the source's running count)
        self.completion: Completion | None = None
        self.killed = False
        self.settled: Settled | None = None
        self._opened = False
        self._settling = False
        self._closed = False

    # -- opening -------------------------------------------------------------------------------

    async def open(self) -> TradeSession:
        """Quote (unless a price was agreed) and reserve, through every gate."""
        if self._opened:
            return self
        if self.price is None:
            self.price = self.desk.quote(self.model)
        self.max_cu = entries.trade_cost(self.max_tokens, self.price)
        if self.charge:
            self.hold = await self.desk.wallet.reserve(
                self.account, self.max_cu, peer=self.peer,
                what=self.what or f"the quote of {self.max_cu:,} CU for up to {self.max_tokens} "
                                  f"tokens at {self.price / 1e6:.2f} CU/token",
                hint=self.hint or "lower max_tokens, or fund the account")
        self._opened = True
        self.desk.generating(+1)
        return self

    async def __aenter__(self) -> TradeSession:
        return await self.open()

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        await self.close(exc)

    # -- generating ----------------------------------------------------------------------------

    async def run(self, source: Source) -> AsyncIterator[str]:
        """The pieces of `source`, stopping at the kill switch (checked on every piece).

        A piece counts as delivered once the consumer asks for the next one: a write to a
        connection that is gone raises in the consumer's loop, and the piece it carried is
        never counted."""
        self.source = source
        async for piece in source:
            if self.desk.safety_killed():
                break
            self.pieces.append(piece)
            yield piece
            self.taken += 1
            self.delivered = max(self.delivered, source.tokens)
        self.killed = self.desk.safety_killed()

    def told(self, tokens: int) -> None:
        """The consumer was told the final count (tokens held back are billed too)."""
        self.delivered = max(self.delivered, tokens)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def delivered_text(self) -> str:
        return "".join(self.pieces[:self.taken])

    @property
    def response(self) -> bytes:
        return self.text.encode()

    async def finish(self) -> Completion | None:
        """Stop generating (if still running) and return what was produced."""
        if self.source is not None and self.completion is None:
            self.completion = await self.source.close()
        return self.completion

    # -- settling ------------------------------------------------------------------------------

    async def settle(self) -> Settled:
        """Record the trade for what was produced (once; nothing when killed)."""
        if self._settling:
            raise RuntimeError("a trade session settles once")
        self._settling = True
        completion = await self.finish()
        if self.killed:
            completion = None
        settled = await self._settle(self, completion)
        if self.hold is not None:
            self.hold.release()
            self.hold = None
        settled.balance = self.desk.wallet.available(self.account)
        self.settled = settled
        return settled

    def keep_hold(self) -> Hold | None:
        """Take over the reservation (a P2P sale holds it until the countersignature)."""
        hold, self.hold = self.hold, None
        return hold

    async def close(self, exc: BaseException | None = None) -> None:
        """The one way out: settle what was produced (or delivered, see `Partial`) if nobody
        did, release, tell the breaker."""
        if self._closed or not self._opened:
            return
        self._closed = True
        try:
            await self.finish()
            if not self._settling and (self.partial == "produced" or hung_up(exc)):
                try:
                    await self.settle()
                except Exception:
                    if exc is None:
                        raise
                    log.exception("could not settle %s after %s", self.label, type(exc).__name__)
        finally:
            if self.hold is not None:
                self.hold.release()
            self.desk.generating(-1)
            if self.charge and (failed(exc) or exc is None and self.settled is not None):
                self.desk.safety.record_outcome(self.account, exc is None)


def request_bytes(payload: dict[str, Any]) -> bytes:
    """A request as its stored body (canonical enough to hash: sorted keys, UTF-8)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


class Pieces:
    """An async iterator over ("text", (piece, tokens)), ("done", None) and ("error", exc)
    items put on `queue` by a producer; `tokens` is the count up to the last piece returned."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.tokens = 0

    def __aiter__(self) -> Pieces:
        return self

    async def __anext__(self) -> str:
        kind, value = await self.queue.get()
        if kind == "text":
            piece: str
            piece, self.tokens = value
            return piece
        if kind == "done":
            raise StopAsyncIteration
        raise value


class Streamed(Protocol):
    """An engine's stream as a pump walks it (forge_cli.inference.engine.Stream): text pieces,
    the tokens generated so far, a way to stop it, and its completion once it ended."""

    tokens: int
    completion: Completion | None

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


class Pump(Pieces):
    """Text pieces of an engine Stream, carried from a worker thread into the event loop.

    `close()` cancels the generation if it is still running, waits for the engine to stop,
    and returns the Completion: what was produced, which is what the consumer pays for.
    """

    def __init__(self, stream: Streamed, pool: ThreadPoolExecutor) -> None:
        super().__init__()
        self.stream = stream
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                for piece in stream:
                    loop.call_soon_threadsafe(self.queue.put_nowait,
                                              ("text", (piece, stream.tokens)))
                loop.call_soon_threadsafe(self.queue.put_nowait, ("done", None))
            except BaseException as exc:  # handed over to the event loop, raised there
                loop.call_soon_threadsafe(self.queue.put_nowait, ("error", exc))

        self.thread = loop.run_in_executor(pool, run)

    async def close(self) -> Completion | None:
        self.stream.cancel()
        try:
            await asyncio.shield(self.thread)
        except Exception:  # the error was already delivered through the queue
            pass
        return self.stream.completion


Starter = Callable[[], Awaitable[Source]]

__all__ = ["NOT_FAILURES", "Completion", "Partial", "Pieces", "Pump", "RemoteCompletion",
           "RemoteOffer", "Settle", "Settled", "Source", "TradeSession", "failed", "hung_up",
           "request_bytes"]
