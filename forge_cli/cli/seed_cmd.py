"""`forge seed`: a node that joins the mesh to sell inference (`forge node --mesh`)."""

from __future__ import annotations

from pathlib import Path

from forge_cli.cli.node_cmd import (
    HostOpt,
    InterfaceOpt,
    LedgerOpt,
    ModelOpt,
    NoPullOpt,
    PeerOpt,
    PortOpt,
    ThreadsOpt,
    run_node,
)


def seed(
    model: list[str] = ModelOpt,
    host: str | None = HostOpt,
    port: int | None = PortOpt,
    ledger: Path | None = LedgerOpt,
    interface: list[str] = InterfaceOpt,
    peer: list[str] = PeerOpt,
    no_pull: bool = NoPullOpt,
    threads: int | None = ThreadsOpt,
) -> None:
    """Sell inference on the mesh: serve MODEL, advertise it over mDNS and find peers.

    The same node as `forge node --mesh`. The interfaces it advertises on are printed at
    start-up; use --peer URL where the network blocks multicast.
    """
    run_node(model, host, port, ledger, mesh=True, interfaces=interface, peers=peer,
             pull=not no_pull, threads=threads)
