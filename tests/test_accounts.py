"""Agent accounts and tokens: real key files under a real FORGE_HOME, hashes only on disk."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from forge_cli.economy import accounts as accounts_mod
from forge_cli.economy.accounts import Accounts, operator_token, token_hash
from forge_cli.errors import IdentityError, UsageError
from forge_cli.identity import load_or_create


def mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


@pytest.fixture
def home(forge_home: Path) -> Path:
    load_or_create(forge_home / "node.key")
    return forge_home


def test_create_writes_a_0600_key_and_only_the_token_hash(home):
    agent, token = Accounts(home).create("scout")
    key = home / "keys" / "scout.key"
    tokens = home / "keys" / "tokens.json"
    assert mode(key) == "0o600" and mode(tokens) == "0o600"
    assert mode(home / "keys") == "0o700"
    assert load_or_create(key).node_id == agent.node_id
    stored = json.loads(tokens.read_text())
    assert list(stored) == [hashlib.sha256(token.encode()).hexdigest()]
    assert stored[token_hash(token)]["name"] == "scout"
    assert stored[token_hash(token)]["account"] == agent.node_id
    assert stored[token_hash(token)]["revoked"] is False
    for path in (home / "keys").iterdir():
        assert token not in path.read_text(errors="replace")  # the token itself is nowhere


def test_resolve_finds_the_agent_and_its_key(home):
    store = Accounts(home)
    agent, token = store.create("scout")
    found = store.resolve(token)
    assert found is not None and not found.is_operator
    assert (found.name, found.account_hex) == ("scout", agent.node_id)
    assert found.identity is not None and found.identity.node_id == agent.node_id
    assert store.signer_for(agent.node_id).node_id == agent.node_id
    for bad in ("", None, token + "x", token[:-1], "Bearer " + token):
        assert store.resolve(bad) is None


def test_operator_token_is_made_once_and_resolves_to_the_node(home):
    first = operator_token(home)
    path = home / "api_token"
    assert mode(path) == "0o600" and len(first) >= 43
    assert operator_token(home) == first  # never regenerated
    node = load_or_create(home / "node.key")
    found = Accounts(home).resolve(first)
    assert found is not None and found.is_operator and found.account_hex == node.node_id
    assert found.identity.node_id == node.node_id
    assert Accounts(home).signer_for(node.node_id).node_id == node.node_id


def test_an_operator_token_file_readable_by_others_is_refused_not_replaced(home):
    token = operator_token(home)
    os.chmod(home / "api_token", 0o644)
    with pytest.raises(IdentityError, match="0644"):
        operator_token(home)
    assert (home / "api_token").read_text().strip() == token


def test_duplicate_and_bad_names_are_usage_errors(home):
    store = Accounts(home)
    store.create("scout")
    with pytest.raises(UsageError, match="already exists") as dup:
        store.create("scout")
    assert dup.value.exit_code == 2
    for bad in ("", "Scout", "-x", "a" * 33, "a/b", "operator", "a b"):
        with pytest.raises(UsageError):
            store.create(bad)
    assert [a["name"] for a in store.list()] == ["scout"]


def test_revoke_stops_the_token_and_keeps_the_key(home):
    store = Accounts(home)
    agent, token = store.create("scout")
    assert store.revoke("scout") is True
    assert store.resolve(token) is None
    assert store.signer_for(agent.node_id) is None
    assert store.revoke("scout") is False
    assert (home / "keys" / "scout.key").exists()
    assert store.list()[0]["revoked"] is True
    with pytest.raises(UsageError, match="no agent named"):
        store.revoke("ghost")


def test_a_running_node_sees_agents_created_by_another_instance(home):
    node_view = Accounts(home)
    assert node_view.list() == []
    _, token = Accounts(home).create("late")  # e.g. the CLI while the node runs
    found = node_view.resolve(token)
    assert found is not None and found.name == "late"
    Accounts(home).revoke("late")
    assert node_view.resolve(token) is None


def test_token_comparison_is_constant_time_over_every_record(home, monkeypatch):
    store = Accounts(home)
    tokens = [store.create(f"a{i}")[1] for i in range(3)]
    operator_token(home)
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(accounts_mod.hmac, "compare_digest", spy)
    assert store.resolve(tokens[0]).name == "a0"
    assert len(calls) == 4  # the operator's and every agent's, no early exit
    calls.clear()
    assert store.resolve("wrong") is None
    assert len(calls) == 4


def test_a_corrupt_token_store_is_an_error_not_replaced(home):
    Accounts(home).create("scout")
    path = home / "keys" / "tokens.json"
    path.write_text("{not json")
    with pytest.raises(IdentityError, match="unreadable"):
        Accounts(home).resolve("anything")
    assert path.read_text() == "{not json"


# -- the CLI --------------------------------------------------------------------------------


def test_cli_agent_create_list_revoke(run_forge, forge_home):
    created = run_forge("wallet", "agent", "create", "scout", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert set(info) == {"name", "account", "token"} and info["name"] == "scout"
    listed = json.loads(run_forge("wallet", "agent", "list", "--json").stdout)
    assert [(a["name"], a["account"], a["revoked"]) for a in listed] == [
        ("scout", info["account"], False)]
    assert info["token"] not in run_forge("wallet", "agent", "list").stdout  # shown once only
    assert Accounts(forge_home).resolve(info["token"]).account_hex == info["account"]
    dup = run_forge("wallet", "agent", "create", "scout")
    assert dup.returncode == 2 and "already exists" in dup.stderr
    assert run_forge("wallet", "agent", "revoke", "scout").returncode == 0
    assert json.loads(run_forge("wallet", "agent", "list", "--json").stdout)[0]["revoked"] is True
    assert Accounts(forge_home).resolve(info["token"]) is None
    missing = run_forge("wallet", "agent", "revoke", "ghost")
    assert missing.returncode == 2 and "no agent named" in missing.stderr


def test_cli_wallet_alone_still_shows_the_node(run_forge):
    plain = run_forge("wallet")
    assert plain.returncode == 0 and "node id" in plain.stdout and "balance  0 CU" in plain.stdout
    data = json.loads(run_forge("wallet", "--json").stdout)
    assert data["balance_cu"] == 0 and len(data["node_id"]) == 64
