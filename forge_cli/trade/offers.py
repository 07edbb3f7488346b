"""Who sells what on the mesh, as a buyer sees it: sellers and their offers, ranked for a mode.

Below every channel: forwarding and agent runs (trade/) and the worker (mesh/) pick sellers
with the same rules, and none of them imports the mesh to do it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

MODES = ("cost", "quality", "balanced")


@dataclass(frozen=True)
class Seller:
    """A peer that offers a model, as discovery or the route table found it."""

    node_id: str
    url: str
    model: str
    params: int = 0
    price_ucu_per_token: int = 0
    reputation: int | None = None

    def short(self) -> str:
        return f"{self.node_id[:12]}… at {self.url}"


class Directory(Protocol):
    """The part of the mesh (forge_cli.mesh.discovery.Mesh) that lists peers."""

    node_id: str

    def trusted_peers(self) -> list[Any]: ...


def offered(mesh: Directory, reputation: Callable[[str], int]) -> list[Seller]:
    """Every priced offer of every trusted peer (no flag, a node id no other peer shows, not
    our own), with the reputation this node gives the peer."""
    return [Seller(peer.node_id, peer.url, offer.model, offer.params, offer.price_ucu_per_token,
                   reputation(peer.node_id))
            for peer in mesh.trusted_peers() if peer.node_id != mesh.node_id
            for offer in peer.offers if offer.price_ucu_per_token > 0]


def rank(candidates: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Providers best first: `cost` (cheapest), `quality` (largest model) or `balanced`
    (price per unit of reputation). Each candidate has price_ucu_per_token, params, reputation."""
    key = {"cost": lambda p: (p["price_ucu_per_token"], -(p["reputation"] or 0)),
           "quality": lambda p: (-p["params"], -(p["reputation"] or 0)),
           "balanced": lambda p: (p["price_ucu_per_token"] / max(1, p["reputation"] or 0),
                                  -p["params"])}[mode]
    return sorted(candidates, key=key)


def choose(sellers: list[Seller], mode: str) -> list[Seller]:
    """Sellers best first for `mode` (see rank)."""
    ranked = rank([{"seller": s, "price_ucu_per_token": s.price_ucu_per_token,
                    "params": s.params, "reputation": s.reputation} for s in sellers], mode)
    return [r["seller"] for r in ranked]


__all__ = ["MODES", "Directory", "Seller", "choose", "offered", "rank"]
