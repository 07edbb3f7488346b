"""The trade core's shape, checked on the source: one owner for each rule (issue 11).

Each check reads the code with `ast`, so a comment or a docstring that names a thing does not
count, and a second copy written in a new file is found wherever it is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("forge_cli", "tui")


def sources() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def calls(tree: ast.AST, method: str) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == method):
            yield node


def first_arg(call: ast.Call) -> object:
    return call.args[0].value if call.args and isinstance(call.args[0], ast.Constant) else None


def where(predicate) -> set[str]:
    return {path for path, tree in sources() if predicate(tree)}


def test_the_free_tier_is_granted_in_one_place():
    assigned = where(lambda tree: any(
        isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FREE_TIER_CU"
                                          for t in n.targets) for n in ast.walk(tree)))
    assert assigned == {"forge_cli/trade/wallet.py"}
    grants = where(lambda tree: any(first_arg(c) == "grant" for c in calls(tree, "append")))
    assert grants == {"forge_cli/trade/wallet.py"}


def test_one_wallet_and_one_trade_session():
    def defines(name: str) -> set[str]:
        return where(lambda tree: any(isinstance(n, ast.ClassDef) and n.name == name
                                      for n in ast.walk(tree)))

    assert defines("Wallet") == {"forge_cli/trade/wallet.py"}
    assert defines("TradeSession") == {"forge_cli/trade/session.py"}
    # Reserving CU: the session, for every sale and every P2P purchase alike (the buyer's side
    # once reserved and released on its own, with its own idea of "failed").
    reserving = where(lambda tree: any(True for m in ("reserve", "reserve_now")
                                       for _ in calls(tree, m)))
    assert reserving <= {"forge_cli/trade/session.py", "forge_cli/trade/wallet.py"}, reserving
    # Generating for a buyer happens only inside a session: every file that starts the
    # engine's pump also runs a session over it and settles it.
    pumping = where(lambda tree: any(True for _ in calls(tree, "pump")))
    sessions = where(lambda tree: any(True for _ in calls(tree, "run"))
                     and any(True for _ in calls(tree, "settle")))
    assert pumping and pumping <= sessions, pumping - sessions


def test_every_spend_reads_available_through_the_wallet():
    # Nothing outside the wallet and the ledger itself decides a spend from `ledger.balance`.
    direct = where(lambda tree: any(
        isinstance(c.func.value, ast.Attribute) and c.func.value.attr in ("ledger", "reader")
        for c in calls(tree, "balance")))
    allowed = {"forge_cli/trade/wallet.py"}
    readers = {p for p in direct if not p.startswith(("forge_cli/ledger/", "forge_cli/cli/"))}
    assert readers <= allowed, readers - allowed


def test_the_node_is_reached_through_protocols_not_any():
    loose = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.arg == "node":
                note = node.annotation
                if note is None or (isinstance(note, ast.Name) and note.id == "Any"):
                    loose.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute) \
                    and node.target.attr == "node" and isinstance(node.annotation, ast.Name) \
                    and node.annotation.id == "Any":
                loose.append(f"{path}:{node.lineno}")
    assert loose == []


def test_requests_and_apps_carry_typed_keys_only():
    stringly = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                    and node.value.id in ("request", "app")
                    and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
                stringly.append(f"{path}:{node.lineno}")
    assert stringly == []


# The trade lifecycle and what it is made of: every module of trade/ (the composition root that
# wires the channels onto it is forge_cli/root/).
CORE = ("session", "seams", "wallet", "forwarding", "offers")


def channel_imports(tree: ast.AST) -> list[str]:
    """Modules of the channels (node/, mesh/) imported anywhere in `tree`, a function's
    body or an `if TYPE_CHECKING:` block included: an import hidden there is still a cycle."""
    found = []
    for node in ast.walk(tree):
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found += [n for n in names if n.startswith(("forge_cli.node", "forge_cli.mesh"))]
    return found


def test_the_trade_core_imports_no_channel():
    loose = {path: channel_imports(tree) for path, tree in sources()
             if path in {f"forge_cli/trade/{name}.py" for name in CORE}}
    assert len(loose) == len(CORE)
    assert sorted(p.stem for p in (REPO / "forge_cli/trade").glob("*.py")
                  if p.stem != "__init__") == sorted(CORE)
    assert {path: found for path, found in loose.items() if found} == {}


def test_the_old_homes_of_the_trade_loop_are_gone():
    for old in ("forge_cli/node/service.py", "forge_cli/node/forwarding.py"):
        assert not (REPO / old).exists(), old
    assert (REPO / "forge_cli/root/build.py").exists()
    assert not (REPO / "forge_cli/trade/build.py").exists()


def test_structure_checks_find_what_they_look_for(tmp_path: Path):
    # The checks above are only worth something if they see a second copy: parse one.
    copy = ast.parse("FREE_TIER_CU = 1000\nledger.append('grant', {})\n"
                     "def f(node: Any): request['who']\n"
                     "def g():\n    from forge_cli.mesh.buyer import choose\n")
    assert channel_imports(copy) == ["forge_cli.mesh.buyer"]
    assert any(first_arg(c) == "grant" for c in calls(copy, "append"))
    assert any(isinstance(n, ast.arg) and n.arg == "node" and n.annotation.id == "Any"
               for n in ast.walk(copy))
