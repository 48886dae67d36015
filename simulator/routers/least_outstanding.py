"""Least outstanding requests: the replica with the fewest requests queued or running (join-the-shortest-queue;
Vidur's ``lor`` global scheduler)."""


def route(request, loads, seq: int) -> int:
    return min(loads, key=lambda x: (x.num_requests, x.index)).index
