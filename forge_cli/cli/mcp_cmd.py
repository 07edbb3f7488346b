"""`forge mcp`: the node's tools for MCP hosts (Claude Desktop, IDEs, agent frameworks)."""

from __future__ import annotations

import typer

from forge_cli.errors import UsageError


def mcp(
    node: str | None = typer.Option(None, "--node", help="Node URL (default: FORGE_NODE or the "
                                    "node running for FORGE_HOME)."),
    token: str | None = typer.Option(None, "--token", help="API token the tools act with "
                                     "(default: FORGE_TOKEN or the operator's token file)."),
) -> None:
    """Serve the node's tools to an MCP host over stdio (the official MCP SDK).

    Tools: balance, pricing, chat (paid), route, trades, lend, borrow, repay, safety status.

    Also: kill switch (operator), ledger verify, checkpoint and prove, agent run.

    An MCP host starts it as a subprocess, e.g. in its config:

        {"command": "forge", "args": ["mcp", "--node", "http://127.0.0.1:3001"]}

    Nothing but the protocol is written to stdout; node errors come back as tool errors.
    """
    from forge_cli.client import default_token, node_url

    url = node_url(node)
    if not url:
        raise UsageError("forge mcp needs a node to talk to, and none is running for this "
                         "FORGE_HOME", hint="pass --node URL or set FORGE_NODE")
    from forge_cli import mcp_server

    mcp_server.serve(url, token or default_token())
