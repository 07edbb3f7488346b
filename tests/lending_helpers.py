"""A real ledger with a pool, a controllable clock and funded accounts, for lending tests."""

from __future__ import annotations

from pathlib import Path

from forge_cli.economy.lending import Lending
from forge_cli.economy.safety import Policy, Safety
from forge_cli.identity import Identity
from forge_cli.ledger.entries import HOUR_MS
from forge_cli.ledger.store import Ledger
from forge_cli.trade.wallet import Wallet

T0 = 1_700_000_000_000


class Clock:
    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, *, hours: float = 0, minutes: float = 0, ms: int = 0) -> None:
        self.ms += int(hours * HOUR_MS) + int(minutes * 60_000) + ms


def open_pool(path: Path, clock: Clock, *, synchronous: str = "normal",
              policy: Policy | None = None) -> tuple[Ledger, Lending, Identity]:
    owner = Identity.generate()
    ledger = Ledger.open_writer(path, owner, synchronous=synchronous)
    big = Policy(per_request_cap_cu=10**9, hourly_budget_cu=10**12, lifetime_budget_cu=10**12,
                 approval_threshold_cu=10**9)
    safety = Safety(ledger, clock=clock, defaults=policy or big)
    wallet = Wallet(ledger, safety, clock=clock)
    return ledger, Lending(ledger, safety, clock=clock, wallet=wallet, host=owner.node_id), owner


def fund(ledger: Ledger, clock: Clock, cu: int = 1000) -> str:
    account = Identity.generate().node_id
    ledger.append("grant", {"account": account, "cu": cu}, ts=clock())
    return account
