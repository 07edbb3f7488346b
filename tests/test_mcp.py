"""`forge mcp` driven by the official `mcp` SDK's stdio client against a real node."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import REPO, forge_env
from tests.node_harness import NodeProcess

TOOLS = {"balance", "pricing", "chat", "route", "trades", "lend", "borrow", "repay",
         "safety_status", "kill_switch", "ledger_verify", "ledger_checkpoint", "ledger_prove",
         "agent_run", "agent_route", "agent_list", "agent_compare"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path):
    with NodeProcess(tmp_path_factory.mktemp("mcp-home"), tiny_gguf) as running:
        yield running


async def test_mcp_client_lists_tools_and_calls_balance_chat_and_verify(node):
    who = node.agent("mia")
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "forge_cli", "mcp", "--node", node.url],
                                   env=forge_env(node.home, FORGE_TOKEN=who["token"]), cwd=REPO)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == TOOLS
        chat_schema = tools["chat"].input_schema
        assert chat_schema["required"] == ["prompt"]
        assert chat_schema["properties"]["max_tokens"]["minimum"] == 1
        assert tools["borrow"].input_schema["properties"]["term_hours"]["maximum"] == 168

        reply = await session.call_tool("chat", {"prompt": "hello", "max_tokens": 5, "seed": 1})
        assert not reply.is_error, reply.content
        paid = reply.structured_content
        assert paid["text"] and paid["usage"]["completion_tokens"] == 5
        assert paid["x_forge"]["cu_cost"] > 0 and paid["x_forge"]["trade_seq"] is not None

        balance = await session.call_tool("balance", {})
        assert not balance.is_error
        assert balance.structured_content["account"] == who["account"]
        assert balance.structured_content["balance"] == paid["x_forge"]["balance"]

        verified = await session.call_tool("ledger_verify", {})
        assert not verified.is_error and verified.structured_content["valid"] is True
        assert verified.structured_content["size"] > paid["x_forge"]["trade_seq"]

        # The node decides: an agent's token may not touch the kill switch.
        refused = await session.call_tool("kill_switch", {"activate": True, "reason": "no"})
        assert refused.is_error
        assert "only the node operator may change safety settings" in refused.content[0].text
        invalid = await session.call_tool("chat", {"prompt": "", "max_tokens": 5})
        assert invalid.is_error and "prompt" in invalid.content[0].text


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory):
    """smollm2:135m (embedded), the judge off: a task that asks for one word ends on its own."""
    with NodeProcess(tmp_path_factory.mktemp("mcp-agents"), Path("smollm2:135m"),
                     env={"FORGE_AGENTS_JUDGE": "false"}) as running:
        yield running


async def test_agent_run_takes_a_plan_object_or_text_and_agent_tools_read_runs_back(writer):
    who = writer.agent("mcp")  # an agent's token, as the README's host config has it
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "forge_cli", "mcp", "--node", writer.url],
                                   env=forge_env(writer.home, FORGE_TOKEN=who["token"]), cwd=REPO)
    plan = {"tasks": [{"id": "T1", "prompt": "Say yes.", "agent": "research",
                       "max_tokens": 24}]}
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert "object" in str(tools["agent_run"].input_schema["properties"]["plan"])
        runs = []
        for given in (plan, json.dumps(plan)):  # the SDK sends an object as an object
            reply = await session.call_tool("agent_run", {"request": "say yes", "plan": given,
                                                          "max_tokens": 24})
            assert not reply.is_error, reply.content
            summary = reply.structured_content
            assert summary["status"] == "answered" and summary["plan"]["planner"] == "file"
            assert summary["tasks"][0]["lane"] == "research"
            runs.append(summary["run"])

        routed = await session.call_tool("agent_route", {"text": "review the security risks "
                                                         "and bugs"})
        assert not routed.is_error and routed.structured_content["lane"] == "code-review"
        listed = await session.call_tool("agent_list", {})
        assert [r["run"] for r in listed.structured_content["runs"]] == runs[::-1]
        compared = await session.call_tool("agent_compare", {"a": runs[0], "b": runs[1]})
        assert not compared.is_error
        assert compared.structured_content["delta"]["tasks"] == 0
        bad = await session.call_tool("agent_compare", {"a": runs[0], "b": "nope"})
        assert bad.is_error


def test_forge_mcp_without_a_node_is_a_usage_error(run_forge):
    done = run_forge("mcp")
    assert done.returncode == 2 and "--node" in done.stderr and done.stdout == ""
