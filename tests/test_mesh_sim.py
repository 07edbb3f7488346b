"""bench/mesh_sim.py at a small N: forge's own gossip, network view, dispute checks and trust
over the in-memory transport. A new trade and a new dispute reach every node; sybils that wash
trades and dispute honest sellers rank below every honest node, as every honest node that has
bought anything sees them, and flag none of them; two honest auditors flag the cheater
everywhere."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

SIM = REPO / "bench" / "mesh_sim.py"


def _run(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SIM), *options], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def report() -> dict:
    done = _run("--nodes", "20", "--history", "40", "--probes", "2", "--sybils", "0.1,0.3",
                "--observers", "0", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["runs"][0]


def test_mesh_sim_refuses_bad_options_in_one_line():
    for options, words in ((["--nodes", "5"], "at least 10"),
                           (["--nodes", "ten"], "--nodes takes counts like 100,300"),
                           (["--sybils", "0.7"], "below 0.5"),
                           (["--loss", "0.9"], "--loss must be")):
        done = _run(*options)
        assert done.returncode == 2, options
        assert words in done.stderr and "Traceback" not in done.stderr


def test_a_new_trade_and_a_new_dispute_reach_every_node(report):
    n = report["nodes"]
    assert n == 20 and report["lost"] > 0  # the transport lost messages, and gossip retried
    assert all(r is not None for r in report["trade_rounds"]), report
    assert report["dispute_rounds"] is not None, report
    # Hops along the tree each one spread by: within twice log2 N on a graph of degree ~8.
    for hops in [*report["trade_hops"], report["dispute_hops"]]:
        assert hops is not None and 1 <= hops <= 2 * math.log2(n), report
    assert report["bytes_per_node_round"] > 0 and report["idle_bytes_per_node_round"] > 0
    assert report["memory_per_node_bytes"] > 0


def test_every_sybil_run_spreads_its_trades_and_disputes_and_flags_the_cheater_somewhere(report):
    for run in report["sybil_runs"]:
        assert run["trade_spread_rounds"] is not None, run  # the trades gossiped to all
        assert run["dispute_rounds"] is not None, run
        assert run["cheater_flagged_at"] >= 1, run


def test_sybils_rank_below_every_honest_node_and_only_the_cheater_is_flagged(report):
    for run in report["sybil_runs"]:
        assert run["sybils_below_every_honest"], run
        assert run["honest_sellers_flagged"] == 0, run
        assert run["cheater_flagged_at"] == run["observers"], run
