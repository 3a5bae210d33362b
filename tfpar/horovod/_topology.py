"""Ranks, hosts and local/cross ranks from the cluster's task list (pure Python, no TensorFlow).

A MultiWorkerMirroredStrategy's processes are the ``chief`` task (if any) and the ``worker``
tasks, in that order (TensorFlow's ``id_in_cluster``). Horovod's local rank is a process's rank
among the processes on its host; its cross rank is its rank among the processes that have its
local rank (one per host), and the cross size is how many there are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

__all__ = ["Topology", "host_of", "ordered_tasks", "topology"]


@dataclasses.dataclass(frozen=True)
class Topology:
    """Horovod's numbers for this process."""

    size: int
    rank: int
    local_size: int
    local_rank: int
    cross_size: int
    cross_rank: int
    is_homogeneous: bool


def ordered_tasks(cluster: Mapping[str, Sequence[str]]) -> list[tuple[str, int, str]]:
    """``(task type, index, address)`` of the processes that all-reduce, in TensorFlow's order."""
    tasks = [("chief", i, address) for i, address in enumerate(cluster.get("chief", ()))]
    return tasks + [("worker", i, address) for i, address in enumerate(cluster.get("worker", ()))]


def host_of(address: str) -> str:
    """The host of ``host:port`` (``[::1]:port`` too)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def topology(hosts_by_rank: Sequence[str], rank: int) -> Topology:
    """Horovod's size, ranks and local/cross numbers, given the host of every rank.

    Example:
    >>> topology(["a", "a", "b", "b"], 3)
    Topology(size=4, rank=3, local_size=2, local_rank=1, cross_size=2, cross_rank=1, is_homogeneous=True)
    """
    host = hosts_by_rank[rank]
    local_ranks = []
    seen: dict[str, int] = {}
    for other in hosts_by_rank:
        local_ranks.append(seen.get(other, 0))
        seen[other] = seen.get(other, 0) + 1
    local_rank = local_ranks[rank]
    same_local_rank = [r for r, lr in enumerate(local_ranks) if lr == local_rank]
    return Topology(
        size=len(hosts_by_rank),
        rank=rank,
        local_size=seen[host],
        local_rank=local_rank,
        cross_size=len(same_local_rank),
        cross_rank=same_local_rank.index(rank),
        is_homogeneous=len(set(seen.values())) == 1,
    )
