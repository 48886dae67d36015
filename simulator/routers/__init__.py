"""Global routers: which replica an arriving request goes to. One file per policy; ``ROUTERS`` maps the CLI name
(``--router``) to the policy's ``route`` function.

A router is a plain function ``route(request, loads, seq) -> index`` of the replicas' load snapshot: ``loads`` is a
list of ``ReplicaLoad`` (one per replica of the pool, in index order), ``seq`` the request's arrival sequence
number in this pool (0, 1, ...). It returns the index of the chosen replica; ties go to the lowest index. A router
only chooses: it never changes a replica or a request.
"""
from simulator.routers.kv_aware import route as kv_aware
from simulator.routers.least_outstanding import route as least_outstanding
from simulator.routers.least_tokens import route as least_tokens
from simulator.routers.load import ReplicaLoad
from simulator.routers.prefix_affinity import route as prefix_affinity
from simulator.routers.round_robin import route as round_robin

ROUTERS = {
    "round-robin": round_robin,
    "least-outstanding": least_outstanding,
    "least-tokens": least_tokens,
    "kv-aware": kv_aware,
    "prefix-affinity": prefix_affinity,
}

__all__ = ["ROUTERS", "ReplicaLoad"]
