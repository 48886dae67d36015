"""servesim's simulator: requests, batch plans, the paged KV cache, scheduling policies and one replica on SimPy.

``simulate(config)`` runs one replica and returns a ``SimResult``. torch is never imported here.
"""
from simulator.config import SimConfig, load_config
from simulator.plan import BatchPlan
from simulator.request import Request
from simulator.simulation import SimResult, simulate

__all__ = ["BatchPlan", "Request", "SimConfig", "SimResult", "load_config", "simulate"]
