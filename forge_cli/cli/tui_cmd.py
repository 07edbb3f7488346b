"""`forge tui`: the Textual dashboard of a running node (textual is imported only here)."""

from __future__ import annotations

import typer

from forge_cli import config


def resolve_node_url(node: str | None) -> str:
    """--node, else FORGE_NODE, else FORGE_HOME/node.url (a running node writes it), else config."""
    from forge_cli.client import node_url

    return (node_url(node) or config.get("node.url")
            or f"http://127.0.0.1:{config.get('node.port')}")


def tui(
    node: str | None = typer.Option(
        None, "--node", "-n", metavar="URL",
        help="Node to watch; default FORGE_NODE, then FORGE_HOME/node.url, then node.url in config.",
    ),
    token: str | None = typer.Option(
        None, "--token", "-t", metavar="TOKEN",
        help="API token; default FORGE_TOKEN, then the operator token in FORGE_HOME/api_token.",
    ),
    poll: float = typer.Option(
        2.0, "--poll", min=0.2, max=60.0, metavar="SECONDS",
        help="Seconds between polls of balance, prices and safety (the SSE feed is live).",
    ),
) -> None:
    """The live dashboard: the node at a glance, trades, prices, loans, safety, peers (q quits, ? helps)."""
    from forge_cli.client import default_token
    from tui.app import ForgeApp

    url = resolve_node_url(node)
    ForgeApp(url=url, token=token or default_token(), poll_s=poll).run()
