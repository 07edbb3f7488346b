"""`make demo`: a guided tour of forge on a throwaway FORGE_HOME.

Creates an identity, records signed entries (a grant, a transfer, a dual-signed trade with
its prompt and output as bodies, a redaction), then drives the real `forge` CLI the way a
shell script would: verify, show, prove, checkpoint, and a tamper that verify catches.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

from forge_cli import config, identity
from forge_cli.ledger import entries
from forge_cli.ledger.store import Ledger


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def forge(*args: str, check: bool = True) -> int:
    print(f"$ forge {' '.join(args)}", flush=True)
    code = subprocess.call([sys.executable, "-m", "forge_cli", *args])
    if check and code != 0:
        sys.exit(f"demo: `forge {' '.join(args)}` exited {code}")
    return code


def record_entries(book: Ledger, me: identity.Identity) -> None:
    buyer = identity.Identity.generate()
    book.append("grant", {"account": me.node_id, "cu": 1000, "reason": "free tier"})
    book.append("grant", {"account": buyer.node_id, "cu": 1000, "reason": "free tier"})
    prompt, output = b"What is compute worth?", b"Exactly what someone will pay for it."
    terms = {
        "provider": me.node_id, "consumer": buyer.node_id, "model": "demo:tiny",
        "model_sha256": "00" * 32, "prompt_tokens": 6, "completion_tokens": 42,
        "price_ucu_per_token": 1_000_000, "cu": entries.trade_cost(42, 1_000_000),
        "request_sha256": entries.body_hash(prompt), "response_sha256": entries.body_hash(output),
        "nonce": os.urandom(8).hex(), "ts": 0,
    }
    message = entries.trade_message(terms)
    trade = book.append(
        "trade",
        {"terms": terms, "provider_sig": me.sign(message).hex(),
         "consumer_sig": buyer.sign(message).hex()},
        bodies=[prompt, output],
    )
    book.append("transfer", {"from": me.node_id, "to": buyer.node_id, "cu": 7, "memo": "tip"},
                parent=trade.seq)
    book.append("redact", {"body": entries.body_hash(prompt), "reason": "buyer asked"},
                parent=trade.seq)


def main() -> None:
    home = config.home()
    if home.exists():
        shutil.rmtree(home)
    step(f"a fresh FORGE_HOME at {home}")
    forge("wallet")

    step("record a grant, a dual-signed trade, a transfer and a redaction")
    me = identity.load_or_create()
    with Ledger.open_writer(config.ledger_path(), me) as book:
        record_entries(book, me)
    forge("ledger", "show")

    step("verify it, as a shell script would (exit code 0 = valid)")
    forge("ledger", "verify", "--deep")
    forge("ledger", "replay", "--until", "2")

    step("a signed checkpoint (C2SP signed note), saved outside the ledger")
    saved = home / "checkpoint.txt"
    with saved.open("w") as fh:
        subprocess.check_call([sys.executable, "-m", "forge_cli", "ledger", "checkpoint"], stdout=fh)
    print(saved.read_text(), end="")
    forge("ledger", "prove", "2")

    step("tamper with one amount in the file: verify exits 1 and names the seq")
    with sqlite3.connect(config.ledger_path()) as conn:
        raw = conn.execute("SELECT entry FROM entries WHERE seq = 3").fetchone()[0]
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 3",
                     (raw.replace(b'"cu":7', b'"cu":9'),))
    code = forge("ledger", "verify", check=False)
    print(f"exit code {code}")
    if code != 1:
        sys.exit("demo: tampering was not detected")
    print(f"\ndone; look around with FORGE_HOME={home} forge ledger --help")


if __name__ == "__main__":
    main()
