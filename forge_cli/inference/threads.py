"""How many threads and sequence slots the engine uses when the operator does not say.

Generation runs on the physical cores this process may use (SMT siblings share one core's
arithmetic units and caches, so a second thread per core only contends), capped by a cgroup
CPU quota. llama-cpp-python's own default of half the logical CPUs halves throughput on a
2-core machine.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

# Sequences decoded together when the operator does not choose (engine.slots = 0). Every
# slot holds a full context of KV cache, so slots cost memory in proportion; on a CPU, 4
# keeps that modest for the 1-8B models people serve while letting 4 buyers share each
# step. What a step of several rows saves depends on llama.cpp's kernels for the model's
# weight types: on this project's shared 2-core x86 VM a raw llama_decode of 4 rows measured
# 1.15-1.3x the tokens/s of one row, and of 8 rows 1.3-2x (bench/engine_bench.py prints it
# beside the node's figures). A GPU batches dozens of rows almost for free, so it gets more.
CPU_SLOTS = 4
GPU_SLOTS = 8


def physical_cores() -> int:
    """Physical cores available to this process (at least 1)."""
    found = _linux_cores() if sys.platform.startswith("linux") else None
    if found is None and sys.platform == "darwin":
        found = _darwin_cores()
    if found is None:
        found = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(found, quota) if quota else found)


def default_threads() -> int:
    """`engine.threads = 0`: one thread per physical core."""
    return physical_cores()


def default_threads_batch(n_threads: int) -> int:
    """`engine.threads_batch = 0`: the same as the generation threads.

    llama.cpp runs any decode of more than one token (prompt chunks, and every step that
    carries several sequences) on the batch threads, so with continuous batching they drive
    generation too; past the physical cores extra threads only contend. This is also what
    llama.cpp's own tools do.
    """
    return n_threads


def default_slots(gpu_offload: bool) -> int:
    """`engine.slots = 0`: how many sequences share one context."""
    return GPU_SLOTS if gpu_offload else CPU_SLOTS


def _linux_cores() -> int | None:
    """Distinct cores among the CPUs this process may run on (SMT siblings counted once)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    cores: set[str] = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                cores.add((topology / name).read_text().strip())
                break
            except OSError:
                continue
        else:
            cores.add(str(cpu))  # no topology (some containers): count the CPU itself
    return len(cores) or None


def _darwin_cores() -> int | None:
    """Performance cores on Apple silicon (efficiency cores slow a shared decode down),
    otherwise the physical cores."""
    for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
        try:
            out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True,
                                 timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out.isdigit() and int(out) > 0:
            return int(out)
    return None


def _cgroup_quota() -> int | None:
    """CPUs a cgroup v2 quota allows (`cpu.max` of "200000 100000" is 2), if one is set."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


__all__ = ["CPU_SLOTS", "GPU_SLOTS", "default_slots", "default_threads",
           "default_threads_batch", "physical_cores"]
