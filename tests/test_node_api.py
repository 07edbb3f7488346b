"""A real node on 127.0.0.1 with the tiny GGUF, driven by the official `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    home = tmp_path_factory.mktemp("node-home")
    # The breaker opens above 30 spends a minute node-wide; the workload below makes 200.
    with NodeProcess(home, tiny_gguf, env={"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "100000"}
                     ) as running:
        yield running


@pytest.fixture(scope="module")
def alice(node: NodeProcess) -> dict[str, str]:
    return node.agent("alice")


def client(node: NodeProcess, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=token, max_retries=0, timeout=120)


def balance(node: NodeProcess, token: str) -> int:
    status, _, body = node.request("GET", "/v1/forge/balance", token=token)
    assert status == 200, body
    return body["balance"]


def test_models_lists_the_loaded_model(node, alice):
    models = client(node, alice["token"]).models.list()
    assert [m.id for m in models.data] == ["tiny-llama.gguf"]


def test_models_report_the_engines_threads_and_slots(node, tmp_path: Path, tiny_gguf: Path):
    from forge_cli.inference import threads

    status, _, body = node.request("GET", "/v1/models", token=node.operator_token)
    assert status == 200
    engine = body["data"][0]["engine"]
    assert engine["threads"] == engine["threads_batch"] == threads.physical_cores()
    assert engine["slots"] == threads.default_slots(engine["gpu_offload"])
    assert engine["n_ctx"] == 4096
    with NodeProcess(tmp_path / "home", tiny_gguf, "--threads", "1",
                     env={"FORGE_ENGINE_SLOTS": "3", "FORGE_MODELS_N_CTX": "512"}) as small:
        status, _, body = small.request("GET", "/v1/models", token=small.operator_token)
    assert status == 200
    assert {k: body["data"][0]["engine"][k] for k in ("threads", "slots", "n_ctx")} == {
        "threads": 1, "slots": 3, "n_ctx": 512}


def test_chat_completion_is_a_trade_that_moves_balances_exactly(node, alice):
    before = balance(node, alice["token"]) or 1000  # the free tier arrives with the first buy
    reply = client(node, alice["token"]).chat.completions.create(
        model=client(node, alice["token"]).models.list().data[0].id,
        messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0, seed=1)
    x = reply.model_extra["x_forge"]
    assert reply.usage.completion_tokens >= 1
    assert x["cu_cost"] >= 1 and x["trade_seq"] is not None
    after = balance(node, alice["token"])
    assert before - after == x["cu_cost"]
    assert x["balance"] == after
    status, _, entry = node.request("GET", f"/v1/forge/ledger/entry/{x['trade_seq']}",
                                    token=alice["token"])
    terms = entry["entry"]["data"]["terms"]
    assert status == 200 and terms["consumer"] == alice["account"]
    assert terms["completion_tokens"] == reply.usage.completion_tokens
    assert terms["cu"] == x["cu_cost"]


def test_streaming_carries_x_forge_in_the_last_chunk(node, alice):
    stream = client(node, alice["token"]).chat.completions.create(
        messages=[{"role": "user", "content": "stream please"}], model="",
        max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[-1].model_extra.get("x_forge") is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    x = chunks[-1].model_extra["x_forge"]
    assert x["cu_cost"] >= 1 and len(text) > 0
    assert x["balance"] == balance(node, alice["token"])


def test_completions_route_works_with_the_openai_client(node, alice):
    done = client(node, alice["token"]).completions.create(
        model="", prompt="Once upon", max_tokens=5, temperature=0)
    assert done.choices[0].text is not None
    x = done.model_extra["x_forge"]
    assert x["cu_cost"] == -(-done.usage.completion_tokens * x["price_ucu_per_token"] // 10**6)


def test_operator_token_buying_is_a_refused_self_trade(node):
    status, _, body = node.request("POST", "/v1/chat/completions", token=node.operator_token,
                                   body={"messages": [{"role": "user", "content": "hi"}]})
    assert status == 403
    assert "self-trade" in body["error"]["message"] and "agent" in body["error"]["message"]


def test_new_account_gets_the_free_tier_grant(node):
    bob = node.agent("bob")
    status, _, before = node.request("GET", "/v1/forge/balance", token=bob["token"])
    assert status == 200 and before["balance"] == 0  # nothing until the first purchase
    assert before["free_tier_pending"] == 1000  # but it says what is waiting
    reply = client(node, bob["token"]).chat.completions.create(
        model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    _, _, after = node.request("GET", "/v1/forge/balance", token=bob["token"])
    assert after["balance"] == 1000 - reply.model_extra["x_forge"]["cu_cost"]
    assert after["free_tier_pending"] == 0


def test_quote_above_balance_is_402(node):
    carol = node.agent("carol")
    status, _, body = node.request(
        "POST", "/v1/chat/completions", token=carol["token"],
        body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000})
    assert status == 402
    assert "below the quote" in body["error"]["message"]


def test_chat_cli_buys_from_the_node_and_prints_cost_and_balance(node, alice):
    done = subprocess.run(
        [sys.executable, "-m", "forge_cli", "chat", "--node", node.url, "--token", alice["token"],
         "--max-tokens", "6", "--json", "hi there"],
        capture_output=True, text=True, cwd=REPO, env=forge_env(node.home), timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["x_forge"]["balance"] == balance(node, alice["token"])
    plain = subprocess.run(
        [sys.executable, "-m", "forge_cli", "chat", "--node", node.url, "--max-tokens", "4", "hi"],
        capture_output=True, text=True, cwd=REPO, env=forge_env(node.home, FORGE_TOKEN=alice["token"]),
        timeout=120)
    assert plain.returncode == 0 and "CU" in plain.stderr and "balance" in plain.stderr


def test_mixed_workload_of_200_requests_then_deep_verify(node):
    accounts = [node.agent(f"load{i}") for i in range(3)]
    errors: list[BaseException] = []
    spent = {a["account"]: 0 for a in accounts}
    lock = threading.Lock()

    def work(account: dict[str, str], n: int) -> None:
        api = client(node, account["token"])
        try:
            for i in range(n):
                if i % 3 == 0:
                    chunks = list(api.chat.completions.create(
                        model="", messages=[{"role": "user", "content": f"s{i}"}], max_tokens=3,
                        stream=True))
                    cost = chunks[-1].model_extra["x_forge"]["cu_cost"]
                else:
                    reply = api.chat.completions.create(
                        model="", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3)
                    cost = reply.model_extra["x_forge"]["cu_cost"]
                with lock:
                    spent[account["account"]] += cost
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a, n)) for a, n in zip(accounts, (67, 67, 66))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    for account in accounts:
        assert balance(node, account["token"]) == 1000 - spent[account["account"]]
    ledger = node.home / "ledger.db"
    done = subprocess.run([sys.executable, "-m", "forge_cli", "ledger", "verify", "--deep",
                           "--ledger", str(ledger)], capture_output=True, text=True, cwd=REPO,
                          env=forge_env(node.home), timeout=300)
    assert done.returncode == 0, done.stderr
    with Ledger.open_reader(ledger) as book:
        trades = [e for e in book.iter_entries(kind="trade")
                  if e.data["terms"]["consumer"] in spent]
    assert len(trades) == 200


def test_economy_read_routes_reflect_the_trades(node, alice):
    client(node, alice["token"]).chat.completions.create(
        model="", messages=[{"role": "user", "content": "one more"}], max_tokens=3)
    status, _, trades = node.request("GET", f"/v1/forge/trades?limit=5&account={alice['account']}",
                                     token=alice["token"])
    assert status == 200 and trades["trades"], trades
    newest = trades["trades"][0]
    assert newest["consumer"] == alice["account"] and len(newest["consumer_sig"]) == 128
    status, _, network = node.request("GET", "/v1/forge/network", token=alice["token"])
    assert network["trades"] >= 1 and network["ledger_size"] >= newest["seq"] + 1
    from forge_cli.ledger import note

    signed = note.open_checkpoint(network["checkpoint"], note.Verifier.parse(network["vkey"]))
    assert signed.size == network["ledger_size"] and signed.root.hex() == network["merkle_root"]
    status, _, pricing = node.request("GET", "/v1/forge/pricing", token=alice["token"])
    model = pricing["models"][0]
    assert model["estimate_cu"]["100"] == -(-100 * model["price_ucu_per_token"] // 10**6)
    status, _, route = node.request("GET", "/v1/forge/route?mode=cost", token=alice["token"])
    assert route["choice"]["model"] == model["model"]
    status, _, proof = node.request("GET", f"/v1/forge/ledger/proof/{newest['seq']}",
                                    token=alice["token"])
    from forge_cli.ledger import merkle

    assert merkle.verify_inclusion(bytes.fromhex(proof["leaf_hash"]), proof["seq"], proof["size"],
                                   [bytes.fromhex(p) for p in proof["proof"]],
                                   bytes.fromhex(proof["root"]))


def test_reading_the_price_does_not_move_it(node, alice):
    prices = [node.request("GET", "/v1/forge/pricing", token=alice["token"])[2]["models"][0]
              ["price_ucu_per_token"] for _ in range(3)]
    assert prices[0] == prices[1] == prices[2]
