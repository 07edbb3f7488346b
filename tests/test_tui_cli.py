"""`forge tui` on the command line: lazy import of textual, and where the node URL comes from."""

from __future__ import annotations

from forge_cli.cli.tui_cmd import resolve_node_url
from tests.test_cli_foundation import imported_modules


def test_tui_help_does_not_import_textual(forge_home):
    code, modules = imported_modules(forge_home, "tui", "--help")
    assert code == 0
    assert "textual" not in modules and "aiohttp" not in modules


def test_node_url_from_flag_then_env_then_node_url_file_then_config(forge_home, monkeypatch):
    forge_home.mkdir(parents=True, exist_ok=True)
    assert resolve_node_url(None) == "http://127.0.0.1:3001"
    (forge_home / "node.url").write_text("http://127.0.0.1:4555\n")
    assert resolve_node_url(None) == "http://127.0.0.1:4555"
    monkeypatch.setenv("FORGE_NODE", "http://127.0.0.1:4666")
    assert resolve_node_url(None) == "http://127.0.0.1:4666"
    assert resolve_node_url("http://127.0.0.1:4777") == "http://127.0.0.1:4777"
