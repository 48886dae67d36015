"""servesim's simulator: requests, the paged KV cache, scheduling policies, replicas with pipeline stages,
clusters with routers and prefill/decode disaggregation, on one SimPy clock.

``simulate(config)`` runs a deployment and returns a ``SimResult``. torch is never imported here. The names below
are imported on first use, so ``import simulator.cli`` stays light.
"""
import importlib

_EXPORTS = {"BatchPlan": "cost_models.plan", "Request": "simulator.request", "SimConfig": "simulator.config",
            "load_config": "simulator.config", "SimResult": "simulator.simulation", "simulate": "simulator.simulation"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'simulator' has no attribute {name!r}")
