"""`forge mcp`: an MCP server over stdio (the official `mcp` SDK) in front of a node's API.

Each tool is one node route, called with the token given at start-up; the node enforces who
may do what (the kill switch is the operator's). A node error comes back as an MCP tool error
carrying the node's message. stdout carries only the protocol; logs go to stderr.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Any, Literal

from pydantic import Field

from forge_cli.client import Client
from forge_cli.errors import ForgeError

HEX64 = r"^[0-9a-f]{64}$"
INSTRUCTIONS = (
    "Tools of a forge node: compute is money. Every chat is a paid trade in compute units (CU) "
    "recorded in a signed, verifiable ledger. Check `balance` and `pricing` before spending; "
    "`agent_run` runs a budgeted multi-step agent whose every step is in the ledger.")


def build(client: Client) -> Any:
    """The MCP server (mcp.server.mcpserver.MCPServer) with forge's tools, bound to `client`."""
    import anyio
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from forge_cli import version

    server = MCPServer("forge", instructions=INSTRUCTIONS, version=version(), log_level="WARNING")

    async def call(method: str, path: str, body: Any = None) -> Any:
        def send() -> Any:
            return client.get(path) if method == "GET" else client.post(path, body)

        try:
            return await anyio.to_thread.run_sync(send)
        except ForgeError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            raise ToolError(f"{exc.message}{hint}") from exc

    def query(**params: Any) -> str:
        given = {k: v for k, v in params.items() if v is not None}
        return "?" + urllib.parse.urlencode(given) if given else ""

    @server.tool()
    async def balance() -> dict[str, Any]:
        """This token's account: balance, reserved and available CU, earned, spent, reputation."""
        return await call("GET", "/v1/forge/balance")

    @server.tool()
    async def pricing() -> dict[str, Any]:
        """Current price of every model the node serves (µCU per completion token) and estimates."""
        return await call("GET", "/v1/forge/pricing")

    @server.tool()
    async def chat(
        prompt: Annotated[str, Field(min_length=1, max_length=100_000,
                                     description="The user message.")],
        model: Annotated[str | None, Field(description="Model id (see `pricing`); the node's "
                                           "only model if omitted.")] = None,
        system: Annotated[str | None, Field(max_length=100_000,
                                            description="Optional system prompt.")] = None,
        max_tokens: Annotated[int, Field(ge=1, le=32_768, description="Most completion tokens; "
                                         "the cost is at most this × the price.")] = 256,
        temperature: Annotated[float, Field(ge=0, le=2)] = 0.7,
        seed: Annotated[int | None, Field(ge=0, lt=2**32)] = None,
    ) -> dict[str, Any]:
        """Buy one chat completion from the node (a paid trade). Returns the text, token usage
        and x_forge: CU cost, price, new balance and the trade's ledger seq."""
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if model is not None:
            body["model"] = model
        if seed is not None:
            body["seed"] = seed
        out = await call("POST", "/v1/chat/completions", body)
        return {"text": out["choices"][0]["message"]["content"], "model": out["model"],
                "usage": out["usage"], "x_forge": out["x_forge"]}

    @server.tool()
    async def route(
        model: Annotated[str | None, Field(description="Only providers of this model.")] = None,
        mode: Literal["cost", "quality", "balanced"] = "balanced",
        max_cu: Annotated[int | None, Field(ge=0, description="Skip providers whose price for "
                                            "one token is above this.")] = None,
    ) -> dict[str, Any]:
        """The best provider for a model by cost, quality or a balance of both, and the ranking."""
        return await call("GET", "/v1/forge/route" + query(model=model, mode=mode, max_cu=max_cu))

    @server.tool()
    async def trades(
        limit: Annotated[int, Field(ge=1, le=1000)] = 20,
        account: Annotated[str | None, Field(pattern=HEX64, description="Only trades of this "
                                             "account (64 hex digits).")] = None,
    ) -> dict[str, Any]:
        """The newest trades in the node's ledger, each with both signatures."""
        return await call("GET", "/v1/forge/trades" + query(limit=limit, account=account))

    @server.tool()
    async def lend(amount: Annotated[int, Field(ge=1, description="CU to deposit.")]) -> dict[str, Any]:
        """Deposit CU into the lending pool for shares at the pool's current value."""
        return await call("POST", "/v1/forge/lend", {"amount": amount})

    @server.tool()
    async def borrow(
        amount: Annotated[int, Field(ge=1, description="Principal, CU.")],
        term_hours: Annotated[int, Field(ge=1, le=168)],
        collateral: Annotated[int, Field(ge=1, description="CU put in escrow; principal may be "
                                         "at most 3 × collateral.")],
    ) -> dict[str, Any]:
        """Borrow from the pool against collateral (credit ≥ 0.2, ≤ 20 % of the pool)."""
        return await call("POST", "/v1/forge/borrow", {"amount": amount, "term_hours": term_hours,
                                                       "collateral": collateral})

    @server.tool()
    async def repay(loan_id: Annotated[int, Field(ge=0)]) -> dict[str, Any]:
        """Repay a loan: principal + interest back to the pool; the collateral comes back."""
        return await call("POST", "/v1/forge/repay", {"loan_id": loan_id})

    @server.tool()
    async def safety_status() -> dict[str, Any]:
        """Kill switch, circuit breaker, spending policy and budgets, pending approvals."""
        return await call("GET", "/v1/forge/safety")

    @server.tool()
    async def kill_switch(
        activate: Annotated[bool, Field(description="true stops every spend; false lifts it.")],
        reason: Annotated[str, Field(max_length=1000, description="Recorded in the ledger; "
                                     "required to activate.")] = "",
    ) -> dict[str, Any]:
        """Turn the node's kill switch on or off (the operator's token only)."""
        return await call("POST", "/v1/forge/kill", {"activate": activate, "reason": reason})

    @server.tool()
    async def ledger_verify(
        deep: Annotated[bool, Field(description="Also re-hash bodies and rebuild every table "
                                    "by replay.")] = False,
    ) -> dict[str, Any]:
        """Check every entry, signature and checkpoint of the node's ledger; `valid` says the
        outcome and `findings` name each bad seq."""
        return await call("GET", "/v1/forge/ledger/verify" + query(deep=1 if deep else None))

    @server.tool()
    async def ledger_checkpoint() -> dict[str, Any]:
        """Sign and return a checkpoint (C2SP signed note) of the ledger's Merkle tree."""
        return await call("GET", "/v1/forge/ledger/checkpoint")

    @server.tool()
    async def ledger_prove(
        seq: Annotated[int, Field(ge=0, description="Entry to prove.")],
        size: Annotated[int | None, Field(ge=1, description="Tree size (default: current).")] = None,
    ) -> dict[str, Any]:
        """RFC 9162 inclusion proof that entry `seq` is in the tree of the given size."""
        return await call("GET", f"/v1/forge/ledger/proof/{seq}" + query(size=size))

    @server.tool()
    async def agent_run(
        request: Annotated[str, Field(min_length=1, max_length=4000)],
        budget_cu: Annotated[int | None, Field(ge=1, description="Most CU the run may spend; "
                                               "checked before each call (default: the node's "
                                               "agents.budget_cu).")] = None,
        max_calls: Annotated[int | None, Field(ge=1, le=10_000)] = None,
        max_seconds: Annotated[int | None, Field(ge=1, le=86_400)] = None,
        account: Annotated[str | None, Field(description="Agent account to pay from (operator "
                                             "token only; default: the token's own).")] = None,
        model: Annotated[str | None, Field(description="Model for coordinator, tasks and "
                                           "synthesizer.")] = None,
        plan: Annotated[dict[str, Any] | list[Any] | str | None, Field(
            description="A plan instead of the coordinator's: an object {\"tasks\": [{\"id\", "
                        "\"prompt\", \"agent\"?, \"deps\"?}]} or the same as JSON text.")] = None,
        max_tokens: Annotated[int | None, Field(ge=1, le=32_768)] = None,
    ) -> dict[str, Any]:
        """Run a budgeted multi-step agent on the node; every step is witnessed in the ledger.
        Returns the run's summary; a run that stops (budget, call limit, safety gate) or whose
        plan is rejected is a tool error naming the reason and the run id."""
        body = {k: v for k, v in {"request": request, "budget_cu": budget_cu,
                                  "max_calls": max_calls, "max_seconds": max_seconds,
                                  "account": account, "model": model, "plan": plan,
                                  "max_tokens": max_tokens}.items() if v is not None}
        summary = await call("POST", "/v1/forge/agent/runs", body)
        ended = summary.get("stop") or summary.get("error")
        if summary["status"] != "answered" and ended:
            raise ToolError(f"run {summary['run']} {summary['status']} at seq {ended['seq']}: "
                            f"{ended['reason']}")
        return summary

    @server.tool()
    async def agent_route(
        text: Annotated[str, Field(min_length=1, max_length=4000)],
    ) -> dict[str, Any]:
        """Which roster lane the lexical router picks for a text (keyword scores in permille);
        `decided` false means a run would ask the classifier model. Nothing is run or paid."""
        return await call("POST", "/v1/forge/agent/route", {"text": text})

    @server.tool()
    async def agent_list(
        limit: Annotated[int, Field(ge=1, le=1000)] = 20,
    ) -> dict[str, Any]:
        """Agent runs of this token's account, newest first: status, tasks passed, CU, calls,
        seconds and intent coverage."""
        return await call("GET", "/v1/forge/agent/runs" + query(limit=limit))

    @server.tool()
    async def agent_compare(
        a: Annotated[str, Field(pattern=r"^ag_[0-9a-f]{12}$", description="First run.")],
        b: Annotated[str, Field(pattern=r"^ag_[0-9a-f]{12}$", description="Second run.")],
    ) -> dict[str, Any]:
        """Two agent runs side by side (tasks, verdicts, CU, calls, seconds, coverage) and b − a."""
        return await call("GET", "/v1/forge/agent/compare" + query(a=a, b=b))

    return server


def serve(url: str, token: str | None) -> None:
    """Serve MCP on stdin/stdout until the client closes the stream."""
    build(Client(url, token, timeout=3600)).run("stdio")
