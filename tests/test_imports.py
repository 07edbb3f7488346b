"""Imports point one way (DESIGN §2): no cycle anywhere, lazy imports counted, and the trade core
and everything under it import no channel above them."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO
from tests.import_graph import cycles, graph

PACKAGES = ("forge_cli", "tui")
# The core and what it stands on; none of them may reach up into a channel or the root.
LOWER = ("forge_cli.trade", "forge_cli.economy", "forge_cli.ledger")
ABOVE = ("forge_cli.root", "forge_cli.node", "forge_cli.mesh", "forge_cli.rpc", "forge_cli.agents",
         "forge_cli.cli",
         "forge_cli.app", "forge_cli.mcp_server", "forge_cli.demo", "tui")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycles_lazy_imports_included():
    edges = {m: set(targets) for m, targets in graph(REPO, PACKAGES).items()}
    assert cycles(edges) == []


def test_the_trade_core_economy_and_ledger_import_nothing_above_them():
    wrong = sorted(f"{m} -> {t}" for m, targets in graph(REPO, PACKAGES).items()
                   if _under(m, LOWER) for t in targets if _under(t, ABOVE))
    assert wrong == []


def test_rpc_imports_no_other_channel_and_not_the_root():
    """rpc (layer peers, tunnels, the split head) stands on the core alone: the root wires it to
    the node's HTTP skin and to the mesh (forge_cli.root.rpc)."""
    rpc = ("forge_cli.rpc",)
    wrong = sorted(f"{m} -> {t}" for m, targets in graph(REPO, PACKAGES).items()
                   if _under(m, rpc) for t in targets if _under(t, ABOVE) and not _under(t, rpc))
    assert wrong == []


def test_the_graph_sees_lazy_imports_and_skips_type_checking(tmp_path: Path):
    """The checks above can fail: a cycle closed by an import inside a function is found, one
    closed only under TYPE_CHECKING is not, and a lower module reaching up is named."""
    pkg = tmp_path / "forge_cli"
    (pkg / "trade").mkdir(parents=True)
    (pkg / "node").mkdir()
    for init in (pkg, pkg / "trade", pkg / "node"):
        (init / "__init__.py").write_text("")
    (pkg / "trade" / "core.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from forge_cli.node import skin\n"
        "def later():\n    from forge_cli.node.routes import handler\n    return handler\n")
    (pkg / "node" / "routes.py").write_text("from forge_cli.trade import core\nhandler = 1\n")
    (pkg / "node" / "skin.py").write_text("from forge_cli.trade.core import later\n")
    found = graph(tmp_path, ["forge_cli"])
    assert found["forge_cli.trade.core"] == {"forge_cli.node.routes": True}
    assert cycles({m: set(t) for m, t in found.items()}) == [
        ["forge_cli.node.routes", "forge_cli.trade.core"]]
    assert [t for t in found["forge_cli.trade.core"] if _under(t, ABOVE)] == ["forge_cli.node.routes"]
