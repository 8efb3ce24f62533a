"""SecAgg+'s round parameters as privrec sets them: the same function on the server (which sends them)
and on every device (which checks what it received before it trains or helps unmask)."""

from __future__ import annotations


def share_count(nodes: int, neighbours: int) -> float | int:
    """The ``num_shares`` privrec gives Flower's workflow: everyone (1.0) or an odd neighbourhood of
    ``neighbours`` others plus the node itself (Flower mishandles an even integer)."""
    if neighbours <= 0:
        return 1.0
    size = neighbours + 1 if neighbours % 2 == 0 else neighbours + 2
    return 1.0 if size >= nodes else size


def neighbourhood(nodes: int, neighbours: int) -> int:
    """The neighbourhood size (the node included) Flower's workflow derives from :func:`share_count`."""
    shares = share_count(nodes, neighbours)
    if isinstance(shares, float):
        size = round(shares * nodes)
        if size < nodes and size % 2 == 0:
            size += 1
        return nodes if size <= 2 else size
    return shares


def reconstruction_threshold(share_num: int, fraction: float, nodes: int | None = None) -> int:
    """SecAgg+'s reconstruction threshold: ``fraction`` of the neighbourhood, and always a strict majority
    of it (so that two disjoint groups of honest devices cannot each rebuild a secret of the same device).
    In a sparse graph (a neighbourhood smaller than the round) Flower needs it below the neighbourhood
    size, which still leaves a strict majority for neighbourhoods of three or more."""
    threshold = max(2, share_num // 2 + 1, round(fraction * share_num))
    if nodes is not None and share_num < nodes:
        threshold = min(threshold, share_num - 1)
    return threshold
