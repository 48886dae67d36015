"""Engine overhead: the per-iteration time a serving engine spends outside the model's GPU kernels.

Scheduling, input preparation, sampling, output processing, RPC to the workers and — for engines that run the model
eagerly — Python and kernel-launch time the GPU waits for. The roofline (``cost_models.roofline``) prices the GPU
kernels; this term is added once per iteration (``breakdown()`` key ``cpu_overhead``; with pipeline parallelism
``CPU_OVERHEAD_FIRST_STAGE`` of it on the first stage, the rest on the last). It depends on the *engine being
simulated*, not on the GPU, so it is chosen by name: ``RooflineCostModel(..., engine="sarathi-serve-2024")``.

Form (every profile)::

    engine_overhead_s = (fixed_s + per_seq_s x B + per_token_s x T) x (tp / measured_tp) ** tp_exponent

B = sequences scheduled in the iteration (``len(plan.num_new_tokens)``), T = tokens computed
(``sum(plan.num_new_tokens)``), tp = tensor-parallel degree. Every profile below was measured or estimated at one TP
degree only (``measured_tp``) — none of the public data holds the same engine at several TP degrees with the GPU time
known — so ``tp_exponent`` is 0 (the overhead is applied unchanged at other TP degrees); the field is there for a
profile fitted to data that has them.

Profiles (``PROFILES``; the fitted numbers are generated into ``cost_models/calibration.py`` ``ENGINE_FITS`` by
``experiments/calibrate_roofline.py``, which documents each fit and its residuals):

- ``vidur-vllm-2023`` (the default: what the roofline charged before the engine term existed): Vidur's measured CPU
  overhead of its vLLM-v0-era engine (Agrawal et al., MLSys'24; ``cpu_overheads.csv`` of microsoft/vidur commit
  e2d00e9, CodeLlama-34B TP2 on A100): schedule + sampler + prepare inputs + process outputs medians at batch 8-128,
  the least-squares line in B.
- ``sarathi-serve-2024``: the Sarathi-Serve artifact's engine (microsoft/sarathi-serve ``osdi-sarathi-serve``, on
  vLLM v0, eager PyTorch, Ray workers): fitted to its measured Yi-34B TP2 batch times on 2xA100-80GB-PCIe as
  measured time − the calibrated roofline's GPU time, least squares in relative error of the batch time,
  coefficients >= 0. It reproduces those batch benchmarks (figure-2, table-2), but its ~1.1 ms per sequence does
  not show in the artifact's own end-to-end run (Table 4: Yi-34B, openchat, QPS 1, chunk 512, measured P99 TBT
  0.14 s; servesim on the built-in sharegpt trace: 0.23 s with this profile, 0.14 s with ``vidur-vllm-2023``):
  use it to reproduce the batch times, not as a serving default.
- ``vllm-0.32``: today's vLLM (v1 engine, CUDA graphs, async scheduling): fitted to the newest public end-to-end
  measurement of the v1 engine, AIConfigurator's vLLM 0.12.0 Qwen3-32B TP2 bf16 TPOT on H100-SXM (a closed-loop
  benchmark modelled in ``experiments/calibrate_aic.py``) given the H100 roofline calibrated on TRT-LLM. No
  measurement of 0.32 itself is public: the profile assumes 0.32 is no heavier than 0.12 (an estimate, said in its
  ``source``).
- ``trtllm-1.0``: TensorRT-LLM 1.0 (C++ runtime, CUDA graphs), fitted jointly with the H100 calibration on
  AIConfigurator's TRT-LLM 1.0.0rc3 Llama-3.1-8B TP1 TPOT.
- ``none``: 0, for cost models whose profile already times the engine, or CPU-profile fitted models.

Errors: ``EngineProfileError`` (a ValueError), one line naming the unknown profile and the known ones, or the field.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


class EngineProfileError(ValueError):
    """An unknown engine profile name, or a malformed profile."""


@dataclass(frozen=True)
class EngineProfile:
    """One engine's per-iteration overhead (seconds) and where its numbers come from.

    Attributes:
        name: the profile's name (``PROFILES`` key).
        fixed_s: seconds per iteration.
        per_seq_s: seconds per scheduled sequence.
        per_token_s: seconds per computed token.
        measured_tp: the tensor-parallel degree the numbers were measured at.
        tp_exponent: the overhead scales as ``(tp / measured_tp) ** tp_exponent`` (0: TP-independent).
        measured: True when the numbers are fitted to measurements of this engine, False for an estimate
            (``vllm-0.32``: fitted to vLLM 0.12.0's, with its ``median_abs_error`` there).
        source: the engine, the data and the method, one paragraph.
        median_abs_error: median absolute % error of the fit on its data (None for an estimate).
    Raises EngineProfileError for a negative coefficient or a non-positive ``measured_tp``.
    """

    name: str
    fixed_s: float
    per_seq_s: float
    per_token_s: float = 0.0
    measured_tp: int = 1
    tp_exponent: float = 0.0
    measured: bool = False
    source: str = ""
    median_abs_error: float | None = None

    def __post_init__(self):
        for key in ("fixed_s", "per_seq_s", "per_token_s"):
            if not getattr(self, key) >= 0:
                raise EngineProfileError(f"engine profile {self.name!r}: {key} must be >= 0, "
                                         f"got {getattr(self, key)!r}")
        if not self.measured_tp >= 1:
            raise EngineProfileError(f"engine profile {self.name!r}: measured_tp must be >= 1, "
                                     f"got {self.measured_tp!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: name, the formula with its numbers in ms, and whether measured."""
        parts = [f"{self.fixed_s * 1e3:.4g} ms"]
        if self.per_seq_s:
            parts.append(f"{self.per_seq_s * 1e3:.4g} ms/sequence")
        if self.per_token_s:
            parts.append(f"{self.per_token_s * 1e6:.4g} us/token")
        kind = "measured" if self.measured else "estimate"
        err = f", median error {self.median_abs_error:.1f}%" if self.median_abs_error is not None else ""
        return f"{self.name}: {' + '.join(parts)} per iteration ({kind}{err})"


def _fits() -> dict:
    try:
        from cost_models.calibration import ENGINE_FITS
    except ImportError:          # calibration.py not generated yet (experiments/calibrate_roofline.py writes it)
        return {}
    return ENGINE_FITS


#: Used only while cost_models/calibration.py holds no fit of the default profile (a fresh checkout before
#: experiments/calibrate_roofline.py has run): the line through Vidur's cpu_overheads.csv at 8 and 128 sequences
#: (1.15 ms and 5.8 ms; Agrawal et al., MLSys'24), marked as an estimate.
_BOOTSTRAP = {"vidur-vllm-2023": {"fixed_s": 0.85e-3, "per_seq_s": 0.039e-3, "measured_tp": 2}}


def _fitted(name: str, source: str, **fixed) -> EngineProfile | None:
    fit = _fits().get(name)
    if fit is None:
        boot = _BOOTSTRAP.get(name)
        if boot is None:
            return None
        return EngineProfile(name=name, measured=False, source="first estimate (cost_models/calibration.py has no "
                             "fit): the line through Vidur's cpu_overheads at 8 and 128 sequences", **boot)
    numbers = {k: fit[k] for k in ("fixed_s", "per_seq_s", "per_token_s", "measured_tp", "median_abs_error")
               if k in fit}
    return EngineProfile(**{"name": name, "measured": True, "source": source, **numbers, **fixed})


_SOURCES = {
    "vidur-vllm-2023": (
        "Vidur (Agrawal et al., MLSys'24) cpu_overheads.csv (microsoft/vidur legacy-e2d00e9; CodeLlama-34B TP2 on "
        "A100, Vidur's vLLM-v0-era engine): schedule + sampler_e2e + prepare_inputs_e2e + process_model_outputs "
        "medians at batch 8-128, least-squares line in B (Ray RPC and model execution excluded); fit in "
        "cost_models/calibration.py"),
    "sarathi-serve-2024": (
        "Sarathi-Serve artifact (microsoft/sarathi-serve osdi-sarathi-serve, Agrawal et al., OSDI'24; on vLLM v0, "
        "eager PyTorch, Ray workers): measured Yi-34B TP2 batch times on 2xA100-80GB-PCIe (figure-2 prefill/decode, "
        "table-2) minus the calibrated A100-80GB-PCIe roofline's GPU time, least squares in relative error of the "
        "batch time, coefficients >= 0; all decodes are at ~1k context, so a per-sequence engine cost cannot be told "
        "apart from decode attention slower than the roofline's; fit in cost_models/calibration.py. Caveat: it "
        "reproduces those batch benchmarks, not the artifact's end-to-end Table 4 (Yi-34B, QPS 1, chunk 512: "
        "measured P99 TBT 0.14 s; servesim on its built-in sharegpt trace: 0.23 s with this profile, 0.14 s with "
        "vidur-vllm-2023)"),
    "vllm-0.32": (
        "ESTIMATE for vLLM 0.32 (v1 engine, CUDA graphs, async scheduling): no public measurement of 0.32; fitted to "
        "the newest public one of the v1 engine, AIConfigurator's silicon sample (ai-dynamo/aiconfigurator, "
        "Apache-2.0): vLLM 0.12.0 Qwen3-32B TP2 bf16 TPOT on H100-SXM at concurrency 8-128, through the closed-loop "
        "model of experiments/calibrate_aic.py and the H100 roofline calibrated on TRT-LLM (so kernels slower than "
        "TRT-LLM's land in this term too); 0.32 assumed no heavier than 0.12; fit in cost_models/calibration.py"),
    "trtllm-1.0": (
        "TensorRT-LLM 1.0.0rc3 (C++ runtime, CUDA graphs): fitted jointly with the H100-SXM roofline calibration to "
        "AIConfigurator's silicon sample (ai-dynamo/aiconfigurator, Apache-2.0), Llama-3.1-8B TP1 bf16 TPOT at "
        "concurrency 8-128, through the closed-loop model of experiments/calibrate_aic.py; fit in "
        "cost_models/calibration.py"),
}


def _profiles() -> dict[str, EngineProfile]:
    out = {}
    for name, source in _SOURCES.items():
        # vllm-0.32: fitted to vLLM 0.12's measurements, an estimate for 0.32 itself
        p = _fitted(name, source, **({"measured": False} if name == "vllm-0.32" else {}))
        if p is not None:
            out[name] = p
    out["none"] = EngineProfile("none", 0.0, 0.0, measured=False,
                                source="no engine overhead: the cost model's profile already times the engine, or "
                                       "a CPU profile has no separate engine to charge for")
    return out


#: Named engine profiles (see the module docstring). Fitted ones are absent until calibration.py is generated.
PROFILES: dict[str, EngineProfile] = _profiles()
#: The profile ``RooflineCostModel`` uses without ``engine=``: the overhead the roofline charged before this term
#: existed, so the capacity baseline (``servesim regress``) is unchanged.
DEFAULT_ENGINE = "vidur-vllm-2023"


def known_engines() -> list[str]:
    return sorted(PROFILES)


def get_engine(engine) -> EngineProfile:
    """The EngineProfile for a profile name or an EngineProfile (returned as is); None means ``DEFAULT_ENGINE``.

    Raises EngineProfileError (one line) for an unknown name or another type."""
    if engine is None:
        engine = DEFAULT_ENGINE
    if isinstance(engine, EngineProfile):
        return engine
    if isinstance(engine, str):
        found = PROFILES.get(engine) or PROFILES.get(engine.lower())
        if found is None:
            hint = "" if _fits() else (" (fitted profiles need cost_models/calibration.py: run "
                                       "experiments/calibrate_roofline.py)")
            raise EngineProfileError(f"unknown engine profile {engine!r}; known: {', '.join(known_engines())}{hint}")
        return found
    raise EngineProfileError(f"engine must be a profile name or an EngineProfile, got {type(engine).__name__}")


def engine_overhead_s(profile, batch_size: int, num_tokens: int, tp: int = 1) -> float:
    """Seconds of engine overhead of one iteration (see the module docstring for the form and its sources).

    Args:
        profile: a profile name (``PROFILES``) or an EngineProfile.
        batch_size: sequences scheduled in the iteration (B >= 0).
        num_tokens: tokens computed in the iteration (T >= 0).
        tp: tensor-parallel degree (>= 1).
    Raises EngineProfileError for an unknown profile, ValueError for a negative count or tp < 1.
    """
    p = get_engine(profile)
    if batch_size < 0 or num_tokens < 0:
        raise ValueError(f"engine_overhead_s: batch_size and num_tokens must be >= 0, got {batch_size}, {num_tokens}")
    if tp < 1:
        raise ValueError(f"engine_overhead_s: tp must be >= 1, got {tp}")
    t = p.fixed_s + p.per_seq_s * batch_size + p.per_token_s * num_tokens
    if p.tp_exponent:
        t *= (tp / p.measured_tp) ** p.tp_exponent
    return t


def constants_profile(fixed_s: float, per_seq_s: float, source: str) -> EngineProfile:
    """A profile from ``RooflineConstants.iteration_overhead_s`` / ``iteration_overhead_per_seq_s`` set by a caller
    (the roofline's form before the engine term: fixed + per sequence)."""
    return EngineProfile("constants", float(fixed_s), float(per_seq_s), measured=False,
                         source=f"iteration_overhead_s / iteration_overhead_per_seq_s of the constants ({source})")
