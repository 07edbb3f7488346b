"""`forge node`: the long-running node (OpenAI-compatible API + economy API + metrics)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from forge_cli import config


def node(
    model: list[str] = typer.Option(None, "--model", "-m",
                                    help="Model to serve (repeat for several) [default: "
                                    "models.default]."),
    host: str | None = typer.Option(None, "--host", help="Address to bind [default: node.host]."),
    port: int | None = typer.Option(None, "--port", "-p", min=0, max=65535,
                                    help="Port [default: node.port]; 0 picks a free one."),
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file."),
) -> None:
    """Serve inference where every request is a dual-signed trade in the ledger.

    Consumers authenticate with a bearer token: create one per consumer with
    `forge wallet agent create NAME`. Stop with Ctrl-C or SIGTERM; every acknowledged trade
    is already durable.
    """
    from forge_cli import identity
    from forge_cli.node.app import check_bind, load_models, serve
    from forge_cli.node.service import Node

    settings = config.load()
    host = host or settings["node.host"]
    port = settings["node.port"] if port is None else port
    home = config.ensure_home()
    token_file = home / "api_token"
    check_bind(host, token_file)
    signer = identity.load_or_create()
    models = load_models(model or [settings["models.default"]], n_ctx=settings["models.n_ctx"],
                         queue=settings["node.queue"])
    node_ = Node(home=home, ledger_path=config.ledger_path(ledger), signer=signer, models=models)

    def announce(site) -> None:  # noqa: ANN001
        bound = site._server.sockets[0].getsockname()  # the real port when 0 was asked
        url = f"http://{bound[0]}:{bound[1]}"
        offload = {m.name: m.engine.gpu_offload for m in models}
        lines = [
            f"forge node listening on {url}",
            f"  node id   {signer.node_id}",
            *(f"  model     {m.name}  ({m.params:,} params, sha256 {m.sha256[:16]}…, "
              f"gpu offload {'on' if offload[m.name] else 'off'})" for m in models),
            f"  token     {token_file}  (operator; consumers need agent tokens)",
            f"  ledger    {node_.ledger.path}  ({node_.ledger.size} entries)",
            f"  docs      {url}/openapi.json   metrics {url}/metrics",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        # Lets `forge safety` on this machine find the node that holds the ledger.
        (home / "node.url").write_text(url + "\n", encoding="utf-8")

    try:
        serve(node_, host, port, announce=announce)
    finally:
        (home / "node.url").unlink(missing_ok=True)
