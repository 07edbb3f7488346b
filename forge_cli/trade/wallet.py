"""The one way CU is spent: balances, what requests hold, and the free tier.

Every decision (grant, check, hold) and every write that spends runs on the ledger's one
writer thread, so a check and the write it guards cannot be split by another spend: a
purchase's reservation and a lending deposit see each other. A `Hold` is released from any
thread; releasing only ever makes more CU available, which is safe to do late.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from forge_cli.errors import InsufficientCU, TooManyStrangers
from forge_cli.ledger import views

if TYPE_CHECKING:
    from forge_cli.economy.safety import Safety
    from forge_cli.ledger.entries import Entry
    from forge_cli.ledger.store import Ledger

R = TypeVar("R")

FREE_TIER_CU = 1000
FREE_TIER_REASON = "free tier"
PEER_FREE_TIER_REASON = "free tier (peer)"
IDLE_RETURN_REASON = "idle free tier returned"

class Run(Protocol):
    """Runs `fn(*args, **kwargs)` where the ledger's writer runs (Node.on_ledger, or inline)."""

    def __call__(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Awaitable[R]: ...


def free_tier_pending(reader: Ledger, account: str) -> int:
    """The free tier a local account gets with its first purchase: FREE_TIER_CU until any CU
    has reached it, then 0 (what `Wallet.free_tier` grants, told before it does)."""
    return 0 if reader.has_account(account) else FREE_TIER_CU


@dataclass(frozen=True)
class StrangerRules:
    """How many peer accounts may live on this node's free tier, and for how long when idle."""

    limit: int = 50
    idle_ms: int = 3_600_000

    @classmethod
    def from_config(cls) -> StrangerRules:
        from forge_cli import config

        return cls(config.get("mesh.strangers"), config.get("mesh.stranger_idle_s") * 1000)


@dataclass
class Hold:
    """CU held for one spend until `release` (idempotent)."""

    account: str
    cu: int
    wallet: Wallet = field(repr=False)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.wallet._unhold(self.account, self.cu)


async def inline(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run `fn` here: for a wallet used from one thread with no node around it."""
    return fn(*args, **kwargs)


class Wallet:
    """Balances over one writer ledger; `run` executes a function on its writer thread
    (`inline` where the caller already is that thread, e.g. a CLI command)."""

    def __init__(self, ledger: Ledger, safety: Safety, run: Run = inline, *,
                 clock: Callable[[], int], reader: Ledger | None = None,
                 strangers: StrangerRules | None = None) -> None:
        self.ledger = ledger
        self.reader = reader or ledger  # for reads off the writer thread
        self.safety = safety
        self.run = run
        self.clock = clock
        self.rules = strangers or StrangerRules()
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()
        # Held while a grant and its hold are made, while a trade is appended and its hold
        # released, and while balance and held are read together.
        self._books = threading.RLock()
        self._strangers: dict[str, int] | None = None  # peer account → ts of its live grant

    # -- reading -------------------------------------------------------------------------------

    def balance(self, account: str) -> int:
        """The ledger balance (from any thread)."""
        return self.reader.balance(account)

    def free_tier_pending(self, account: str) -> int:
        """CU of free tier waiting for `account`'s first purchase (from any thread)."""
        return free_tier_pending(self.reader, account)

    def held(self, account: str) -> int:
        with self._lock:
            return self._held.get(account, 0)

    def holds(self) -> dict[str, int]:
        """Every account's held CU (a copy)."""
        with self._lock:
            return dict(self._held)

    def books(self, account: str) -> tuple[int, int]:
        """(balance, held), read together: never between a trade's append and the release of
        the hold that covered it (which `record_trade` does as one step)."""
        with self._books:
            return self.balance(account), self.held(account)

    def available(self, account: str) -> int:
        """Balance less what requests in flight hold: what any new spend may use."""
        balance, held = self.books(account)
        return balance - held

    def available_seen(self, account: str, earned_less_spent: int) -> int:
        """What a peer account may spend as a network view sees it (DESIGN §7): the free tier
        plus what it earned less what it spent over every verified trade, less what requests
        hold here. It can only lower what `available` extends, never raise it."""
        return FREE_TIER_CU + earned_less_spent - self.held(account)

    # -- spending ------------------------------------------------------------------------------

    async def reserve(self, account: str, cu: int, *, what: str, peer: bool = False,
                      hint: str | None = None) -> Hold:
        """The free tier if new, `available` ≥ `cu`, every safety gate; then hold `cu`.

        `what` names the spend for the refusal ("the quote of 40 CU for 40 tokens at …")."""
        return await self.run(self.reserve_now, account, cu, what=what, peer=peer, hint=hint)

    def reserve_now(self, account: str, cu: int, *, what: str, peer: bool = False,
                    hint: str | None = None) -> Hold:
        """`reserve` on the writer thread. The free-tier grant and the hold are one step for
        readers: none sees the hold without the grant that pays for it."""
        self.ledger.check_files()  # refused before generating, not after, if the files changed
        with self._books:
            if peer:
                self._peer_free_tier(account)
            else:
                self.free_tier(account)
            self.check_available(account, cu, what, hint=hint)
            self.safety.check(account, cu)
            with self._lock:
                self._held[account] = self._held.get(account, 0) + cu
        return Hold(account, cu, self)

    def check_available(self, account: str, cu: int, what: str, *, hint: str | None = None) -> None:
        """InsufficientCU unless `cu` fits in what the account has and nothing holds (writer
        thread: the write it guards must follow on the same thread)."""
        balance, held = self.ledger.balance(account), self.held(account)
        if balance - held < cu:
            also = f" ({balance:,} CU less {held:,} CU held by requests in flight)" if held else ""
            raise InsufficientCU(f"balance: {max(0, balance - held):,} CU available{also} is "
                                 f"below {what}", hint=hint)

    def record_trade(self, data: dict[str, Any], bodies: list[bytes], *,
                     hold: Hold | None = None) -> Entry:
        """Append a dual-signed trade and count the consumer's spend (writer thread); the
        consumer's reservation covers it, so the balance rule cannot refuse it. The hold is
        released in the same step, so no reader sees the trade's cost taken twice."""
        with self._books:
            entry = self.ledger.append("trade", data, bodies=bodies)
            if hold is not None:
                hold.release()
        self.safety.record_spend(data["terms"]["consumer"], data["terms"]["cu"])
        return entry

    async def pay(self, account: str, cu: int,
                  countersigned: Callable[[], Awaitable[tuple[dict[str, Any], list[bytes]]]], *,
                  what: str, peer: bool = False) -> Entry:
        """A trade whose other party signs over the network, as one lifecycle: reserve `cu` of
        `account`, await `countersigned()` for the (data, bodies) of the dual-signed trade,
        record it, release; nothing is recorded if it raises. (A split model's layer trades:
        the head paying a peer, and the peer recording what the head pays it.)"""
        hold = await self.reserve(account, cu, what=what, peer=peer)
        try:
            data, bodies = await countersigned()
            return await self.run(self.record_trade, data, bodies, hold=hold)
        finally:
            hold.release()

    def _unhold(self, account: str, cu: int) -> None:
        with self._lock:
            left = self._held.get(account, 0) - cu
            if left > 0:
                self._held[account] = left
            else:
                self._held.pop(account, None)

    # -- the free tier -------------------------------------------------------------------------

    def free_tier(self, account: str) -> None:
        """A new local account's 1000 CU, once: a `grant` entry (writer thread)."""
        if not self.ledger.has_account(account):
            self.ledger.append("grant", {"account": account, "cu": FREE_TIER_CU,
                                         "reason": FREE_TIER_REASON})

    def strangers(self) -> dict[str, int]:
        """Peer accounts living on the free tier: granted, never paid nor earned, not returned
        (account → ts of the grant)."""
        if self._strangers is None:
            granted: dict[str, tuple[int, int]] = {}  # account → (seq, ts) of its newest grant
            for entry in self.ledger.iter_newest("grant"):
                if entry.data.get("reason") == PEER_FREE_TIER_REASON:
                    granted.setdefault(entry.data["account"], (entry.seq, entry.fields["ts"]))
            returned: dict[str, int] = {}  # account → seq of its newest idle return
            for entry in self.ledger.iter_newest("burn"):
                if entry.data.get("reason") == IDLE_RETURN_REASON:
                    returned.setdefault(entry.data["account"], entry.seq)
            self._strangers = {account: ts for account, (seq, ts) in granted.items()
                               if returned.get(account, -1) < seq}
        for account in [a for a in self._strangers if self._has_traded(a)]:
            del self._strangers[account]  # it paid or earned: no longer free-tier-only
        return self._strangers

    def _has_traded(self, account: str) -> bool:
        spent, earned, _ = self.ledger.row(views.TRADE_TOTALS, (account,)) or (0, 0, 0)
        return bool(spent > 0 or earned > 0)

    def _peer_free_tier(self, account: str) -> None:
        """A peer's free tier, unless `limit` strangers already live on it; an account whose
        idle grant was returned may be granted again."""
        strangers = self.strangers()
        if self.ledger.has_account(account) and not self._returned(account):
            return
        if len(strangers) >= self.rules.limit:
            self.return_idle()
        if len(strangers) >= self.rules.limit:
            oldest = min(strangers.values())
            wait_s = max(1, (oldest + self.rules.idle_ms - self.clock()) // 1000)
            raise TooManyStrangers(
                f"this node already carries {len(strangers)} peer accounts on its free tier (at "
                f"most {self.rules.limit}); a slot frees when one of them pays for a trade, or "
                f"in at most {wait_s} s when an idle grant returns", gate="rate_limit")
        entry = self.ledger.append("grant", {"account": account, "cu": FREE_TIER_CU,
                                             "reason": PEER_FREE_TIER_REASON})
        strangers[account] = entry.fields["ts"]

    def _returned(self, account: str) -> bool:
        """Its last free-tier grant came back as idle (so it may be granted again)."""
        if account in self.strangers() or self.ledger.balance(account) != 0 or \
                self._has_traded(account):
            return False
        grant = next((e.seq for e in self.ledger.iter_newest("grant")
                      if e.data["account"] == account), None)
        burn = next((e.seq for e in self.ledger.iter_newest("burn")
                     if e.data["account"] == account
                     and e.data.get("reason") == IDLE_RETURN_REASON), None)
        return grant is not None and burn is not None and burn >= grant

    def return_idle(self) -> list[str]:
        """Burn the grants of strangers idle longer than the window (writer thread): the CU a
        grant made goes back out of supply, so conservation holds and a slot frees."""
        now = self.clock()
        back = []
        for account, granted in list(self.strangers().items()):
            if granted + self.rules.idle_ms > now or self.held(account):
                continue
            balance = self.ledger.balance(account)
            if balance > 0:
                self.ledger.append("burn", {"account": account, "cu": balance,
                                            "reason": IDLE_RETURN_REASON})
            del self.strangers()[account]
            back.append(account)
        return back


__all__ = ["FREE_TIER_CU", "Hold", "StrangerRules", "Wallet", "free_tier_pending"]
