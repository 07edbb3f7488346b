"""`forge rpc serve`: lend this machine's memory and cores to a head that splits one model
across machines (llama.cpp's RPC backend, behind forge's authenticated tunnel)."""

from __future__ import annotations

import sys

import typer

from forge_cli import config
from forge_cli.cli.node_cmd import InterfaceOpt

app = typer.Typer(help="Split one model across machines: serve layers to a head.",
                  no_args_is_help=True)


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address the tunnel listens on (ggml's own server always "
                             "binds 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", "-p", min=0, max=65535,
                                    help="Tunnel port [default: rpc.port]; 0 picks a free one."),
    threads: int | None = typer.Option(None, "--threads", min=1, max=1024,
                                       help="Threads the layers run on [default: "
                                       "engine.threads; 0 there means one per physical core]."),
    memory: int | None = typer.Option(None, "--memory", min=1, max=config.INT_MAX,
                                      help="MiB offered to heads [default: rpc.memory_mb; 0 "
                                      "there means what the machine has available]."),
    rate: int | None = typer.Option(None, "--rate", min=0, max=config.INT_MAX,
                                    help="µCU charged per layer per token run, prompt or "
                                    "generated [default: rpc.rate_ucu]."),
    mesh: bool = typer.Option(False, "--mesh", help="Advertise on the mesh (mDNS TXT: "
                              "role layer-peer, free memory) for heads started with --split auto."),
    interface: list[str] = InterfaceOpt,
) -> None:
    """Serve model layers to a head (`forge node -m MODEL --split URL`), paid per layer-token.

    ggml's RPC server runs inside this process on 127.0.0.1 only; heads reach it through the
    tunnel on --port after a signed handshake over terms this peer issued. Each generation the
    head pays layers × tokens × rate in a dual-signed trade recorded in both ledgers; a head
    that does not pay gets at most rpc.credit_kib of tunnel traffic per agreement.
    """
    from forge_cli.inference.threads import default_threads
    from forge_cli.node.app import serve as serve_app
    from forge_cli.root.build import build_node
    from forge_cli.root.rpc import layer_peer_app
    from forge_cli.rpc import ggml
    from forge_cli.rpc.peer import LayerPeer

    ggml.require_rpc()
    settings = config.load()
    home = config.ensure_home()
    node = build_node(settings, models=[])
    peer = LayerPeer(node, rate=settings["rpc.rate_ucu"] if rate is None else rate,
                     memory_mb=memory or settings["rpc.memory_mb"],
                     threads=threads or settings["engine.threads"] or default_threads(),
                     terms_ms=settings["rpc.terms_s"] * 1000, cache_dir=home / "rpc-cache",
                     credit_bytes=settings["rpc.credit_kib"] * 1024,
                     bytes_per_layer_token=settings["rpc.layer_token_kib"] * 1024,
                     idle_s=settings["rpc.idle_s"])
    try:
        endpoint = peer.start_ggml()
    except BaseException:
        node.close()
        raise
    if mesh:
        from forge_cli.mesh.discovery import Mesh

        node.mesh = Mesh(node.node_id, lambda: [], interfaces=interface or settings["mesh.interfaces"],
                         mdns=settings["mesh.mdns"], probe_s=settings["mesh.probe_s"],
                         expire_s=settings["mesh.expire_s"],
                         txt=lambda: {"role": "layer-peer", "free_mb": str(peer.free_mb())})

    def announce(site) -> None:  # noqa: ANN001
        import ctypes

        # ggml's server writes its own lines through C's stdio buffer: out with them first, so
        # the banner below is whole lines that scripts (and the tests) can read.
        ctypes.CDLL(None).fflush(None)
        bound = site._server.sockets[0].getsockname()
        url = f"http://{bound[0]}:{bound[1]}"
        sys.stdout.write("\n".join([
            f"forge rpc serve listening on {url}",
            f"  node id   {node.node_id}",
            f"  ggml rpc  {endpoint} (loopback only; reached through the tunnel)",
            f"  offers    {peer.free_mb():,} MiB, {peer.threads} threads, "
            f"{peer.rate} µCU per layer-token",
            f"  credit    {peer.credit_bytes // 1024:,} KiB unpaid per agreement; each paid "
            f"layer-token buys {peer.bytes_per_layer_token // 1024:,} KiB; idle tunnels closed "
            f"after {peer.idle_s} s",
            f"  cache     {peer.cache_dir}",
            f"  ledger    {node.ledger.path}  ({node.ledger.size} entries)",
            f"  mesh      {node.mesh.describe() if node.mesh else 'off (advertise with --mesh)'}",
        ]) + "\n")
        sys.stdout.flush()

    serve_app(node, host, settings["rpc.port"] if port is None else port, announce=announce,
              app=layer_peer_app(peer))
