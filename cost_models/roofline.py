"""Analytical (roofline) cost model of one iteration of a decoder-only transformer on one replica.

Per layer and operator, time = max(FLOPs / (peak FLOP/s x compute efficiency),
bytes / (memory bandwidth x bandwidth efficiency)) + a kernel launch overhead (Williams et al., "Roofline",
CACM 2009). Operators of one layer (shapes as in vLLM's Llama/Mistral implementation):

==================  ==========================================================  =======================================
operator            FLOPs                                                       bytes moved
==================  ==========================================================  =======================================
input_layernorm     4·T·h                                                       2·T·h + h (elements)
attn_pre_proj (QKV) 2·T·h·(q+2kv)/tp                                            h·(q+2kv)/tp + T·(h + (q+2kv)/tp)
attn_rope           6·T·(q+kv)/tp                                               2·T·(q+kv)/tp
attn_kv_cache_save  0                                                           2·T·2kv/tp
attn_prefill        Σ_chunks 4·(q/tp)·c·(k + (c+1)/2)  (causal; FlashAttention)  Σ_chunks 2·c·q/tp + (k+c)·2kv/tp
                    + one fixed attention-call cost per layer (all chunks go through one varlen kernel call)
attn_decode         Σ_decodes 4·(q/tp)·(k+1)                                     Σ_decodes (k+1)·2kv/tp + 2·q/tp
                    + one fixed attention-call cost per layer (one paged-attention call for all decodes)
attn_post_proj (O)  2·T·(q/tp)·h                                                (q/tp)·h + T·(q/tp + h)
post_attn_layernorm like input_layernorm
mlp_up_proj         2·T·h·m·f/tp  (m = 2 gate+up for SwiGLU, 1 for GELU)         h·m·f/tp + T·(h + m·f/tp)
mlp_act             ~5·T·f/tp                                                   T·(m+1)·f/tp
mlp_down_proj       2·T·(f/tp)·h                                                (f/tp)·h + T·(f/tp + h)
add (2 residuals)   2·T·h                                                       6·T·h
all_reduce (tp>1)   ring all-reduce of T·h elements, 2 per layer (1 for a parallel attention + MLP block, Falcon):
                    2·(tp-1)/tp · bytes / link bandwidth + 2·(tp-1) · link latency (Patarasuk & Yuan, JPDC 2009),
                    over the slowest link of the TP group (``cost_models.topology``)
==================  ==========================================================  =======================================

T = tokens in the iteration, c = a prefill chunk's new tokens, k = its context already cached, h = hidden size,
q = query heads × head_dim, kv = KV heads × head_dim, f = FFN size; elements × dtype bytes = bytes. Once per
iteration: the embedding lookup, the LM head over one row per scheduled sequence (2·B·h·V FLOPs, V·h/tp weights
read; vLLM computes the logits of each sequence's last token, including a partial prefill chunk's), and the CPU
overhead (scheduling, sampling, input preparation, output processing): a fixed part plus a part per scheduled
sequence, ``iteration_overhead_s + iteration_overhead_per_seq_s × B`` (B = len(plan.request_ids)), the form of
Vidur's measured cpu_overheads (Agrawal et al., MLSys'24), which grow linearly with the batch.

Bandwidth efficiencies by operator family (one efficiency cannot fit them all; Vidur's A100 tables put the residual
add at ~85% of HBM peak, RMSNorm/RoPE/SiLU at ~30-50% and the embedding gather at ~14% with these byte counts):
GEMMs and prefill attention ``bandwidth_eff``; decode attention ``attn_decode_bandwidth_eff``; the residual adds
``add_bandwidth_eff``; norms, RoPE, the MLP activation and the KV-cache save ``norm_bandwidth_eff``; the embedding
lookup ``emb_bandwidth_eff``.

Pipeline parallelism: ``stage_time(plan, s)`` prices one stage — its layers (split as evenly as possible, vLLM's
``get_pp_indices``), the embedding on the first stage, the LM head on the last, and the CPU overhead split between
them: ``CPU_OVERHEAD_FIRST_STAGE`` of it (scheduling and input preparation) on the first stage, the rest (sampling
and output processing) on the last — and ``transfer_time(plan, s)`` the send/recv of the activations (T·h
elements) from stage s to s+1 over the link between them. ``iteration_time(plan)`` is the latency of the whole
micro-batch: every stage plus every transfer (with pp = 1, the one stage). The engine (``simulator.replica``) keeps
up to ``pp`` micro-batches in flight, so throughput follows from the stages while each token still pays them all.

The efficiency constants live in ``RooflineConstants``; their defaults are the values calibrated against measured
profiles (see ``cost_models/calibration.py`` if present), else the stated first estimates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from cost_models.specs import load_device, load_model


@dataclass(frozen=True)
class RooflineConstants:
    """Efficiencies (fractions of peak) and overheads (seconds; ``iteration_overhead_per_seq_s`` per sequence).

    First estimates (used for devices without a calibration, e.g. ``cpu``) and their sources:
      - matmul_compute_eff 0.70: cuBLAS fp16 GEMMs of LLM shapes reach 65-80% of A100 dense peak
        (NVIDIA "Matrix Multiplication Background" guide, 2023, Fig. on A100 GEMM throughput).
      - attn_compute_eff 0.50: FlashAttention-2 forward reaches 50-73% of A100 peak (Dao, ICLR'24 §4.1, Fig. 4);
        the causal, short-sequence shapes of serving sit at the low end.
      - bandwidth_eff 0.80: achievable HBM bandwidth is ~80-90% of the datasheet figure (stream-like copies).
      - attn_decode_bandwidth_eff 0.60: paged decode attention reads scattered 16-token blocks.
      - add_bandwidth_eff 0.80: the residual add is a stream-like copy (two reads, one write), so as bandwidth_eff.
      - norm_bandwidth_eff 0.60: RMSNorm (two passes: variance, then scale), RoPE, SiLU-and-mul and the KV-cache
        save are small kernels that rarely saturate HBM.
      - emb_bandwidth_eff 0.30: the embedding lookup gathers scattered table rows (and, in vLLM's vocab-parallel
        embedding, masks the token ids first), well below stream bandwidth.
      - launch_overhead_s 4 µs per kernel: CUDA kernel launch latency without CUDA graphs.
      - attn_call_overhead_s 10 µs per attention call: the smallest attention kernels in Vidur's A100 tables
        (one decode sequence, a few cached tokens) take 11 µs, far above their roofline time (Agrawal et al.,
        MLSys'24; legacy attention.csv) — metadata setup, split-KV reduction and launch of the attention backend.
      - iteration_overhead_s 0.85 ms + iteration_overhead_per_seq_s 0.039 ms per scheduled sequence: vLLM's CPU
        time per iteration (scheduling, sampling, input preparation, output processing) measured by Vidur on A100
        grows linearly with the batch, 1.15 ms at 8 sequences to 5.8 ms at 128 (Agrawal et al., MLSys'24,
        cpu_overheads.csv); the first estimate is the line through those two points.
    """

    matmul_compute_eff: float = 0.70
    attn_compute_eff: float = 0.50
    bandwidth_eff: float = 0.80
    attn_decode_bandwidth_eff: float = 0.60
    add_bandwidth_eff: float = 0.80
    norm_bandwidth_eff: float = 0.60
    emb_bandwidth_eff: float = 0.30
    launch_overhead_s: float = 4e-6
    attn_call_overhead_s: float = 10e-6
    iteration_overhead_s: float = 0.85e-3
    iteration_overhead_per_seq_s: float = 0.039e-3
    source: str = "first estimates (see RooflineConstants docstring)"

    def to_dict(self) -> dict:
        return asdict(self)


def default_constants(device_name: str | None = None) -> RooflineConstants:
    """Calibrated constants for ``device_name`` when the package ships them, else the first estimates."""
    try:
        from cost_models.calibration import CALIBRATED
    except ImportError:
        return RooflineConstants()
    if device_name and device_name in CALIBRATED:
        return replace(RooflineConstants(), **CALIBRATED[device_name])
    if "default" in CALIBRATED:
        return replace(RooflineConstants(), **CALIBRATED["default"])
    return RooflineConstants()


#: share of the per-iteration CPU overhead paid before the first stage (scheduling + input preparation); the rest
#: (sampling + output processing) follows the last stage. Vidur's A100 cpu_overheads.csv (legacy-e2d00e9) medians:
#: schedule + prepare_inputs_e2e are 11-25% of schedule + sampler_e2e + prepare_inputs_e2e + process_model_outputs
#: at batch 8-128 (0.18 of 1.15 ms at 8, 0.65 of 5.77 ms at 128).
CPU_OVERHEAD_FIRST_STAGE = 0.15


class RooflineCostModel:
    """Prices a ``BatchPlan`` analytically. Units: seconds, FLOPs, bytes.

    Args:
        model: a ModelSpec or a name ``load_model`` knows.
        device: a DeviceSpec or a name ``load_device`` knows.
        tp, pp: tensor- and pipeline-parallel degrees (heads and FFN sharded ``tp`` ways; layers split ``pp`` ways).
        constants: efficiencies and overheads; defaults to ``default_constants(device.name)``.
        placement: where the GPUs sit (``cost_models.topology.place``); default: one node derived from the device.
    Raises:
        SpecError for an unknown model or device; ValueError when heads do not divide by ``tp`` or ``pp`` exceeds
        the layers.
    """

    def __init__(self, model, device, *, tp: int = 1, pp: int = 1, constants: RooflineConstants | None = None,
                 placement=None):
        from cost_models.topology import default_node, place

        self.model = load_model(model)
        self.device = load_device(device)
        m = self.model
        if m.num_attention_heads % tp:
            raise ValueError(f"{m.name}: {m.num_attention_heads} attention heads do not divide by tp={tp}")
        if not 1 <= pp <= m.num_layers:
            raise ValueError(f"{m.name}: pp={pp} must be between 1 and the {m.num_layers} layers")
        self.tp, self.pp = tp, pp
        self.placement = placement or place(default_node(self.device), tp, pp)
        self.c = constants or default_constants(self.device.name)
        self.stage_layers = layers_per_stage(m.num_layers, pp)
        self.layers = m.num_layers / pp           # mean layers per stage (kept for callers that scale by it)
        self.dt = m.dtype_bytes
        self.flops = self.device.flops(m.dtype)
        self.bw = self.device.memory_bandwidth_bytes_per_s
        self.q = m.q_size / tp
        self.kv = max(1, m.num_kv_heads // tp) * m.head_dim
        self.h = m.hidden_size
        self.f = m.intermediate_size / tp
        self.mlp_in = 2 if m.mlp == "gated" else 1
        self.tp_links = [self.placement.tp_link(s) for s in range(pp)]
        self.pp_links = [self.placement.pp_link(s) for s in range(pp - 1)]
        self._linear_cache: dict[int, dict[str, float]] = {}
        self._linear_total: dict[int, float] = {}

    # --- roofline helpers ---------------------------------------------------------------------------------
    def _op(self, flops: float, elements: float, compute_eff: float, bw_eff: float) -> float:
        return max(flops / (self.flops * compute_eff), elements * self.dt / (self.bw * bw_eff)) + self.c.launch_overhead_s

    def _all_reduce(self, tokens: int, stage: int = 0) -> float:
        """One ring all-reduce of ``tokens x hidden`` activations across stage ``stage``'s ``tp`` GPUs (seconds)."""
        if self.tp == 1:
            return 0.0
        link = self.tp_links[stage]
        nbytes = tokens * self.h * self.dt
        return 2 * (self.tp - 1) / self.tp * nbytes / link.bandwidth_bytes_per_s + 2 * (self.tp - 1) * link.latency_s

    def _per_token_ops(self, T: int) -> dict[str, float]:
        """Per-layer seconds of the operators whose cost depends only on the token count ``T`` (cached), with the
        all-reduces of the first stage's TP group."""
        hit = self._linear_cache.get(T)
        if hit is not None:
            return hit
        h, q, kv, f, c = self.h, self.q, self.kv, self.f, self.c
        mm, ew = c.matmul_compute_eff, c.norm_bandwidth_eff
        norm = self._op(4 * T * h, 2 * T * h + h, 1.0, ew)
        ops = {
            "input_layernorm": norm,
            "attn_pre_proj": self._op(2 * T * h * (q + 2 * kv), h * (q + 2 * kv) + T * (h + q + 2 * kv), mm, c.bandwidth_eff),
            "attn_rope": self._op(6 * T * (q + kv), 2 * T * (q + kv), 1.0, ew),
            "attn_kv_cache_save": self._op(0, 2 * T * 2 * kv, 1.0, ew),
            "attn_post_proj": self._op(2 * T * q * h, q * h + T * (q + h), mm, c.bandwidth_eff),
            "post_attention_layernorm": norm,
            "mlp_up_proj": self._op(2 * T * h * self.mlp_in * f, h * self.mlp_in * f + T * (h + self.mlp_in * f), mm, c.bandwidth_eff),
            "mlp_act": self._op(5 * T * f, T * (self.mlp_in + 1) * f, 1.0, ew),
            "mlp_down_proj": self._op(2 * T * f * h, f * h + T * (f + h), mm, c.bandwidth_eff),
            "add": self._op(2 * T * h, 6 * T * h, 1.0, c.add_bandwidth_eff),
            # after the O projection and after the MLP down projection (one, after both, for a parallel block)
            "all_reduce": self.model.layer_all_reduces * self._all_reduce(T),
        }
        if self.model.layer_norms == 1:
            del ops["post_attention_layernorm"]
        if len(self._linear_cache) < 65536:
            self._linear_cache[T] = ops
        return ops

    def _all_gather(self, nbytes: float, stage: int) -> float:
        if self.tp == 1:
            return 0.0
        link = self.tp_links[stage]
        return (self.tp - 1) / self.tp * nbytes / link.bandwidth_bytes_per_s + (self.tp - 1) * link.latency_s

    def _per_token_total(self, T: int) -> float:
        """Sum of ``_per_token_ops(T)`` (cached): the hot path of ``iteration_time``."""
        total = self._linear_total.get(T)
        if total is None:
            total = sum(self._per_token_ops(T).values())
            if len(self._linear_total) < 65536:
                self._linear_total[T] = total
        return total

    def _attention(self, plan) -> dict[str, float]:
        """Per-layer seconds of decode and prefill attention of ``plan``."""
        q, kv, c = self.q, self.kv, self.c
        out = {}
        d = plan.num_decodes
        if d:
            ctx = sum(plan.context_lens[:d]) + d
            out["attn_decode"] = (self._op(4 * q * ctx, ctx * 2 * kv + d * 2 * q, c.attn_compute_eff,
                                           c.attn_decode_bandwidth_eff) + c.attn_call_overhead_s)
        if d < len(plan.num_new_tokens):
            flops = elems = 0.0
            for n, k in zip(plan.num_new_tokens[d:], plan.context_lens[d:]):
                flops += 4 * q * n * (k + (n + 1) / 2)
                elems += 2 * n * q + (k + n) * 2 * kv
            out["attn_prefill"] = self._op(flops, elems, c.attn_compute_eff, c.bandwidth_eff) + c.attn_call_overhead_s
        return out

    def _first_stage_ops(self, T: int, B: int) -> dict[str, float]:
        c = self.c
        return {"emb": self._op(0, 2 * T * self.h, 1.0, c.emb_bandwidth_eff),
                "cpu_overhead": c.iteration_overhead_s + c.iteration_overhead_per_seq_s * B}

    def _cpu_split(self, cpu: float, stage: int) -> float:
        """The part of ``cpu`` seconds of CPU overhead stage ``stage`` pays (all of it with one stage)."""
        if self.pp == 1:
            return cpu
        return (cpu * CPU_OVERHEAD_FIRST_STAGE if stage == 0 else 0.0) + \
            (cpu * (1 - CPU_OVERHEAD_FIRST_STAGE) if stage == self.pp - 1 else 0.0)

    def _last_stage_ops(self, B: int) -> dict[str, float]:
        V, h, tp, c = self.model.vocab_size, self.h, self.tp, self.c
        return {"lm_head": self._op(2 * B * h * V / tp, h * V / tp + B * V / tp, c.matmul_compute_eff,
                                    c.bandwidth_eff) + self._all_gather(B * V * self.dt, self.pp - 1)}

    def _stage_extra(self, T: int, stage: int) -> float:
        """Per-layer seconds a stage's all-reduce link adds over the first stage's (0 when they are the same)."""
        if self.tp == 1 or self.tp_links[stage] == self.tp_links[0]:
            return 0.0
        return self.model.layer_all_reduces * (self._all_reduce(T, stage) - self._all_reduce(T, 0))

    def describe(self) -> dict:
        """Provenance: the model kind, the device and where its constants come from."""
        return {"kind": "roofline", "device": self.device.name, "constants": self.c.source,
                "calibrated": not self.c.source.startswith("first estimates")}

    # --- CostModel protocol --------------------------------------------------------------------------------
    def breakdown(self, plan) -> dict[str, float]:
        """Seconds per operator for the whole micro-batch (all layers of all stages, plus once-per-iteration
        operators and ``send_recv`` between stages); the values add up to ``iteration_time(plan)``."""
        T = sum(plan.num_new_tokens)
        if T == 0:
            return {}
        L = self.model.num_layers
        out = {k: v * L for k, v in self._per_token_ops(T).items()}
        if self.tp > 1:
            out["all_reduce"] += sum(n * self._stage_extra(T, s) for s, n in enumerate(self.stage_layers))
        out.update({k: v * L for k, v in self._attention(plan).items()})
        B = len(plan.num_new_tokens)
        out.update(self._first_stage_ops(T, B))
        out.update(self._last_stage_ops(B))
        if self.pp > 1:
            out["send_recv"] = sum(self.transfer_time(plan, s) for s in range(self.pp - 1))
        return out

    def stage_time(self, plan, stage: int) -> float:
        """Seconds stage ``stage`` (0-based) spends on ``plan``: its layers, plus the embedding on the first stage,
        the LM head on the last, and their shares of the CPU overhead."""
        T = sum(plan.num_new_tokens)
        if T == 0:
            return 0.0
        layer = self._per_token_total(T) + sum(self._attention(plan).values()) + self._stage_extra(T, stage)
        t = self.stage_layers[stage] * layer
        B = len(plan.num_new_tokens)
        first = self._first_stage_ops(T, B)
        if stage == 0:
            t += first["emb"]
        if stage == self.pp - 1:
            t += sum(self._last_stage_ops(B).values())
        return t + self._cpu_split(first["cpu_overhead"], stage)

    def transfer_time(self, plan, stage: int) -> float:
        """Seconds to send the activations (T x hidden elements) from stage ``stage`` to ``stage + 1``."""
        T = sum(plan.num_new_tokens)
        if T == 0 or stage >= self.pp - 1:
            return 0.0
        return self.pp_links[stage].transfer_s(T * self.h * self.dt)

    def iteration_time(self, plan) -> float:
        """Seconds from the start of ``plan`` on the first stage to its tokens on the last: every stage plus every
        transfer (equals the sum of ``breakdown``)."""
        T = sum(plan.num_new_tokens)
        if T == 0:
            return 0.0
        if self.pp == 1:
            B = len(plan.num_new_tokens)
            return (self.stage_layers[0] * (self._per_token_total(T) + sum(self._attention(plan).values()))
                    + sum(self._first_stage_ops(T, B).values()) + sum(self._last_stage_ops(B).values()))
        return sum(self.stage_time(plan, s) for s in range(self.pp)) + \
            sum(self.transfer_time(plan, s) for s in range(self.pp - 1))


def layers_per_stage(num_layers: int, pp: int) -> tuple[int, ...]:
    """Decoder layers of each pipeline stage, as even as possible; extra layers go to the stages before the last
    (vLLM 0.32 ``vllm/distributed/utils.py`` ``get_pp_indices``)."""
    base, extra = divmod(num_layers, pp)
    parts = [base] * pp
    for i in range(2, extra + 2):
        parts[-i] += 1
    return tuple(parts)
