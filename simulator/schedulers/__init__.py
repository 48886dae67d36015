"""Scheduling policies, one per file. ``SCHEDULERS`` maps the CLI name to the class."""
from simulator.schedulers.base import Scheduler
from simulator.schedulers.fastertransformer import FasterTransformerScheduler
from simulator.schedulers.orca import OrcaScheduler
from simulator.schedulers.sarathi import SarathiScheduler
from simulator.schedulers.vllm import VLLMScheduler

SCHEDULERS = {
    "vllm": VLLMScheduler,
    "orca": OrcaScheduler,
    "sarathi": SarathiScheduler,
    "fastertransformer": FasterTransformerScheduler,
}

__all__ = ["SCHEDULERS", "Scheduler", "VLLMScheduler", "OrcaScheduler", "SarathiScheduler",
           "FasterTransformerScheduler"]
