"""`build_node(settings)`: the one place a node is wired — ledger, safety, wallet, lending,
markets, engines, network view and, with the mesh, discovery and gossip. `forge node`,
`forge seed`, the demo (through `forge node`) and bench/ all build their node here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from forge_cli.root.node import LoadedModel, Node, ms_now


def load_models(names: list[str], *, n_ctx: int, queue: int = 16, threads: int = 0,
                threads_batch: int = 0, slots: int = 0, lanes: int = 0,
                split: list[str] | None = None, signer: Any = None,
                stall_s: int = 120) -> list[LoadedModel]:
    """Resolve and load each model (catalog name, hf.co reference or .gguf path).

    `threads`, `threads_batch`, `slots` and `lanes` of 0 leave the choice to the engine;
    `split` names layer peers the (one) model is split with, the head signing as `signer`."""
    from forge_cli.inference import catalog, gguf_meta
    from forge_cli.inference.engine import Engine

    loaded = []
    for name in names:
        ref, path = catalog.find_model_file(name)
        # A local file is served under its file name: the path is the operator's business.
        model_id = path.name if ref.kind == "path" else ref.name
        engine: Engine | SplitEngine
        if split:
            from forge_cli.rpc.split import SplitEngine

            engine = SplitEngine(path, name=model_id, urls=split, signer=signer, n_ctx=n_ctx,
                                 queue_size=queue, n_threads=threads or None,
                                 n_threads_batch=threads_batch or None, slots=slots or None,
                                 stall_s=stall_s, load=False)  # loaded by attach: paid as it goes
        else:
            engine = Engine(path, name=model_id, n_ctx=n_ctx, queue_size=queue,
                            n_threads=threads or None, n_threads_batch=threads_batch or None,
                            slots=slots or None, lanes=lanes or None)
        params = ref.params or gguf_meta.read_info(path).n_params
        loaded.append(LoadedModel(model_id, engine, engine.sha256, params, path))
    return loaded


def build_node(settings: Mapping[str, Any], *, models: list[str] | list[LoadedModel],
               ledger_path: Path | None = None, mesh: bool = False,
               interfaces: list[str] | None = None, peers: list[str] | None = None,
               clock: Callable[[], int] | None = None, split: list[str] | None = None) -> Node:
    """A node over FORGE_HOME as `settings` (config.load()) describe it.

    `models` are names to load or models already loaded; `mesh` joins the mesh (mDNS on
    `interfaces`, plus static `peers`); `split` names layer peers the model is split with."""
    from forge_cli import config, identity
    from forge_cli.economy.accounts import Accounts, operator_token
    from forge_cli.economy.lending import Lending
    from forge_cli.economy.pricing import Market
    from forge_cli.economy.safety import BreakerRules, Policy, Safety
    from forge_cli.ledger.store import Ledger
    from forge_cli.mesh.network import NetworkView
    from forge_cli.trade.wallet import StrangerRules, Wallet

    home = config.ensure_home()
    clock = clock or ms_now
    signer = identity.load_or_create()
    loaded = [m for m in models if isinstance(m, LoadedModel)] or load_models(
        [str(m) for m in models], n_ctx=settings["models.n_ctx"], queue=settings["node.queue"],
        threads=settings["engine.threads"], threads_batch=settings["engine.threads_batch"],
        slots=settings["engine.slots"], lanes=settings["engine.lanes"], split=split,
        signer=signer, stall_s=settings["rpc.stall_s"])
    path = ledger_path or config.ledger_path(None)
    ledger = Ledger.open_writer(path, signer)
    try:
        reader = Ledger.open_reader(path)
        safety = Safety(ledger, clock=clock, defaults=Policy.from_config(),
                        breaker=BreakerRules.from_config(),
                        approval_ttl_ms=settings["safety.approval_ttl_s"] * 1000)
    except BaseException:
        ledger.close()
        raise
    node = Node(home=home, ledger=ledger, reader=reader, signer=signer, models=loaded,
                accounts=Accounts(home), operator_token=operator_token(home), safety=safety,
                clock=clock,
                ledger_thread=ThreadPoolExecutor(1, thread_name_prefix="forge-ledger"),
                settle_ms=settings["mesh.settle_s"] * 1000,
                max_unsettled=settings["mesh.max_unsettled"],
                audit_every=settings["audit.every"],
                rechecks_per_minute=settings["audit.rechecks_per_minute"],
                recheck_queue=settings["audit.recheck_queue"],
                trust_s=settings["mesh.trust_s"])
    node.wallet = Wallet(ledger, safety, node.on_ledger, clock=clock, reader=reader,
                         strangers=StrangerRules.from_config())
    for model in loaded:  # a split model pays its layer peers through the node's wallet
        attach = getattr(model.engine, "attach", None)
        if attach is not None:
            attach(node)
    node.lending = Lending(ledger, safety, clock=clock, host=node.node_id, wallet=node.wallet)
    node.markets = {name: Market() for name in node.models}
    # Every verified dual-signed trade: ours (followed from the ledger) and gossiped ones.
    node.network = NetworkView.open(home / "network.db")
    node.network.follow(ledger)
    node.metrics.ledger_size.set(ledger.size)
    ledger.listeners.append(node.appended)
    if mesh:
        from forge_cli.mesh.discovery import Mesh, Offer
        from forge_cli.mesh.gossip import Gossip

        node.mesh = Mesh(node.node_id, lambda: [Offer.from_json(o) for o in node.offers()],
                         interfaces=interfaces or settings["mesh.interfaces"],
                         static_peers=[*settings["mesh.peers"], *(peers or [])],
                         mdns=settings["mesh.mdns"], probe_s=settings["mesh.probe_s"],
                         expire_s=settings["mesh.expire_s"])
        refused = node.metrics.gossip_refused
        node.gossip = Gossip(node.network, node.mesh, round_s=settings["mesh.gossip_s"],
                             batch=settings["mesh.gossip_batch"],
                             source_quota=settings["mesh.gossip_source_quota"],
                             max_trades=settings["mesh.gossip_max_trades"],
                             on_refused=lambda reason, n: refused.labels(reason).inc(n),
                             rank=node.trust_rank)
        from forge_cli.mesh.witnesses import Witnesses

        node.gossip.witnesses = Witnesses(node)
    return node


__all__ = ["build_node", "load_models"]
