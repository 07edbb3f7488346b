"""Forum, whole (issue 21): lanes, routing, the judge, escalation by tier, executors beyond forge
(a command, another forge node over the OpenAI API, a loopback stand-in for Anthropic's), the
intent check, listing and comparing runs, and tamper shown by `agent show`."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from forge_cli import canonical
from forge_cli.agents import judge, roster
from forge_cli.agents.plan import coordinator_schema, parts
from forge_cli.agents.run import upstream
from forge_cli.errors import UsageError
from forge_cli.ledger.store import Ledger
from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

README_REQUEST = "Write a short README intro for a CLI tool and list three risks"
LONG = "import sys; print('\\n'.join(f'line {i:04d} of the long output' for i in range(300)))"
ECHO = "import sys; print(sys.argv[-1])"
# One lane: a command that prints its instruction.
ECHO_ROSTER = f"""[[agent]]
name = "echo"
category = "engineering"
domain = "commands"
keywords = ["echo"]
executor = "subprocess"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(ECHO)}]
"""


def forge(home: Path, url: str | None, *args: str, timeout: float = 120,
          **env: str) -> subprocess.CompletedProcess[str]:
    extra = {"FORGE_NODE": url} if url else {}
    return subprocess.run([sys.executable, "-m", "forge_cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=forge_env(home, **extra, **env),
                          timeout=timeout)


def agent_steps(home: Path, run: str) -> list[Any]:
    with Ledger.open_reader(home / "ledger.db") as book:
        return [e for e in book.iter_entries(kind="agent") if e.data["run"] == run]


# -- the judge's deterministic checks, the intent check, the truncation marker ---------------


def test_judge_catches_truncated_looping_and_empty_output_and_passes_a_clean_one():
    cut = judge.deterministic("1. Uncaught Exception: the", "length", 64, 64, None)
    assert cut is not None and cut.check == "truncated" and "64 of 64" in cut.reason
    loop = judge.deterministic("1. Uncaught Exception: 1. Uncaught Exception: "
                               "1. Uncaught Exception: 1. Uncaught Exception:", "stop", 30, 64, None)
    assert loop is not None and loop.check == "repetition"
    spread = " ".join(["It is a tool that can be used to manage complex systems."] * 3)
    assert judge.repetition("Intro. " + spread + " The end.") is not None  # not back to back
    assert judge.deterministic("  \n", "stop", 1, 64, None).check == "empty"
    assert judge.deterministic("Risks: cost, drift, lock-in.", "stop", 9, 64, None) is None
    assert judge.deterministic("Risks: none", "stop", 3, 64, "cost").check == "expect"


def test_model_judgment_is_read_even_when_its_reason_is_cut():
    whole = judge.read_judgment('{"ok": false, "score": 2, "reason": "drops the risks"}')
    assert (whole.ok, whole.score, whole.check) == (False, 2, "model")
    cut = judge.read_judgment('{"ok": true, "score": 8, "reason": "covers the int')
    assert (cut.ok, cut.score) == (True, 8)
    assert judge.read_judgment("no verdict at all").ok is False


def test_intent_coverage_names_the_missing_terms_and_flags_low_coverage():
    good = judge.coverage(README_REQUEST, "forge is a CLI tool. README intro: short and clear. "
                          "Three risks, a list: cost, drift, lock-in. Write to us.")
    assert good["coverage_pm"] == 1000 and not good["flagged"] and good["missing"] == []
    bad = judge.coverage(README_REQUEST, "Uncaught Exception")
    assert bad["flagged"] and "risks" in bad["missing"] and bad["coverage_pm"] < 500


def test_upstream_results_are_cut_with_a_marker_naming_the_cut_and_the_witness():
    assert upstream("T1", "short", 7) == "[T1] short"
    shown = upstream("T1", "x" * 5000, 42)
    assert shown.startswith("[T1] " + "x" * 1500)
    assert "truncated: 3,500 of 5,000 characters cut" in shown
    assert "witnessed at ledger seq 42" in shown and "forge ledger get 42" in shown


def test_coordinator_schema_holds_only_dags_of_the_requests_own_parts():
    assert parts(README_REQUEST)[1:] == ["Write a short README intro for a CLI tool",
                                         "List three risks"]
    schema = coordinator_schema(["docs", "review"], README_REQUEST)
    [two] = schema["properties"]["tasks"]["anyOf"]  # two parts: exactly two tasks
    first, second = two["prefixItems"]
    assert first["properties"]["deps"]["maxItems"] == 0
    assert second["properties"]["deps"]["items"] == {"enum": ["T1"]}
    assert second["properties"]["prompt"] == {"const": "List three risks"}


# -- the roster and the lexical router ---------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=[]", "keywords must be a non-empty"),
    ("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['x']\nmodel_tier='huge'",
     "model_tier must be one of cheap, capable, frontier"),
    ("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['x']\nexecutor='subprocess'",
     "argv is required by the subprocess executor"),
    ("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['x']\nexecutor='openai'",
     "the openai executor needs base_url and model"),
    ("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['x']\nshell='rm -rf /'",
     "unknown keys ['shell']"),
    ("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['x']\n"
     "[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['y']", "a repeat"),
    ("agent = 3", "no [[agent]] lanes"),
    ("[[agent", "not valid TOML"),
], ids=["no-keywords", "tier", "argv", "openai", "unknown-key", "twice", "no-lanes", "toml"])
def test_bad_rosters_are_refused_naming_the_lane_and_the_rule(text, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        roster.parse(text, "r.toml")


def test_lexical_router_decides_on_keywords_and_defers_to_the_classifier_otherwise():
    lanes = roster.default()
    assert len(lanes.lanes) >= 8 and all(lane.keywords for lane in lanes.lanes)
    won = roster.route("build the database schema and the api endpoint", lanes)
    assert won.lane == "backend" and won.confidence_pm == 800
    vague = roster.route("make it better", lanes)
    assert vague.lane is None and vague.method == "lexical"
    # A tie leaves no margin: undecided even above the threshold.
    tie = roster.parse("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=['x','y']\n"
                       "[[agent]]\nname='b'\ncategory='c'\ndomain='d'\nkeywords=['x','z']")
    assert roster.route("x y z", tie).lane is None
    assert roster.route("x y z", tie, margin_pm=0).lane == "a"


def test_forge_agent_route_prints_the_decision_without_a_node(tmp_path):
    done = forge(tmp_path, None, "agent", "route", "--json",
                 "build the database schema and the api endpoint")
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["lane"] == "backend" and decision["method"] == "lexical"
    assert decision["candidates"][0] == {"lane": "backend", "score_pm": 800}
    text = forge(tmp_path, None, "agent", "route", "make it better")
    assert "undecided" in text.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[[agent]]\nname='a'\ncategory='c'\ndomain='d'\nkeywords=[]")
    refused = forge(tmp_path, None, "agent", "route", "--roster", str(bad), "x")
    assert refused.returncode == 2 and "keywords must be a non-empty" in refused.stderr
    assert "Traceback" not in refused.stderr


# -- executors beyond forge: a command, another forge node, Anthropic's API (a stand-in) -------


class StandIn(BaseHTTPRequestHandler):
    """A loopback stand-in for Anthropic's Messages API: records what it was sent."""

    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        reply = json.dumps({"id": "msg_1", "type": "message", "role": "assistant",
                            "model": "claude-stand-in", "stop_reason": "end_turn",
                            "content": [{"type": "text", "text": "Three risks: cost, drift."}],
                            "usage": {"input_tokens": 12, "output_tokens": 7}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    """Node B sells to an agent account; node A holds B's token in REMOTE_KEY (its openai
    lane's api_key_env) and a key for the Anthropic stand-in."""
    env = {"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "100000", "FORGE_AGENTS_JUDGE": "false"}
    with NodeProcess(tmp_path_factory.mktemp("node-b"), tiny_gguf, env=env) as b:
        buyer = b.agent("from-a")
        with NodeProcess(tmp_path_factory.mktemp("node-a"), tiny_gguf,
                         env={**env, "REMOTE_KEY": buyer["token"],
                              "ANTHROPIC_API_KEY": "test-key"}) as a:
            a.agent("ops")
            yield a, b


def external_roster(path: Path, b: NodeProcess, stand_in: str) -> Path:
    lanes = f"""
[[agent]]
name = "shell"
category = "engineering"
domain = "commands"
keywords = ["long"]
executor = "subprocess"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(LONG)}]
timeout_s = 30

[[agent]]
name = "echo"
category = "engineering"
domain = "commands"
keywords = ["echo"]
executor = "subprocess"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(ECHO)}]

[[agent]]
name = "remote"
category = "research"
domain = "another forge node"
keywords = ["remote"]
executor = "openai"
base_url = "{b.url}/v1"
model = "tiny-llama.gguf"
api_key_env = "REMOTE_KEY"

[[agent]]
name = "claude"
category = "research"
domain = "anthropic"
keywords = ["claude"]
executor = "anthropic"
base_url = "{stand_in}"
model = "claude-stand-in"
"""
    path.write_text(lanes)
    return path


PLAN = {"tasks": [
    {"id": "T1", "prompt": "print the long output", "agent": "shell"},
    {"id": "T2", "prompt": "echo what you were given", "agent": "echo", "deps": ["T1"]},
    {"id": "T3", "prompt": "say hello", "agent": "remote", "max_tokens": 8},
    {"id": "T4", "prompt": "list two risks", "agent": "claude"},
    {"id": "T5", "prompt": "echo after T1, without its result", "agent": "echo",
     "deps": [{"id": "T1", "type": "order"}]}]}


def test_roster_with_a_command_another_forge_node_and_anthropic_witnesses_every_call(
        pair, stand_in, tmp_path):
    a, b = pair
    lanes = external_roster(tmp_path / "roster.toml", b, stand_in)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    done = forge(a.home, a.url, "agent", "run", "--account", "ops", "--roster", str(lanes),
                 "--plan", str(plan), "--max-tokens", "8", "--json", "use every executor",
                 FORGE_TOKEN=a.operator_token)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "answered"
    tasks = {t["id"]: t for t in summary["tasks"]}
    assert [tasks[t]["lane"] for t in ("T1", "T2", "T3", "T4", "T5")] == \
        ["shell", "echo", "remote", "claude", "echo"]
    assert all(r["method"] == "plan" for r in summary["route"])
    steps = agent_steps(a.home, summary["run"])
    results = {e.data["task"]: e for e in steps if e.data["step"] == "result"}

    # The command: ok iff exit 0, its whole output witnessed; a data edge shows it cut, marked.
    whole = tasks["T1"]["result"]
    assert len(whole) > 1500 and tasks["T1"]["verdict"]["ok"]
    assert results["T1"].data["executor_model"] == "subprocess:" + Path(sys.executable).name
    shown = tasks["T2"]["result"]
    assert "line 0000 of the long output" in shown
    assert f"characters cut; the whole output is witnessed at ledger seq {results['T1'].seq}" \
        in shown
    # An order-only edge waits for T1 but is not shown its result.
    assert "line 0000" not in tasks["T5"]["result"] and tasks["T5"]["wave"] == 1
    started = {e.data["task"]: e for e in steps if e.data["step"] == "task"}
    assert started["T5"].data["inputs"] == [] and started["T2"].data["inputs"] == [
        results["T1"].seq]

    # Another forge node over its OpenAI API: the trade is in B's ledger, witnessed in A's.
    remote = results["T3"].data
    assert remote["executor_model"].startswith("openai:") and remote["prompt_tokens"] > 0
    cost = remote["external_cost"]
    with Ledger.open_reader(b.home / "ledger.db") as book:
        trade = book.entry(cost["trade"])
    assert trade.kind == "trade" and trade.data["terms"]["cu"] == cost["cu"] > 0
    # ... and the same signed trade is held in A's ledger, as a body of the result entry.
    with Ledger.open_reader(a.home / "ledger.db") as book:
        held = book.body(results["T3"].fields["bodies"][1])
    assert hashlib.sha256(held).hexdigest() == remote["external_trade_sha256"]
    assert canonical.decode(held) == trade.data
    assert tasks["T3"]["external_trade_sha256"] == remote["external_trade_sha256"]

    # Anthropic's Messages API (a loopback stand-in): the key, the version, the reply.
    [sent] = [s for s in StandIn.seen if s["body"]["messages"][0]["content"].endswith(
        "list two risks")]
    assert sent["path"] == "/v1/messages" and sent["headers"]["x-api-key"] == "test-key"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["model"] == "claude-stand-in" and sent["body"]["max_tokens"] == 8
    claude = results["T4"].data
    assert claude["executor_model"] == "anthropic:claude-stand-in"
    assert (claude["prompt_tokens"], claude["completion_tokens"]) == (12, 7)
    assert tasks["T4"]["result"] == "Three risks: cost, drift."
    assert summary["calls"] == 6  # five external calls and the synthesizer
    assert summary["intent"] is not None


def test_only_the_operator_may_send_a_roster_that_runs_outside_forge(pair, stand_in, tmp_path):
    a, b = pair
    who = a.agent("mallory")
    text = external_roster(tmp_path / "roster.toml", b, stand_in).read_text()
    with Ledger.open_reader(a.home / "ledger.db") as book:
        before = book.size
    status, _, body = a.request("POST", "/v1/forge/agent/runs",
                                {"request": "run my command", "roster": text},
                                token=who["token"])
    assert status == 403 and "only the operator" in body["error"]["message"]
    assert "shell" in body["error"]["message"]
    with Ledger.open_reader(a.home / "ledger.db") as book:
        assert book.size == before  # nothing recorded, nothing reserved


def test_policy_refuses_a_lane_outside_the_allowed_categories_before_any_task(pair, tmp_path):
    a, _ = pair
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tasks": [{"id": "T1", "prompt": "x", "agent": "backend"}]}))
    assert forge(a.home, None, "config", "set", "agents.categories", "research").returncode == 0
    try:
        done = forge(a.home, a.url, "agent", "run", "--account", "ops", "--plan", str(plan),
                     "--json", "build it", FORGE_TOKEN=a.operator_token)
    finally:
        forge(a.home, None, "config", "set", "agents.categories", "")
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "refused" and summary["error"]["stage"] == "policy"
    assert "category 'engineering'" in summary["error"]["reason"]
    assert summary["calls"] == 0 and summary["tasks"][0]["status"] == "not run"


def test_classifier_picks_a_lane_when_the_keywords_cannot_and_is_paid(pair, tmp_path):
    a, _ = pair
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tasks": [{"id": "T1", "prompt": "make it better",
                                           "max_tokens": 4}]}))
    done = forge(a.home, a.url, "agent", "run", "--account", "ops", "--plan", str(plan),
                 "-n", "4", "--json", "vague", FORGE_TOKEN=a.operator_token)
    summary = json.loads(done.stdout)
    [decision] = summary["route"]
    assert decision["method"] == "classifier" and decision["trade"] is not None
    assert decision["lane"] in roster.default().names() and decision["cu"] > 0
    with Ledger.open_reader(a.home / "ledger.db") as book:
        assert book.entry(decision["trade"]).kind == "trade"


def test_max_seconds_bounds_a_slow_command_and_stops_the_run_with_a_hint(pair, tmp_path):
    a, _ = pair
    lanes = tmp_path / "roster.toml"
    nap = "import time; time.sleep(20)"
    lanes.write_text(f"""[[agent]]
name = "nap"
category = "engineering"
domain = "commands"
keywords = ["nap"]
executor = "subprocess"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(nap)}]
""")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tasks": [{"id": "T1", "prompt": "nap", "agent": "nap"},
                                          {"id": "T2", "prompt": "nap", "agent": "nap",
                                           "deps": ["T1"]}]}))
    started = time.monotonic()
    done = forge(a.home, a.url, "agent", "run", "--account", "ops", "--roster", str(lanes),
                 "--plan", str(plan), "--max-seconds", "2", "--json", "nap twice",
                 FORGE_TOKEN=a.operator_token)
    assert time.monotonic() - started < 20  # the command was killed, not waited for
    assert done.returncode == 1
    summary = json.loads(done.stdout)
    first = summary["tasks"][0]
    assert first["status"] == "failed" and first["verdict"]["check"] == "executor"
    assert "timeout" in first["verdict"]["reason"] or "killed" in first["verdict"]["reason"]
    assert summary["status"] == "stopped" and summary["stop"]["gate"] == "max_seconds"
    assert summary["tasks"][1]["status"] == "not run"
    assert "raise the seconds budget" in done.stderr and "--max-seconds 4" in done.stderr


def test_a_configured_verifier_checks_the_answer_and_is_witnessed(pair, tmp_path):
    a, _ = pair
    check = "import sys; print(len(sys.argv[-1])); sys.exit(0)"
    assert forge(a.home, None, "config", "set", "agents.verifier",
                 f"{sys.executable},-c,{check}").returncode == 0
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tasks": [{"id": "T1", "prompt": "x", "agent": "echo"}]}))
    lanes = tmp_path / "roster.toml"
    lanes.write_text(ECHO_ROSTER)
    try:
        done = forge(a.home, a.url, "agent", "run", "--account", "ops", "--roster", str(lanes),
                     "--plan", str(plan), "-n", "8", "--json", "verify me",
                     FORGE_TOKEN=a.operator_token)
    finally:
        forge(a.home, None, "config", "set", "agents.verifier", "")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    verification = summary["verification"]
    assert verification["ok"] is True and verification["source"].startswith(sys.executable)
    assert verification["detail"].strip() == str(len(summary["answer"]))
    steps = agent_steps(a.home, summary["run"])
    [entry] = [e for e in steps if e.data["step"] == "verification"]
    assert entry.fields["parent"] == summary["answer_seq"]


@pytest.fixture(scope="module")
def two_runs(pair, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two answered runs on node A: one task on a command lane each, then the synthesizer."""
    a, _ = pair
    folder = tmp_path_factory.mktemp("two-runs")
    lanes = folder / "roster.toml"
    lanes.write_text(ECHO_ROSTER)
    out = []
    for tasks in (1, 2):
        plan = folder / f"plan{tasks}.json"
        plan.write_text(json.dumps({"tasks": [{"id": f"T{i}", "prompt": f"echo {i}",
                                               "agent": "echo"} for i in range(tasks)]}))
        done = forge(a.home, a.url, "agent", "run", "--account", "ops", "--roster", str(lanes),
                     "--plan", str(plan), "-n", "8", "--json", f"echo {tasks}",
                     FORGE_TOKEN=a.operator_token)
        assert done.returncode == 0, done.stderr
        out.append(json.loads(done.stdout)["run"])
    return out


def test_list_and_compare_runs_side_by_side(pair, two_runs):
    a, _ = pair
    listed = forge(a.home, None, "agent", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["run"] for r in rows[:2]] == two_runs[::-1]  # newest first
    assert {"run", "status", "spent_cu", "calls", "seconds", "coverage_pm",
            "passed"} <= set(rows[0])
    newer, older = rows[0]["run"], rows[1]["run"]
    both = json.loads(forge(a.home, None, "agent", "compare", older, newer, "--json").stdout)
    assert both["a"]["run"] == older and both["b"]["run"] == newer
    assert (both["a"]["tasks"], both["b"]["tasks"], both["delta"]["tasks"]) == (1, 2, 1)
    assert both["delta"]["calls"] == both["b"]["calls"] - both["a"]["calls"] == 1
    text = forge(a.home, None, "agent", "compare", older, newer)
    assert "spent_cu" in text.stdout and "b - a" in text.stdout
    status, _, body = a.request("GET", f"/v1/forge/agent/compare?a={older}&b=nope",
                                token=a.operator_token)
    assert status == 400 and "run ids" in body["error"]["message"]


def test_a_tampered_answer_is_flagged_by_agent_show(pair, two_runs):
    a, _ = pair
    run = two_runs[0]
    before = forge(a.home, None, "agent", "show", run)
    assert before.returncode == 0 and "TAMPERED" not in before.stdout
    [answer] = [e for e in agent_steps(a.home, run) if e.data["step"] == "answer"]
    db = sqlite3.connect(a.home / "ledger.db", timeout=30)
    with db:
        db.execute("UPDATE bodies SET data = ? WHERE hash = ?",
                   (b"a forged answer", answer.data["answer_sha256"]))
    db.close()
    shown = forge(a.home, None, "agent", "show", run)
    assert shown.returncode == 1
    assert "TAMPERED" in shown.stdout and f"seq {answer.seq}: the answer body" in shown.stdout
    assert "ledger verify --deep" in shown.stderr
    rows = json.loads(forge(a.home, None, "agent", "list", "--json").stdout)
    for row in rows:  # flagged exactly when one of its bodies is the forged one
        shares = any(answer.data["answer_sha256"] in e.data.values()
                     for e in agent_steps(a.home, row["run"]))
        assert row["tampered"] is shares, row["run"]


# -- escalation by tier never lands on a base model ----------------------------------------


def test_escalation_goes_up_by_tier_and_skips_a_base_model(tmp_path_factory, tiny_gguf, tmp_path):
    home = tmp_path_factory.mktemp("tiers")
    env = {"FORGE_AGENTS_JUDGE": "false", "FORGE_AGENTS_TIER_CAPABLE": "gemma3:270m",
           "FORGE_AGENTS_TIER_FRONTIER": "gemma3:270m,smollm2:135m"}
    with NodeProcess(home, tiny_gguf, "-m", "gemma3:270m", "-m", "smollm2:135m", env=env) as node:
        node.agent("esc")
        listed = forge(home, None, "models", "list", "--json")
        kinds = {m["name"]: m["kind"] for m in json.loads(listed.stdout)}
        assert kinds["gemma3:270m"] == "base" and kinds["smollm2:135m"] == "instruct"
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"tasks": [{"id": "T1", "prompt": "Reply with yes.",
                                               "agent": "research", "max_tokens": 4,
                                               "expect": "never-in-any-reply"}]}))
        done = forge(home, node.url, "agent", "run", "--account", "esc", "--plan", str(plan),
                     "--model", "tiny-llama.gguf", "-n", "4", "--json", "escalate")
    assert done.returncode == 1  # both attempts failed their checks
    summary = json.loads(done.stdout)
    started = [e.data for e in agent_steps(home, summary["run"]) if e.data["step"] == "task"]
    assert [(s["model"], s["tier"]) for s in started] == [("tiny-llama.gguf", "cheap"),
                                                          ("smollm2:135m", "frontier")]
    verdicts = [e for e in agent_steps(home, summary["run"]) if e.data["step"] == "verdict"]
    assert started and all(not v.data["ok"] for v in verdicts)
    second = next(e for e in agent_steps(home, summary["run"])
                  if e.data["step"] == "task" and e.data["attempt"] == 2)
    assert second.fields["parent"] == verdicts[0].seq  # escalated from that verdict


# -- as a new user would: defaults, smollm2, no --budget, no --plan --------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("writer")
    with NodeProcess(home, Path("smollm2:135m"),
                     env={"FORGE_SAFETY_BREAKER_SPENDS_PER_MINUTE": "100000"}) as node:
        yield node


def test_readme_request_with_defaults_answers_on_smollm2(smollm2, capsys):
    smollm2.agent("writer")
    started = time.monotonic()
    done = forge(smollm2.home, smollm2.url, "agent", "run", "--account", "writer",
                 README_REQUEST, timeout=1800)
    wall = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[forge agent run, defaults, smollm2:135m] {wall:.1f} s wall, rc "
              f"{done.returncode}")
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(forge(smollm2.home, None, "agent", "list", "--json").stdout)[0]["run"]
    summary = json.loads(forge(smollm2.home, None, "agent", "show", run, "--json").stdout)
    with capsys.disabled():
        print(f"  {summary['spent_cu']} CU of {summary['budget_cu']}, {summary['calls']} calls, "
              f"{len(summary['tasks'])} tasks, coverage {summary['intent']['coverage_pm']}‰")
        print(done.stdout)
    assert summary["status"] == "answered" and summary["answer"]
    assert summary["plan"]["planner"] == "coordinator" and len(summary["tasks"]) >= 2
    assert all(t["lane"] and t["verdict"] and t["verdict"]["check"] for t in summary["tasks"])
    assert {r["method"] for r in summary["route"]} <= {"coordinator", "lexical"}
    # "Write a short README intro …" has three of technical-writing's five keywords: the
    # deterministic router decides it, whatever lane the coordinator named.
    assert summary["route"][0]["method"] == "lexical"
    assert summary["tasks"][0]["lane"] == "technical-writing"
    intent = summary["intent"]
    assert set(intent) >= {"coverage", "coverage_pm", "flagged", "missing"}
    assert summary["budget_cu"] == 4000 and summary["spent_cu"] <= 4000
    assert "answer" in done.stdout and "intent" in done.stdout
