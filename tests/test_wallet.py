"""The Wallet on a real ledger file: what readers see while CU is reserved and a trade settles.

Both races here were found by the trade state machine (tests/test_trade_state.py): each test
reads the books from another thread at the exact moment between two writes (a ledger listener
runs after a commit, before the call that made it returns) and asserts that the reader sees
the wallet before or after the whole step, never in between.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forge_cli.economy.safety import Policy, Safety
from forge_cli.identity import Identity
from forge_cli.ledger.store import Ledger
from forge_cli.trade.wallet import Wallet
from tests.gossip_helpers import make_trade

BIG = Policy(per_request_cap_cu=10**9, hourly_budget_cu=10**12, lifetime_budget_cu=10**12,
             approval_threshold_cu=10**9)


@dataclass
class Books:
    ledger: Ledger
    wallet: Wallet
    provider: Identity
    consumer: Identity
    seen: list[Any]

    def read_after(self, kind: str, read: Callable[[], Any]) -> None:
        """After each `kind` entry commits, `read` on another thread (waiting at most 0.5 s
        for it: a reader that must wait for the step to finish is what the fix is)."""
        readers: list[threading.Thread] = []

        def listener(entry: Any) -> None:
            if entry.kind == kind:
                thread = threading.Thread(target=lambda: self.seen.append(read()))
                thread.start()
                thread.join(0.5)
                readers.append(thread)

        self.ledger.listeners.append(listener)
        self._readers = readers

    def wait(self) -> None:
        for thread in self._readers:
            thread.join(10)


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    provider, consumer = Identity.generate(), Identity.generate()
    ledger = Ledger.open_writer(tmp_path / "ledger.db", provider)
    reader = Ledger.open_reader(tmp_path / "ledger.db")

    def clock() -> int:
        return 1_700_000_000_000

    wallet = Wallet(ledger, Safety(ledger, clock=clock, defaults=BIG), clock=clock,
                    reader=reader)
    yield Books(ledger, wallet, provider, consumer, [])
    reader.close()
    ledger.close()


def test_no_reader_sees_a_settling_trade_paid_twice(books: Books):
    # available read −231 once: the balance already lower, the hold still there.
    account = books.consumer.node_id
    books.ledger.append("grant", {"account": account, "cu": 100})
    hold = books.wallet.reserve_now(account, 100, what="a purchase of up to 100 CU")
    assert books.wallet.available(account) == 0
    books.read_after("trade", lambda: books.wallet.available(account))
    trade = make_trade(books.provider, books.consumer, tokens=40)  # 40 CU at 1 CU/token
    books.wallet.record_trade(trade, [b"request", b"response"], hold=hold)
    books.wait()
    assert books.seen == [60] and books.wallet.available(account) == 60
    assert books.wallet.holds() == {}


def test_no_reader_sees_a_hold_without_the_free_tier_that_pays_for_it(books: Books):
    # available read −55 once: the balance from before a new account's free-tier grant, the
    # held CU from after its hold.
    account = books.consumer.node_id
    books.read_after("grant", lambda: books.wallet.books(account))
    hold = books.wallet.reserve_now(account, 55, what="a purchase of up to 55 CU")
    books.wait()
    assert books.seen == [(1000, 55)] and books.wallet.available(account) == 945
    hold.release()
    assert books.wallet.available(account) == 1000
