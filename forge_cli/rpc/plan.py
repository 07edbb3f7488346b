"""Layer planning for a split model: which layers the head keeps and which each layer peer runs,
as llama.cpp will place them for the `n_gpu_layers` and `tensor_split` the plan gives it, and the
check that it did (the terms agreed with each peer pay for exactly the layers it runs)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from forge_cli.errors import ModelError, UsageError


@dataclass
class Plan:
    """Which device runs which layer: layer `n_layer` is the output layer. The head keeps the
    input embeddings and the first layers; the peers run the rest, the last one the output."""

    n_layer: int
    n_gpu_layers: int
    tensor_split: list[float]
    head: list[int]
    peers: list[list[int]]

    def check(self, assigned: dict[int, str]) -> None:
        """ModelError unless llama.cpp put the layers where the plan (and the terms agreed
        from it) says: `assigned` is layer → device ("CPU", "RPC0", …) from its load log."""
        if not assigned:
            return  # this llama.cpp does not log placements: the plan stands
        planned = {layer: "CPU" for layer in self.head}
        planned.update({layer: f"RPC{i}" for i, layers in enumerate(self.peers)
                        for layer in layers})
        if assigned != planned:
            raise ModelError(f"llama.cpp placed the layers as {_by_device(assigned)}, not as "
                             f"planned ({_by_device(planned)}), so the terms agreed with the "
                             "peers would not pay what they run")


def _by_device(assigned: dict[int, str]) -> str:
    devices: dict[str, list[int]] = {}
    for layer, device in sorted(assigned.items()):
        devices.setdefault(device, []).append(layer)
    return "; ".join(f"{device} {','.join(map(str, layers))}" for device, layers in devices.items())


def plan_layers(n_layer: int, head_mb: int, peers_mb: list[int]) -> Plan:
    """Layers split by free memory between the head and its peers, as llama.cpp assigns them
    for the `n_gpu_layers` and `tensor_split` returned: the last `n_gpu_layers` layers (output
    included) go to the devices, cut where the cumulative shares cross (load_tensors)."""
    import numpy as np

    units = n_layer + 1
    if len(peers_mb) >= units:
        raise UsageError(f"the model has {n_layer} layers: too few to give each of "
                         f"{len(peers_mb)} peers one and keep one on the head")
    total = max(1, head_mb + sum(peers_mb))
    head_units = min(max(1, round(units * head_mb / total)), units - len(peers_mb))
    n_gpu = units - head_units
    shares = [float(max(1, mb)) for mb in peers_mb]
    cumulative = np.cumsum(np.array(shares, dtype=np.float32))
    splits = [float(x) for x in cumulative / cumulative[-1]]
    start = max(units - n_gpu, 0)
    head, peers = [], [[] for _ in peers_mb]  # type: list[int], list[list[int]]
    for layer in range(units):
        if layer < start or layer - start >= n_gpu:
            head.append(layer)
            continue
        at = float(np.float32(layer - start) / np.float32(n_gpu))
        peers[min(bisect.bisect_right(splits, at), len(peers) - 1)].append(layer)
    if any(not layers for layers in peers):  # memories too uneven: share the layers evenly
        if shares != [1.0] * len(shares):
            return plan_layers(n_layer, 1, [1] * len(peers_mb))
        raise UsageError(f"the model's {n_layer} layers cannot give each of {len(peers_mb)} "
                         "peers one")
    return Plan(n_layer, n_gpu, shares, head, peers)


__all__ = ["Plan", "plan_layers"]
