"""`forge node`: the long-running node (OpenAI-compatible API + economy API + metrics).

`run_node` is shared with `forge seed`, which is `forge node --mesh`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from forge_cli import config

ModelOpt = typer.Option(None, "--model", "-m",
                        help="Model to serve (repeat for several) [default: models.default].")
HostOpt = typer.Option(None, "--host", help="Address to bind [default: node.host].")
PortOpt = typer.Option(None, "--port", "-p", min=0, max=65535,
                       help="Port [default: node.port]; 0 picks a free one.")
LedgerOpt = typer.Option(None, "--ledger", help="Ledger file.")
InterfaceOpt = typer.Option(None, "--interface",
                            help="Address mDNS binds to (repeat for several) "
                            "[default: mesh.interfaces].")
ThreadsOpt = typer.Option(None, "--threads", min=1, max=1024,
                          help="Threads llama.cpp runs on [default: engine.threads; "
                          "0 there means one per physical core].")
PeerOpt = typer.Option(None, "--peer", help="URL of a node to probe as a peer without mDNS "
                       "(repeat for several; adds to mesh.peers).")
OllamaPortOpt = typer.Option(None, "--ollama-port", min=0, max=65535,
                             help="Also serve the API on this port (Ollama's is 11434), for apps "
                             "with a fixed Ollama URL [default: off]; 0 picks a free one.")
NoPullOpt = typer.Option(False, "--no-pull",
                         help="Refuse a model that is not on disk instead of pulling it.")


def node(
    model: list[str] = ModelOpt,
    host: str | None = HostOpt,
    port: int | None = PortOpt,
    ledger: Path | None = LedgerOpt,
    mesh: bool = typer.Option(False, "--mesh", help="Join the mesh: advertise this node, "
                              "find peers (`forge seed` is `forge node --mesh`)."),
    interface: list[str] = InterfaceOpt,
    peer: list[str] = PeerOpt,
    no_pull: bool = NoPullOpt,
    threads: int | None = ThreadsOpt,
    split: str | None = typer.Option(None, "--split",
                                     help="Split the model's layers with layer peers "
                                     "(`forge rpc serve`): auto (found on the mesh) or "
                                     "URL[,URL…]; each is paid per layer-token."),
    ollama_port: int | None = OllamaPortOpt,
) -> None:
    """Serve inference where every request is a dual-signed trade in the ledger.

    Consumers authenticate with a bearer token: create one per consumer with
    `forge wallet agent create NAME`. Stop with Ctrl-C or SIGTERM; every acknowledged trade
    is already durable. A catalog model that is not on disk is pulled first.
    """
    if (interface or peer) and not mesh:
        from forge_cli.errors import UsageError

        raise UsageError("--interface and --peer configure the mesh, which is off",
                         hint="add --mesh, or use `forge seed`")
    run_node(model, host, port, ledger, mesh=mesh, interfaces=interface, peers=peer,
             pull=not no_pull, threads=threads, split=_split_urls(split, model),
             ollama_port=ollama_port)


def _split_urls(split: str | None, model: list[str] | None) -> list[str] | None:
    from forge_cli.errors import UsageError

    if split is None:
        return None
    if model is not None and len(model) > 1:
        raise UsageError("--split serves one model; name only one with -m")
    if split == "auto":
        return ["auto"]  # found on the mesh when the node starts
    urls = [url.strip() for url in split.split(",") if url.strip()]
    bad = [url for url in urls if not url.startswith(("http://", "https://"))]
    if not urls or bad:
        raise UsageError(f"--split takes auto or URL[,URL…] of layer peers, found {split!r}",
                         hint="e.g. --split http://10.0.0.2:3002,http://10.0.0.3:3002")
    return urls


def run_node(model: list[str] | None, host: str | None, port: int | None, ledger: Path | None,
             *, mesh: bool, interfaces: list[str] | None = None,
             peers: list[str] | None = None, pull: bool = True,
             threads: int | None = None, split: list[str] | None = None,
             ollama_port: int | None = None) -> None:
    """Start a node and serve until SIGINT/SIGTERM (with `mesh`, advertise it and find peers);
    with `pull`, catalog models not on disk are downloaded first; with `ollama_port`, the API
    listens on that port too."""
    from forge_cli.inference import download
    from forge_cli.node.app import check_bind, serve
    from forge_cli.root.build import build_node

    settings = config.load()
    if threads:
        settings = {**settings, "engine.threads": threads}
    host = host or settings["node.host"]
    port = settings["node.port"] if port is None else port
    home = config.ensure_home()
    token_file = home / "api_token"
    check_bind(host, token_file)
    names = model or [settings["models.default"]]
    if split == ["auto"]:
        from forge_cli import identity
        from forge_cli.root.rpc import find_lenders

        split = find_lenders(identity.load_or_create().node_id, settings)
    if pull:
        for name in names:
            download.ensure_local(name)
    node_ = build_node(settings, models=names,
                       ledger_path=config.ledger_path(ledger), mesh=mesh,
                       interfaces=interfaces, peers=peers, split=split)
    signer, models = node_.signer, list(node_.models.values())

    def announce(site, ollama=None) -> None:  # noqa: ANN001
        url = _url(site)
        offload = {m.name: m.engine.gpu_offload for m in models}
        lines = [
            f"forge node listening on {url}",
            f"  node id   {signer.node_id}",
            *(f"  model     {m.name}  ({m.params:,} params, sha256 {m.sha256[:16]}…, "
              f"gpu offload {'on' if offload[m.name] else 'off'}, {_engine_line(m.engine)})"
              for m in models),
            *(split_lines(m.engine.describe()["split"]) for m in models
              if "split" in m.engine.describe()),
            f"  token     {token_file}  (operator; consumers need agent tokens)",
            f"  ledger    {node_.ledger.path}  ({node_.ledger.size} entries)",
            f"  mesh      {node_.mesh.describe() if node_.mesh else 'off (start with --mesh)'}",
            *([f"  gossip    {node_.gossip.describe()}; network view {node_.network.path}"]
              if node_.gossip else []),
            f"  docs      {url}/openapi.json   metrics {url}/metrics",
            f"  ollama    {_url(ollama) if ollama else url}/api   (Ollama's API)",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        # Lets `forge safety` on this machine find the node that holds the ledger.
        (home / "node.url").write_text(url + "\n", encoding="utf-8")

    try:
        serve(node_, host, port, announce=announce, ollama_port=ollama_port)
    finally:
        (home / "node.url").unlink(missing_ok=True)


def _url(site) -> str:  # noqa: ANN001
    bound = site._server.sockets[0].getsockname()  # the real port when 0 was asked
    return f"http://{bound[0]}:{bound[1]}"


def split_lines(split: dict) -> str:
    """Which device runs which layer of a split model (layer N is the output layer)."""
    output = split.get("output_layer")

    def named(layers: list[int]) -> str:
        return ",".join("output" if layer == output else str(layer) for layer in layers) or "none"

    lines = [f"  split     head runs layers {named(split['head']['layers'])}"]
    lines += [f"            {p['peer'][:12]}… at {p['url']} runs layers {named(p['layers'])} "
              f"at {p['rate_ucu_per_layer_token']} µCU per layer-token"
              + (f" (lost: {p['lost']})" if p.get("lost") else "") for p in split["peers"]]
    return "\n".join(lines)


def _engine_line(engine) -> str:  # noqa: ANN001
    """`2 threads, 4 slots × 4096 tokens in 2 lanes` (and why requests run one at a time, if
    they do)."""
    line = (f"{engine.n_threads} threads, {engine.slots} slots × {engine.n_ctx} tokens"
            f"{f' in {lanes} lanes' if (lanes := getattr(engine, 'lanes', 1)) > 1 else ''}")
    reason = engine.slots_note
    return f"{line}; {reason}" if reason else line
