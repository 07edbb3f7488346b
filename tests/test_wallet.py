"""The Wallet on a real ledger file: what readers see while a trade settles."""

from __future__ import annotations

import threading
from pathlib import Path

from forge_cli.economy.safety import Policy, Safety
from forge_cli.identity import Identity
from forge_cli.ledger.store import Ledger
from forge_cli.trade.wallet import Wallet
from tests.gossip_helpers import make_trade

BIG = Policy(per_request_cap_cu=10**9, hourly_budget_cu=10**12, lifetime_budget_cu=10**12,
             approval_threshold_cu=10**9)


def test_no_reader_sees_a_settling_trade_paid_twice(tmp_path: Path):
    # Found by the trade state machine: between the trade's append and the release of the
    # hold that covered it, `available` read the cost twice (balance already lower, hold
    # still there) and went negative. A reader now sees the books before or after, never
    # in between.
    provider, consumer = Identity.generate(), Identity.generate()
    ledger = Ledger.open_writer(tmp_path / "ledger.db", provider)
    reader = Ledger.open_reader(tmp_path / "ledger.db")
    def clock() -> int:
        return 1_700_000_000_000

    wallet = Wallet(ledger, Safety(ledger, clock=clock, defaults=BIG), clock=clock,
                    reader=reader)
    account = consumer.node_id
    ledger.append("grant", {"account": account, "cu": 100})
    hold = wallet.reserve_now(account, 100, what="a purchase of up to 100 CU")
    assert wallet.available(account) == 0

    seen: list[int] = []
    readers: list[threading.Thread] = []

    def read_during_append(entry) -> None:  # runs after the commit, before append returns
        if entry.kind == "trade":
            thread = threading.Thread(target=lambda: seen.append(wallet.available(account)))
            thread.start()
            thread.join(0.5)  # without the lock it reads at once, mid-settle
            readers.append(thread)

    ledger.listeners.append(read_during_append)
    trade = make_trade(provider, consumer, tokens=40)  # 40 CU at 1 CU/token
    wallet.record_trade(trade, [b"request", b"response"], hold=hold)
    for thread in readers:
        thread.join(10)
    assert seen == [60] and wallet.available(account) == 60 and wallet.holds() == {}
    reader.close()
    ledger.close()


def test_no_reader_sees_a_hold_without_the_free_tier_that_pays_for_it(tmp_path: Path):
    # Found by the trade state machine too (available −55): a reader took the balance before
    # a new account's free-tier grant and the held CU after the hold. The grant and the hold
    # are now one step: a reader sees neither or both.
    provider, consumer = Identity.generate(), Identity.generate()
    ledger = Ledger.open_writer(tmp_path / "ledger.db", provider)
    reader = Ledger.open_reader(tmp_path / "ledger.db")

    def clock() -> int:
        return 1_700_000_000_000

    wallet = Wallet(ledger, Safety(ledger, clock=clock, defaults=BIG), clock=clock,
                    reader=reader)
    account = consumer.node_id
    seen: list[tuple[int, int]] = []
    readers: list[threading.Thread] = []

    def read_during_grant(entry) -> None:  # after the grant's commit, before the hold
        if entry.kind == "grant":
            thread = threading.Thread(target=lambda: seen.append(wallet.books(account)))
            thread.start()
            thread.join(0.5)
            readers.append(thread)

    ledger.listeners.append(read_during_grant)
    hold = wallet.reserve_now(account, 55, what="a purchase of up to 55 CU")
    for thread in readers:
        thread.join(10)
    assert seen == [(1000, 55)] and wallet.available(account) == 945
    hold.release()
    reader.close()
    ledger.close()
