"""The `forge` command itself: help, version, lazy imports, config, identity, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from forge_cli.identity import Identity
from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env

HEAVY = ("llama_cpp", "textual", "aiohttp", "huggingface_hub")


def imported_modules(home, *argv: str, full: bool = False) -> tuple[int, set[str]]:
    probe = (
        "import sys, json\n"
        "from forge_cli.cli.app import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code or 0\n"
        "else:\n"
        "    code = 0\n"
        "sys.stderr.write(json.dumps([code, sorted(sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, env=forge_env(home), timeout=60)
    code, modules = json.loads(result.stderr.strip().splitlines()[-1])
    return code, set(modules) if full else {m.split(".")[0] for m in modules}


def test_help_and_ledger_verify_do_not_import_heavy_modules(forge_home, tmp_path):
    code, modules = imported_modules(forge_home, "--help")
    assert code == 0
    assert not modules & set(HEAVY), modules & set(HEAVY)
    db = tmp_path / "empty.db"
    Ledger.open_writer(db, Identity.generate()).close()
    code, modules = imported_modules(forge_home, "ledger", "verify", "--ledger", str(db))
    assert code == 0
    assert "nacl" in modules and "sqlite3" in modules  # it really verified
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_help_imports_only_the_command_tree_and_what_it_names(forge_home):
    """`forge --help` stays fast: no event loop, no HTTP client, and of forge itself only the
    command modules and the few they name at import (config, errors, identity, the catalog)."""
    code, modules = imported_modules(forge_home, "--help", full=True)
    assert code == 0
    assert not {"asyncio", "http.client", "forge_cli.client", "aiohttp"} & modules
    ours = {m for m in modules if m.startswith("forge_cli.") and not m.startswith("forge_cli.cli.")}
    assert ours <= {"forge_cli.cli", "forge_cli.config", "forge_cli.display", "forge_cli.errors",
                    "forge_cli.identity",
                    "forge_cli.inference", "forge_cli.inference.catalog"}, ours


def test_help_lists_every_group(run_forge):
    result = run_forge("--help")
    assert result.returncode == 0
    for group in ("ledger", "config", "wallet"):
        assert group in result.stdout


def test_version(run_forge):
    result = run_forge("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("forge ")


def test_unknown_command_is_usage_error(run_forge):
    result = run_forge("ledgr")
    assert result.returncode == 2


def test_config_set_get_show_and_path(run_forge, forge_home):
    assert run_forge("config", "path").stdout.strip() == str(forge_home / "config.toml")
    assert run_forge("config", "set", "node.port", "4000").returncode == 0
    assert run_forge("config", "get", "node.port").stdout.strip() == "4000"
    shown = json.loads(run_forge("config", "show", "--json").stdout)
    assert shown["node.port"] == 4000 and shown["node.host"] == "127.0.0.1"
    assert "[node]" in (forge_home / "config.toml").read_text()
    env_override = run_forge("config", "get", "node.port", env={"FORGE_NODE_PORT": "5000"})
    assert env_override.stdout.strip() == "5000"


def test_config_unknown_key_and_wrong_type_exit_2_naming_the_key(run_forge, forge_home):
    unknown = run_forge("config", "set", "node.prot", "1")
    assert unknown.returncode == 2 and "node.prot" in unknown.stderr
    wrong = run_forge("config", "set", "node.port", "many")
    assert wrong.returncode == 2 and "node.port" in wrong.stderr and "integer" in wrong.stderr
    choice = run_forge("config", "set", "ledger.synchronous", "sometimes")
    assert choice.returncode == 2 and "full, normal" in choice.stderr
    forge_home.mkdir(parents=True, exist_ok=True)
    (forge_home / "config.toml").write_text('[node]\nport = "high"\n')
    bad_file = run_forge("config", "show")
    assert bad_file.returncode == 2 and "node.port" in bad_file.stderr
    (forge_home / "config.toml").write_text('[nodes]\nport = 1\n')
    assert "nodes.port" in run_forge("config", "show").stderr
    (forge_home / "config.toml").write_text("not toml [")
    broken = run_forge("config", "show")
    assert broken.returncode == 2 and "not valid TOML" in broken.stderr
    (forge_home / "config.toml").unlink()
    bad_env = run_forge("config", "show", env={"FORGE_NODE_PORT": "x"})
    assert bad_env.returncode == 2 and "FORGE_NODE_PORT" in bad_env.stderr
    for result in (unknown, wrong, choice, bad_file, broken, bad_env):
        assert "Traceback" not in result.stderr


def test_wallet_creates_key_once_with_mode_0600(run_forge, forge_home):
    first = json.loads(run_forge("wallet", "--json").stdout)
    key = forge_home / "node.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert first["balance_cu"] == 0 and len(first["node_id"]) == 64
    again = json.loads(run_forge("wallet", "--json").stdout)
    assert again["node_id"] == first["node_id"]


def test_key_with_wrong_permissions_is_an_error_not_replaced(run_forge, forge_home):
    run_forge("wallet")
    key = forge_home / "node.key"
    before = key.read_bytes()
    os.chmod(key, 0o644)
    result = run_forge("wallet")
    assert result.returncode == 2
    assert "0644" in result.stderr and "chmod 600" in result.stderr
    assert key.read_bytes() == before


def test_corrupt_key_is_an_error_not_replaced(run_forge, forge_home):
    forge_home.mkdir(parents=True)
    key = forge_home / "node.key"
    key.write_text("not a key\n")
    os.chmod(key, 0o600)
    result = run_forge("wallet")
    assert result.returncode == 2
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr
    assert key.read_text() == "not a key\n"
    key.write_text("ab" * 16 + "\n")  # hex, but 16 bytes
    assert "32-byte" in run_forge("wallet").stderr


def test_wallet_shows_balance_from_the_ledger(run_forge, forge_home):
    me = json.loads(run_forge("wallet", "--json").stdout)["node_id"]
    from forge_cli.identity import load_or_create

    identity = load_or_create(forge_home / "node.key")
    assert identity.node_id == me
    fresh = run_forge("wallet")
    assert "balance  0 CU (+1000 CU free tier on first purchase)" in fresh.stdout.splitlines()
    assert json.loads(run_forge("wallet", "--json").stdout)["free_tier_pending_cu"] == 1000
    with Ledger.open_writer(forge_home / "ledger.db", identity) as book:
        book.append("grant", {"account": me, "cu": 1000})
    shown = json.loads(run_forge("wallet", "--json").stdout)
    assert shown["balance_cu"] == 1000 and shown["free_tier_pending_cu"] == 0
    assert "balance  1000 CU" in run_forge("wallet").stdout.splitlines()
