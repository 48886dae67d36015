"""servesim's simulator: requests, the paged KV cache, scheduling policies, replicas with pipeline stages,
clusters with routers and prefill/decode disaggregation, on one SimPy clock.

``simulate(config)`` runs a deployment and returns a ``SimResult``. torch is never imported here.
"""
from cost_models.plan import BatchPlan
from simulator.config import SimConfig, load_config
from simulator.request import Request
from simulator.simulation import SimResult, simulate

__all__ = ["BatchPlan", "Request", "SimConfig", "SimResult", "load_config", "simulate"]
